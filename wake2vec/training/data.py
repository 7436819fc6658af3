"""The training text: corpus file -> token ids -> fixed blocks -> train / val -> batches.

The reference run tokenized the whole Wake as one string (add_special_tokens=False), cut it
into non-overlapping 256-token blocks, trained on the first 90% and validated on the rest.
This module does exactly that, and adds two things the notebook lacked:

* the tokenization is cached in the workdir, keyed by everything that determines it, so a
  resumed run neither re-tokenizes nor silently uses ids from a different tokenizer;
* a training batch is a pure function of (seed, step), so a run resumed at step N sees the
  same batches as the uninterrupted run (the reference's data order restarted with every
  manual resume).
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import unicodedata
from typing import Iterator

import numpy as np
from absl import logging

from wake2vec.training import workdir as records
from wake2vec.errors import UserError


class CorpusError(UserError, ValueError):
    """The corpus (or a setting that depends on it) cannot produce training blocks."""


def read_utf8(path: str | os.PathLike, *, error: type[Exception], what: str) -> str:
    """Returns a UTF-8 file's text with newlines normalised to "\\n" and a leading BOM dropped.

    Undecodable input raises `error` naming the file and the 1-based line of the first bad
    byte, so the user can fix that line instead of guessing the encoding of the whole file.
    Newlines are normalised as Python's text mode does ("\\r\\n" and "\\r" become "\\n"),
    which is how the reference notebook read its files. `what` names the input ("corpus",
    "lexicon") in messages.
    """
    p = pathlib.Path(path)
    if not p.exists():
        raise error(f"{what} file {p} does not exist; check the path")
    if not p.is_file():
        raise error(f"{what} path {p} is not a file; pass the path of a UTF-8 text file")
    raw = p.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise error(
            f"{p}:{line}: {what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at line {line}); "
            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {p} > fixed.txt`"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


# Project Gutenberg wraps its texts in "*** START OF THE PROJECT GUTENBERG EBOOK ... ***" and
# "*** END OF ... ***" lines; everything outside them is licence boilerplate, not the book.
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg_banners(text: str) -> str:
    """Keeps only the text between Gutenberg START/END banner lines (each one optional).

    Text without banners is returned unchanged, so the flag is safe to leave on (the
    default) for a bare transcription such as the reference's.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() if (start or end) else text


def read_corpus(path: str | os.PathLike, *, strip_banners: bool = True, start_marker: str = "") -> str:
    """Reads the training text: UTF-8, NFC, optionally de-bannered and anchored at a marker.

    The text is NFC-normalised because the lexicon is (wake2vec.tokens.vocab.load_lexicon): an
    accented coinage typed in decomposed form would otherwise never match its added token.
    The reference corpus is already NFC, so this changes none of its 360,623 tokens.
    `start_marker` drops everything before its first occurrence (the reference anchored at
    "riverrun"); a marker that does not occur is an error rather than a silent no-op.
    """
    text = unicodedata.normalize("NFC", read_utf8(path, error=CorpusError, what="corpus"))
    if not text.strip():
        raise CorpusError(f"corpus {path} is empty; pass --corpus=PATH to a non-empty UTF-8 text")
    if strip_banners:
        text = strip_gutenberg_banners(text)
    if start_marker:
        at = text.find(unicodedata.normalize("NFC", start_marker))
        if at < 0:
            raise CorpusError(
                f"start marker {start_marker!r} does not occur in corpus {path}; "
                "fix --start_marker or pass --start_marker='' to keep the whole text"
            )
        text = text[at:]
    if not text.strip():
        raise CorpusError(
            f"corpus {path} has no text left after banner stripping; "
            "check its *** START/END *** lines or pass --nostrip_banners"
        )
    return text


# Everything besides the tokenizer and the text that decides the ids. Bump "format" when the
# way ids are produced changes, so stale caches are ignored rather than trusted.
_TOKENIZE_SETTINGS = {"add_special_tokens": False, "whole_text": True, "dtype": "int32", "format": 1}


