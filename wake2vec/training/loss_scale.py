"""Dynamic loss scaling for float16 compute (--loss_scale=dynamic, the default there).

float16 flushes magnitudes below 6e-8 to zero, and a step's gradients sit far below that
(the mean loss divides every token's gradient by the token count before the body's
backward pass sees it). Two measures keep them (docs/results/fp16_underflow.md):

* the chunked cross-entropy forms its logit gradient (softmax - one-hot, |x| <= 1) times
  LOGIT_GRAD_SCALE before the cast to float16, and divides the float32 products back;
* the loss is multiplied by a dynamic scale before differentiation and the gradient
  divided by it in float32. A non-finite gradient means the scale overflowed float16: the
  update is skipped (parameters and the inner optimiser state unchanged, the step counter
  advances, as torch's GradScaler) and the scale halves; after GROWTH_INTERVAL finite
  steps in a row it doubles. A skipped step does not advance the inner optimiser's own
  count either, so its schedule (and Adafactor's decay) lag the step counter by the number
  of skipped steps, which metrics.jsonl lists; the logged `lr` is the schedule at the step.

optax has no loss scaler and jmp is unmaintained, so this is written here. The scale lives
in the optimiser state (`ScaledState`), so it is checkpointed with it and a resumed run is
bit-identical. float32 / bfloat16 runs do not wrap the optimiser: no new state, and their
existing checkpoints restore.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wake2vec.errors import UserError

CHOICES = ("dynamic", "none")
INITIAL_SCALE = 2.0**15
GROWTH_INTERVAL = 2000
# The scale never grows past this (float16's largest finite value is 65504) nor halves below 1.
MAX_SCALE = 2.0**24
# |logit gradient| <= 1 (weights are 0 or 1 in a training step), so x 2^15 stays below 65504.
LOGIT_GRAD_SCALE = 2.0**15


class LossScaleResumeError(UserError, RuntimeError):
    """An fp16 run written before loss scaling existed: its optimiser state has no scale."""


def active(loss_scale: str, compute_dtype: str) -> bool:
    """Whether a run with these flags scales its loss: float16 compute and --loss_scale=dynamic."""
    return compute_dtype == "float16" and loss_scale == "dynamic"


class ScaledState(NamedTuple):
    inner: Any
    scale: jax.Array  # float32, the factor the next step's loss is multiplied by
    good_steps: jax.Array  # int32, finite steps since the scale last changed


def _all_finite(tree) -> jax.Array:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def dynamic(inner: optax.GradientTransformation, initial: float = INITIAL_SCALE,
            growth_interval: int = GROWTH_INTERVAL) -> optax.GradientTransformation:
    """`inner` behind a dynamic loss scale. Its update takes the *unscaled* gradient (the
    train step divides by `current_scale` first) and applies it only if it is finite."""

    def init(params):
        return ScaledState(inner.init(params), jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))

    def update(grads, state, params=None):
        finite = _all_finite(grads)
        # Zeros stand in for an overflowed gradient, so no NaN reaches the discarded update.
        safe = jax.tree_util.tree_map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, inner_state = inner.update(safe, state.inner, params)
        updates = jax.tree_util.tree_map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        inner_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), inner_state, state.inner)
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= growth_interval
        scale = jnp.where(finite, jnp.where(grow, jnp.minimum(state.scale * 2, MAX_SCALE), state.scale),
                          jnp.maximum(state.scale / 2, 1.0))
        return updates, ScaledState(inner_state, scale, jnp.where(grow, 0, good).astype(jnp.int32))

    return optax.GradientTransformation(init, update)


def current_scale(opt_state) -> jax.Array | None:
    """The loss scale of a wrapped optimiser's state; None for an unwrapped one."""
    return opt_state.scale if isinstance(opt_state, ScaledState) else None


def check_resumable(checkpointed_paths: set[str] | None, scaled: bool) -> None:
    """Refuses to resume scaled from a checkpoint whose optimiser state (its leaves' keystr
    paths; None: none to resume) has no scale: an fp16 run from before loss scaling."""
    if scaled and checkpointed_paths is not None and ".scale" not in checkpointed_paths:
        raise LossScaleResumeError(
            "this fp16 run's checkpoints predate loss scaling and cannot resume scaled; rerun with --loss_scale=none "
            "to continue it unscaled, or start a new --workdir")
