r"""Builds the coinage lexicon of a corpus for Phase 1 (see wake2vec.lexicon_builder).

    python -m experiments.build_lexicon --corpus=wake.txt --tokenizer=TOKENIZER_DIR \
        --out=lexicon.txt [--min_count=2 --min_pieces=3 --max_words=0 --frequency_list=FILE]

Writes the selected words one per line (UTF-8), rarest in general use first when a
frequency list is given and most fragmented first otherwise, and prints a short report.
The corpus is read as training reads it (wake2vec.data.read_corpus: NFC, Gutenberg banners
stripped) and the tokenizer is loaded as training loads it (wake2vec.vocab), so the lexicon
is measured on the very text and pieces that Phase 1 will see.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from absl import app, flags

from wake2vec import data, lexicon_builder, vocab

_CORPUS = flags.DEFINE_string("corpus", None, "UTF-8 text to take the coinages from.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "The base model's tokenizer: a directory holding tokenizer.json, or the file itself."
)
_OUT = flags.DEFINE_string("out", None, "Where to write the lexicon, one word per line.")
_MIN_COUNT = flags.DEFINE_integer("min_count", 2, "Keep words the corpus uses at least this many times.")
_MIN_PIECES = flags.DEFINE_integer("min_pieces", 3, "Keep words the tokenizer splits into at least this many pieces.")
_MAX_WORDS = flags.DEFINE_integer("max_words", 0, "Keep at most this many words, best ranked first; 0: all.")
_FREQUENCY_LIST = flags.DEFINE_string(
    "frequency_list", "", "Optional general-use frequency list, 'word<TAB>count' per line; ranks rarest first."
)

_REPORT_TOP = 10


def write_lexicon(
    corpus: str,
    tokenizer: str,
    out: str,
    *,
    min_count: int,
    min_pieces: int,
    max_words: int,
    frequency_list: str,
) -> str:
    """Selects the lexicon of `corpus`, writes it to `out` and returns the report to print."""
    text = data.read_corpus(corpus)
    frequency = lexicon_builder.read_frequency_list(frequency_list) if frequency_list else None
    base = vocab.load_base_tokenizer(tokenizer)
    count_pieces = lexicon_builder.piece_counter(base)
    entries = lexicon_builder.build_lexicon(
        text, count_pieces, min_count=min_count, min_pieces=min_pieces, max_words=max_words, frequency=frequency
    )
    if not entries:
        raise ValueError(
            f"no word of {corpus} occurs at least {min_count} times and splits into at least {min_pieces} "
            "pieces; lower --min_count or --min_pieces, or check that --tokenizer is the base model's"
        )
    out_path = pathlib.Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(entry.word + "\n" for entry in entries), encoding="utf-8")

    counts = lexicon_builder.count_words(text)
    frequent = sum(1 for count in counts.values() if count >= min_count)
    lines = [
        f"words in text: {sum(counts.values())}, distinct: {len(counts)}, used >= {min_count} times: {frequent}",
        f"selected: {len(entries)} (>= {min_pieces} pieces), written to {out_path}",
        "ranked by " + ("general frequency, rarest first" if frequency is not None else "pieces, most first"),
    ]
    for rank, entry in enumerate(entries[:_REPORT_TOP], start=1):
        general = "" if entry.general_frequency is None else f"  general={entry.general_frequency}"
        lines.append(f"{rank:4d}. {entry.word}  pieces={entry.pieces}  count={entry.count}{general}")
    lines += lexicon_builder.injection_report(base, [entry.word for entry in entries], text)
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every input is a --flag")
    print(
        write_lexicon(
            _CORPUS.value,
            _TOKENIZER.value,
            _OUT.value,
            min_count=_MIN_COUNT.value,
            min_pieces=_MIN_PIECES.value,
            max_words=_MAX_WORDS.value,
            frequency_list=_FREQUENCY_LIST.value,
        )
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["corpus", "tokenizer", "out"])
    app.run(main)