def tokenizers_backend(tokenizer):
    """The `tokenizers.Tokenizer` inside a transformers fast tokenizer (or the object itself)."""
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def corpus_cache_key(tokenizer, text: str) -> str:
    """sha256 over the tokenizer's full serialisation, the text and the tokenize settings.

    The serialisation (`Tokenizer.to_str()`) includes the added Wake tokens, so a cache
    written with a different lexicon or base tokenizer can never be picked up.
    """
    h = hashlib.sha256()
    for part in (tokenizers_backend(tokenizer).to_str(), text, json.dumps(_TOKENIZE_SETTINGS, sort_keys=True)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def corpus_cache_path(cache_dir, tokenizer, text: str) -> pathlib.Path:
    """Where tokenize_corpus caches the ids of `text` under `tokenizer`."""
    return pathlib.Path(cache_dir) / f"corpus_tokens_{corpus_cache_key(tokenizer, text)[:32]}.npy"


def tokenize_corpus(tokenizer, text: str, *, cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """Token ids of the whole text as one int32 vector, without BOS/EOS.

    The text goes through the tokenizer as ONE string, as in the reference run. Line by
    line is not equivalent: each line would get its own leading "▁" and lose its "\\n"
    byte token (323,641 tokens for the Wake instead of the reference's 360,623). Using the
    `tokenizers` backend directly runs exactly the tokenizer.json pipeline, with no
    transformers wrapper between (and no over-length warning for a 360k-token string).

    With `cache_dir`, the ids are stored as `corpus_tokens_<key>.npy` (key: see
    `corpus_cache_key`) and re-read on the next call instead of re-tokenizing.
    """
    cache_path = None
    if cache_dir is not None:
        cache_path = corpus_cache_path(cache_dir, tokenizer, text)
        if cache_path.is_file():
            try:
                ids = np.load(cache_path)
            except (OSError, ValueError, EOFError) as e:
                # A cache only saves time: an unreadable one is rebuilt, not an error.
                logging.warning("corpus token cache %s is unreadable (%s); re-tokenizing", cache_path, e)
            else:
                logging.info("corpus token ids read from cache %s", cache_path)
                return ids
    ids = np.asarray(tokenizers_backend(tokenizer).encode(text, add_special_tokens=False).ids, dtype=np.int32)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        # A run killed mid-write must not leave a truncated cache behind.
        records.atomic_save_npy(cache_path, ids)
        logging.info("corpus token ids (%d) cached in %s", ids.size, cache_path)
    return ids


def check_seq_len(seq_len: int, max_position_embeddings: int, source: str) -> None:
    """Refuses a block length the model cannot attend over, before any data work starts.

    Past `max_position_embeddings` RoPE rotates into angles the model never saw in
    pretraining; the loss would be meaningless rather than an error, so it is refused here.
    """
    if seq_len < 2:
        raise CorpusError(f"seq_len={seq_len} is too short: a block needs at least 2 tokens to predict one")
    if seq_len > max_position_embeddings:
        raise CorpusError(
            f"seq_len={seq_len} exceeds max_position_embeddings={max_position_embeddings} of {source}; "
            f"pass --seq_len={max_position_embeddings} or less"
        )


def make_blocks(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Cuts ids into non-overlapping (n_blocks, seq_len) int32 blocks, dropping the tail.

    The tail (fewer than seq_len ids) is dropped as in the reference; 360,623 Wake tokens
    give 1,408 blocks of 256 and a 175-token tail that is never trained on.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D vector, got shape {ids.shape}")
    if seq_len < 1:
        raise CorpusError(f"seq_len={seq_len} must be positive")
    n = ids.size // seq_len
    if n == 0:
        raise CorpusError(
            f"the corpus has {ids.size} tokens, fewer than one block of seq_len={seq_len}; "
            f"use a longer corpus or pass --seq_len={ids.size} or less"
        )
    return np.ascontiguousarray(ids[: n * seq_len].reshape(n, seq_len), dtype=np.int32)


def split_blocks(
    blocks: np.ndarray, val_fraction: float = 0.1, shuffle_seed: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Splits blocks into (train, val): the first int((1 - val_fraction) * n) train.

    Text order by default, as the reference (1,408 -> 1,267 / 141): validation is then the
    end of the book, unseen text rather than blocks interleaved with the training ones.
    A non-negative `shuffle_seed` permutes the blocks first (seeded, reproducible).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction={val_fraction} must be in [0, 1)")
    n = len(blocks)
    if shuffle_seed >= 0:
        blocks = blocks[np.random.default_rng(shuffle_seed).permutation(n)]
    n_train = int((1.0 - val_fraction) * n)
    if n_train < 1 or (val_fraction > 0 and n_train == n):
        raise CorpusError(
            f"{n} block(s) cannot be split into train and validation with val_fraction={val_fraction}; "
            "use a longer corpus, a smaller --seq_len, or another --val_fraction"
        )
    return blocks[:n_train], blocks[n_train:]


@dataclasses.dataclass(frozen=True)
class CorpusStats:
    """What the data pipeline produced; recorded as config.json's "data" entry."""

    corpus_tokens: int
    train_blocks: int
    val_blocks: int
    seq_len: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The block order of one epoch; cached because consecutive steps share an epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def split_ids(ids: np.ndarray, seq_len: int, val_fraction: float, shuffle_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) blocks of a token-id vector: make_blocks then split_blocks, the one rule every
    phase, the base-model cost and the analysis CLI must apply alike to see the same blocks."""
    return split_blocks(make_blocks(ids, seq_len), val_fraction, shuffle_seed)


def train_batch(train_blocks: np.ndarray, step: int, *, seed: int, batch_size: int, grad_accum: int) -> np.ndarray:
    """The (grad_accum, batch_size, seq_len) int32 blocks of optimizer step `step`.

    A pure function of (seed, step): sample i = (step * grad_accum + a) * batch_size + b
    belongs to epoch i // n and is block perm(seed, epoch)[i % n], where perm is a fresh
    permutation per epoch. So every epoch visits each block exactly once, and a run resumed
    at any step draws the same batches as one that never stopped, without saving any
    data-loader state.
    """
    if step < 0 or seed < 0 or batch_size < 1 or grad_accum < 1:
        raise ValueError(
            f"need step >= 0, seed >= 0, batch_size >= 1, grad_accum >= 1; "
            f"got step={step}, seed={seed}, batch_size={batch_size}, grad_accum={grad_accum}"
        )
    n = len(train_blocks)
    per_step = grad_accum * batch_size
    sample = step * per_step + np.arange(per_step, dtype=np.int64)
    epochs, pos = np.divmod(sample, n)
    index = np.empty(per_step, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        index[sel] = _epoch_order(seed, int(epoch), n)[pos[sel]]
    return np.asarray(train_blocks[index], dtype=np.int32).reshape(grad_accum, batch_size, -1)


def eval_batches(val_blocks: np.ndarray, batch_size: int, max_blocks: int = 0) -> Iterator[np.ndarray]:
    """Yields validation blocks in order, batch_size at a time; `max_blocks` > 0 caps them.

    The last batch holds the remainder and may be smaller: nothing is dropped or padded, so
    the mean loss over all yielded blocks is exact, provided the caller weights each batch
    by its number of blocks. (A jitted eval step compiles once more for that last shape.)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    blocks = val_blocks[:max_blocks] if max_blocks > 0 else val_blocks
    for start in range(0, len(blocks), batch_size):
        yield np.asarray(blocks[start : start + batch_size], dtype=np.int32)
