"""--init=distill on SmolLM2-135M: its cost, and what each output-side choice does, on held-out text.

    python -m benchmarks.distill_smollm2 [--words=16] [--out=docs/results/distill]

Writes OUT.json and OUT.md. It distils `--words` whole_word rows (a seeded sample of the new
words that occur both in the first 90% of the Wake, where their contexts are taken, and in the
last 10%, where they are judged) with the default settings, twice: output `input` (the
distilled row is also the tied output row) and `joint` (the hidden-state MSE plus 0.1 x the
new token's next-token loss). Then, on the held-out contexts, for the starting rows
(`subword_mean`), both distilled sets, and the base model spelling the word with its old pieces:

* MSE: the distillation objective (last layer, at the word and the tokens after it);
* word nats: the nats to produce the word at its place (the new token, over the full injected
  vocabulary of 98,137 rows with every other new row at subword_mean; for the base model, the
  sum over its pieces, over its own vocabulary): the output side;
* next nats: the nats of the up to 8 tokens after the word: the input side as a language model.

It also states the cost: the measured CPU rate, the hours for all new rows, and by FLOP count
the cost for TinyLlama's 44,500 rows on a T4 and an H100 (an estimate, not a measurement).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from wake2vec.models import convert, model
from wake2vec.phases import distill, prepare
from wake2vec.tokens import vocab

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# TinyLlama-1.1B's config.json (hidden, intermediate, layers, heads, kv heads) and its new rows.
TINYLLAMA = dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, new_rows=44_500)
# Dense bf16/fp16 peaks (T4: 65 TFLOP/s fp16 tensor cores; H100 SXM: 989 TFLOP/s bf16), at an
# assumed 40% of peak: the step is small matmuls over short windows.
PEAKS = {"T4": 65e12, "H100": 989e12}
ASSUMED_MFU = 0.4

_WORDS = flags.DEFINE_integer("words", 16, "new rows distilled (one batch of this many words)")
_OUT = flags.DEFINE_string("out", "docs/results/distill", "output path without suffix (.json and .md are written)")


def body_params(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int) -> int:
    """Weights a token's pass multiplies by: attention and MLP kernels (norms are negligible)."""
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return layers * (attention + 3 * hidden * intermediate)


def flops_per_row(params: int, settings: distill.Settings) -> float:
    """Student passes of one row: steps x C windows of P+1+S tokens, forward + backward (3 x 2 x params)."""
    tokens = settings.contexts * (settings.prefix_tokens + 1 + settings.suffix_tokens)
    return settings.steps * tokens * 6.0 * params


def _pick(tok, forms, train: str, held_out: str, n: int, settings: distill.Settings):
    """n forms with a clean context in both parts, drawn with seed 0; their contexts in each part."""
    candidates = [i for i, f in enumerate(forms) if f.word in held_out and f.word in train]
    order = np.random.default_rng(0).permutation(len(candidates))
    chosen, train_ctx, held_ctx = [], [], []
    for j in order:
        form = forms[candidates[j]]
        a = distill.build_contexts(tok, [form], [train], settings)
        b = distill.build_contexts(tok, [form], [held_out], settings)
        if a.from_training[0] and b.from_training[0]:
            chosen.append(candidates[j])
            train_ctx.append(a)
            held_ctx.append(b)
        if len(chosen) == n:
            break

    def stack(parts):
        return distill.Contexts(*(np.concatenate([getattr(p, f.name) for p in parts])
                                  for f in dataclasses.fields(distill.Contexts)))
    return chosen, stack(train_ctx), stack(held_ctx)


