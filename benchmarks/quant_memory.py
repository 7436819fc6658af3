"""What a quantized frozen body (--frozen_dtype=int8 | nf4) saves, and what it costs in loss.

    python -m benchmarks.quant_memory [--out_dir=docs/quant] [--loss=true]

Memory: the Phase 1 step (benchmarks.base_memory.step_memory: the real train step under
TrainConfig's defaults, the study's recipe: tied table, batch 1 x 16 accumulated 256-token
blocks, Adafactor, full remat, float32 compute) compiled on abstract shapes only (nothing
allocated), its XLA memory_analysis() read for a float32, bfloat16, int8 and nf4 body, at
TinyLlama-1.1B's and Llama-3.1-8B's shapes with the whole 44,990-word lexicon added to the
vocabulary (an upper bound on the rows; words already in a vocabulary add none). Each step
is compiled twice, as base_memory does: with XLA's default passes, and with
while-loop-invariant-code-motion off (what a backend that does not hoist the per-layer
dequantization out of the layer loop would allocate). The layer loop is compiled once
whatever the layer count, so the 8B shape compiles in seconds at its full 32 layers.

Loss: the mean next-token loss of SmolLM2-135M-Instruct (its GGUF file, read by
convert.load_hf as a run reads it, prepare.read_frozen_body per format) on the first 16
256-token blocks of the Wake after "riverrun", tokenized by the model's own tokenizer, with
the body stored in each format and the table float32. The file is itself Q4_1: its
dequantized float32 weights are the reference, and int8 / nf4 quantize those.

Writes out_dir/quant_memory.json (every figure) and out_dir/quant_memory.md (the tables).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import base_memory
from wake2vec import convert, data, prepare, quant, train, vocab
from wake2vec.config import TrainConfig

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/quant", "Folder for quant_memory.json and quant_memory.md")
_LOSS = flags.DEFINE_bool("loss", True, "Also measure the SmolLM2 loss per format (reads --gguf and --corpus)")
_GGUF = flags.DEFINE_string("gguf", str(_SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"), "SmolLM2 model file")
_CORPUS = flags.DEFINE_string("corpus", str(_SHARED / "finnegans_wake.txt"), "The Wake's text")

FORMATS = ("float32", "bfloat16") + quant.FORMATS
SHAPES = ("tinyllama-1.1b", "llama-3.1-8b")
BLOCKS, SEQ_LEN = 16, 256
GIB = 1024**3


def memory_rows() -> list[dict]:
    rows = []
    bases = {b.name: b for b in base_memory.BASES}
    for name in SHAPES:
        base = bases[name]
        train_cfg = TrainConfig()
        grown = base.cfg.replace(vocab_size=base.tokenizer_size + base_memory.LEXICON_WORDS,
                                 tie_word_embeddings=train_cfg.tie_embeddings)
        for fmt in FORMATS:
            mem = base_memory.step_memory(grown, base.tokenizer_size, dataclasses.replace(train_cfg, frozen_dtype=fmt))
            rows.append({"shape": name, "frozen_dtype": fmt, "vocab": grown.vocab_size, **mem})
            print(f"{name} {fmt}: body {mem['frozen_bytes'] / GIB:.2f} GiB, peak {mem['peak_bytes'] / GIB:.2f} GiB "
                  f"(per-layer {mem['peak_bytes_per_layer_converts'] / GIB:.2f})", flush=True)
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


def render(memory: list[dict], losses: list[dict], backend: str) -> str:
    card = base_memory.CARDS["T4 16 GB"] * base_memory.HEADROOM
    lines = [
        "<!-- written by `python -m benchmarks.quant_memory`; do not edit by hand -->",
        f"Phase 1 step, XLA memory_analysis() on the {backend} backend (TrainConfig defaults: tied table, "
        f"1 x 16 blocks of 256, Adafactor, full remat, fp32 compute), vocabulary + 44,990 rows. Peak = arguments "
        f"+ outputs + temporaries - aliased; per-layer: while-loop-invariant-code-motion off. T4: peak <= "
        f"{card:.1f} GiB (90% of 15 GiB); 'maybe' when only the per-layer peak fits.",
        "",
        "| shape | frozen body | body | table + Adafactor state | step: arguments | temporaries | peak "
        "| peak, per-layer | T4 16 GB |",
        "|:--|:--|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for r in memory:
        state = r["arguments_bytes"] - r["frozen_bytes"]
        peak, low = r["peak_bytes"] / GIB, r["peak_bytes_per_layer_converts"] / GIB
        fits = "yes" if peak <= card else "maybe" if low <= card else "no"
        lines.append(
            f"| {r['shape']} | {r['frozen_dtype']} | {r['frozen_bytes'] / GIB:.2f} GiB | {state / GIB:.2f} GiB | "
            f"{r['arguments_bytes'] / GIB:.2f} GiB | {r['temp_bytes'] / GIB:.2f} GiB | {peak:.2f} GiB | "
            f"{low:.2f} GiB | {fits} |")
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
