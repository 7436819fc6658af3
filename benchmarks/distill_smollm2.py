"""Cost of --init=distill on SmolLM2-135M: rate on N Wake words, written to docs/results/distill.md.

PYTHONPATH=. python -m benchmarks.distill_smollm2 [N]
Only the rate and the hidden-state MSE; the output-side comparison is not measured yet.
"""

from __future__ import annotations

import pathlib
import sys
import time


from wake2vec.models import convert
from wake2vec.phases import distill, prepare
from wake2vec.tokens import vocab

SHARED = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
GGUF = SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main(n: int) -> None:
    text = (SHARED / "finnegans_wake.txt").read_text(encoding="utf-8")
    train = text[: int(0.9 * len(text))]  # the text-order split's training part, roughly
    cfg = convert.read_config(GGUF)
    tok = vocab.load_base_tokenizer(str(GGUF))
    words = vocab.load_lexicon(str(SHARED / "wake_lexicon.txt"))
    _, stats, forms = vocab.inject(tok, words, "whole_word", text)
    forms = forms[:n]
    base = convert.drop_padding_rows(convert.load_vocab_rows(GGUF), stats.base_size)["embedding"]
    frozen = prepare.read_frozen_body(GGUF, "float32")
    settings = distill.Settings()
    t0 = time.process_time()
    ctx = distill.build_contexts(tok, forms, [train], settings)
    pieces = vocab.subword_piece_ids(tok, forms)
    start = vocab.init_new_rows(base, len(forms), "subword_mean", seed=0, piece_ids=pieces)
    res = distill.distill(cfg, frozen, base, ctx, start, settings, progress=print)
    cpu = time.process_time() - t0
    rate = n / res.seconds
    out = pathlib.Path(__file__).resolve().parents[1] / "docs" / "results" / "distill.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        f"# --init=distill on SmolLM2-135M (CPU)\n\nCommand: `PYTHONPATH=. python -m benchmarks.distill_smollm2 {n}`\n\n"
        f"{n} whole_word rows, default settings {settings}: {res.seconds:.1f} s wall ({cpu:.1f} CPU-s, first batch "
        f"includes compilation), {rate:.2f} rows/s; hidden-state MSE {res.mse_before.mean():.4g} -> "
        f"{res.mse_after.mean():.4g}; {int(ctx.from_training.sum())} rows with training contexts.\n\n"
        f"At this rate {stats.added} new rows take {stats.added / rate / 3600:.1f} h.\n", encoding="utf-8")
    print(out.read_text())


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