def held_out_costs(cfg, frozen, base, new_rows, chosen, rows_by_name: dict, ctx, settings) -> dict:
    """name -> per-word means over the held-out contexts of MSE, word nats and next nats, for
    each set of rows and for the base model spelling the word ("base model, old spelling")."""
    p, k, s = settings.prefix_tokens, settings.max_spelling, settings.suffix_tokens
    n, c = ctx.prefix.shape[:2]
    ids_new = base.shape[0] + np.asarray(chosen)
    (t_ids, t_valid), (s_ids, s_valid), weight = distill.layouts(ctx, settings, ids_new)

    @jax.jit
    def nll(table, ids, valid):
        hidden, per_layer = distill.residual_streams(cfg, {**frozen, "embedding": table}, ids, valid)
        logits = model.logits_from_hidden(cfg.replace(vocab_size=table.shape[0], tie_word_embeddings=True),
                                          {"embedding": table}, hidden)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0], per_layer[-1]

    in_use = weight[:, :, 0] > 0  # (n, c)
    use = in_use & (ctx.prefix_len > 0)  # the word's own nats need a real token before it
    suffix_valid = np.arange(s)[None, None] < ctx.suffix_len[..., None]

    def per_word(values, mask):
        return np.sum(values * mask, axis=1) / np.maximum(mask.sum(axis=1), 1)

    def summary(mse, word, after):
        next_nats = np.sum(np.where(suffix_valid, after, 0.0), axis=2)
        return {"mse": per_word(mse, in_use), "word_nats": per_word(word, use), "next_nats": per_word(next_nats, use),
                "contexts": int(use.sum())}

    loss, teacher = nll(jnp.asarray(base), jnp.asarray(t_ids), jnp.asarray(t_valid))
    loss, teacher = np.asarray(loss).reshape(n, c, -1), np.asarray(teacher)[:, p + k - 1:]
    spell_valid = t_valid.reshape(n, c, -1)[:, :, p:p + k]
    out = {}
    for name, rows in rows_by_name.items():
        table = np.concatenate([base, new_rows])
        table[ids_new] = rows
        student, hidden = nll(jnp.asarray(table), jnp.asarray(s_ids), jnp.asarray(s_valid))
        err = np.mean((np.asarray(hidden)[:, p:] - teacher) ** 2, axis=-1).reshape(n, c, -1)
        mse = np.sum(err * weight, axis=2) / np.maximum(np.sum(weight, axis=2), 1.0)
        student = np.asarray(student).reshape(n, c, -1)
        out[name] = summary(mse, student[:, :, p - 1], student[:, :, p:p + s])
    out["base model, old spelling"] = summary(np.zeros((n, c)),
                                              np.sum(np.where(spell_valid, loss[:, :, p - 1:p + k - 1], 0.0), axis=2),
                                              loss[:, :, p + k - 1:p + k - 1 + s])
    return out


def main(_argv) -> None:
    n = _WORDS.value
    text = (SHARED / "finnegans_wake.txt").read_text(encoding="utf-8")
    cut = int(0.9 * len(text))
    train, held_out = text[:cut], text[cut:]
    cfg = convert.read_config(GGUF)
    tok = vocab.load_base_tokenizer(str(GGUF))
    words = vocab.load_lexicon(str(SHARED / "wake_lexicon.txt"))
    _, stats, forms = vocab.inject(tok, words, "whole_word", text)
    base = convert.drop_padding_rows(convert.load_vocab_rows(GGUF), stats.base_size)["embedding"]
    frozen = jax.tree_util.tree_map(jnp.asarray, prepare.read_frozen_body(GGUF, "float32"))
    pieces = vocab.subword_piece_ids(tok, forms)
    new_rows = vocab.init_new_rows(base, len(forms), "subword_mean", seed=0, piece_ids=pieces)
    settings = distill.Settings(words_per_step=n)
    chosen, train_ctx, held_ctx = _pick(tok, forms, train, held_out, n, settings)
    start = new_rows[chosen]

    rows, runs = {"subword_mean": start}, {}
    for output in ("input", "joint"):
        chosen_settings = dataclasses.replace(settings, output=output)
        wall, cpu = time.perf_counter(), time.process_time()
        result = distill.distill(cfg, frozen, base, train_ctx, start, chosen_settings, progress=print)
        runs[output] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                        "train_mse_before": float(result.mse_before.mean()), "train_mse_after": float(result.mse_after.mean())}
        rows[f"distill, output={output}"] = result.rows
    costs = held_out_costs(cfg, frozen, base, new_rows, chosen, rows, held_ctx, settings)

    params = body_params(cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                         cfg.num_key_value_heads)
    tiny = body_params(*(TINYLLAMA[key] for key in ("hidden", "intermediate", "layers", "heads", "kv_heads")))
    rate = n / runs["input"]["cpu_s"]  # per CPU-second: wall time on a shared machine says little
    report = {
        "command": f"python -m benchmarks.distill_smollm2 --words={n}",
        "settings": dataclasses.asdict(settings), "words": [forms[i].word for i in chosen],
        "new_rows": stats.added, "runs": runs,
        "held_out": {name: {key: (float(np.mean(v)) if key != "contexts" else v) for key, v in c.items()}
                     for name, c in costs.items()},
        "per_word": {name: {key: np.asarray(v).round(4).tolist() for key, v in c.items() if key != "contexts"}
                     for name, c in costs.items()},
        "cost": {
            "rows_per_cpu_s": rate, "cpu_hours_all_rows": stats.added / rate / 3600,
            "smollm2_body_params": params, "smollm2_tflop_per_row": flops_per_row(params, settings) / 1e12,
            "tinyllama_body_params": tiny, "tinyllama_tflop_per_row": flops_per_row(tiny, settings) / 1e12,
            "tinyllama_gpu_minutes": {gpu: TINYLLAMA["new_rows"] * flops_per_row(tiny, settings) / (peak * ASSUMED_MFU) / 60
                                      for gpu, peak in PEAKS.items()},
            "assumed_mfu": ASSUMED_MFU,
        },
        "devices": str(jax.devices()),
    }
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(render(report))
    print(out.with_suffix(".md").read_text())


