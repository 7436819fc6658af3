"""Selects the coined words of a text: the lexicon that Phase 1 injects as new tokens.

A coinage, for this purpose, is a word that the text uses more than once and that the base
tokenizer cannot spell without breaking it into several pieces: those are the words whose
meaning the model has to assemble from fragments, and so the ones a whole-word token helps.
The ranking puts the words least known in general use first when a frequency list is
given, and otherwise the most fragmented first, so that a capped lexicon (`max_words`)
keeps the most Wake-like words.

Everything here is a pure function of its inputs, apart from `read_frequency_list`, which
belongs with the format it parses; reading the corpus and the tokenizer is left to the
launcher `experiments/build_lexicon.py`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import unicodedata
from typing import Callable, Mapping

from wake2vec.tokens import segmentation, vocab
from wake2vec.training.data import read_utf8
from wake2vec.tokens.words import WORD



@dataclasses.dataclass(frozen=True)
class LexiconEntry:
    """One selected word and the evidence it was selected and ranked on."""

    word: str
    # Occurrences in the text.
    count: int
    # Tokens the base tokenizer spends on the word mid-text (see `piece_counter`).
    pieces: int
    # Occurrences in general use from the frequency list (0 when absent), or None without a list.
    general_frequency: int | None


def extract_words(text: str) -> list[str]:
    """The words of `text` in order, NFC-normalised, case and accents kept.

    NFC first, so that a word typed with combining accents (NFD) and the same word typed
    precomposed are one word, and so that the lexicon matches the text the tokenizer sees
    once it is normalised the same way. Case is kept because tokenizers match added tokens
    case-sensitively: the lexicon must hold the forms the text uses.
    """
    return WORD.findall(unicodedata.normalize("NFC", text))


def count_words(text: str) -> collections.Counter[str]:
    """Occurrences of each word of `text` (see `extract_words`)."""
    return collections.Counter(extract_words(text))


def build_lexicon(
    text: str,
    count_pieces: Callable[[str], int],
    *,
    min_count: int = 2,
    min_pieces: int = 3,
    max_words: int = 0,
    frequency: Mapping[str, int] | None = None,
) -> list[LexiconEntry]:
    """The words of `text` used at least `min_count` times that split into at least `min_pieces`.

    Ranking: with `frequency` (word -> occurrences in general use), rarest first, a word
    missing from it counting as 0, then more pieces first, then the word; a word is looked
    up as written and then lower-cased, since frequency lists are usually lower-case.
    Without `frequency`: more pieces first, then more occurrences in the text, then the
    word. `max_words` keeps the first that many; 0 keeps all.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if min_pieces < 1:
        raise ValueError(f"min_pieces must be at least 1, got {min_pieces}")
    if max_words < 0:
        raise ValueError(f"max_words must be 0 (no cap) or positive, got {max_words}")

    entries = []
    for word, count in count_words(text).items():
        if count < min_count:
            continue
        pieces = count_pieces(word)
        if pieces < min_pieces:
            continue
        general = None if frequency is None else frequency.get(word, frequency.get(word.lower(), 0))
        entries.append(LexiconEntry(word, count, pieces, general))

    if frequency is None:
        entries.sort(key=lambda e: (-e.pieces, -e.count, e.word))
    else:
        entries.sort(key=lambda e: (e.general_frequency, -e.pieces, e.word))
    return entries[:max_words] if max_words else entries


def piece_counter(tokenizer) -> Callable[[str], int]:
    """`count_pieces` for a HF tokenizer: how many tokens a word costs in running text.

    A word is measured as it occurs mid-text, after a space: the tokens of "a " + word minus
    the tokens of "a", without special tokens. Encoding " " + word alone would be wrong for
    Llama's layout, whose normalizer prepends "▁" to every input and so would see "▁▁word";
    encoding the bare word would be wrong for byte-level tokenizers (GPT-2), which spell a
    word differently after a space. The difference is right for both. A bare "▁" piece, which
    Llama emits before a word whose first letter cannot merge with "▁", counts: it is a token
    the model spends on that word.
    """
    context = len(tokenizer.encode("a", add_special_tokens=False))

    def count_pieces(word: str) -> int:
        return len(tokenizer.encode("a " + word, add_special_tokens=False)) - context

    return count_pieces


def injection_report(base_tokenizer, words: list[str], text: str) -> list[str]:
    """Report lines: what injecting `words` into `base_tokenizer` would do to `text`, per mode.

    A lexicon of fragments is harmless to the whole-word injection but re-segments English
    under the study's `add_tokens` (--injection=reference); the builder says how much, and
    which words suffer most, before anyone trains on it.
    """
    lines = []
    for mode in vocab.INJECTION_MODES:
        tokenizer, stats, _ = vocab.inject(base_tokenizer, words, mode, text)
        r, _ = segmentation.measure(base_tokenizer, tokenizer, text, words, stats.base_size, mode)
        worst = ", ".join(f"{w} ({n})" for w, n in r.top_resegmented)
        lines.append(
            f"--injection={mode}: {stats.added} new tokens; re-segments {r.resegmented_occurrences} of "
            f"{r.non_lexicon_occurrences} occurrences of other words ({100 * r.collateral:.2f}%, "
            f"{r.resegmented_types} distinct){': ' + worst if worst else ''}; lexicon coverage "
            f"{100 * r.coverage_multi_piece:.2f}% of multi-piece occurrences; corpus {r.corpus_tokens_base} -> "
            f"{r.corpus_tokens} tokens"
        )
    return lines


def read_frequency_list(path: str | os.PathLike) -> dict[str, int]:
    """Reads a general-use frequency list: one "word<TAB or spaces>count" per line.

    Blank lines are skipped; words are NFC-normalised like the text's; a word listed twice
    has its counts added. Any other line is an error naming the file and line, since a
    silently skipped line would quietly change the ranking.
    """
    frequency: collections.Counter[str] = collections.Counter()
    lines = read_utf8(path, error=ValueError, what="frequency list").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not re.fullmatch(r"[0-9]+", fields[1]):
            raise ValueError(
                f"{path}:{number}: expected 'word<TAB>count' with a non-negative integer count, got {line!r}"
            )
        frequency[unicodedata.normalize("NFC", fields[0])] += int(fields[1])
    return dict(frequency)
