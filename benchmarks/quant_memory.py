"""What a quantized frozen body (--frozen_dtype=int8 | nf4) saves, and what it costs in loss.

    python -m benchmarks.quant_memory [--out_dir=docs/quant] [--loss=true]

Memory: the real train steps compiled on abstract shapes only (nothing allocated), their
XLA memory_analysis() read for a float32, bfloat16, int8 and nf4 body, at TinyLlama-1.1B's
and Llama-3.1-8B's shapes with the whole 44,990-word lexicon added to the vocabulary (an
upper bound on the rows; words already in a vocabulary add none), the table tied:

* Phase 1 (benchmarks.base_memory.step_memory): TrainConfig's defaults, the study's recipe:
  the table trains, batch 1 x 16 accumulated 256-token blocks, Adafactor, full remat,
  float32 compute.
* Phase 2 (phase2_step_memory): Phase2Config's defaults, the study's recipe: LoRA r 8,
  alpha 16, dropout 0.1 on q/k/v/gate/up/down, AdamW, full remat, bfloat16 compute, over
  the frozen float32 table; batch x accumulation x tokens 8 x 2 x 256 for TinyLlama (the
  study's TinyLlama runs), 4 x 4 x 512 for the 8B shape (its 1B/8B-class runs).

Each step is compiled twice, as base_memory does: with XLA's default passes, and with
while-loop-invariant-code-motion off (what a backend that does not hoist the per-layer
converts or dequantization out of the layer loop would allocate). The layer loop is
compiled once whatever the layer count, so the 8B shape compiles in seconds at its full
32 layers.

Loss: the mean next-token loss of SmolLM2-135M-Instruct (its GGUF file, read by
convert.load_hf as a run reads it, prepare.read_frozen_body per format) on the first 16
256-token blocks of the Wake after "riverrun", tokenized by the model's own tokenizer, with
the body stored in each format and the table float32. The file is itself Q4_1: its
dequantized float32 weights are the reference, and int8 / nf4 quantize those.

Writes out_dir/quant_memory.json (every figure) and out_dir/quant_memory.md (the tables).
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import base_memory
from wake2vec.models import convert, lora, quant
from wake2vec.training import data, optim, train
from wake2vec.phases import phase2, prepare
from wake2vec.tokens import vocab
from wake2vec.config import ModelConfig, Phase2Config, TrainConfig, dtype_from_name

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/quant", "Folder for quant_memory.json and quant_memory.md")
_LOSS = flags.DEFINE_bool("loss", True, "Also measure the SmolLM2 loss per format (reads --gguf and --corpus)")
_GGUF = flags.DEFINE_string("gguf", str(_SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2 model file")
_CORPUS = flags.DEFINE_string("corpus", str(_SHARED / "finnegans_wake.txt"), "The Wake's text")

FORMATS = ("float32", "bfloat16") + quant.FORMATS
SHAPES = ("tinyllama-1.1b", "llama-3.1-8b")
BLOCKS, SEQ_LEN = 16, 256
GIB = 1024**3


PHASES = (1, 2)
# The study's Phase 2 (batch, accumulation, tokens): TinyLlama's runs, and its 1B/8B-class runs.
PHASE2_BATCH = {"tinyllama-1.1b": (8, 2, 256), "llama-3.1-8b": (4, 4, 512)}


def phase2_step_memory(cfg: ModelConfig, base_size: int, p2_cfg: Phase2Config, seq_len: int) -> dict:
    """XLA's memory analysis of the compiled Phase 2 step (adapters train; body, table and an
    untied head frozen, as phase2.prepare_phase2 and loop.train_job build it), nothing allocated."""
    rows = base_memory.padded_rows(cfg)
    body = base_memory.abstract_body(cfg, p2_cfg.frozen_dtype)
    tables = {"embedding": jax.ShapeDtypeStruct((rows, cfg.hidden_size), jnp.float32)}
    if not cfg.tie_word_embeddings:
        tables["lm_head"] = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size, rows), jnp.float32)}
    spec = phase2.lora_spec(p2_cfg)
    trainable = {"lora": lora.adapter_shapes(cfg, spec)}
    schedule = optim.make_schedule(p2_cfg)
    tx = optim.make_optimizer(p2_cfg, base_size, cfg.vocab_size, schedule, trainable_keys=tuple(trainable))
    settings = train.StepSettings(cfg, dtype_from_name(p2_cfg.compute_dtype), p2_cfg.remat, p2_cfg.loss_chunk,
                                  lora=spec, seed=p2_cfg.seed)
    batch_shape = (p2_cfg.grad_accum, p2_cfg.batch_size, seq_len)
    return {
        "table_rows_padded": rows,
        "frozen_bytes": base_memory.tree_bytes(body),
        "table_bytes": base_memory.tree_bytes(tables),
        "adapter_bytes": base_memory.tree_bytes(trainable),
        **base_memory.compiled_memory(tx, schedule, settings, trainable, {**body, **tables}, batch_shape),
    }


def phase_memory(phase: int, name: str, grown: ModelConfig, base_size: int, fmt: str) -> dict:
    """One row: the phase's step at this shape with this body, and the batch it was compiled for."""
    if phase == 1:
        cfg = TrainConfig(frozen_dtype=fmt)
        return {"batch": [cfg.batch_size, cfg.grad_accum, cfg.seq_len], "compute_dtype": cfg.compute_dtype,
                **base_memory.step_memory(grown, base_size, cfg)}
    batch, accum, seq_len = PHASE2_BATCH[name]
    cfg = Phase2Config(frozen_dtype=fmt, batch_size=batch, grad_accum=accum)
    return {"batch": [batch, accum, seq_len], "compute_dtype": cfg.compute_dtype,
            **phase2_step_memory(grown, base_size, cfg, seq_len)}


