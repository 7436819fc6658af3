r"""Builds the coinage lexicon of a corpus for Phase 1 (see wake2vec.tokens.lexicon_builder).

    python -m experiments.build_lexicon --corpus=wake.txt --tokenizer=TOKENIZER_DIR \
        --out=lexicon.txt [--min_count=2 --min_pieces=3 --max_words=0 --frequency_list=FILE]

Writes the selected words one per line (UTF-8), rarest in general use first when a
frequency list is given and most fragmented first otherwise, and prints a short report.
The corpus is read as training reads it (wake2vec.training.data.read_corpus: NFC, Gutenberg banners
stripped) and the tokenizer is loaded as training loads it (wake2vec.tokens.vocab), so the lexicon
is measured on the very text and pieces that Phase 1 will see.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import ClassVar

from wake2vec import launcher
from wake2vec.config import FlagError
from wake2vec.errors import UserError


class FrequencyListError(UserError, ValueError):
    """The --frequency_list file has a line that is not 'word<TAB>count'."""


class LexiconEmptyError(UserError, ValueError):
    """No word of the corpus passes the thresholds."""


@dataclasses.dataclass(frozen=True)
class BuildLexiconConfig:
    """Flags of experiments.build_lexicon."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("corpus", "tokenizer", "out", "frequency_list")

    # UTF-8 text to take the coinages from.
    corpus: str = ""
    # The base model's tokenizer: a directory holding tokenizer.json, or the file itself.
    tokenizer: str = ""
    # Where to write the lexicon, one word per line.
    out: str = ""
    # Keep words the corpus uses at least this many times.
    min_count: int = 2
    # Keep words the tokenizer splits into at least this many pieces.
    min_pieces: int = 3
    # Keep at most this many words, best ranked first; 0: all.
    max_words: int = 0
    # Optional general-use frequency list, 'word<TAB>count' per line; ranks rarest first.
    frequency_list: str = ""
    # Replace --out if it exists (otherwise an existing file is refused, before anything is read).
    overwrite: bool = False


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
    from wake2vec.training import data, workdir as records
    from wake2vec.tokens import lexicon_builder, vocab

    text = data.read_corpus(corpus)
    try:
        frequency = lexicon_builder.read_frequency_list(frequency_list) if frequency_list else None
    except ValueError as e:  # the reader names the file and line
        raise FrequencyListError(str(e)) from None
    base = vocab.load_base_tokenizer(tokenizer)
    count_pieces = lexicon_builder.piece_counter(base)
    entries = lexicon_builder.build_lexicon(
        text, count_pieces, min_count=min_count, min_pieces=min_pieces, max_words=max_words, frequency=frequency
    )
    if not entries:
        raise LexiconEmptyError(
            f"no word of {corpus} occurs at least {min_count} times and splits into at least {min_pieces} "
            "pieces; lower --min_count or --min_pieces, or check that --tokenizer is the base model's"
        )
    out_path = pathlib.Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    records.atomic_write_text(out_path, "".join(entry.word + "\n" for entry in entries))

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


def run(cfg: BuildLexiconConfig) -> str:
    missing = [f"--{name}" for name in ("corpus", "tokenizer", "out") if not getattr(cfg, name)]
    if missing:
        raise FlagError(f"{', '.join(missing)} required: the text, the base tokenizer and where to write the lexicon")
    for name, low in (("min_count", 1), ("min_pieces", 1), ("max_words", 0)):
        if getattr(cfg, name) < low:
            raise FlagError(f"--{name}={getattr(cfg, name)} must be at least {low}")
    if pathlib.Path(cfg.out).exists() and not cfg.overwrite:
        raise FlagError(f"{cfg.out} exists; pass --out=OTHER.txt, or --overwrite to replace it")
    return write_lexicon(cfg.corpus, cfg.tokenizer, cfg.out, min_count=cfg.min_count, min_pieces=cfg.min_pieces,
                         max_words=cfg.max_words, frequency_list=cfg.frequency_list)


if __name__ == "__main__":
    launcher.launch(BuildLexiconConfig, run, __doc__)
