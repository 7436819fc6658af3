"""Source ranks on a real pretrained table: SmolLM2-135M with the Wake lexicon injected.

    python -m benchmarks.source_rank_smollm2 [--gguf=../shared/data/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --lexicon=../shared/data/wake_lexicon.txt --out=docs/source_rank_smollm2.md]

No Wake training is involved: this measures where the new rows *start*, which is the
"before" column every trained run is compared with. The base rows are SmolLM2's real input
embeddings (dequantised from the GGUF file; tied with its head), the tokenizer is the one
transformers builds from the same file, and the lexicon is injected with the study's
add_tokens (wake2vec.tokens.vocab.augment_tokenizer). The new rows are initialised two ways:
mean_noise (the study's recipe: every new row near the base centroid) and subword_mean (the
mean of the word's pieces). Each table goes through `report.analyze`, and the source_rank
figures of each pair group are written as a Markdown table to --out.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

import numpy as np
from absl import app, flags

from wake2vec.tokens import vocab
from wake2vec.analysis import report, source_rank

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
_GGUF = flags.DEFINE_string("gguf", str(_SHARED / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"), "GGUF model file.")
_LEXICON = flags.DEFINE_string("lexicon", str(_SHARED / "wake_lexicon.txt"), "Lexicon, one word per line.")
_OUT = flags.DEFINE_string("out", "docs/source_rank_smollm2.md", "Markdown file the table is written to.")


def _embedding(path: pathlib.Path) -> np.ndarray:
    import gguf  # only this measurement reads GGUF

    reader = gguf.GGUFReader(str(path))
    (tensor,) = [t for t in reader.tensors if t.name == "token_embd.weight"]
    return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from transformers import AutoTokenizer

    path = pathlib.Path(_GGUF.value)
    base_table = _embedding(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    words = vocab.load_lexicon(_LEXICON.value)
    base_for_pieces = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    stats = vocab.augment_tokenizer(tokenizer, words)
    if stats.base_size != base_table.shape[0]:
        raise ValueError(f"the tokenizer has {stats.base_size} tokens, the table {base_table.shape[0]} rows")
    new_words = vocab.added_words(tokenizer, stats.base_size)
    tokens = tokenizer.convert_ids_to_tokens(list(range(stats.total)))
    inits = {
        "mean_noise": vocab.init_new_rows(base_table, stats.added, "mean_noise", seed=0),
        "subword_mean": vocab.init_new_rows(base_table, stats.added, "subword_mean", seed=0,
                                            piece_ids=vocab.subword_piece_ids(base_for_pieces, new_words)),
    }
    lines = [
        f"Source ranks on SmolLM2-135M-Instruct's real input embeddings ({stats.base_size:,} base rows, "
        f"{base_table.shape[1]} dims) with the Wake lexicon injected ({stats.added:,} new rows), before any "
        "training. Written by `python -m benchmarks.source_rank_smollm2`.",
        "",
        "| new-row init | pair group | pairs ranked (of listed) | median rank | top 5 | top 50 | mean cosine |",
        "|:--|:--|--:|--:|--:|--:|--:|",
    ]
    builtin_ranks = {}
    for name, rows in inits.items():
        summary = report.analyze(np.vstack([base_table, rows]), stats.base_size, tokens=tokens)
        builtin_ranks[name] = {(row["wake"], row["english"]): row["rank_post"]
                               for row in summary["source_rank"]["builtin"]["pairs"]}
        for group, section in summary["source_rank"].items():
            stats_post = section["post"]
            lines.append(f"| {name} | {group} | {section['used']} ({section['listed']}) | "
                         f"{stats_post['median_rank']:g} | {stats_post['share_top5']:.1%} | "
                         f"{stats_post['share_top50']:.1%} | {stats_post['mean_cosine']:.3f} |")
        print(source_rank.headline(summary))
    meta = summary["meta"]["sampling"]["source_rank"]
    lines += ["", f"Edit-distance rule: {meta['edit_distance_found']:,} pairs found, {meta['edit_distance_sampling']}; "
              f"word-start marker {meta['marker']!r}.", "",
              "Each built-in pair's rank:", "", "| Wake | English | " + " | ".join(inits) + " |",
              "|:--|:--|" + "--:|" * len(inits)]
    lines += [f"| {wake} | {english} | " + " | ".join(str(builtin_ranks[name][wake, english]) for name in inits) + " |"
              for wake, english in builtin_ranks["mean_noise"]]
    out = pathlib.Path(_OUT.value)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