def memory_rows() -> list[dict]:
    rows = []
    bases = {b.name: b for b in base_memory.BASES}
    for phase in PHASES:
        for name in SHAPES:
            base = bases[name]
            grown = base.cfg.replace(vocab_size=base.tokenizer_size + base_memory.LEXICON_WORDS,
                                     tie_word_embeddings=TrainConfig().tie_embeddings)
            for fmt in FORMATS:
                mem = phase_memory(phase, name, grown, base.tokenizer_size, fmt)
                rows.append({"phase": phase, "shape": name, "frozen_dtype": fmt, "vocab": grown.vocab_size, **mem})
                print(f"phase {phase} {name} {fmt}: body {mem['frozen_bytes'] / GIB:.2f} GiB, peak "
                      f"{mem['peak_bytes'] / GIB:.2f} GiB (per-layer "
                      f"{mem['peak_bytes_per_layer_converts'] / GIB:.2f}), compile {mem['compile_cpu_s']} CPU-s",
                      flush=True)
    return rows


def loss_rows(gguf: str, corpus: str) -> list[dict]:
    model_cfg, params = convert.load_hf(gguf, as_numpy=True)
    trainable = {"embedding": jnp.asarray(params["embedding"])}
    tokenizer = vocab.load_base_tokenizer(gguf)
    text = data.read_corpus(corpus, start_marker="riverrun")
    blocks = data.make_blocks(data.tokenize_corpus(tokenizer, text[: 40 * BLOCKS * SEQ_LEN]), SEQ_LEN)[:BLOCKS]
    if len(blocks) < BLOCKS:
        raise ValueError(f"{corpus} gave only {len(blocks)} blocks of {SEQ_LEN} tokens")
    settings = train.StepSettings(model_cfg, jnp.float32, "none", 1024)
    step = jax.jit(lambda t, f, ids, w: train.loss_sum_and_count(t, f, ids, w, settings))
    rows = []
    for fmt in FORMATS:
        frozen = jax.tree_util.tree_map(jnp.asarray, prepare.read_frozen_body(pathlib.Path(gguf), fmt))
        total = count = 0.0
        for batch in np.split(blocks, 4):
            loss_sum, n = step(trainable, frozen, jnp.asarray(batch), jnp.ones(len(batch), jnp.float32))
            total, count = total + float(loss_sum), count + float(n)
        rows.append({"frozen_dtype": fmt, "mean_loss": total / count, "predictions": int(count)})
        print(f"SmolLM2 {fmt}: mean loss {total / count:.6f} over {int(count)} predictions", flush=True)
    by_fmt = {r["frozen_dtype"]: r["mean_loss"] for r in rows}
    for r in rows:
        r["minus_bfloat16"] = r["mean_loss"] - by_fmt["bfloat16"]
        r["minus_float32"] = r["mean_loss"] - by_fmt["float32"]
    return rows


