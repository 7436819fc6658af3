"""The jitted Phase 1 step on CPU: descent, frozen weights, exact masking, accumulation,
the chunked loss (value and memory), and what XLA differentiates (FLOPs)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from wake2vec.models import model
from wake2vec.training import optim, train
from wake2vec.config import ModelConfig, TrainConfig

pytestmark = pytest.mark.accelerator  # re-run on a device by benchmarks.accelerator

TINY = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
BASE_ROWS = 200  # rows [0, 200) play the base vocabulary, [200, 300) the new words


def _setup(cfg: ModelConfig = TINY, **train_changes):
    tc = dataclasses.replace(TrainConfig(max_steps=50, lr=1e-2, warmup_ratio=0.0, schedule="constant"), **train_changes)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    params["embedding"] = jnp.pad(params["embedding"], ((0, 84), (0, 0)))  # padded to 384 rows
    if "lm_head" in params:
        params["lm_head"]["kernel"] = jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, 84)))
    trainable, frozen = optim.split_params(params)
    tx = optim.make_optimizer(tc, BASE_ROWS)
    step = jax.jit(train.make_train_step(tx, optim.make_schedule(tc), train.StepSettings(cfg, loss_chunk=64)))
    return train.init_state(trainable, frozen, tx), frozen, step


def _batch(seed=0, accum=2, batch=2, length=33, vocab=300):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (accum, batch, length)), jnp.int32)


def test_repeated_batch_loss_decreases():
    state, frozen, step = _setup()
    batch = _batch()
    losses = []
    for _ in range(15):
        state, metrics = step(state, frozen, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses


def test_frozen_weights_are_bit_identical_and_hold_no_optimizer_state():
    state, frozen, step = _setup(optimizer="adamw", weight_decay=0.1)
    before = jax.tree_util.tree_map(np.asarray, frozen)
    for seed in range(3):
        state, _ = step(state, frozen, _batch(seed))
    after = jax.tree_util.tree_map(np.asarray, frozen)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)
    # Adam's moments exist only for the table: every frozen slot of the state is a MaskedNode.
    array_leaves = [x for x in jax.tree_util.tree_leaves(state.opt_state) if hasattr(x, "shape") and x.ndim > 0]
    assert all(leaf.shape == state.trainable["embedding"].shape for leaf in array_leaves)
    assert len(array_leaves) == 2  # mu and nu of the table


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
@pytest.mark.parametrize("tied", [True, False])
def test_mask_base_rows_is_exact_under_weight_decay(optimizer, tied):
    cfg = dataclasses.replace(TINY, tie_word_embeddings=tied)
    state, frozen, step = _setup(cfg, optimizer=optimizer, weight_decay=0.1, mask_base_rows=True)
    start = jax.tree_util.tree_map(np.asarray, state.trainable)
    for seed in range(3):
        state, _ = step(state, frozen, _batch(seed))
    table_delta = np.abs(np.asarray(state.trainable["embedding"]) - start["embedding"])
    assert table_delta[:BASE_ROWS].max() == 0.0  # exactly: not small, zero
    assert table_delta[BASE_ROWS:300].max() > 1e-4
    if not tied:
        head_delta = np.abs(np.asarray(state.trainable["lm_head"]["kernel"]) - start["lm_head"]["kernel"])
        assert head_delta[:, :BASE_ROWS].max() == 0.0
        assert head_delta[:, BASE_ROWS:300].max() > 1e-4


def test_without_mask_base_rows_train():
    state, frozen, step = _setup(weight_decay=0.1)
    start = np.asarray(state.trainable["embedding"])
    state, _ = step(state, frozen, _batch())
    assert np.abs(np.asarray(state.trainable["embedding"]) - start)[:BASE_ROWS].max() > 1e-4


def test_gradient_accumulation_equals_one_large_batch():
    big = _batch(seed=3, accum=1, batch=4)
    accumulated = big.reshape(4, 1, -1)
    results = []
    for batch in (big, accumulated):
        state, frozen, step = _setup()
        state, metrics = step(state, frozen, batch)
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), np.asarray(state.trainable["embedding"])))
    (loss_a, norm_a, table_a), (loss_b, norm_b, table_b) = results
    # Same arithmetic in a different summation order: float32 rounding only.
    assert abs(loss_a - loss_b) <= 1e-5
    assert abs(norm_a - norm_b) <= 1e-5
    np.testing.assert_allclose(table_a, table_b, atol=1e-5)


def _naive_loss(hidden, head, targets, vocab_size):
    logits = hidden @ head.T
    logits = jnp.where(jnp.arange(head.shape[0]) < vocab_size, logits, -jnp.inf)
    return jnp.sum(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[:, None], -1)[:, 0])


def test_chunked_cross_entropy_matches_naive_value_and_gradient():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(300, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(512, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 500, 300))
    weights = jnp.ones(300)
    chunked = lambda h, w: train.chunked_cross_entropy(h, w, targets, weights, 500, chunk=64)  # noqa: E731
    naive = lambda h, w: _naive_loss(h, w, targets, 500)  # noqa: E731
    value_c, grads_c = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, head)
    value_n, grads_n = jax.value_and_grad(naive, argnums=(0, 1))(hidden, head)
    # Sum of 300 per-token losses ~7 each: 1e-5 relative is float32 reordering.
    assert abs(float(value_c) - float(value_n)) <= 1e-5 * abs(float(value_n))
    for a, b in zip(grads_c, grads_n):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # Padding rows (>= 500) get no probability mass, hence exactly zero gradient.
    assert float(jnp.abs(grads_c[1][500:]).max()) == 0.0


def test_chunked_cross_entropy_temporary_memory_is_under_a_quarter_of_naive():
    tokens, vocab, dim = 2048, 50_000, 64
    hidden = jax.ShapeDtypeStruct((tokens, dim), jnp.float32)
    head = jax.ShapeDtypeStruct((vocab, dim), jnp.float32)
    targets = jax.ShapeDtypeStruct((tokens,), jnp.int32)
    weights = jax.ShapeDtypeStruct((tokens,), jnp.float32)

    def temp_bytes(loss):
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(hidden, head, targets, weights).compile().memory_analysis().temp_size_in_bytes

    naive = temp_bytes(lambda h, w, t, wt: _naive_loss(h, w, t, vocab))
    chunked = temp_bytes(lambda h, w, t, wt: train.chunked_cross_entropy(h, w, t, wt, vocab, chunk=256))
    assert naive >= tokens * vocab * 4  # the naive version holds the full logits at least once
    assert chunked < naive / 4, (chunked, naive)


def test_only_the_table_is_differentiated_flops():
    """On a body-heavy config, differentiating the table alone skips the weight gradients."""
    cfg = ModelConfig(vocab_size=128, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    trainable, frozen = optim.split_params(params)
    ids = jnp.zeros((2, 129), jnp.int32)
    settings = train.StepSettings(cfg, remat="none", loss_chunk=256)

    def loss(tr, fr):
        total, count = train.loss_sum_and_count(tr, fr, ids, jnp.ones(2), settings)
        return total / count

    def flops(fn):
        return fn.lower(trainable, frozen).compile().cost_analysis()["flops"]

    ours = flops(jax.jit(jax.grad(loss, argnums=0)))
    everything = flops(jax.jit(jax.grad(loss, argnums=(0, 1))))
    assert ours <= 0.72 * everything, ours / everything


def test_schedule_warmup_then_cosine():
    tc = TrainConfig(max_steps=100, lr=1e-3, warmup_ratio=0.1, schedule="cosine")
    schedule = optim.make_schedule(tc)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    # Halfway through the 90 decay steps the cosine is at half the peak.
    np.testing.assert_allclose(float(schedule(55)), 0.5e-3, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 0.0, atol=1e-9)
    linear = optim.make_schedule(dataclasses.replace(tc, schedule="linear"))
    np.testing.assert_allclose(float(linear(55)), 0.5e-3, rtol=1e-5)
    constant = optim.make_schedule(dataclasses.replace(tc, schedule="constant"))
    np.testing.assert_allclose(float(constant(90)), 1e-3, rtol=1e-6)


def test_adafactor_matches_hf_configuration_on_a_step():
    """One Adafactor step from zero state equals HF's rule: update = lr * g / rms-clipped sqrt(v)."""
    tc = TrainConfig(max_steps=10, lr=0.1, warmup_ratio=0.0, schedule="constant", clip_norm=0.0)
    tx = optim.make_optimizer(tc, 0)
    grad = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)), jnp.float32)
    params = {"embedding": jnp.zeros((8, 4))}
    updates, _ = tx.update({"embedding": grad}, tx.init(params), params)
    # First step: HF's beta2 = 1 - 1^-0.8 = 0, so v is the factored estimate of g^2; the
    # factored update is g / sqrt(r c / mean r), then clipped to unit RMS, times -lr.
    r = jnp.mean(grad**2 + 1e-30, axis=1)
    c = jnp.mean(grad**2 + 1e-30, axis=0)
    u = grad / jnp.sqrt(jnp.outer(r, c) / jnp.mean(r))
    u = u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u**2)))
    np.testing.assert_allclose(updates["embedding"], -0.1 * u, rtol=1e-5)


