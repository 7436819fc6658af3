"""Vocabulary padding: the one place that adds and cuts the rows that are no tokens.

The trainable table (and an untied head) is padded to a multiple of lcm(128, |model|) rows:
128 so that XLA tiles the head matmul cleanly, |model| so that it shards evenly over the
mesh's 'model' axis. (128 x |model|, the rule before, made mesh 1,8 pay 14% more head FLOPs
than 8,1 at the demo shape: 1,474 rows became 2,048 instead of 1,536. A shard needs equal
rows, not 128 of them: the lane dimension is the hidden size.) The
padding rows are zero, get no probability in the loss (wake2vec.training.train masks them out of
the softmax) and so no gradient, and must be invisible to every statistic: the optimiser
reads the real rows through `real_rows` (wake2vec.training.optim), and everything a user sees (the
analysis, snapshots, the export) goes through `unpad` first.

The vocabulary axis is 0 for the (rows, D) table and 1 for the (D, rows) head kernel;
`vocab_axis` says which for a leaf of the trainable tree, so the same rule serves the
parameters, their gradients and their updates.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# XLA's lane width on TPU and a friendly tile for GPU matmuls.
MULTIPLE = 128


def padded_rows(vocab_size: int, model_axis: int = 1) -> int:
    """The table's row count: vocab_size rounded up to a multiple of lcm(128, model_axis)."""
    multiple = math.lcm(MULTIPLE, model_axis)
    return -(-vocab_size // multiple) * multiple


def vocab_axis(top_key: str) -> int:
    """The vocabulary axis of a trainable leaf under `top_key` ('embedding' or 'lm_head')."""
    return 0 if top_key == "embedding" else 1


def _pad_axis(array: np.ndarray, axis: int, rows: int) -> np.ndarray:
    if rows < array.shape[axis]:
        raise ValueError(f"cannot pad {array.shape[axis]} rows down to {rows}")
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, rows - array.shape[axis])
    return np.pad(array, widths)


def _cut_axis(array, axis: int, rows: int):
    if rows > array.shape[axis]:
        raise ValueError(f"cannot cut {array.shape[axis]} rows to {rows} real ones")
    return array[(slice(None),) * axis + (slice(0, rows),)]


def _map_tables(fn, tree: dict, rows: int) -> dict:
    """fn over the table and an untied head of `tree`; every other subtree passes through
    (Phase 2's adapters, or the body when the table is frozen beside it)."""
    out = dict(tree)
    if "embedding" in tree:
        out["embedding"] = fn(tree["embedding"], vocab_axis("embedding"), rows)
    if "lm_head" in tree:
        out["lm_head"] = {"kernel": fn(tree["lm_head"]["kernel"], vocab_axis("lm_head"), rows)}
    return out


def pad(tree: dict, rows: int) -> dict:
    """Zero rows appended to the vocabulary axis of the table and an untied head (host arrays)."""
    return _map_tables(_pad_axis, tree, rows)


def unpad(tree: dict, vocab_size: int) -> dict:
    """The table and an untied head cut to their first `vocab_size` rows (the real tokens)."""
    return _map_tables(_cut_axis, tree, vocab_size)


def unpad_table(table, vocab_size: int):
    """The (vocab_size, D) real rows of a padded (rows, D) table (numpy or jax)."""
    return _cut_axis(table, vocab_axis("embedding"), vocab_size)


def rows_in(shape: tuple[int, ...], axis: int, start: int, stop: int | None) -> jnp.ndarray:
    """A boolean mask broadcastable to `shape`: True on rows [start, stop) of `axis`.

    stop None means every row from `start` on. Traced inside the jitted step, so it costs
    an iota, not a host array per shape.
    """
    index = jnp.arange(shape[axis])
    keep = index >= start
    if stop is not None:
        keep = keep & (index < stop)
    return keep.reshape([-1 if a == axis else 1 for a in range(len(shape))])
