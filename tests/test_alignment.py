"""wake2vec.phases.alignment: each extra loss on tiny tables where its value is known by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wake2vec.phases import alignment
from wake2vec.phases.alignment import AlignmentData, AlignmentWeights, WordPieces


def pieces(*words: list[int]) -> WordPieces:
    """WordPieces from lists of ids, padded with 0 to the longest."""
    width = max(len(w) for w in words)
    ids = np.zeros((len(words), width), np.int32)
    mask = np.zeros((len(words), width), bool)
    for row, w in enumerate(words):
        ids[row, : len(w)], mask[row, : len(w)] = w, True
    return WordPieces(jnp.asarray(ids), jnp.asarray(mask))


def table_of(rows) -> jax.Array:
    return jnp.asarray(np.asarray(rows, np.float32))


E = np.eye(4, dtype=np.float32)

# Called eagerly, each loss compiles every primitive it uses as a program of its own (hundreds
# per test); jitted, it is one program per shape. Eager and jitted agree:
# test_alignment_terms_total_is_the_weighted_sum_and_jit_agrees.
word_vectors = jax.jit(alignment.word_vectors)
morph_loss = jax.jit(alignment.morph_loss, static_argnums=4)
device_loss = jax.jit(alignment.device_loss, static_argnames=("anchors", "margin"))
repulsion_loss = jax.jit(alignment.repulsion_loss, static_argnames=("pairs", "threshold"))
norm_band = jax.jit(alignment.norm_band, static_argnums=1)
norm_loss = jax.jit(alignment.norm_loss)


def test_word_vectors_are_the_mean_of_the_pieces_rows():
    table = table_of([E[0], E[1], 2 * E[2], E[3]])
    got = word_vectors(table, pieces([0, 1], [2], [0, 1, 3]))
    np.testing.assert_allclose(got, [[0.5, 0.5, 0, 0], [0, 0, 2, 0], [1 / 3, 1 / 3, 0, 1 / 3]], rtol=1e-6)


def test_parallel_equal_offsets_give_zero_morph_loss():
    # word_i = base_i + e0 in one group, base_i + e1 in the other: each group is one direction.
    e = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
    bases = np.array([[0, 1, 0, 0], [0, 0, 3, 1], [2, 2, 2, 2], [0, 0, 0, 5]], np.float32)
    words = bases + np.array([e, e, np.roll(e, 1), np.roll(e, 1)])
    table = table_of(np.concatenate([bases, words]))
    loss = morph_loss(table, pieces([4], [5], [6], [7]), pieces([0], [1], [2], [3]),
                                jnp.array([0, 0, 1, 1]), 2)
    assert float(loss) == pytest.approx(0.0, abs=1e-7)


def test_opposite_offsets_give_the_known_morph_loss():
    # One group, offsets +e0 and -e0: mu = 0, and (d - mu)^2 sums to 1 per pair over D=4 dims.
    table = table_of([np.zeros(4), np.zeros(4), E[0], -E[0]])
    loss = morph_loss(table, pieces([2], [3]), pieces([0], [1]), jnp.array([0, 0]), 1)
    assert float(loss) == pytest.approx(2 / (2 * 4))
    # Scaled offsets +-3 e0: 9 per pair.
    loss = morph_loss(3 * table, pieces([2], [3]), pieces([0], [1]), jnp.array([0, 0]), 1)
    assert float(loss) == pytest.approx(9 * 2 / 8)


def test_morph_loss_without_pairs_is_zero():
    empty = WordPieces(jnp.zeros((0, 1), jnp.int32), jnp.zeros((0, 1), bool))
    assert float(morph_loss(table_of(E), empty, empty, jnp.zeros((0,), jnp.int32), 1)) == 0.0


def _device_table():
    # Group 0: rows along e0 and e0 rotated by 60 degrees (cos 0.5); group 1: e1 rotated likewise.
    c, s = 0.5, np.sqrt(3) / 2
    return table_of([[1, 0, 0, 0], [c, 0, s, 0], [0, 1, 0, 0], [0, c, 0, s]])


def test_device_loss_is_the_hinge_of_known_cosines():
    # Every anchor has cos(a, p) = 0.5 and cos(a, n) = 0 (its only choices), so each term is
    # max(0, margin - 0.5): 0 at margin 0.2, 0.3 at margin 0.8.
    table, words, device = _device_table(), pieces([0], [1], [2], [3]), jnp.array([0, 0, 1, 1])
    key = jax.random.key(0)
    assert float(device_loss(table, words, device, key, margin=0.2)) == pytest.approx(0.0, abs=1e-7)
    assert float(device_loss(table, words, device, key, margin=0.8)) == pytest.approx(0.3, rel=1e-5)


def test_a_singleton_device_group_is_never_an_anchor_but_serves_as_negative():
    # Words 0, 1 in group 0 (cos 1); word 2 alone in group 1, at cos -1 to both. A singleton
    # anchor would give max(0, 0.2 + cos(a, n) - cos(a, p)) with no positive; as a negative it
    # gives max(0, 0.2 - 1 - 1) = 0 for every anchor, and margin 2.5 gives 0.5 exactly.
    table = table_of([E[0], E[0], -E[0]])
    words, device = pieces([0], [1], [2]), jnp.array([0, 0, 1])
    assert float(device_loss(table, words, device, jax.random.key(1), margin=2.5)) == pytest.approx(0.5)
    # Only singletons, or one group: no eligible anchor, loss 0.
    assert float(device_loss(table, words, jnp.array([0, 1, 2]), jax.random.key(1))) == 0.0
    assert float(device_loss(table, words, jnp.array([0, 0, 0]), jax.random.key(1))) == 0.0


def test_repulsion_is_the_mean_squared_hinge_over_pairs():
    # Three Wake rows: 3 and 4 identical (cos 1), 5 orthogonal to both. A pair is {3, 4} with
    # probability 1/3 per draw; its term is (1 - 0.95)^2, the others 0. With two rows only,
    # every pair is {3, 4}.
    table = table_of([E[1], E[1], E[1], E[0], E[0], E[2]])
    two = repulsion_loss(table, jnp.array([3, 4]), jax.random.key(0), pairs=10)
    assert float(two) == pytest.approx(0.05 ** 2, rel=1e-4)
    # A threshold of 0.5 and a cosine of 0.8 between the two rows: (0.3)^2.
    tilted = table_of([[1, 0, 0, 0], [0.8, 0.6, 0, 0]])
    assert float(repulsion_loss(tilted, jnp.array([0, 1]), jax.random.key(0), threshold=0.5)) == \
        pytest.approx(0.09, rel=1e-5)
    three = repulsion_loss(table, jnp.array([3, 4, 5]), jax.random.key(0), pairs=3000)
    assert float(three) == pytest.approx(0.05 ** 2 / 3, rel=0.1)
    assert float(repulsion_loss(table, jnp.array([3]), jax.random.key(0))) == 0.0


def test_norm_band_and_norm_loss():
    # Base norms 1 and 3: mu = 2, sigma = 1 (population). Wake norms 2.5 (inside), 5 (2 above the
    # band's top 3) and 0.5 (0.5 below its bottom 1): mean of 0, 4, 0.25.
    table = table_of([E[0], 3 * E[1], 2.5 * E[2], 5 * E[3], 0.5 * E[0]])
    mu, sigma = norm_band(table, 2)
    assert (float(mu), float(sigma)) == pytest.approx((2.0, 1.0))
    assert float(norm_loss(table, jnp.array([2]), mu, sigma)) == 0.0
    assert float(norm_loss(table, jnp.array([2, 3, 4]), mu, sigma)) == pytest.approx(4.25 / 3)


def _data(num_rows: int = 12) -> tuple[jax.Array, AlignmentData]:
    rng = np.random.default_rng(0)
    table = table_of(rng.standard_normal((num_rows, 8)))
    data = AlignmentData(
        morph_words=pieces([6], [7], [8, 1]), morph_bases=pieces([0], [1], [2]), morph_group=jnp.array([0, 0, 1]),
        device_words=pieces([6], [7], [9], [2, 3]), device=jnp.array([0, 0, 1, 1]),
        wake_ids=jnp.arange(6, 10), mu=jnp.float32(2.0), sigma=jnp.float32(0.5), num_groups=2)
    return table, data


def test_alignment_terms_total_is_the_weighted_sum_and_jit_agrees():
    table, data = _data()
    weights = AlignmentWeights(morph=0.3, device=0.7)
    key = jax.random.key(3)
    eager = alignment.alignment_terms(table, data, weights, key)
    jitted = jax.jit(alignment.alignment_terms, static_argnums=2)(table, data, weights, key)
    assert set(eager) == {"morph", "device", "rep", "norm", "total"}
    for name in eager:
        np.testing.assert_allclose(jitted[name], eager[name], rtol=1e-5, atol=1e-7)
    expected = (0.3 * eager["morph"] + 0.7 * eager["device"] + 0.05 * eager["rep"] + 0.01 * eager["norm"])
    assert float(eager["total"]) == pytest.approx(float(expected), rel=1e-6)
    assert AlignmentWeights() == AlignmentWeights(0.1, 0.05, 0.05, 0.01)


def test_gradients_reach_only_the_rows_the_words_use():
    table, data = _data(num_rows=16)  # rows 10-15: never used, like vocabulary padding
    weights = AlignmentWeights()
    grad = jax.jit(jax.grad(lambda t: alignment.alignment_terms(t, data, weights, jax.random.key(0))["total"]))(table)
    touched = np.flatnonzero(np.abs(np.asarray(grad)).sum(axis=1))
    assert set(touched.tolist()) <= {0, 1, 2, 3, 6, 7, 8, 9}
    assert not np.any(np.asarray(grad)[10:])
    # L_morph alone: the rows of group 0's two pairs; group 1 has one pair, which is its own
    # mean offset (d - mu = 0), so its rows 2, 8 get no gradient.
    morph = jax.jit(jax.grad(lambda t: morph_loss(t, data.morph_words, data.morph_bases, data.morph_group, 2)))(table)
    assert set(np.flatnonzero(np.abs(np.asarray(morph)).sum(axis=1)).tolist()) == {0, 1, 6, 7}


def test_a_zero_row_has_a_finite_gradient():
    table = table_of([np.zeros(4), E[0], E[1]])
    grad = jax.jit(jax.grad(lambda t: device_loss(t, pieces([0], [1], [2]), jnp.array([0, 0, 1]), jax.random.key(0))
                            + norm_loss(t, jnp.array([0]), 1.0, 0.1)))(table)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_keys_fix_the_samples():
    table, data = _data()
    words, device = data.device_words, data.device
    first = [float(device_loss(table, words, device, jax.random.key(k), margin=1.0)) for k in range(6)]
    again = [float(device_loss(table, words, device, jax.random.key(k), margin=1.0)) for k in range(6)]
    assert first == again
    assert len(set(first)) > 1  # another key, another draw
    rep = [float(repulsion_loss(table, data.wake_ids, jax.random.key(k), pairs=2, threshold=-1.0))
           for k in range(6)]
    assert len(set(rep)) > 1
    assert rep[0] == float(repulsion_loss(table, data.wake_ids, jax.random.key(0), pairs=2, threshold=-1.0))