def _hf_optimizer(tc: TrainConfig, table, base_rows: int, steps: int):
    """HF Trainer's optimiser and schedule for `tc`, over one torch table, hook for the mask."""
    from tests.hf_oracle import torch, transformers

    args = transformers.TrainingArguments(
        output_dir="unused", optim="adafactor" if tc.optimizer == "adafactor" else "adamw_torch",
        learning_rate=tc.lr, weight_decay=tc.weight_decay, warmup_steps=tc.warmup_ratio,
        # HF's "constant" ignores the warmup; wake2vec's constant warms up first.
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(tc.schedule, tc.schedule), report_to=[])
    if tc.mask_base_rows:  # the study's gradient hook
        keep = (torch.arange(table.shape[0]) >= base_rows).float()[:, None]
        table.register_hook(lambda grad: grad * keep)
    optimizer_cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = optimizer_cls([{"params": [table], "weight_decay": args.weight_decay}], **kwargs)
    schedule = transformers.get_scheduler(args.lr_scheduler_type, optimizer,
                                          num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps)
    return optimizer, schedule


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
@pytest.mark.parametrize("mask", [False, True], ids=["unmasked", "masked"])
def test_optimizer_on_a_padded_table_matches_hf_trainers(optimizer, mask):
    """Items 1-3 of issue 11 on fixed gradients: padding invisible, HF's clip and warmup, the study's mask.

    195 real rows padded to 256, 150 of them base rows; 5 steps x 0.25 warm up over 2 (HF) not 1. Each gradient has one spike, which
    makes Adafactor's factored estimate undershoot every other entry, so its update-RMS
    clip fires even with 150/195 rows masked to zero; the spike also fires the global clip.
    The torch side is HF Trainer's optimiser with the study's gradient hook, the base rows
    then held fixed (the hook lets decoupled weight decay move them; --mask_base_rows
    promises they stay).
    """
    from tests.hf_oracle import torch

    vocab, rows, dim, base, steps = 195, 256, 16, 150, 5
    tc = TrainConfig(max_steps=steps, lr=0.05, warmup_ratio=0.25, schedule="cosine", optimizer=optimizer,
                     weight_decay=0.1, clip_norm=1.0, mask_base_rows=mask)
    rng = np.random.default_rng(0)
    start = rng.normal(0, 0.1, (vocab, dim)).astype(np.float32)
    grads = rng.normal(0, 1e-2, (steps, vocab, dim)).astype(np.float32)
    grads[np.arange(steps), base + 3 * np.arange(steps), np.arange(steps)] = 10.0

    pad = lambda x: jnp.asarray(np.pad(x, ((0, rows - vocab), (0, 0))))  # noqa: E731
    tx = optim.make_optimizer(tc, base, vocab)
    params = {"embedding": pad(start)}
    state = tx.init(params)
    update_fn = jax.jit(tx.update)
    for grad in grads:
        updates, state = update_fn({"embedding": pad(grad)}, state, params)
        params = optax.apply_updates(params, updates)
    ours = np.asarray(params["embedding"])

    table = torch.nn.Parameter(torch.from_numpy(start.copy()))
    hf_opt, hf_schedule = _hf_optimizer(tc, table, base, steps)
    clipped_rms = []
    for grad in grads:
        hf_opt.zero_grad()
        (table * torch.from_numpy(grad)).sum().backward()  # through the hook, as a real backward
        assert float(torch.nn.utils.clip_grad_norm_([table], tc.clip_norm)) > tc.clip_norm
        lr, before = hf_schedule.get_last_lr()[0], table.detach().clone()
        hf_opt.step()
        hf_schedule.step()
        with torch.no_grad():
            decayed = before * (1 - lr * tc.weight_decay)
            if mask:
                table[:base] = decayed[:base] = before[:base]
            clipped_rms.append(float((table - decayed).pow(2).mean().sqrt()) / lr if lr else 0.0)
    expected = table.detach().numpy()

    assert np.abs(ours[vocab:]).max() == 0.0  # padding rows stay zero
    if mask:
        np.testing.assert_array_equal(ours[:base], start[:base])
    if optimizer == "adafactor":  # a clipped update has RMS 1 over the real table (HF's clip fired)
        assert sum(abs(r - 1.0) < 1e-4 for r in clipped_rms) >= 2, clipped_rms
    movement = np.abs(expected - start).max()
    # float32 rounding of a few dozen ops per entry per step: measured below 1e-6 of the movement.
    np.testing.assert_allclose(ours[:vocab], expected, atol=1e-5 * movement, rtol=0)


