"""The Phase 1 optimiser: only the embedding table (and an untied head) learns.

* `optax.partition` labels every leaf of the full parameter tree: the table / head get
  `chain(clip, adafactor | adamw, weight decay, schedule, row mask)`, every other leaf gets
  `set_to_zero` and so holds no optimiser state at all.
* The training step never differentiates the frozen body (wake2vec.train), so the frozen
  leaves of the gradient tree are 0-d placeholders: `set_to_zero` ignores them and no
  body-sized gradient buffer ever exists (`gradient_tree`).
* `--mask_base_rows` is exact because the row mask is the *last* transform, after weight
  decay and the learning rate: a mask applied to gradients alone would still let decoupled
  weight decay (and Adafactor's update clipping) move the "frozen" base rows, which is the
  leak the original's gradient hook had.
* Adafactor follows HF's `Adafactor(scale_parameter=False, relative_step=False,
  warmup_init=False)`, the configuration HF Trainer builds for `optim="adafactor"`:
  factored second moments with decay 1 - t^-0.8, eps 1e-30, update RMS clipped to 1, no
  first moment, no parameter-scale multiplication.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from wake2vec.config import TrainConfig

TRAINABLE = "trainable"
FROZEN = "frozen"
TRAINABLE_KEYS = ("embedding", "lm_head")
# The names --optimizer and --schedule accept (the flag validation reads these).
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


def param_labels(params: dict) -> dict:
    """'trainable' for the table and an untied head, 'frozen' for every other leaf."""
    return {
        key: jax.tree_util.tree_map(lambda _: TRAINABLE if key in TRAINABLE_KEYS else FROZEN, value)
        for key, value in params.items()
    }


def split_params(params: dict) -> tuple[dict, dict]:
    """(trainable, frozen) top-level subtrees of a parameter tree."""
    trainable = {k: v for k, v in params.items() if k in TRAINABLE_KEYS}
    frozen = {k: v for k, v in params.items() if k not in TRAINABLE_KEYS}
    return trainable, frozen


def gradient_tree(trainable_grads: dict, frozen: dict) -> dict:
    """The full-structure gradient optax.partition expects, frozen leaves as scalar zeros."""
    placeholders = jax.tree_util.tree_map(lambda _: jnp.zeros((), jnp.float32), frozen)
    return {**placeholders, **trainable_grads}


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 over warmup_ratio x max_steps, then cosine / linear / constant."""
    warmup = int(round(cfg.warmup_ratio * cfg.max_steps))
    decay_steps = max(1, cfg.max_steps - warmup)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, decay_steps)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(cfg.lr, 0.0, decay_steps)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"--schedule={cfg.schedule!r}; choose cosine, linear or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


class RowMaskState(NamedTuple):
    pass


def mask_rows(num_frozen_rows: int) -> optax.GradientTransformation:
    """Zeroes the updates of rows [0, num_frozen_rows) of the table and of an untied head.

    The table is (rows, D) and the head kernel (D, rows), so the vocabulary axis is 0 for
    one and 1 for the other.
    """

    def _mask(path, update):
        key = path[0].key
        axis = 0 if key == "embedding" else 1
        keep = jnp.arange(update.shape[axis]) >= num_frozen_rows
        keep = keep[:, None] if axis == 0 else keep[None, :]
        return jnp.where(keep, update, jnp.zeros_like(update))

    def update_fn(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u if isinstance(u, optax.MaskedNode) else _mask(p, u), updates,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        ), state

    return optax.GradientTransformation(lambda _: RowMaskState(), update_fn)


def _core(cfg: TrainConfig) -> list[optax.GradientTransformation]:
    if cfg.optimizer == "adafactor":
        return [
            optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30, min_dim_size_to_factor=1),
            optax.clip_by_block_rms(1.0),
        ]
    if cfg.optimizer == "adamw":
        return [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]
    raise ValueError(f"--optimizer={cfg.optimizer!r}; choose adafactor or adamw")


def make_optimizer(cfg: TrainConfig, base_vocab_size: int) -> optax.GradientTransformation:
    """The partitioned optimiser over the full parameter tree (see module docstring)."""
    chain: list[Any] = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain += _core(cfg)
    if cfg.weight_decay > 0:
        chain.append(optax.add_decayed_weights(cfg.weight_decay))
    chain.append(optax.scale_by_learning_rate(make_schedule(cfg)))
    if cfg.mask_base_rows:
        chain.append(mask_rows(base_vocab_size))
    return optax.partition(
        {TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()},
        param_labels,
    )
