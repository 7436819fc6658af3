"""The new rows split by training exposure: those a training block holds (seen) and those none does.

A new row that no training block holds is never a target, so the only gradient it receives is
the softmax's push-down from every other target (and, tied, nothing as an input): its norm
and drift describe what that does, not what training teaches. The analysis reports the two
groups apart when it is given `train_counts`, the per-new-row number of occurrences in the
training blocks (wake2vec.training.train.training_counts over the new rows: the counts the
eval's seen / unseen split uses).
"""

from __future__ import annotations

import numpy as np

from wake2vec.analysis import metrics

GROUPS = ("new_seen", "new_unseen")


def new_row_counts(train_counts, n_rows: int, n_base: int) -> np.ndarray | None:
    """The (n_new,) int counts; a full-vocabulary array (n_rows,) is cut to its new rows."""
    if train_counts is None:
        return None
    counts = np.asarray(train_counts)
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"train_counts must be a 1-D integer array, got {counts.dtype} {counts.shape}")
    if counts.size == n_rows:
        counts = counts[n_base:]
    if counts.size != n_rows - n_base:
        raise ValueError(f"train_counts has {counts.size} entries; expected one per new row ({n_rows - n_base}) "
                         f"or per row ({n_rows})")
    if np.any(counts < 0):
        raise ValueError("train_counts holds negative counts")
    return counts


def masks(counts: np.ndarray) -> dict[str, np.ndarray]:
    return {"new_seen": counts > 0, "new_unseen": counts == 0}


def norms(new_norms: np.ndarray, counts: np.ndarray) -> dict:
    """norms.new_seen / new_unseen: describe() of each group, None for an empty one."""
    return {name: metrics.describe(new_norms[mask]) if mask.any() else None for name, mask in masks(counts).items()}


def drift(cosines: np.ndarray, distances: np.ndarray, counts: np.ndarray, n_base: int, drift_of) -> dict:
    """drift.new_seen / new_unseen: drift_of(cosines, distances, ids) of each group, None for an empty one."""
    ids = np.arange(counts.size) + n_base
    return {name: drift_of(cosines[mask], distances[mask], ids[mask]) if mask.any() else None
            for name, mask in masks(counts).items()}