def test_a_non_finite_update_leaves_the_state_unchanged():
    """Issue 11 item 5: the loss is finite (computed before the update) but lr x update overflows."""
    state, frozen, step = _setup(lr=3e38)
    before = jax.tree_util.tree_map(np.asarray, state)
    after, metrics = step(state, frozen, _batch())
    assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.tree_util.tree_map(np.asarray, after), before)


@pytest.mark.parametrize("schedule", sorted(optim.SCHEDULES))
def test_schedules_match_hf_trainers_with_a_fractional_warmup(schedule):
    """50 steps x 0.05 = 2.5: HF Trainer warms up over ceil = 3 steps (issue 11 item 2)."""
    from tests.hf_oracle import torch

    tc = TrainConfig(max_steps=50, lr=1e-3, warmup_ratio=0.05, schedule=schedule)
    _, hf_schedule = _hf_optimizer(tc, torch.nn.Parameter(torch.zeros(2, 2)), 0, tc.max_steps)
    expected = []
    for _ in range(tc.max_steps):
        expected.append(hf_schedule.get_last_lr()[0])
        hf_schedule.optimizer.step()
        hf_schedule.step()
    ours = optim.make_schedule(tc)
    # float32 schedule arithmetic against torch's float64: 1e-6 relative of the peak.
    np.testing.assert_allclose([float(ours(s)) for s in range(tc.max_steps)], expected, rtol=0, atol=1e-9)
    assert optim.warmup_steps(tc.warmup_ratio, tc.max_steps) == 3


