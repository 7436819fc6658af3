"""Measures both injection modes with both tokenizer families on the Wake, for docs/results/injection.md.

    python -m tools.injection_table [--data=../shared/data]   # measure, write docs/injection.json, update the page
    python -m tools.injection_table --check                   # exit 1 if the page's table is not the JSON's

The Llama 2 / TinyLlama tokenizer.json stands for SentencePiece-style tokenizers, SmolLM2-135M's
(read from its GGUF by transformers) for byte-level BPE; the corpus and lexicon are the
fixtures of ../shared/data (see its PROVENANCE.md), read as training reads them. Each row is
`vocab.inject` + `segmentation.measure`, i.e. exactly what a run records in config.json.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "results" / "injection.md"
RESULTS = ROOT / "docs" / "injection.json"
START, END = "<!-- injection:start -->", "<!-- injection:end -->"
MODES = ("reference", "whole_word")


def _tokenizers(data: pathlib.Path) -> dict:
    from transformers import AutoTokenizer

    from wake2vec.tokens import vocab

    return {
        "Llama 2 (SentencePiece BPE)": vocab.load_base_tokenizer(data / "tinyllama_tokenizer"),
        "SmolLM2 (byte-level BPE)": AutoTokenizer.from_pretrained(str(data / "smollm2"), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    }


def measure(data: pathlib.Path) -> list[dict]:
    from wake2vec.training import data as corpus
    from wake2vec.tokens import segmentation, vocab

    words = vocab.load_lexicon(data / "wake_lexicon.txt")
    text = corpus.read_corpus(data / "finnegans_wake.txt")
    rows = []
    for name, base in _tokenizers(data).items():
        for mode in MODES:
            tokenizer, stats, _ = vocab.inject(base, words, mode, text)
            report, _ = segmentation.measure(base, tokenizer, text, words, stats.base_size, mode)
            rows.append({"tokenizer": name, **stats.as_dict(), **report.as_dict()})
    return rows


def render_table(rows: list[dict]) -> str:
    lines = [
        "| tokenizer | --injection | added tokens | corpus tokens (base) | tokens / word | collateral re-segmentation "
        "| coverage (multi-piece words) | round trip |",
        "|:--|:--|--:|--:|--:|--:|--:|:--|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['injection']} | {r['added']:,} | {r['corpus_tokens']:,} ({r['corpus_tokens_base']:,}) "
            f"| {r['tokens_per_word']:.3f} | {100 * r['collateral']:.3f}% ({r['resegmented_occurrences']:,} of "
            f"{r['non_lexicon_occurrences']:,}) | {100 * r['coverage_multi_piece']:.3f}% ({r['lexicon_multi_piece_covered']:,} "
            f"of {r['lexicon_multi_piece_occurrences']:,}) | {'exact' if r['round_trip_exact'] else 'lossy'} |"
        )
    return "\n".join(lines)


def render(page_text: str, rows: list[dict]) -> str:
    head, rest = page_text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{render_table(rows)}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = PAGE.read_text(encoding="utf-8")
    if "--check" in argv:
        rows = json.loads(RESULTS.read_text(encoding="utf-8"))
        if render(current, rows) != current:
            print("docs/results/injection.md's table differs from docs/injection.json: run python -m tools.injection_table",
                  file=sys.stderr)
            return 1
        return 0
    data = ROOT.parent / "shared" / "data"
    for arg in argv:
        if arg.startswith("--data="):
            data = pathlib.Path(arg.split("=", 1)[1])
    rows = measure(data)
    RESULTS.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    PAGE.write_text(render(current, rows), encoding="utf-8")
    print(render_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
