"""wake2vec.models.padding: the one place vocabulary padding rows are added and cut."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from wake2vec.models import padding


def test_padded_rows_round_up_to_what_128_and_the_model_shards_both_need():
    assert padding.padded_rows(76_500) == 76_544
    assert padding.padded_rows(128) == 128
    assert padding.padded_rows(300, model_axis=4) == 384
    # The demo's 1,474 rows: the same 1,536 on mesh 8,1 and on 1,8 (the 128 x |model| rule gave 1,1 x 2,048).
    assert padding.padded_rows(1_474, model_axis=1) == padding.padded_rows(1_474, model_axis=8) == 1_536
    assert padding.padded_rows(300, model_axis=3) == 384 and padding.padded_rows(400, model_axis=3) == 768


def test_pad_then_unpad_is_the_identity_on_table_and_head():
    rng = np.random.default_rng(0)
    trainable = {"embedding": rng.normal(size=(195, 8)), "lm_head": {"kernel": rng.normal(size=(8, 195))}}
    padded = padding.pad(trainable, 256)
    assert padded["embedding"].shape == (256, 8) and padded["lm_head"]["kernel"].shape == (8, 256)
    assert not padded["embedding"][195:].any() and not padded["lm_head"]["kernel"][:, 195:].any()
    back = padding.unpad(padded, 195)
    np.testing.assert_array_equal(back["embedding"], trainable["embedding"])
    np.testing.assert_array_equal(back["lm_head"]["kernel"], trainable["lm_head"]["kernel"])
    np.testing.assert_array_equal(padding.unpad_table(padded["embedding"], 195), trainable["embedding"])
    with pytest.raises(ValueError, match="cannot pad"):
        padding.pad(trainable, 100)
    with pytest.raises(ValueError, match="cannot cut"):
        padding.unpad(trainable, 300)


def test_rows_in_selects_rows_on_either_vocabulary_axis():
    table_mask = padding.rows_in((6, 2), padding.vocab_axis("embedding"), 2, 4)
    np.testing.assert_array_equal(jnp.broadcast_to(table_mask, (6, 2))[:, 0], [0, 0, 1, 1, 0, 0])
    head_mask = padding.rows_in((2, 6), padding.vocab_axis("lm_head"), 3, None)
    np.testing.assert_array_equal(jnp.broadcast_to(head_mask, (2, 6))[0], [0, 0, 0, 1, 1, 1])
