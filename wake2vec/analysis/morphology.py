"""Is the Wake's morphology visible in the table? Phase 3's two questions, before and after.

* Morpheme-direction consistency: for each pair of a morpheme group, the cosine of its
  offset d_i = v(word_i) - v(base_i) with the group's mean offset mu_g. 1 means every pair
  of the group moves along one direction (what L_morph pushes towards); around 0, the
  offsets share nothing. Reported per group (mean over its pairs) and overall (over pairs,
  and over groups so that large groups do not drown small ones).
* Device-group separation: of the device groups' word vectors, the mean cosine of two words
  of one group minus the mean cosine of two words of different groups (per group and
  overall), and the silhouette score with cosine distance (sklearn), in [-1, 1].

v(w) is the mean of the rows of w's running-text pieces, as in wake2vec.phases.alignment; the
groups come as the AlignmentData the losses take (wake2vec.phases.groups.alignment_data), read
here as plain numpy arrays, so this module needs no JAX. Each measure is taken on the
trained table and, given the snapshot before step 0, on it too: the change is the result.
All numbers are float64; a cosine with an all-zero vector is 0 (metrics' convention).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from wake2vec.analysis.metrics import _unit_rows_float64
from wake2vec.analysis.plots import MorphologyFigureData

# Device words measured at most (a seeded subsample beyond): the Gram matrix is n^2.
MAX_DEVICE_WORDS = 4096


def word_vectors(table, ids, mask) -> np.ndarray:
    """(W, D) float64: the mean of the rows of each word's pieces (ids[w][mask[w]])."""
    ids, mask = np.asarray(ids), np.asarray(mask, dtype=np.float64)
    rows = np.asarray(table)[ids].astype(np.float64)  # (W, P, D)
    return np.einsum("wpd,wp->wd", rows, mask) / np.maximum(mask.sum(axis=1), 1.0)[:, None]


def morpheme_consistency(table, words, bases, group, num_groups: int) -> dict:
    """cos(d_i, mu_g) of every pair, averaged per group and overall (see the module docstring).

    `words`, `bases`: (ids, mask) pairs, as alignment.WordPieces. A group without pairs has
    None as its mean.
    """
    group = np.asarray(group)
    offsets = word_vectors(table, *words) - word_vectors(table, *bases)
    counts = np.bincount(group, minlength=num_groups)
    sums = np.zeros((num_groups, offsets.shape[1]))
    np.add.at(sums, group, offsets)
    means = sums / np.maximum(counts, 1)[:, None]
    cosines = np.einsum("nd,nd->n", _unit_rows_float64(offsets), _unit_rows_float64(means)[group])
    per_group = [float(cosines[group == g].mean()) if counts[g] else None for g in range(num_groups)]
    filled = [c for c in per_group if c is not None]
    return {
        "per_group": per_group,
        "pairs_per_group": counts.tolist(),
        "mean_over_pairs": float(cosines.mean()) if cosines.size else None,
        "mean_over_groups": float(np.mean(filled)) if filled else None,
    }


def device_separation(table, words, device) -> dict:
    """Mean intra-group minus mean inter-group cosine, per group and overall, and the silhouette.

    Intra: pairs of distinct words of one group; inter: pairs of words of different groups.
    A group of one word has no intra pair (None); the silhouette needs at least two groups
    and fewer groups than words (None otherwise). A word listed in two groups is measured as
    a member of each.
    """
    from sklearn.metrics import silhouette_score

    device = np.asarray(device)
    unit = _unit_rows_float64(word_vectors(table, *words))
    gram = unit @ unit.T
    labels, index = np.unique(device, return_inverse=True)
    onehot = np.eye(labels.size)[index]  # (M, G)
    block = onehot.T @ gram @ onehot  # sum of cosines between groups g and h
    self_sum = onehot.T @ np.diag(gram)  # each word with itself (1, or 0 for a zero vector)
    size = onehot.sum(axis=0)
    intra_sum, intra_pairs = np.diag(block) - self_sum, size * (size - 1)
    inter_sum, inter_pairs = block.sum(axis=1) - np.diag(block), size * (size.sum() - size)

    def ratio(total, n):
        return float(total / n) if n else None

    per_group = []
    for g in range(labels.size):
        intra, inter = ratio(intra_sum[g], intra_pairs[g]), ratio(inter_sum[g], inter_pairs[g])
        per_group.append({"group": int(labels[g]), "words": int(size[g]), "intra": intra, "inter": inter,
                          "separation": None if intra is None or inter is None else intra - inter})
    intra, inter = ratio(intra_sum.sum(), intra_pairs.sum()), ratio(inter_sum.sum(), inter_pairs.sum())
    silhouette = (float(silhouette_score(unit, index, metric="cosine"))
                  if 2 <= labels.size <= unit.shape[0] - 1 else None)
    return {"per_group": per_group, "intra": intra, "inter": inter,
            "separation": None if intra is None or inter is None else intra - inter, "silhouette": silhouette}


def section(E_post, data, rng: np.random.Generator, *, E_pre=None, names: Mapping[str, Sequence[str]] | None = None
            ) -> tuple[dict, MorphologyFigureData]:
    """(summary.json's "morphology" section, the figure's data) for the groups in `data`.

    `data` is an alignment.AlignmentData (any object with its morph_* and device_* fields);
    `names` labels the groups ({"morph": [...], "device": [...]}, as alignment_data's stats
    give it), else they are numbered. More than MAX_DEVICE_WORDS device words are subsampled
    with `rng`, the same words for both tables.
    """
    tables = {"post": E_post} if E_pre is None else {"pre": E_pre, "post": E_post}
    words = (np.asarray(data.morph_words.ids), np.asarray(data.morph_words.mask))
    bases = (np.asarray(data.morph_bases.ids), np.asarray(data.morph_bases.mask))
    device_words = (np.asarray(data.device_words.ids), np.asarray(data.device_words.mask))
    device = np.asarray(data.device)
    chosen = np.arange(device.size)
    if device.size > MAX_DEVICE_WORDS:
        chosen = np.sort(rng.permutation(device.size)[:MAX_DEVICE_WORDS])
    device_words = (device_words[0][chosen], device_words[1][chosen])
    names = names or {}
    morph_names = list(names.get("morph") or [str(g) for g in range(data.num_groups)])
    device_names = list(names.get("device") or [str(g) for g in range(int(device.max()) + 1 if device.size else 0)])

    summary = {"morph_groups": morph_names, "device_groups": device_names,
               "device_words_measured": int(chosen.size), "device_words": int(device.size)}
    consistency, separation = {}, {}
    for when, table in tables.items():
        entry = {}
        if words[0].shape[0]:
            entry["consistency"] = morpheme_consistency(table, words, bases, data.morph_group, data.num_groups)
            consistency[when] = entry["consistency"]["per_group"]
        if chosen.size:
            entry["device"] = device_separation(table, device_words, device[chosen])
            by_group = {g["group"]: g["separation"] for g in entry["device"]["per_group"]}
            separation[when] = [by_group.get(g) for g in range(len(device_names))]
        summary[when] = entry
    return summary, MorphologyFigureData(morph_names, consistency, device_names, separation)
