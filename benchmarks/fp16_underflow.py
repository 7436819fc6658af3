"""How much of a Phase 1 step's table gradient float16 compute flushes to zero, with and without loss scaling.

    python -m benchmarks.fp16_underflow [--model=../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--steps=1x256,4x256] [--out=docs/results/fp16_underflow.md]

On the real SmolLM2-135M (its GGUF file, dequantized to float32, tied table) and the first
tokens of the Wake, one Phase 1 step (wake2vec.training.train.make_train_step, --remat=none)
is taken three ways: float32 compute (the reference), float16 compute unscaled
(--loss_scale=none) and float16 compute scaled (--loss_scale=dynamic, the scale at its
initial 2^15). The step's optimiser is a probe that keeps the table gradient it receives
(after the step's own unscaling) as its state, so the figures are of exactly the gradient
an optimiser sees. For each float16 gradient: the share of the entries nonzero in float32
that are zero in float16 (flushed), and the relative error ||g16 - g32|| / ||g32||.
Writes the markdown table to --out and the figures as JSON beside it.
"""

from __future__ import annotations

import json
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from wake2vec.config import TrainConfig
from wake2vec.models import convert, gguf_model
from wake2vec.training import loss_scale, optim, train

_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
_MODEL = flags.DEFINE_string("model", str(_DATA / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"), "Llama .gguf file")
_CORPUS = flags.DEFINE_string("corpus", str(_DATA / "finnegans_wake.txt"), "text whose first tokens make the blocks")
_STEPS = flags.DEFINE_list("steps", ["1x256", "4x256"], "step shapes, microbatches x tokens per block")
_OUT = flags.DEFINE_string("out", "docs/results/fp16_underflow.md", "markdown report; the JSON goes beside it")


def gradient_probe() -> optax.GradientTransformation:
    """Updates nothing; its state is the last table gradient it was given."""
    return optax.GradientTransformation(
        lambda params: jnp.zeros_like(params["embedding"]),
        lambda grads, state, params=None: (jax.tree_util.tree_map(jnp.zeros_like, grads), grads["embedding"]))


def table_gradient(model_cfg, trainable, frozen, batch, compute_dtype: str, scale: str) -> tuple[np.ndarray, float]:
    """(the step's table gradient, seconds of the step including its compile)."""
    cfg = TrainConfig(compute_dtype=compute_dtype, loss_scale=scale, remat="none", loss_chunk=1024)
    tx = loss_scale.dynamic(gradient_probe()) if loss_scale.active(scale, compute_dtype) else gradient_probe()
    step = jax.jit(train.make_train_step(tx, optax.constant_schedule(0.0), train.settings_for(cfg, model_cfg)))
    started = time.perf_counter()
    state, metrics = jax.block_until_ready(step(train.init_state(trainable, frozen, tx), frozen, batch))
    if not bool(metrics["finite"]) or bool(metrics.get("skipped", False)):
        raise RuntimeError(f"{compute_dtype}/{scale}: the step was not finite or was skipped")
    probe = state.opt_state.inner if isinstance(state.opt_state, loss_scale.ScaledState) else state.opt_state
    return np.asarray(probe, np.float64), time.perf_counter() - started


def _figures(reference: np.ndarray, other: np.ndarray) -> dict:
    nonzero = reference != 0
    return {"flushed_share": float(np.sum(nonzero & (other == 0)) / np.sum(nonzero)),
            "relative_error": float(np.linalg.norm(other - reference) / np.linalg.norm(reference))}


def compare(reference: np.ndarray, other: np.ndarray, absent: np.ndarray) -> dict:
    """The figures over the whole table, and over the rows absent from the step's blocks: those
    get only the softmax's small push-down, which is all most new Wake rows ever get."""
    return {**_figures(reference, other), "absent_rows": _figures(reference[absent], other[absent])}


def main(argv):
    del argv
    cpu_started = time.process_time()
    model_cfg, params = convert.load_hf(_MODEL.value)
    trainable, frozen = optim.split_params(params)
    tokenizer = gguf_model.load_tokenizer(_MODEL.value)
    text = pathlib.Path(_CORPUS.value).read_text(encoding="utf-8")[:40_000]
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    rows = []
    for shape in _STEPS.value:
        accum, length = (int(x) for x in shape.split("x"))
        # Blocks of length + 1 tokens give `length` predictions each.
        batch = jnp.asarray(ids[: accum * (length + 1)].reshape(accum, 1, length + 1))
        reference, ref_s = table_gradient(model_cfg, trainable, frozen, batch, "float32", "none")
        absent = np.ones(reference.shape[0], bool)
        absent[np.asarray(batch).ravel()] = False
        row = {"step": shape, "absent_rows": int(absent.sum()), "tokens": accum * length, "nonzero_fp32": int(np.sum(reference != 0)),
               "entries": int(reference.size), "seconds": {"float32": ref_s}}
        for scale in loss_scale.CHOICES:
            gradient, seconds = table_gradient(model_cfg, trainable, frozen, batch, "float16", scale)
            row[scale] = compare(reference, gradient, absent)
            row["seconds"][f"float16_{scale}"] = seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
    cpu_s = time.process_time() - cpu_started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    command = "python -m benchmarks.fp16_underflow " + " ".join(sys.argv[1:])
    out = pathlib.Path(_OUT.value)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "cpu_s": cpu_s, "device": str(jax.devices()[0]),
                                                    "model": pathlib.Path(_MODEL.value).name, "rows": rows}, indent=1) + "\n")
    lines = [
        "# float16 compute: the table gradient's underflow, with and without loss scaling",
        "",
        f"`{command.strip()}` on {jax.devices()[0].platform.upper()} ({cpu_s:.0f} CPU-seconds in all,"
        f" peak RSS {usage.ru_maxrss / 1e6:.1f} GB); figures also in [fp16_underflow.json](fp16_underflow.json).",
        "",
        f"One Phase 1 step on {pathlib.Path(_MODEL.value).name} (dequantized to float32, tied 49,152 x 576 table), "
        "blocks from the start of the Wake, `--remat=none`. Reference: the same step in float32 compute. "
        "*Flushed*: the share of the table-gradient entries nonzero in float32 that are exactly zero in float16. "
        "*Error*: ||g16 - g32|| / ||g32||. *Scaled* is `--loss_scale=dynamic` at its initial scale 2^15 "
        "(with the logit gradient scaled before its float16 cast); *unscaled* is `--loss_scale=none`, "
        "the step as it was before loss scaling. *Absent rows*: the figures over the table rows whose "
        "token is in none of the step's blocks, which get only the softmax's push-down (most new Wake rows, most steps).",
        "",
        "| step (microbatches x tokens) | rows | flushed, unscaled | flushed, scaled | error, unscaled | error, scaled |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for label, none, dynamic in (("all", row["none"], row["dynamic"]),
                                     (f"{row['absent_rows']:,} absent", row["none"]["absent_rows"], row["dynamic"]["absent_rows"])):
            lines.append(f"| {row['step']} | {label} | {none['flushed_share']:.3%} | {dynamic['flushed_share']:.3%} "
                         f"| {none['relative_error']:.3g} | {dynamic['relative_error']:.3g} |")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    app.run(main)
