"""Phase 3's extra losses: the Wake's morphology made visible in the embedding table.

The study trained Phase 2's adapters and the Wake rows under

    L_lm + lambda_m L_morph + lambda_d L_device + 0.05 L_rep + 0.01 L_norm

(../shared/ORIGINAL.md, Phase 3). This module holds the four extra terms as pure, jittable
functions of the embedding table (V, D) float32, which may carry padding rows beyond the
real vocabulary (no term reads a row no word uses). The language-model term and the loop
are the launcher's; which words go in, and as which pieces, is wake2vec.phases.groups'.

A word is its pieces as running text tokenizes it (`WordPieces`, built by
`groups.running_text_pieces`), and its vector v(w) is the mean of those rows. That is the
fix of the study's defect: its terms tokenized words without their word-start marker, so
they mostly moved rows that running text never uses. With a whole-word injection a Wake
word is then its one new row, and the gradient of every term reaches exactly the rows the
words use (tests/test_alignment.py checks it with jax.grad).

Everything random (device anchors, repulsion pairs) is drawn from the `key` argument, so a
step's key fixes its samples and the same key gives the same loss. Cosines divide by
max(norm, EPS), so an all-zero row has cosine 0 and a finite gradient.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

# Floor of a norm inside a cosine or a norm penalty: keeps sqrt's gradient finite at 0.
EPS = 1e-8


class WordPieces(NamedTuple):
    """W words as fixed-shape arrays: row w's pieces are ids[w][mask[w]], padded with id 0.

    A NamedTuple, so it is a pytree and passes into a jitted step as arrays.
    """

    ids: jax.Array  # (W, P) int32
    mask: jax.Array  # (W, P) bool; every word has at least one piece


def word_vectors(table: jax.Array, pieces: WordPieces) -> jax.Array:
    """(W, D): each word's vector, the mean of the table rows of its pieces.

    A gather of W * P rows: with whole-word injection a Wake word and a whole-word base stem
    are one piece each, so P is small. Masked slots contribute exactly 0 to the mean and to
    the gradient of row 0.
    """
    rows = table[pieces.ids]  # (W, P, D)
    mask = pieces.mask.astype(table.dtype)
    counts = jnp.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    return jnp.einsum("wpd,wp->wd", rows, mask) / counts


def _unit(x: jax.Array) -> jax.Array:
    """Rows scaled to unit length; rows below EPS in norm are divided by EPS instead."""
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, EPS * EPS))


def _safe_norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), EPS * EPS))


def morph_loss(table: jax.Array, words: WordPieces, bases: WordPieces, group: jax.Array, num_groups: int) -> jax.Array:
    """L_morph: the spread of each morpheme group's offsets around the group's mean offset.

    d_i = v(word_i) - v(base_i) for pair i, mu_g the mean d_i of group g, and
    L = mean over pairs i and dimensions of (d_i - mu_{group_i})^2. Zero exactly when every
    group's offsets are parallel and equal, i.e. when the morpheme is one direction.
    `num_groups` is static (it shapes the segment sum); a group with no pair is ignored.
    No pair: 0.
    """
    if words.ids.shape[0] == 0:
        return jnp.zeros((), table.dtype)
    offsets = word_vectors(table, words) - word_vectors(table, bases)  # (N, D)
    sums = jax.ops.segment_sum(offsets, group, num_segments=num_groups)
    counts = jax.ops.segment_sum(jnp.ones_like(group, dtype=table.dtype), group, num_segments=num_groups)
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    return jnp.mean((offsets - means[group]) ** 2)


def _masked_choice(key: jax.Array, allowed: jax.Array, shape: tuple[int, ...] | None = None) -> jax.Array:
    """Indices drawn uniformly among the True entries of `allowed`'s last axis (index 0 if none);
    `shape` draws that many from a 1-D `allowed`, None one per row of a 2-D one."""
    logits = jnp.where(allowed, 0.0, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1, shape=shape)


def device_loss(table: jax.Array, words: WordPieces, device: jax.Array, key: jax.Array, anchors: int = 64,
                margin: float = 0.2) -> jax.Array:
    """L_device: a triplet hinge pulling words of one device group together.

    `anchors` anchors are drawn with replacement, each with a positive from its own group
    (never itself) and a negative from another group; L = mean of
    max(0, margin + cos(a, n) - cos(a, p)). A word can only be an anchor when both exist: a
    word alone in its group (size 1) has no positive and is never an anchor, though it still
    serves as a negative for the others. With no eligible anchor (fewer than two groups, or
    only singletons) the loss is 0. The group masks are (M, M) booleans: cheap for the
    thousands of words an annotation holds.
    """
    m = words.ids.shape[0]
    if m == 0:
        return jnp.zeros((), table.dtype)
    unit = _unit(word_vectors(table, words))
    same = device[:, None] == device[None, :]
    positive_ok = same & ~jnp.eye(m, dtype=bool)
    negative_ok = ~same
    eligible = positive_ok.any(axis=1) & negative_ok.any(axis=1)
    k_anchor, k_positive, k_negative = jax.random.split(key, 3)
    anchor = _masked_choice(k_anchor, eligible, (anchors,))
    positive = _masked_choice(k_positive, positive_ok[anchor])
    negative = _masked_choice(k_negative, negative_ok[anchor])
    a = unit[anchor]
    cos_p = jnp.sum(a * unit[positive], axis=-1)
    cos_n = jnp.sum(a * unit[negative], axis=-1)
    hinge = jnp.maximum(0.0, margin + cos_n - cos_p)
    return jnp.where(eligible.any(), jnp.mean(hinge), 0.0)


def repulsion_loss(table: jax.Array, wake_ids: jax.Array, key: jax.Array, pairs: int = 100,
                   threshold: float = 0.95) -> jax.Array:
    """L_rep: keeps Wake rows from collapsing onto each other.

    `pairs` pairs of distinct Wake rows (uniform, with replacement across pairs), and
    L = mean over pairs of max(0, cos - threshold)^2.

    The study wrote "mean(max(0, cos - 0.95))^2", which reads either as the square of the
    mean hinge or as the mean of squared hinges. This is the second, the usual squared
    hinge: each pair's gradient depends on its own cosine only, whereas under the first a
    lone near-duplicate pair among 100 gets its gradient scaled by the mean hinge of all of
    them, so the rare collapse the term exists for would barely be pushed apart.
    Fewer than two Wake rows: 0.
    """
    k = wake_ids.shape[0]
    if k < 2:
        return jnp.zeros((), table.dtype)
    k_first, k_shift = jax.random.split(key)
    first = jax.random.randint(k_first, (pairs,), 0, k)
    second = (first + jax.random.randint(k_shift, (pairs,), 1, k)) % k  # never the same row
    cosine = jnp.sum(_unit(table[wake_ids[first]]) * _unit(table[wake_ids[second]]), axis=-1)
    return jnp.mean(jnp.maximum(0.0, cosine - threshold) ** 2)


def norm_band(table, base_size: int) -> tuple[jax.Array, jax.Array]:
    """(mu, sigma): mean and population standard deviation of the base rows' L2 norms.

    Taken once from the table at the start of Phase 3, so the band L_norm keeps the Wake
    rows in is the base vocabulary's and does not move with training.
    """
    norms = jnp.linalg.norm(jnp.asarray(table[:base_size], jnp.float32), axis=-1)
    return jnp.mean(norms), jnp.std(norms)


def norm_loss(table: jax.Array, wake_ids: jax.Array, mu, sigma) -> jax.Array:
    """L_norm: mean over Wake rows of max(0, |norm - mu| - sigma)^2; 0 inside [mu - sigma, mu + sigma]."""
    if wake_ids.shape[0] == 0:
        return jnp.zeros((), table.dtype)
    norms = _safe_norm(table[wake_ids])
    return jnp.mean(jnp.maximum(0.0, jnp.abs(norms - mu) - sigma) ** 2)


@dataclasses.dataclass(frozen=True)
class AlignmentWeights:
    """The weights of the extra terms in the total; defaults are the study's TinyLlama run.

    Frozen and hashable, so a jitted step can close over it or take it as a static argument.
    """

    morph: float = 0.1
    device: float = 0.05
    rep: float = 0.05
    norm: float = 0.01


@struct.dataclass
class AlignmentData:
    """Everything the four terms read besides the table; a pytree, so it passes into a jitted step.

    `num_groups` is static (part of the tree's structure), the rest are arrays.
    """

    morph_words: WordPieces  # (N, P) the pairs' derived words
    morph_bases: WordPieces  # (N, P) their stems, in the same order
    morph_group: jax.Array  # (N,) int32 group index of each pair, in [0, num_groups)
    device_words: WordPieces  # (M, P) the device groups' words
    device: jax.Array  # (M,) int32 device-group index of each word
    wake_ids: jax.Array  # (K,) int32 the trainable Wake rows (L_rep, L_norm)
    mu: jax.Array  # () base-row norm mean at the start (norm_band)
    sigma: jax.Array  # () base-row norm standard deviation at the start
    num_groups: int = struct.field(pytree_node=False, default=1)


def alignment_terms(table: jax.Array, data: AlignmentData, weights: AlignmentWeights, key: jax.Array
                    ) -> dict[str, jax.Array]:
    """Each term unweighted ("morph", "device", "rep", "norm") and their weighted sum ("total").

    "total" excludes L_lm, which the caller adds; the terms are returned apart so that they
    are logged apart (the study's validation loss silently included them). Device anchors
    and repulsion pairs use independent keys split from `key`.
    """
    k_device, k_rep = jax.random.split(key)
    terms = {
        "morph": morph_loss(table, data.morph_words, data.morph_bases, data.morph_group, data.num_groups),
        "device": device_loss(table, data.device_words, data.device, k_device),
        "rep": repulsion_loss(table, data.wake_ids, k_rep),
        "norm": norm_loss(table, data.wake_ids, data.mu, data.sigma),
    }
    terms["total"] = (weights.morph * terms["morph"] + weights.device * terms["device"]
                      + weights.rep * terms["rep"] + weights.norm * terms["norm"])
    return terms
