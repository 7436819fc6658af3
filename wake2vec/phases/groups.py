"""Phase 3's group files: which words the alignment losses (wake2vec.phases.alignment) compare.

Two kinds of JSONL file, one JSON object per line (blank lines skipped), the study's format
(docs/groups.md):

* morpheme groups, for L_morph::

    {"morpheme": "ing", "morpheme_type": "suffix", "examples": ["speeching", "togethering"],
     "bases": ["speech", "together"], "n_examples": 2}

  `examples[i]` is a word carrying the morpheme and `bases[i]` its stem (parallel lists);
  `morpheme_type` is one of prefix, suffix, infix; `n_examples` is optional and, when
  present, must equal the number of examples. A group of fewer than `min_pairs` (3) pairs
  is dropped, as in the study, and the number dropped is logged: a mean offset of one or two
  pairs is no direction.
* device groups, for L_device::

    {"device": "portmanteau", "examples": ["chaosmos", "meandertale"]}

  The study's devices are nonce, malapropism, portmanteau, foreign and pun; any name is
  accepted. Each line is one group.

Words are NFC-normalised, as the lexicon and the corpus are (wake2vec.tokens.vocab). Every error
names the file and the line, and says what is wrong there.

The study's annotation files are not public, so `build_affix_groups` derives morpheme
groups mechanically (experiments/build_groups.py writes them). `alignment_data` turns groups
into the arrays the losses take, each word spelt with the pieces running text gives it:
the study's terms tokenized words without their word-start marker and so mostly moved rows
that running text never uses (`running_text_pieces`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import unicodedata
from typing import Iterable, Iterator, Sequence

import numpy as np

from wake2vec.tokens import vocab
from wake2vec.phases.alignment import AlignmentData, WordPieces
from wake2vec.analysis import source_pairs
from wake2vec.training.data import read_utf8
from wake2vec.errors import UserError
from wake2vec.tokens.words import WORD

MORPHEME_TYPES = ("prefix", "suffix", "infix")
STUDY_DEVICES = ("nonce", "malapropism", "portmanteau", "foreign", "pun")
MIN_PAIRS = 3


class GroupFileError(UserError, ValueError):
    """A group file that cannot be read: bad JSON, a missing or malformed field (file:line named)."""


@dataclasses.dataclass(frozen=True)
class MorphemeGroup:
    """One morpheme and its (word, stem) pairs: examples[i] is bases[i] plus the morpheme."""

    morpheme: str
    morpheme_type: str
    examples: tuple[str, ...]
    bases: tuple[str, ...]

    @property
    def n_examples(self) -> int:
        return len(self.examples)

    def as_dict(self) -> dict:
        return {"morpheme": self.morpheme, "morpheme_type": self.morpheme_type, "examples": list(self.examples),
                "bases": list(self.bases), "n_examples": self.n_examples}


@dataclasses.dataclass(frozen=True)
class DeviceGroup:
    """Words that share one Wake device (nonce, malapropism, portmanteau, foreign, pun)."""

    device: str
    examples: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"device": self.device, "examples": list(self.examples)}


def _records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where = "file:line", object) for each non-blank line of a JSONL file."""
    text = read_utf8(path, error=GroupFileError, what="group file")
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise GroupFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object "
                                 "per line") from None
        if not isinstance(record, dict):
            raise GroupFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def _text(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise GroupFileError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        raise GroupFileError(f"{where}: {name!r} must be a non-empty string, got {value!r}")
    return unicodedata.normalize("NFC", value.strip())


def _words(record: dict, name: str, where: str) -> tuple[str, ...]:
    if name not in record:
        raise GroupFileError(f"{where}: missing field {name!r}")
    value = record[name]
    if not isinstance(value, list) or not value:
        raise GroupFileError(f"{where}: {name!r} must be a non-empty list of words")
    words = []
    for word in value:
        if not isinstance(word, str) or not word.strip() or any(ch.isspace() for ch in word.strip()):
            raise GroupFileError(f"{where}: {name!r} holds {word!r}, which is not one word")
        words.append(unicodedata.normalize("NFC", word.strip()))
    return tuple(words)


def read_morpheme_groups(path: str | os.PathLike, min_pairs: int = MIN_PAIRS) -> list[MorphemeGroup]:
    """The morpheme groups of a JSONL file (see the module docstring), those under `min_pairs` dropped."""
    groups, dropped = [], 0
    for where, record in _records(path):
        morpheme = _text(record, "morpheme", where)
        kind = _text(record, "morpheme_type", where)
        if kind not in MORPHEME_TYPES:
            raise GroupFileError(f"{where}: morpheme_type {kind!r} is not one of {', '.join(MORPHEME_TYPES)}")
        examples, bases = _words(record, "examples", where), _words(record, "bases", where)
        if len(examples) != len(bases):
            raise GroupFileError(f"{where}: {len(examples)} examples but {len(bases)} bases; bases[i] is the stem "
                                 "of examples[i], so the lists must be parallel")
        stated = record.get("n_examples")
        if stated is not None and stated != len(examples):
            raise GroupFileError(f"{where}: n_examples is {stated!r} but there are {len(examples)} examples")
        if len(examples) < min_pairs:
            dropped += 1
            continue
        groups.append(MorphemeGroup(morpheme, kind, examples, bases))
    logging.info("%s: %d morpheme groups, %d under %d pairs dropped", path, len(groups), dropped, min_pairs)
    return groups


def read_device_groups(path: str | os.PathLike) -> list[DeviceGroup]:
    """The device groups of a JSONL file (see the module docstring), one per line."""
    groups = [DeviceGroup(_text(record, "device", where), _words(record, "examples", where))
              for where, record in _records(path)]
    logging.info("%s: %d device groups", path, len(groups))
    return groups


def write_groups(path: str | os.PathLike, groups: Iterable[MorphemeGroup | DeviceGroup]) -> None:
    """Writes groups as JSONL (UTF-8, one object per line), atomically: a reader never sees half a file."""
    from wake2vec.training.workdir import atomic_write_text

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(g.as_dict(), ensure_ascii=False) + "\n" for g in groups))


