"""What an injection did to the corpus's segmentation, measured word by word.

A *word* is a match of `wake2vec.tokens.words` (letters with inner apostrophes or hyphens, the
definition the lexicon is built with) in the corpus text, the same in every
injection mode. A word's *tokenization* is the sequence of ids of the tokens whose
character span overlaps the word's span; a token that carries the word-start marker
("▁word", "Ġword") overlaps its word, a lone marker token before it does not.

* collateral re-segmentation: the share of occurrences of words NOT in the lexicon whose
  tokenization differs between the base tokenizer and the injected one;
* lexicon coverage: the share of occurrences of lexicon words whose tokenization is
  exactly one new id, over all of them and over those the base splits into more than one
  piece (a word that is already one base piece keeps its base id and can get no new one);
* corpus tokens and tokens per word, before and after;
* whether decode(encode(corpus)) == corpus with the injected tokenizer.

The per-token mask of re-segmented words (base-token positions inside a non-lexicon word
whose tokenization changed) is aligned with the corpus ids, for the validation loss by
target type.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Iterable

import numpy as np

from wake2vec.training.data import tokenizers_backend
from wake2vec.tokens.words import word_spans


@dataclasses.dataclass(frozen=True)
class SegmentationReport:
    """The injection's effect on the corpus; recorded in config.json's "vocab" block."""

    injection: str
    corpus_words: int
    corpus_tokens_base: int
    corpus_tokens: int
    tokens_per_word_base: float
    tokens_per_word: float
    lexicon_occurrences: int
    lexicon_multi_piece_occurrences: int
    lexicon_covered: int
    lexicon_multi_piece_covered: int
    coverage: float
    coverage_multi_piece: float
    non_lexicon_occurrences: int
    resegmented_occurrences: int
    resegmented_types: int
    collateral: float
    round_trip_exact: bool
    # The most often re-segmented non-lexicon words, (word, occurrences), most first.
    top_resegmented: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_TOP = 10


def overlapping(offsets: np.ndarray, spans: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[first, last) token indices overlapping each (start, end) span.

    Token offsets are non-decreasing in both ends for these pipelines, so the overlapping
    tokens of a span are one contiguous run found by two binary searches.
    """
    first = np.searchsorted(offsets[:, 1], spans[:, 0], side="right")
    last = np.searchsorted(offsets[:, 0], spans[:, 1], side="left")
    return first, last


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def measure(base_tokenizer, tokenizer, text: str, lexicon: Iterable[str], base_size: int, injection: str):
    """(SegmentationReport, resegmented mask (corpus_tokens,) bool) for `text`."""
    lexicon = set(lexicon)
    base_enc = tokenizers_backend(base_tokenizer).encode(text, add_special_tokens=False)
    enc = tokenizers_backend(tokenizer).encode(text, add_special_tokens=False)
    spans = np.asarray(word_spans(text), dtype=np.int64).reshape(-1, 2)
    base_ids, ids = np.asarray(base_enc.ids), np.asarray(enc.ids)
    base_off, off = np.asarray(base_enc.offsets).reshape(-1, 2), np.asarray(enc.offsets).reshape(-1, 2)
    for name, o in (("base", base_off), ("injected", off)):
        if np.any(np.diff(o, axis=0) < 0):
            raise AssertionError(f"{name} token offsets are not monotone; the word alignment assumes they are")
    b_first, b_last = overlapping(base_off, spans)
    first, last = overlapping(off, spans)

    mask = np.zeros(len(ids), dtype=bool)
    counts = dict.fromkeys(("lex", "lex_multi", "covered", "covered_multi", "other", "changed"), 0)
    changed_types: collections.Counter[str] = collections.Counter()
    for (start, end), bf, bl, f, l in zip(spans.tolist(), b_first, b_last, first, last):
        word = text[start:end]
        before, after = base_ids[bf:bl], ids[f:l]
        if word in lexicon:
            multi = len(before) > 1
            one_new = bool(len(after) == 1 and after[0] >= base_size)
            counts["lex"] += 1
            counts["lex_multi"] += multi
            counts["covered"] += one_new
            counts["covered_multi"] += one_new and multi
        else:
            counts["other"] += 1
            if not np.array_equal(before, after):
                counts["changed"] += 1
                changed_types[word] += 1
                mask[f:l] = after < base_size
    words = len(spans)
    report = SegmentationReport(
        injection=injection,
        corpus_words=words,
        corpus_tokens_base=len(base_ids),
        corpus_tokens=len(ids),
        tokens_per_word_base=_share(len(base_ids), words),
        tokens_per_word=_share(len(ids), words),
        lexicon_occurrences=counts["lex"],
        lexicon_multi_piece_occurrences=counts["lex_multi"],
        lexicon_covered=counts["covered"],
        lexicon_multi_piece_covered=counts["covered_multi"],
        coverage=_share(counts["covered"], counts["lex"]),
        coverage_multi_piece=_share(counts["covered_multi"], counts["lex_multi"]),
        non_lexicon_occurrences=counts["other"],
        resegmented_occurrences=counts["changed"],
        resegmented_types=len(changed_types),
        collateral=_share(counts["changed"], counts["other"]),
        round_trip_exact=tokenizers_backend(tokenizer).decode(enc.ids, skip_special_tokens=False) == text,
        top_resegmented=tuple(changed_types.most_common(_TOP)),
    )
    return report, mask
