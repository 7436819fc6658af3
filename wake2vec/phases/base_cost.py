"""Bits per character against the base model, and what each Wake word costs.

A loss per token cannot compare two tokenizers: the injected one spells a Wake word in one
token, the base one in several. Per character it can. For every validation block this
module finds the block's characters (by the injected tokenizer's offsets), encodes exactly
those characters with the base tokenizer, and scores them once with the base model: the
checkpoint as shipped: the run's frozen body, the base rows of its step-0 table and the
checkpoint's own head where it has one (also when the run ties its head), no new row.

Block boundaries: the first token of a block has no context under either model, so each
model's figure is the nats of every token after its own first one, over the characters
those tokens cover: from the end of the first token to the end of the block. The two spans
differ only by the two first tokens' lengths, and each figure is divided by its own span.

A Wake word is an occurrence (wake2vec.tokens.words) of a lexicon word in a block's text
whose injected spelling holds a new token; it is *seen* when one of those new tokens occurs
in a training block. Its cost under a model is the nats of the tokens whose character span
overlaps the word, plus the token after them (what the word does to the next prediction).
An occurrence is counted only when both tokenizers spell it after their first token and
follow it with a token in the block, so both models are averaged over the same occurrences.

The run's word costs come from the same eval pass as its loss: each occurrence adds 1 to
the weight of its tokens' predictions in two extra weight columns (seen, unseen), so the
cost is one more weighted sum of the chunked logits, not a second pass.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time

import jax
import numpy as np

from wake2vec.errors import UserError
from wake2vec.tokens import segmentation
from wake2vec.tokens.words import word_spans
from wake2vec.training import data, train, workdir as records

CACHE = "base_cost.json"
_FORMAT = 1
WORD_CLASSES = ("seen", "unseen")


class BaseLengthError(UserError, ValueError):
    """The base tokenizer spells a validation block in more tokens than the model has positions."""


@dataclasses.dataclass
class Spans:
    """The validation blocks' characters under both tokenizers, computed on the host once per start."""

    run_chars: int
    run_bytes: int
    # (blocks, T-1, 2) float32: per prediction of the run, how many Wake-word occurrences (seen, unseen) it costs.
    run_word_weights: np.ndarray
    word_counts: tuple[int, int]
    base_ids: np.ndarray  # (blocks, L) int32, zero-padded
    base_weights: np.ndarray  # (blocks, L-1, 3): real predictions, then the word weights as above
    base_chars: int
    base_bytes: int


def _block_offsets(tokenizer, text: str, ids: np.ndarray, cfg) -> np.ndarray:
    """(val blocks, T, 2) character offsets of the validation blocks, cut as prepare cuts the ids."""
    enc = data.tokenizers_backend(tokenizer).encode(text, add_special_tokens=False)
    if not np.array_equal(np.asarray(enc.ids), ids):
        raise AssertionError("re-encoding the corpus gave other ids than the run's: the offsets would not match its blocks")
    index = data.make_blocks(np.arange(len(ids), dtype=np.int32), cfg.seq_len)
    val_index = data.split_blocks(index, cfg.val_fraction, cfg.split_shuffle_seed)[1]
    if cfg.eval_blocks > 0:
        val_index = val_index[: cfg.eval_blocks]
    return np.asarray(enc.offsets, np.int64).reshape(-1, 2)[val_index]