def render(r: dict) -> str:
    c = r["cost"]
    lines = [
        "# `--init=distill` on SmolLM2-135M: cost and the output side", "",
        f"Regenerate with `{r['command']}` (CPU; it writes this page and its .json).", "",
        f"{len(r['words'])} whole_word rows, a seeded sample of the new words that occur in both the first 90% of the "
        "Wake (their distillation contexts) and the last 10% (held-out contexts, where every figure below is measured); "
        f"default settings except one batch of {r['settings']['words_per_step']} words. Means over words; nats per "
        "held-out context.", "",
        "| Rows | MSE (last layer) | Word nats | Next nats (≤ 8 tokens) |", "|:--|--:|--:|--:|",
    ]
    for name, v in r["held_out"].items():
        mse = "–" if name.startswith("base") else f"{v['mse']:.4f}"
        lines.append(f"| {name} | {mse} | {v['word_nats']:.3f} | {v['next_nats']:.3f} |")
    lines += ["", "Word nats: the new token's cost over the full injected vocabulary (the base model: the sum over "
              "the word's old pieces, over its own vocabulary). Next nats: the tokens after the word.", ""]
    for name, run in r["runs"].items():
        lines.append(f"* output={name}: {run['wall_s']:.0f} s wall, {run['cpu_s']:.0f} CPU-s; training-context MSE "
                     f"{run['train_mse_before']:.4f} → {run['train_mse_after']:.4f}.")
    lines += ["", "## Cost", "",
              f"* Measured on this CPU: {c['rows_per_cpu_s']:.4f} rows per CPU-second (output=input, compilation "
              f"included), so all {r['new_rows']:,} new rows would take {c['cpu_hours_all_rows']:.0f} CPU-hours "
              "(wall times above include other work on the shared 2-core machine).",
              f"* By FLOP count (steps × contexts × (P+1+S) tokens × 6 × body weights): {c['smollm2_tflop_per_row']:.2f} "
              f"TFLOP a row for SmolLM2 ({c['smollm2_body_params'] / 1e6:.0f}M body weights), "
              f"{c['tinyllama_tflop_per_row']:.1f} TFLOP for TinyLlama ({c['tinyllama_body_params'] / 1e6:.0f}M).",
              "* TinyLlama's 44,500 rows, estimated at " + f"{c['assumed_mfu']:.0%} of the dense peak: "
              + ", ".join(f"{gpu} {m:.0f} min" for gpu, m in c["tinyllama_gpu_minutes"].items())
              + " (an estimate by FLOP count, not a measurement).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