@dataclasses.dataclass(frozen=True)
class Affix:
    morpheme_type: str  # prefix or suffix
    morpheme: str

    def stem(self, word: str) -> str | None:
        """The word without the affix, or None when the word does not carry it."""
        if self.morpheme_type == "suffix":
            return word[: -len(self.morpheme)] if word.endswith(self.morpheme) else None
        return word[len(self.morpheme):] if word.startswith(self.morpheme) else None


AFFIXES = (Affix("suffix", "s"), Affix("suffix", "ed"), Affix("suffix", "ing"), Affix("suffix", "y"),
           Affix("prefix", "un"), Affix("prefix", "re"))
MIN_STEM = 3


def base_whole_words(base_tokenizer) -> set[str]:
    """The words that are one base token with its word-start marker ("▁house", "Ġhouse").

    The same definition as the source ranks' English side (analysis.source_pairs), narrowed
    to words (wake2vec.tokens.words): these are the stems running text spells as one known row.
    Pass the base tokenizer: an injected one would count the Wake words themselves.
    """
    tokens = base_tokenizer.convert_ids_to_tokens(list(range(len(base_tokenizer))))
    marker = source_pairs.word_start_marker(tokens)
    return {word for word in source_pairs.whole_word_ids(tokens, marker) if WORD.fullmatch(word)}


def build_affix_groups(lexicon_words: Iterable[str], base_vocab_words: Iterable[str],
                       affixes: Sequence[Affix] = AFFIXES, *, min_pairs: int = MIN_PAIRS,
                       min_stem: int = MIN_STEM) -> list[MorphemeGroup]:
    """Morpheme groups for users without an annotation: a Wake word = a base whole word + an affix.

    For each affix, the lexicon words that carry it (plain concatenation: no spelling rules,
    so "making" is not "make" + "ing") whose remainder is a word of `base_vocab_words`
    (`base_whole_words`) of at least `min_stem` letters; two-letter remainders are mostly
    word-initial fragments of the vocabulary ("▁ty", "▁hy"), not stems. One group per affix,
    pairs in lexicon order; groups under `min_pairs` pairs dropped. A word carrying two
    affixes is in both groups.
    """
    base = set(base_vocab_words)
    words = list(dict.fromkeys(lexicon_words))
    groups = []
    for affix in affixes:
        pairs = [(word, stem) for word in words
                 if (stem := affix.stem(word)) is not None and len(stem) >= min_stem and stem in base]
        if len(pairs) >= min_pairs:
            groups.append(MorphemeGroup(affix.morpheme, affix.morpheme_type, *map(tuple, zip(*pairs))))
    return groups


def affix_counts(lexicon_words: Iterable[str], groups: Sequence[MorphemeGroup]) -> dict:
    """What `build_affix_groups` found: groups, pairs, pairs per group, lexicon words matched or not."""
    lexicon = set(lexicon_words)
    matched = {word for group in groups for word in group.examples}
    return {
        "groups": len(groups),
        "pairs": sum(group.n_examples for group in groups),
        "pairs_per_group": {f"{group.morpheme_type} {group.morpheme}": group.n_examples for group in groups},
        "words_matched": len(matched & lexicon),
        "words_unmatched": len(lexicon - matched),
    }