def measure(text: str, ids: np.ndarray, tokenizer, base_tokenizer, lexicon, base_size: int, train_counts: np.ndarray,
            cfg, max_positions: int) -> Spans:
    """Both tokenizers' spans of the (capped, --eval_blocks) validation blocks, and the Wake-word weights."""
    offsets = _block_offsets(tokenizer, text, ids, cfg)
    blocks = data.split_ids(ids, cfg.seq_len, cfg.val_fraction, cfg.split_shuffle_seed)[1]
    blocks = blocks[: len(offsets)]
    lexicon = set(lexicon)
    spans = np.asarray([s for s in word_spans(text) if text[s[0]:s[1]] in lexicon], np.int64).reshape(-1, 2)
    base = data.tokenizers_backend(base_tokenizer)
    n, length = blocks.shape
    run_weights = np.zeros((n, length - 1, 2), np.float32)
    base_rows, base_word_rows = [], []
    run_chars = run_bytes = base_chars = base_bytes = 0
    counts = [0, 0]
    for b, (block, off) in enumerate(zip(blocks, offsets)):
        start, first_end, end = int(off[0, 0]), int(off[0, 1]), int(off[-1, 1])
        enc = base.encode(text[start:end], add_special_tokens=False)
        b_ids, b_off = np.asarray(enc.ids, np.int32), np.asarray(enc.offsets, np.int64).reshape(-1, 2) + start
        if len(b_ids) > max_positions:
            raise BaseLengthError(f"the base tokenizer spells a validation block of --seq_len={cfg.seq_len} tokens in "
                                  f"{len(b_ids)}, past the model's {max_positions} positions; pass a smaller --seq_len")
        run_chars += end - first_end
        run_bytes += len(text[first_end:end].encode("utf-8"))
        base_chars += end - int(b_off[0, 1])
        base_bytes += len(text[int(b_off[0, 1]):end].encode("utf-8"))
        base_word = np.zeros((len(b_ids) - 1, 2), np.float32)
        inside = spans[(spans[:, 0] >= first_end) & (spans[:, 1] <= end)]
        first, last = segmentation.overlapping(off, inside)
        b_first, b_last = segmentation.overlapping(b_off, inside)
        for f, l, bf, bl in zip(first, last, b_first, b_last):
            new = block[f:l][block[f:l] >= base_size]
            if f < 1 or bf < 1 or l >= length or bl >= len(b_ids) or new.size == 0:
                continue
            cls = 0 if np.any(train_counts[new] > 0) else 1
            counts[cls] += 1
            # Prediction j has target j + 1: the word's tokens f..l-1 and the one after, l.
            run_weights[b, f - 1:l, cls] += 1
            base_word[bf - 1:bl, cls] += 1
        base_rows.append(b_ids)
        base_word_rows.append(base_word)
    width = max(len(r) for r in base_rows)
    base_ids = np.zeros((n, width), np.int32)
    base_weights = np.zeros((n, width - 1, 3), np.float32)
    for b, (row, word) in enumerate(zip(base_rows, base_word_rows)):
        base_ids[b, :len(row)] = row
        base_weights[b, :len(row) - 1, 0] = 1
        base_weights[b, :len(row) - 1, 1:] = word
    return Spans(run_chars, run_bytes, run_weights, tuple(counts), base_ids, base_weights, base_chars, base_bytes)


def base_params(trainable: dict, base_size: int, source_head: dict | None) -> dict:
    """The model as shipped: the step-0 table's first base_size rows (the source's own), and the
    checkpoint's own head when it has one, even where the run ties its head to the table."""
    params = {"embedding": np.asarray(trainable["embedding"])[:base_size]}
    if source_head is not None:
        params["lm_head"] = {"kernel": np.asarray(source_head["kernel"])}
    return params


def _cache_key(spans: Spans, base: dict, frozen_record: dict, settings: train.StepSettings) -> str:
    """sha256 over everything the base scores are a function of: its ids and weights, its rows, the body and dtypes."""
    digest = hashlib.sha256(json.dumps({"format": _FORMAT, "body": frozen_record, "dtype": str(settings.compute_dtype),
                                        "model": repr(settings.model_cfg)}, sort_keys=True).encode())
    for array in (spans.base_ids, spans.base_weights, *jax.tree_util.tree_leaves(base)):
        digest.update(records.array_sha256(array).encode())
    return digest.hexdigest()


