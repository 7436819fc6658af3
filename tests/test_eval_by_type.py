"""The validation loss by target type (train.make_eval_step) against a naive computation
from the full logits of the same tiny model, and its record (metrics fields, loss table)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.models import model
from wake2vec.training import optim, train, workdir
from wake2vec.config import ModelConfig

TINY = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
BASE_ROWS = 200  # rows [0, 200) play the base vocabulary, [200, 300) the new words


def test_eval_step_means_by_target_type_match_the_full_logits():
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    params["embedding"] = jnp.pad(params["embedding"], ((0, 84), (0, 0)))  # padding rows, masked out
    trainable, frozen = optim.split_params(params)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY.vocab_size, (3, 41)).astype(np.int32)
    # Block 0's first window of 32 targets holds base tokens only, so both window types occur.
    ids[0, 1:33] = rng.integers(0, BASE_ROWS, 32)
    resegmented = rng.random(ids.shape) < 0.3
    block_weights = np.array([1.0, 1.0, 0.0], np.float32)  # the third block pads a short batch
    # A chunk that does not divide the 3 x 40 predictions, so the chunk padding is exercised too.
    settings = train.StepSettings(TINY, remat="none", loss_chunk=48)
    step = jax.jit(train.make_eval_step(settings, BASE_ROWS))
    # Training blocks in which every new id occurs 0, 1, 3, 7 or 25 times (id % 5 picks which).
    times = np.array([0, 1, 3, 7, 25])
    train_blocks = np.concatenate([np.full(times[i % 5], i) for i in range(BASE_ROWS, TINY.vocab_size)]
                                  + [np.arange(BASE_ROWS)])
    train_counts = train.training_counts(train_blocks.reshape(1, -1), TINY.vocab_size)
    sums, counts = (np.asarray(x, np.float64)
                    for x in step(trainable, frozen, ids, block_weights, resegmented, train_counts))

    # Naive: full float32 logits over the real vocabulary, per-position losses, masks by hand.
    logits = np.asarray(model.forward(TINY, {**frozen, **trainable}, jnp.asarray(ids[:, :-1])), np.float64)
    logits = logits[..., : TINY.vocab_size]
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    targets = ids[:, 1:]
    losses = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    real = np.broadcast_to(block_weights[:, None] > 0, targets.shape)
    masks = {
        "all": real,
        "new": real & (targets >= BASE_ROWS),
        "base": real & (targets < BASE_ROWS),
        "resegmented": real & (targets < BASE_ROWS) & resegmented[:, 1:],
    }
    # By hand: target j lies in window j // 32 of its block; a window holding a new target is a Wake window.
    window_of = np.arange(targets.shape[1]) // train.WAKE_WINDOW
    wake_window = np.stack([np.isin(window_of, np.unique(window_of[row >= BASE_ROWS])) for row in targets])
    masks["wake_windows"], masks["plain_windows"] = real & wake_window, real & ~wake_window
    # By hand: how often the target occurs in the training blocks, from its id.
    new = masks["new"]
    seen_times = np.where(targets >= BASE_ROWS, times[targets % 5], 0)
    masks["new_seen"], masks["new_unseen"] = new & (seen_times > 0), new & (seen_times == 0)
    for name, wanted in (("new_seen_1", 1), ("new_seen_2_4", 3), ("new_seen_5_19", 7), ("new_seen_20_plus", 25)):
        masks[name] = new & (seen_times == wanted)
    for k, category in enumerate(train.EVAL_CATEGORIES):
        mask = masks[category]
        assert counts[k] == mask.sum() > 0, category
        # float32 logits and a chunked logsumexp against a float64 reference: 1e-5 relative.
        np.testing.assert_allclose(sums[k] / counts[k], losses[mask].mean(), rtol=1e-5, err_msg=category)
    # The overall figure is still the plain eval loss of the training path's function.
    plain = jax.jit(lambda tr, fr, i, w: train.loss_sum_and_count(tr, fr, i, w, settings))
    total, count = plain(trainable, frozen, ids, block_weights)
    np.testing.assert_allclose(sums[0], float(total), rtol=1e-6)
    assert counts[0] == float(count)


def test_val_fields_loss_table_and_curve_show_each_type_with_its_count(tmp_path):
    categories = train.EVAL_CATEGORIES[:6] + ("new_seen", "new_unseen")
    fields = workdir.val_loss_fields(categories, np.array([30.0, 10.0, 20.0, 0.0, 24.0, 6.0, 3.0, 7.0]),
                                     np.array([10, 2, 8, 0, 6, 4, 1, 1]))
    assert fields == {"val_loss": 3.0, "val_tokens": 10, "val_loss_new": 5.0, "val_tokens_new": 2,
                      "val_loss_base": 2.5, "val_tokens_base": 8, "val_loss_resegmented": None,
                      "val_tokens_resegmented": 0, "val_loss_wake_windows": 4.0, "val_tokens_wake_windows": 6,
                      "val_loss_plain_windows": 1.5, "val_tokens_plain_windows": 4, "val_loss_new_seen": 3.0,
                      "val_tokens_new_seen": 1, "val_loss_new_unseen": 7.0, "val_tokens_new_unseen": 1}
    events = [{"step": 0, **fields}, {"step": 10, "train_loss": 2.0, "lr": 1e-3},
              {"step": 10, **fields, "val_loss_resegmented": 4.0, "val_tokens_resegmented": 1234}]
    workdir.write_loss_table(tmp_path, events)
    table = (tmp_path / workdir.LOSS_TABLE).read_text().splitlines()
    assert table[0] == ("| Step | Training Loss | Validation Loss | Val: new tokens (n) | Val: base tokens (n) "
                        "| Val: re-segmented (n) | Val: windows with Wake tokens (n) | Val: windows without (n) "
                        "| Val: new, seen in training (n) | Val: new, never in training (n) | Val nats/char (base; Δ) "
                        "| Val bits/byte (base; Δ) | Wake word nats, seen (base; n) | Wake word nats, unseen (base; n) |")
    assert table[2] == "| 0 |  | 3.0000 | 5.0000 (2) | 2.5000 (8) | – (0) | 4.0000 (6) | 1.5000 (4) | 3.0000 (1) | 7.0000 (1) |  |  |  |  |"
    assert table[3] == ("| 10 | 2.0000 | 3.0000 | 5.0000 (2) | 2.5000 (8) | 4.0000 (1,234) | 4.0000 (6) | 1.5000 (4) "
                        "| 3.0000 (1) | 7.0000 (1) |  |  |  |  |")  # no base comparison in these events
    workdir.write_loss_curve(tmp_path, events)
    assert (tmp_path / workdir.LOSS_CURVE).stat().st_size > 0
