"""Dynamic loss scaling under float16 compute (wake2vec.training.loss_scale) on a tiny Llama."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wake2vec.config import ModelConfig, TrainConfig
from wake2vec.models import model
from wake2vec.training import checkpoint, loss_scale, optim, train

TINY = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
CONSTANT = optax.constant_schedule(1.0)


def _params():
    return optim.split_params(model.init_params(TINY, jax.random.PRNGKey(0)))


def _batch(seed=0, accum=2, batch=2, length=33):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (accum, batch, length)), jnp.int32)


def _sgd_step(tx, dtype, scaled):
    settings = train.StepSettings(TINY, compute_dtype=dtype, loss_chunk=64, loss_scale=scaled)
    return jax.jit(train.make_train_step(tx, CONSTANT, settings))


def _table_gradient(dtype, scaled, initial=loss_scale.INITIAL_SCALE):
    """The table's gradient, read off one SGD step at lr 1 (update = -gradient)."""
    trainable, frozen = _params()
    tx = optax.sgd(1.0)
    tx = loss_scale.dynamic(tx, initial=initial) if scaled else tx
    state = train.init_state(trainable, frozen, tx)
    new, metrics = _sgd_step(tx, dtype, scaled)(state, frozen, _batch())
    return np.asarray(state.trainable["embedding"] - new.trainable["embedding"], np.float64), metrics


def test_scaled_float16_gradient_matches_the_float32_gradient():
    reference, _ = _table_gradient(jnp.float32, scaled=False)
    scaled, metrics = _table_gradient(jnp.float16, scaled=True)
    assert not bool(metrics["skipped"]) and float(metrics["loss_scale"]) == loss_scale.INITIAL_SCALE
    # float16 rounds each matmul operand to 11 significant bits (relative 2^-11 ~ 5e-4); two
    # layers' forward and backward passes compound that to well under 1% of the gradient's norm.
    error = np.linalg.norm(scaled - reference) / np.linalg.norm(reference)
    assert error < 1e-2, error
    # No entry the float32 gradient has is flushed to zero.
    assert np.sum((reference != 0) & (scaled == 0)) == 0


def test_an_overflow_halves_the_scale_and_leaves_the_parameters_untouched():
    trainable, frozen = _params()
    tx = loss_scale.dynamic(optax.adam(1e-2), initial=2.0**100)  # cotangents far past float16's 65504
    state = train.init_state(trainable, frozen, tx)
    new, metrics = _sgd_step(tx, jnp.float16, True)(state, frozen, _batch())
    assert bool(metrics["finite"]) and bool(metrics["skipped"])  # committed: not a failure of the run
    assert float(metrics["loss_scale"]) == 2.0**100
    assert float(new.opt_state.scale) == 2.0**99 and int(new.opt_state.good_steps) == 0
    assert int(new.step) == 1
    np.testing.assert_array_equal(np.asarray(new.trainable["embedding"]), np.asarray(state.trainable["embedding"]))
    jax.tree_util.tree_map(np.testing.assert_array_equal, new.opt_state.inner, state.opt_state.inner)


def test_the_scale_doubles_after_growth_interval_finite_steps():
    trainable, frozen = _params()
    tx = loss_scale.dynamic(optax.adam(1e-3), initial=2.0**10, growth_interval=3)
    state = train.init_state(trainable, frozen, tx)
    step = _sgd_step(tx, jnp.float16, True)
    scales = []
    for seed in range(4):
        state, metrics = step(state, frozen, _batch(seed))
        assert not bool(metrics["skipped"])
        scales.append(float(state.opt_state.scale))
    assert scales == [2.0**10, 2.0**10, 2.0**11, 2.0**11]
    assert int(state.opt_state.good_steps) == 1


