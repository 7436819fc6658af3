"""Whole-word injection: a new token stands for a whole lexicon word and nothing else.

`add_tokens` (the reference injection) matches an added word anywhere in the text before
the model segments it, so lexicon fragments ("ack", "hom", "befor") cut ordinary English
apart. Here the lexicon goes into the BPE model itself, and only a pre-token that equals
a lexicon word (with its word-start marker) becomes the new id:

* the pre-tokenizer isolates every word (`wake2vec.tokens.words`: letters with inner
  apostrophes or hyphens), together with the marker in front of it ("▁" in the Llama
  layout, the space that byte-level BPE spells "Ġ"), as one pre-token;
* the model gets the lexicon's words as vocabulary entries after the base ids, and
  `ignore_merges=True`, so a pre-token that is a vocabulary entry is emitted whole and
  every other pre-token is merged exactly as before.

Why the base segmentation is unchanged: BPE merges never cross a pre-token boundary, and
moving a boundary changes nothing when no base token spans it. The new boundaries lie
between a word and what surrounds it, and no base token of either family spans such a
place (Llama's vocabulary has no token with a letter next to punctuation or a "▁" after
a non-"▁"; byte-level BPE was trained on pre-tokens split there). Byte-level pre-tokens
inside a hyphenated or apostrophised word are joined ("o'er-the-weir" is one word);
`segmentation.measure` checks on every run that no non-lexicon word changed.

Word starts without a marker (at a line start, after "(" or a quote) spell the word
without "▁"/"Ġ"; such an occurrence is a different pre-token, so its unmarked form gets a
token of its own when the corpus uses it that way: the rows a study trains are the forms
its text contains.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

from tokenizers import Tokenizer, pre_tokenizers

from wake2vec.training.data import tokenizers_backend
from wake2vec.errors import UserError
from wake2vec.tokens.words import MARKS, WORD_CORE

SENTENCEPIECE = "sentencepiece"
BYTE_LEVEL = "byte_level"

# The word-start marker of SentencePiece-style tokenizers (Llama's tokenizer.json).
SP_MARKER = "▁"

# GPT-2's pre-tokenizer regex, which `tokenizers`' ByteLevel(use_regex=True) applies; the
# whole-word pre-tokenizer falls back to it everywhere outside a word, so non-word text
# is split exactly as the base splits it.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

_CONTRACTION_BEFORE_LETTER = r"'(?:s|t|re|ve|m|ll|d)(?=\p{L})"

# The byte-level scan can reach a word's later part after GPT-2's alternatives consumed its
# first part and the hyphen ("x-", then "riverrun"); Python's finditer (the measurement's
# definition) never starts a word there, so neither does the pre-tokenizer.
_NOT_INSIDE_A_WORD = rf"(?<![\w{MARKS}])(?<!\w[-'’])"


class WholeWordError(UserError, ValueError):
    """The tokenizer's pipeline is not one whole-word injection knows how to extend."""


@dataclasses.dataclass(frozen=True)
class Form:
    """One new token: a lexicon word, spelt with its word-start marker (`marked`) or without."""

    word: str
    marked: bool


def family(tokenizer) -> str:
    """SENTENCEPIECE (normalizer turns " " into "▁", no pre-tokenizer) or BYTE_LEVEL.

    Anything else is refused by name: a pipeline this module does not know could be
    re-segmented silently.
    """
    spec = json.loads(tokenizers_backend(tokenizer).to_str())
    pre, norm = spec.get("pre_tokenizer"), spec.get("normalizer")
    if pre is None and SP_MARKER in json.dumps(norm, ensure_ascii=False):
        return SENTENCEPIECE
    byte_level = _byte_level_step(pre)
    if byte_level is not None:
        if byte_level.get("add_prefix_space") or not byte_level.get("use_regex", True):
            raise WholeWordError(
                "--injection=whole_word supports a ByteLevel pre-tokenizer with add_prefix_space=false and "
                f"use_regex=true; this tokenizer has {pre}. Use --injection=reference"
            )
        return BYTE_LEVEL
    raise WholeWordError(
        "--injection=whole_word supports the Llama tokenizer.json layout (normalizer Replace ' ' -> '▁', no "
        f"pre-tokenizer) and byte-level BPE; this tokenizer has pre_tokenizer {pre} and normalizer {norm}. "
        "Use --injection=reference"
    )


def _byte_level_step(pre: dict | None) -> dict | None:
    """The ByteLevel step of a byte-level pipeline: ByteLevel alone, or after single-digit
    splitting (Digits(individual_digits=True), as SmolLM2's GGUF "smollm" pre-tokenizer has it)."""
    if pre is None:
        return None
    if pre.get("type") == "ByteLevel":
        return pre
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[1].get("type") == "ByteLevel"
            and steps[0].get("type") == "Digits" and steps[0].get("individual_digits")):
        return steps[1]
    return None