def score_base(frozen: dict, base: dict, spans: Spans, settings: train.StepSettings, batch: int) -> np.ndarray:
    """(3,) float64: the base model's nats of every token after each block's first, then its word sums (seen, unseen)."""
    model_cfg = settings.model_cfg.replace(vocab_size=base["embedding"].shape[0], tie_word_embeddings="lm_head" not in base)
    base_settings = dataclasses.replace(settings, model_cfg=model_cfg)
    step = jax.jit(lambda t, f, ids, w: train.weighted_loss_sum(t, f, ids, w, base_settings))
    base = jax.tree_util.tree_map(jax.numpy.asarray, base)
    total = np.zeros(3)
    for start in range(0, len(spans.base_ids), batch):
        ids, weights = spans.base_ids[start:start + batch], spans.base_weights[start:start + batch]
        pad = batch - len(ids)  # a fixed shape: one compile
        ids = np.pad(ids, ((0, pad), (0, 0)))
        weights = np.pad(weights, ((0, pad), (0, 0), (0, 0)))
        total += np.asarray(step(base, frozen, ids, weights), np.float64)
    return total


def base_figures(workdir: pathlib.Path, frozen: dict, base: dict, spans: Spans, settings: train.StepSettings, batch: int,
                 frozen_record: dict) -> dict:
    """The base model's figures, from workdir/base_cost.json when its key matches, else scored and cached."""
    key = _cache_key(spans, base, frozen_record, settings)
    path = workdir / CACHE
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = None
    if isinstance(cached, dict) and cached.get("key") == key:
        logging.info("base model costs read from %s", path)
        return cached["figures"]
    started = time.process_time()
    nats = score_base(frozen, base, spans, settings, batch)
    figures = {"base_nats_per_char": float(nats[0] / spans.base_chars),
               "base_bits_per_byte": float(nats[0] / math.log(2) / spans.base_bytes)}
    for i, cls in enumerate(WORD_CLASSES):
        figures[f"base_word_nats_{cls}"] = float(nats[1 + i] / spans.word_counts[i]) if spans.word_counts[i] else None
    logging.info("scored the base model on the validation characters in %.1f CPU-s: %s", time.process_time() - started, figures)
    records.atomic_write_text(path, json.dumps({"key": key, "figures": figures}, indent=1) + "\n")
    return figures


def eval_fields(run_nats: float, run_word_nats, spans: Spans, base: dict) -> dict:
    """The eval event's per-character fields: the run's, the base's and their difference (negative: the run is better)."""
    fields = {"val_nats_per_char": run_nats / spans.run_chars, "val_bits_per_byte": run_nats / math.log(2) / spans.run_bytes,
              "base_nats_per_char": base["base_nats_per_char"], "base_bits_per_byte": base["base_bits_per_byte"]}
    fields["delta_nats_per_char"] = fields["val_nats_per_char"] - fields["base_nats_per_char"]
    fields["delta_bits_per_byte"] = fields["val_bits_per_byte"] - fields["base_bits_per_byte"]
    for i, cls in enumerate(WORD_CLASSES):
        count = spans.word_counts[i]
        fields[f"val_word_nats_{cls}"] = float(run_word_nats[i] / count) if count else None
        fields[f"base_word_nats_{cls}"] = base[f"base_word_nats_{cls}"]
        fields[f"word_occurrences_{cls}"] = count
    return fields


@dataclasses.dataclass
class Setup:
    """What the loop needs to report the per-character figures: the spans, the base rows
    (dropped once scored) and the body's identity."""

    spans: Spans
    base: dict | None
    body: dict


def setup(prepared, cfg) -> Setup:
    """Phase 1's Setup from its PreparedRun, before the loop consumes the step-0 arrays."""
    base_size = prepared.vocab_stats.base_size
    counts = train.training_counts(prepared.train_blocks, prepared.model_cfg.vocab_size)
    spans = measure(prepared.corpus_text, prepared.corpus_ids, prepared.tokenizer, prepared.base_tokenizer, prepared.lexicon,
                    base_size, counts, cfg, prepared.model_cfg.max_position_embeddings)
    return Setup(spans, base_params(prepared.trainable, base_size, prepared.source_head),
                 {"source_hash": prepared.record["source_hash"], "frozen_dtype": cfg.frozen_dtype})


def last_eval(events: list[dict]) -> dict | None:
    """The per-character and per-word fields of the last evaluation that has them (for summary.json)."""
    for event in reversed(events):
        if "val_nats_per_char" in event:
            return {k: v for k, v in event.items()
                    if k == "step" or k.endswith(("_per_char", "_per_byte")) or "word_" in k}
    return None