def _abstract(state):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def test_the_scale_survives_checkpoint_and_resume_bit_identically(tmp_path):
    cfg = TrainConfig(compute_dtype="float16", lr=1e-2, warmup_ratio=0.0, schedule="constant", max_steps=10)
    trainable, frozen = _params()
    tx = optim.make_optimizer(cfg, TINY.vocab_size)
    step = jax.jit(train.make_train_step(tx, optim.make_schedule(cfg), train.settings_for(cfg, TINY)))
    state = train.init_state(trainable, frozen, tx)
    # An overflowing first scale, so the saved one is not the initial one.
    state = state.replace(opt_state=state.opt_state._replace(scale=jnp.asarray(2.0**100, jnp.float32)))
    for seed in range(2):
        state, _ = step(state, frozen, _batch(seed))
    assert float(state.opt_state.scale) == 2.0**98
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=1, async_save=False)
    ckpt.save(state)
    ckpt.close()
    restored = checkpoint.Checkpointer(tmp_path / "checkpoints", keep=1, abstract_state=_abstract(state)).restore_latest()
    assert isinstance(restored.opt_state, loss_scale.ScaledState)
    assert float(restored.opt_state.scale) == 2.0**98
    uninterrupted, _ = step(state, frozen, _batch(2))
    resumed, _ = step(restored, frozen, _batch(2))
    jax.tree_util.tree_map(np.testing.assert_array_equal, uninterrupted, resumed)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_other_dtypes_have_no_scale_and_ignore_the_flag_bit_for_bit(dtype):
    trainable, frozen = _params()
    outputs = []
    for choice in loss_scale.CHOICES:
        cfg = TrainConfig(compute_dtype=dtype, loss_scale=choice, lr=1e-2, warmup_ratio=0.0, max_steps=10)
        tx = optim.make_optimizer(cfg, TINY.vocab_size)
        settings = train.settings_for(cfg, TINY)
        assert not settings.loss_scale
        state = train.init_state(trainable, frozen, tx)
        assert loss_scale.current_scale(state.opt_state) is None
        state, metrics = jax.jit(train.make_train_step(tx, optim.make_schedule(cfg), settings))(state, frozen, _batch())
        assert "loss_scale" not in metrics
        outputs.append(state)
    # The same optimiser-state tree (so existing checkpoints restore) and the same numbers.
    assert jax.tree_util.tree_structure(outputs[0]) == jax.tree_util.tree_structure(outputs[1])
    jax.tree_util.tree_map(np.testing.assert_array_equal, *outputs)


def test_unscaled_float16_is_what_none_selects():
    cfg = TrainConfig(compute_dtype="float16", loss_scale="none")
    assert not train.settings_for(cfg, TINY).loss_scale
    assert loss_scale.current_scale(train.init_state(*_params(), optim.make_optimizer(cfg, TINY.vocab_size)).opt_state) is None


def test_an_fp16_run_from_before_loss_scaling_is_refused_in_one_line():
    unscaled = {".inner[0].count"}
    with pytest.raises(loss_scale.LossScaleResumeError) as error:
        loss_scale.check_resumable(unscaled, scaled=True)
    assert "\n" not in str(error.value) and "--loss_scale=none" in str(error.value)
    loss_scale.check_resumable(unscaled | {".scale", ".good_steps"}, scaled=True)
    loss_scale.check_resumable(None, scaled=True)  # nothing to resume
    loss_scale.check_resumable(unscaled, scaled=False)


def _demo_cfg(workdir, **changes):
    return TrainConfig(workdir=str(workdir), seq_len=32, batch_size=2, grad_accum=2, max_steps=4, log_every=2,
                       save_every=2, eval_every=4, eval_blocks=4, analyze=False, compute_dtype="float16", **changes)


@pytest.mark.slow  # two demo runs through the loop
def test_an_fp16_demo_run_logs_its_scale_and_a_pre_scaling_run_is_refused(tmp_path):
    from wake2vec.training import loop, workdir as records

    loop.run(_demo_cfg(tmp_path / "scaled"))
    steps = [e for e in records.read_metrics(tmp_path / "scaled") if "train_loss" in e]
    assert [e["loss_scale"] for e in steps] == [loss_scale.INITIAL_SCALE] * 2
    # An unscaled fp16 run checkpoints what a run from before loss scaling did: no scale.
    loop.run(_demo_cfg(tmp_path / "unscaled", loss_scale="none"))
    with pytest.raises(loss_scale.LossScaleResumeError):
        loop.run(_demo_cfg(tmp_path / "unscaled", allow_config_change=True))