# Per phase: what the step's table describes, and what its arguments hold besides the body.
PHASE_TITLES = {
    1: ("Phase 1 step (TrainConfig defaults: the tied table trains, 1 x 16 blocks of 256, Adafactor, full remat, "
        "fp32 compute)", "table + Adafactor state"),
    2: ("Phase 2 step (Phase2Config defaults: LoRA r 8 alpha 16 on q/k/v/gate/up/down, AdamW, full remat, bf16 "
        "compute, over the frozen fp32 tied table; batch x accumulation x tokens: {batches})",
        "frozen table + adapters + AdamW state"),
}
# What a phase's figures owe to the CPU compiler (checked on its compiled HLO and by the variants named).
PHASE_NOTES = {
    2: "The CPU compiler runs every bf16 dot in f32 (this step's compiled HLO holds no bf16 dot), so with a bf16 "
       "body it converts the whole stacked body to f32 ahead of the layer loop even under bf16 compute: the bf16 "
       "rows' default peak carries an f32 copy of the body. A GPU with bf16 matmuls has no such convert; a T4 "
       "(no bf16 matmul units) runs bf16 dots in f32 as well (openxla/xla#12429), so its figure lies between the "
       "two columns. For the other bodies the gap between the columns is smaller hoisted temporaries: the "
       "adapters' dropout and the bf16 casts (BUILD.md has the variants that tell them apart).",
}


def memory_table(rows: list[dict], phase: int, backend: str, card: float) -> list[str]:
    title, rest = PHASE_TITLES[phase]
    rows = [r for r in rows if r["phase"] == phase]
    batches = ", ".join(dict.fromkeys(f"{r['shape']} {' x '.join(map(str, r['batch']))}" for r in rows))
    lines = [
        f"{title.format(batches=batches)}, XLA memory_analysis() on the {backend} backend, vocabulary + 44,990 rows. "
        f"Peak = arguments + outputs + temporaries - aliased; per-layer: while-loop-invariant-code-motion off. "
        f"T4: peak <= {card:.1f} GiB (90% of 15 GiB); 'maybe' when only the per-layer peak fits.",
        "",
        f"| shape | frozen body | body | {rest} | step: arguments | outputs | temporaries | peak "
        "| peak, per-layer | T4 16 GB |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for r in rows:
        state = r["arguments_bytes"] - r["frozen_bytes"]
        peak, low = r["peak_bytes"] / GIB, r["peak_bytes_per_layer_converts"] / GIB
        fits = "yes" if peak <= card else "maybe" if low <= card else "no"
        lines.append(
            f"| {r['shape']} | {r['frozen_dtype']} | {r['frozen_bytes'] / GIB:.2f} GiB | {state / GIB:.2f} GiB | "
            f"{r['arguments_bytes'] / GIB:.2f} GiB | {r['outputs_bytes'] / GIB:.2f} GiB | "
            f"{r['temp_bytes'] / GIB:.2f} GiB | {peak:.2f} GiB | {low:.2f} GiB | {fits} |")
    return lines + (["", PHASE_NOTES[phase]] if phase in PHASE_NOTES else [])


def render(memory: list[dict], losses: list[dict], backend: str) -> str:
    card = base_memory.CARDS["T4 16 GB"] * base_memory.HEADROOM
    lines = ["<!-- written by `python -m benchmarks.quant_memory`; do not edit by hand -->"]
    for phase in PHASES:
        lines += memory_table(memory, phase, backend, card) + [""]
    lines.pop()
    if losses:
        lines += [
            "",
            f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized = the float32 reference), mean next-token loss over "
            f"{losses[0]['predictions']:,} predictions ({BLOCKS} blocks of {SEQ_LEN} Wake tokens after 'riverrun'), "
            "fp32 compute, fp32 table:",
            "",
            "| frozen body | mean loss | vs bfloat16 | vs float32 |",
            "|:--|--:|--:|--:|",
        ]
        lines += [f"| {r['frozen_dtype']} | {r['mean_loss']:.5f} | {r['minus_bfloat16']:+.5f} | "
                  f"{r['minus_float32']:+.5f} |" for r in losses]
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    memory = memory_rows()
    losses = loss_rows(_GGUF.value, _CORPUS.value) if _LOSS.value else []
    backend = jax.default_backend()
    out = pathlib.Path(_OUT_DIR.value)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_memory.md").write_text(render(memory, losses, backend), encoding="utf-8")
    (out / "quant_memory.json").write_text(
        json.dumps({"backend": backend, "memory": memory, "smollm2_loss": losses}, indent=2) + "\n")
    print(f"wrote {out / 'quant_memory.md'} and {out / 'quant_memory.json'}")


if __name__ == "__main__":
    app.run(main)