def test_extending_max_steps_needs_a_choice_and_each_choice_is_its_definition():
    """Issue 11 item 7: 10 -> 20 steps of cosine on a run that has trained."""
    stored = {"flags": {"max_steps": 10}, "schedule_starts": [0]}
    tc = TrainConfig(max_steps=20, lr=1e-3, warmup_ratio=0.1, schedule="cosine")
    with pytest.raises(optim.ScheduleExtensionError, match="--extend_schedule=restart"):
        optim.schedule_starts(stored, tc)
    assert optim.schedule_starts(stored, dataclasses.replace(tc, max_steps=10)) == [0]  # unchanged: no choice

    original = optim.make_schedule(dataclasses.replace(tc, max_steps=10))
    restart = dataclasses.replace(tc, extend_schedule="restart")
    starts = optim.schedule_starts(stored, restart)
    assert starts == [0, 10]
    assert optim.schedule_record(stored, restart) == {
        "schedule_starts": [0, 10], "schedule_extensions": [{"max_steps": [10, 20], "extend_schedule": "restart"}]}
    restarted = optim.make_schedule(restart, starts)
    # The first 10 steps are the original run's; step 10 starts a 10-step segment's warmup.
    np.testing.assert_array_equal([float(restarted(s)) for s in range(10)], [float(original(s)) for s in range(10)])
    assert float(restarted(10)) == 0.0 and float(restarted(11)) == pytest.approx(1e-3, rel=1e-6)
    with pytest.raises(optim.ScheduleExtensionError, match="adds none"):
        optim.schedule_starts(stored, dataclasses.replace(restart, max_steps=8))

    stretch = dataclasses.replace(tc, extend_schedule="stretch")
    assert optim.schedule_starts(stored, stretch) == [0]
    launched = optim.make_schedule(tc)  # as if launched with 20 steps
    stretched = optim.make_schedule(stretch, [0])
    assert [float(stretched(s)) for s in range(20)] == [float(launched(s)) for s in range(20)]
    # Extending a run restarted before extends its last segment.
    assert optim.schedule_starts({"flags": {"max_steps": 20}, "schedule_starts": [0, 10]},
                                 dataclasses.replace(stretch, max_steps=30)) == [0, 10]