def split_pattern(kind: str) -> str:
    """The regex whose matches are the whole-word pipeline's pre-tokens (onig syntax)."""
    if kind == SENTENCEPIECE:
        # The whole "▁" run before a word stays with it, as in one base BPE word ("▁▁word").
        return f"{SP_MARKER}*{_NOT_INSIDE_A_WORD}{WORD_CORE}"
    return f" ?{_NOT_INSIDE_A_WORD}{WORD_CORE}|{_GPT2_SPLIT}"


def model_string(kind: str, text: str) -> str:
    """How the BPE model spells `text` (after normalization / byte mapping)."""
    if kind == SENTENCEPIECE:
        return text.replace(" ", SP_MARKER)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)[0][0]


def form_string(kind: str, form: Form) -> str:
    return model_string(kind, (" " if form.marked else "") + form.word)


def _pre_tokenizer_spec(kind: str, base_spec: dict) -> dict:
    split = {"type": "Split", "pattern": {"Regex": split_pattern(kind)}, "behavior": "Isolated", "invert": False}
    if kind == SENTENCEPIECE:
        return split
    # GPT-2 isolates a contraction even when letters follow it ("I'se" -> I 's e); inside a
    # joined word BPE could merge its last letter onward ("'", "se"), so the word is cut
    # after such a contraction, where the base cuts it.
    contraction = {"type": "Split", "pattern": {"Regex": _CONTRACTION_BEFORE_LETTER}, "behavior": "MergedWithPrevious",
                   "invert": False}
    byte_level = dict(_byte_level_step(base_spec), use_regex=False)
    # Digits split off before anything else, as in the base; lexicon words hold no digits.
    digits = base_spec["pretokenizers"][:1] if base_spec.get("type") == "Sequence" else []
    return {"type": "Sequence", "pretokenizers": [*digits, split, contraction, byte_level]}


def corpus_forms(kind: str, pre_tokenizer_spec: dict, normalizer, text: str, lexicon: set[str]) -> list[tuple[str, bool]]:
    """(word, marked) of every lexicon-word pre-token the corpus yields, in text order."""
    pre = Tokenizer.from_str(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {}, "unk_token": "x"},
                                         "pre_tokenizer": pre_tokenizer_spec}))
    normalized = normalizer.normalize_str(text) if normalizer is not None else text
    surface = {}
    for word in lexicon:
        surface[form_string(kind, Form(word, True))] = (word, True)
        surface[form_string(kind, Form(word, False))] = (word, False)
    return [surface[p] for p, _ in pre.pre_tokenizer.pre_tokenize_str(normalized) if p in surface]


def build(base_tokenizer, words: Sequence[str], text: str) -> tuple[Tokenizer, list[Form], int]:
    """The whole-word `tokenizers.Tokenizer`, its new forms (id order) and the words already base pieces.

    New ids follow the base ids: first the marked form of every lexicon word that is not
    already one base token (lexicon order), then the unmarked form of every word the corpus
    uses unmarked (order of first use). The base tokenizer is not modified.
    """
    backend = tokenizers_backend(base_tokenizer)
    kind = family(base_tokenizer)
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("dropout"):
        raise WholeWordError(f"--injection=whole_word needs a BPE model without dropout; this one is {model.get('type')}")
    vocab = model["vocab"]
    base_size = backend.get_vocab_size(with_added_tokens=True)
    if max(vocab.values()) + 1 != base_size:
        raise WholeWordError(
            f"the tokenizer's BPE ids end at {max(vocab.values())} but it has {base_size} tokens (added tokens beyond "
            "the model's vocabulary); --injection=whole_word needs new ids right after the model's: use --injection=reference"
        )
    words = list(dict.fromkeys(words))
    pre_spec = _pre_tokenizer_spec(kind, spec.get("pre_tokenizer"))
    already = sum(form_string(kind, Form(w, True)) in vocab for w in words)
    forms = [Form(w, True) for w in words if form_string(kind, Form(w, True)) not in vocab]
    unmarked = dict.fromkeys(w for w, marked in corpus_forms(kind, pre_spec, backend.normalizer, text, set(words)) if not marked)
    forms += [Form(w, False) for w in unmarked if form_string(kind, Form(w, False)) not in vocab]
    for offset, form in enumerate(forms):
        vocab[form_string(kind, form)] = base_size + offset
    model["ignore_merges"] = True
    spec["pre_tokenizer"] = pre_spec
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False)), forms, already