def running_text_pieces(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Each word's ids as running text tokenizes it: mid-sentence, after a space, with `tokenizer`.

    Pass the injected tokenizer the model trains with: a whole-word-injected lexicon word is
    then its single new id, and a base word its usual pieces (every piece kept, a bare
    word-start marker too: it is a row the word really uses). The study took the pieces of
    the word without its marker ("house" rather than "▁house"), which are other rows.
    """
    return [ids for ids, _ in vocab.pieces_in_running_text(tokenizer, list(words))]


def pack_pieces(piece_lists: Sequence[Sequence[int]]) -> WordPieces:
    """WordPieces (W, P) from per-word id lists, padded with id 0 to the longest (P >= 1)."""
    width = max([1, *(len(ids) for ids in piece_lists)])
    ids = np.zeros((len(piece_lists), width), np.int32)
    mask = np.zeros((len(piece_lists), width), bool)
    for row, word_ids in enumerate(piece_lists):
        ids[row, : len(word_ids)], mask[row, : len(word_ids)] = word_ids, True
    return WordPieces(ids, mask)


def alignment_data(tokenizer, morpheme_groups: Sequence[MorphemeGroup], device_groups: Sequence[DeviceGroup],
                   base_size: int, *, band: tuple[float, float], wake_ids: Sequence[int] | None = None
                   ) -> tuple[AlignmentData, dict]:
    """(AlignmentData, stats) for the groups under `tokenizer` (the injected one the model uses).

    `band` is (mu, sigma) of `alignment.norm_band` on the table at the start; `wake_ids` the
    trainable Wake rows, by default every id from `base_size` to len(tokenizer) (padding rows
    beyond the tokenizer are never included). Rows < base_size are the frozen base rows.

    stats says how much of the data can move anything: the study's L_morph mostly touched
    frozen base rows, so `morph_pairs_touching_trainable` counts the pairs with at least one
    piece (of the word or of its stem) at or above base_size, and
    `device_words_touching_trainable` likewise; `group_names` labels the groups in index
    order (for the analysis).
    """
    morph_words = [word for group in morpheme_groups for word in group.examples]
    morph_bases = [base for group in morpheme_groups for base in group.bases]
    morph_group = [g for g, group in enumerate(morpheme_groups) for _ in group.examples]
    device_words = [word for group in device_groups for word in group.examples]
    device = [g for g, group in enumerate(device_groups) for _ in group.examples]
    distinct = list(dict.fromkeys(morph_words + morph_bases + device_words))
    pieces = dict(zip(distinct, running_text_pieces(tokenizer, distinct)))

    def trainable(word: str) -> bool:
        return max(pieces[word]) >= base_size

    if wake_ids is None:
        wake_ids = range(base_size, len(tokenizer))
    data = AlignmentData(
        morph_words=pack_pieces([pieces[w] for w in morph_words]),
        morph_bases=pack_pieces([pieces[w] for w in morph_bases]),
        morph_group=np.asarray(morph_group, np.int32),
        device_words=pack_pieces([pieces[w] for w in device_words]),
        device=np.asarray(device, np.int32),
        wake_ids=np.asarray(list(wake_ids), np.int32),
        mu=np.float32(band[0]),
        sigma=np.float32(band[1]),
        num_groups=max(1, len(morpheme_groups)),
    )
    stats = {
        "morph_groups": len(morpheme_groups),
        "morph_pairs": len(morph_words),
        "morph_pairs_touching_trainable": sum(trainable(w) or trainable(b) for w, b in zip(morph_words, morph_bases)),
        "morph_words_one_new_row": sum(len(pieces[w]) == 1 and trainable(w) for w in morph_words),
        "device_groups": len(device_groups),
        "device_words": len(device_words),
        "device_words_touching_trainable": sum(trainable(w) for w in device_words),
        "wake_rows": len(data.wake_ids),
        "max_pieces": int(max(data.morph_words.ids.shape[1], data.morph_bases.ids.shape[1],
                              data.device_words.ids.shape[1])),
        "group_names": {"morph": [f"{g.morpheme_type} {g.morpheme}" for g in morpheme_groups],
                        "device": [g.device for g in device_groups]},
    }
    logging.info("alignment data: %d of %d morpheme pairs and %d of %d device words touch a trainable row",
                 stats["morph_pairs_touching_trainable"], stats["morph_pairs"],
                 stats["device_words_touching_trainable"], stats["device_words"])
    return data, stats
