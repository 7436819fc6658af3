"""The Phase 1 optimiser: only the embedding table (and an untied head) learns.

* `optax.partition` labels every leaf of the full parameter tree: the table / head get
  `chain(row mask, clip, adafactor | adamw, weight decay, schedule, row mask)`, every other
  leaf gets `set_to_zero` and so holds no optimiser state at all.
* The training step never differentiates the frozen body (wake2vec.training.train), so the frozen
  leaves of the gradient tree are 0-d placeholders: `set_to_zero` ignores them and no
  body-sized gradient buffer ever exists (`gradient_tree`).
* `--mask_base_rows` masks twice. First the base rows' *gradients* are zeroed, before the
  chain: that is what the study's gradient hook did, so the global-norm clip, Adafactor's
  factored moments and its update RMS see exactly the gradient the study's optimiser saw,
  and the new rows move as they did there. Then the base rows' *updates* are zeroed, last,
  after weight decay and the learning rate: decoupled weight decay acts on the parameter,
  not the gradient, and would otherwise move the "frozen" rows (the one leak of the
  study's hook). A zero gradient row gives a zero Adafactor / Adam update, so the second
  mask changes nothing but the weight decay.
* Padding rows (wake2vec.models.padding) have zero gradient, so they add nothing to the global
  norm, and their zero parameters decay by zero. Two statistics still need the real row
  count: Adafactor's factored second moment, whose row and column means both average over
  the padded axis (the dilution cancels in r c / mean(r); what is left is the padding rows'
  epsilon 1e-30, some 1e-22 of a column mean and below float32 resolution), and its
  update RMS, which must average over the real rows only (`clip_update_rms`), or every
  clipped step is larger by sqrt(padded rows / real rows).
* Adafactor follows HF's `Adafactor(scale_parameter=False, relative_step=False,
  warmup_init=False)`, the configuration HF Trainer builds for `optim="adafactor"`:
  factored second moments with decay 1 - t^-0.8, eps 1e-30, update RMS clipped to 1, no
  first moment, no parameter-scale multiplication. AdamW is torch's (b 0.9/0.999, eps 1e-8,
  decoupled decay lr x wd). The global-norm clip is torch's `clip_grad_norm_` (scale
  max_norm / (norm + 1e-6), at most 1), which HF Trainer calls.
* The schedules are HF's `get_{cosine,linear,constant}_schedule_with_warmup` with HF
  Trainer's warmup length ceil(ratio x steps). A run extended past its --max_steps
  (`--extend_schedule`) has one schedule segment per extension (`schedule_starts`).

`OPTIMIZERS` and `SCHEDULES` are the registries: adding an optimiser or a schedule is one
entry there, and flag validation reads their keys.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from wake2vec.models import padding
from wake2vec.training import loss_scale
from wake2vec.config import RunConfig
from wake2vec.errors import UserError

TRAINABLE = "trainable"
FROZEN = "frozen"
# Phase 1's trainable subtrees; later phases train others ("lora") and may freeze these.
TRAINABLE_KEYS = ("embedding", "lm_head")
# The subtrees with a vocabulary axis: the row mask and the update-RMS clip act on these only.
TABLE_KEYS = ("embedding", "lm_head")
# The names --optimizer and --schedule accept (the flag validation reads these).
OPTIMIZERS = ("adafactor", "adamw")
SCHEDULES = ("cosine", "linear", "constant")


class ScheduleExtensionError(UserError, ValueError):
    """A resumed run changes --max_steps without saying what its schedule should do."""


def param_labels(params: dict, trainable_keys: Sequence[str] = TRAINABLE_KEYS) -> dict:
    """'trainable' for the subtrees under `trainable_keys`, 'frozen' for every other leaf."""
    return {
        key: jax.tree_util.tree_map(lambda _: TRAINABLE if key in trainable_keys else FROZEN, value)
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


# ----------------------------------------------------------------------------- schedules

# name -> (peak lr, decay steps) -> the schedule after warmup, as HF's get_*_schedule_with_warmup
# (for "constant" that is HF's constant_with_warmup: HF's plain "constant" ignores warmup).
SCHEDULES: dict[str, Callable[[float, int], optax.Schedule]] = {
    "cosine": lambda lr, steps: optax.cosine_decay_schedule(lr, steps),
    "linear": lambda lr, steps: optax.linear_schedule(lr, 0.0, steps),
    "constant": lambda lr, steps: optax.constant_schedule(lr),
}

# What a resumed run whose --max_steps changed does with its schedule (see schedule_starts).
EXTENSIONS = ("restart", "stretch")


def warmup_steps(warmup_ratio: float, steps: int) -> int:
    """HF Trainer's rule, ceil(steps x ratio): 50 steps at 0.05 warm up over 3, not 2."""
    return math.ceil(steps * warmup_ratio)


def _segment(cfg: RunConfig, steps: int) -> optax.Schedule:
    """Linear warmup from 0 over warmup_steps(...), then `cfg.schedule` down over the rest."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule={cfg.schedule!r}; choose one of {', '.join(sorted(SCHEDULES))}")
    warmup = warmup_steps(cfg.warmup_ratio, steps)
    after = SCHEDULES[cfg.schedule](cfg.lr, max(1, steps - warmup))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), after], [warmup])


def make_schedule(cfg: RunConfig, segment_starts: Sequence[int] = (0,)) -> optax.Schedule:
    """The learning rate at each optimizer step (0-based, as HF's LambdaLR counts).

    `segment_starts` [0, s1, ...] (config.json's `schedule_starts`) cuts the run into
    segments [0, s1), [s1, s2), ..., [s_last, max_steps), each with its own warmup and
    decay: one segment per `--extend_schedule=restart`.
    """
    starts = list(segment_starts)
    ends = starts[1:] + [cfg.max_steps]
    segments = [_segment(cfg, end - start) for start, end in zip(starts, ends)]
    return segments[0] if len(segments) == 1 else optax.join_schedules(segments, starts[1:])


def _changed_max_steps(stored: dict | None, cfg: RunConfig) -> int | None:
    """The stored --max_steps when this invocation changes it on a run configured to train."""
    old = (stored or {}).get("flags", {}).get("max_steps")
    return None if not old or cfg.max_steps in (0, old) else old


def schedule_record(stored: dict | None, cfg: RunConfig) -> dict:
    """config.json's schedule fields: `schedule_starts`, and the `schedule_extensions` that
    made them ({"max_steps": [old, new], "extend_schedule": choice} per extension)."""
    extensions = list((stored or {}).get("schedule_extensions", []))
    old = _changed_max_steps(stored, cfg)
    starts = schedule_starts(stored, cfg)
    if old is not None:
        extensions.append({"max_steps": [old, cfg.max_steps], "extend_schedule": cfg.extend_schedule})
    return {"schedule_starts": starts, "schedule_extensions": extensions}


def schedule_starts(stored: dict | None, cfg: RunConfig) -> list[int]:
    """This run's schedule segments, from its config.json record and the new flags.

    A rerun that changes --max_steps of a run configured to train must say what the change
    means, because the two readings differ by far more than noise (3,000 -> 6,000 steps of
    cosine: resuming at lr 0 or at 2.7e-4):

    * restart: the steps up to the old --max_steps keep their schedule; the added steps get
      one of their own (warmup over warmup_ratio of them, then the decay to the new
      --max_steps), a warm restart;
    * stretch: the last segment's warmup and decay are recomputed for the new --max_steps,
      as if the run had been launched with it; the lr jumps where the run resumes.
    """
    starts = list((stored or {}).get("schedule_starts", [0]))
    old = _changed_max_steps(stored, cfg)
    if old is None:
        return starts
    if cfg.extend_schedule not in EXTENSIONS:
        raise ScheduleExtensionError(
            f"--max_steps changes from {old} to {cfg.max_steps} on an existing run: pass --extend_schedule=restart "
            "(a new warmup and decay over the added steps) or --extend_schedule=stretch (the schedule recomputed "
            "for the new --max_steps, as if launched with it); see README"
        )
    if cfg.extend_schedule == "stretch":
        if cfg.max_steps <= starts[-1]:
            raise ScheduleExtensionError(
                f"--extend_schedule=stretch: --max_steps={cfg.max_steps} must exceed the last segment's start {starts[-1]}")
        return starts
    if cfg.max_steps <= old:
        raise ScheduleExtensionError(
            f"--extend_schedule=restart adds steps after the old --max_steps={old}; --max_steps={cfg.max_steps} adds none")
    return starts + [old]


# ----------------------------------------------------------------------------- transformations


class _NoState(NamedTuple):
    pass


def _map_trainable(fn: Callable[[str, jax.Array], jax.Array], updates, keys: Sequence[str] | None = None):
    """fn(top key, leaf) over the trainable leaves under `keys` (None: all of them); the
    frozen MaskedNodes and the other leaves pass through."""
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731

    def apply(path, u):
        key = path[0].key
        return u if masked(u) or (keys is not None and key not in keys) else fn(key, u)

    return jax.tree_util.tree_map_with_path(apply, updates, is_leaf=masked)


def _stateless(fn: Callable) -> optax.GradientTransformation:
    def update_fn(updates, state, params=None):
        del params
        return fn(updates), state

    return optax.GradientTransformation(lambda _: _NoState(), update_fn)


def mask_rows(num_frozen_rows: int) -> optax.GradientTransformation:
    """Zeroes rows [0, num_frozen_rows) of the table's and an untied head's updates."""

    def zero_base(key, u):
        return jnp.where(padding.rows_in(u.shape, padding.vocab_axis(key), num_frozen_rows, None), u, 0.0)

    return _stateless(lambda updates: _map_trainable(zero_base, updates, TABLE_KEYS))


def clip_update_rms(threshold: float, vocab_size: int | None) -> optax.GradientTransformation:
    """Adafactor's update clip, u / max(1, RMS(u) / threshold), with the RMS over real rows.

    optax.clip_by_block_rms averages over every row of the leaf, the zero padding rows
    included; HF's Adafactor sees the unpadded matrix. `vocab_size` None: every row is real.
    """

    def clip(key, u):
        axis = padding.vocab_axis(key)
        rows = u.shape[axis] if vocab_size is None else vocab_size
        real = jnp.where(padding.rows_in(u.shape, axis, 0, rows), u, 0.0)
        rms = jnp.sqrt(jnp.sum(jnp.square(real)) / (rows * (u.size // u.shape[axis])))
        return u / jnp.maximum(1.0, rms / threshold)

    return _stateless(lambda updates: _map_trainable(clip, updates, TABLE_KEYS))


def scale_by_key(factors: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies the updates under each top-level key by its factor (keys not named: 1).

    Placed after the learning rate, factor lr_k / lr gives subtree k its own peak rate on
    the shared schedule; weight decay, already in the update, scales with it, as a torch
    parameter group's lr scales both.
    """
    return _stateless(lambda updates: _map_trainable(lambda key, u: u * factors.get(key, 1.0), updates))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: g x min(1, max_norm / (||g|| + 1e-6)).

    optax's own clip has no 1e-6; HF Trainer calls torch's, so this is torch's.
    """

    def clip(updates):
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree_util.tree_map(lambda u: u * scale, updates)

    return _stateless(clip)


# ----------------------------------------------------------------------------- optimisers


def _adafactor(cfg: RunConfig, vocab_size: int | None) -> list[optax.GradientTransformation]:
    return [
        optax.scale_by_factored_rms(decay_rate=0.8, epsilon=1e-30, min_dim_size_to_factor=1),
        clip_update_rms(1.0, vocab_size),
    ]


def _adamw(cfg: RunConfig, vocab_size: int | None) -> list[optax.GradientTransformation]:
    return [optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)]


# name -> (config, real vocabulary rows) -> the core of the chain, between clip and decay.
OPTIMIZERS: dict[str, Callable[[RunConfig, int | None], list[optax.GradientTransformation]]] = {
    "adafactor": _adafactor,
    "adamw": _adamw,
}


def make_optimizer(
    cfg: RunConfig,
    base_vocab_size: int,
    vocab_size: int | None = None,
    schedule: optax.Schedule | None = None,
    *,
    trainable_keys: Sequence[str] = TRAINABLE_KEYS,
    lr_by_key: dict[str, float] | None = None,
) -> optax.GradientTransformation:
    """The partitioned optimiser over the full parameter tree (see module docstring).

    `vocab_size` is the real row count of a padded table (None: no padding); `schedule`
    defaults to make_schedule(cfg). `trainable_keys` names the top-level subtrees that
    learn (Phase 1: the table and an untied head; Phase 2: "lora"); `lr_by_key` gives a
    subtree its own peak rate on the same schedule (Phase 3's adapters and Wake rows). The
    global-norm clip sees every trainable subtree at once, as torch's clip over all groups.
    `cfg.mask_base_rows` keeps the table's base rows fixed (a flag in Phase 1, always on in
    Phase 3, moot in Phase 2, which trains no row). With float16 compute and
    --loss_scale=dynamic the optimiser is wrapped in wake2vec.training.loss_scale.dynamic.
    """
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer={cfg.optimizer!r}; choose one of {', '.join(sorted(OPTIMIZERS))}")
    mask_base_rows = cfg.mask_base_rows
    chain: list[Any] = []
    if mask_base_rows:
        chain.append(mask_rows(base_vocab_size))
    if cfg.clip_norm > 0:
        chain.append(clip_by_global_norm(cfg.clip_norm))
    chain += OPTIMIZERS[cfg.optimizer](cfg, vocab_size)
    if cfg.weight_decay > 0:
        chain.append(optax.add_decayed_weights(cfg.weight_decay))
    chain.append(optax.scale_by_learning_rate(schedule or make_schedule(cfg)))
    if lr_by_key:
        chain.append(scale_by_key({key: lr / cfg.lr for key, lr in lr_by_key.items()}))
    if mask_base_rows:
        chain.append(mask_rows(base_vocab_size))
    keys = tuple(trainable_keys)
    tx = optax.partition(
        {TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()},
        lambda params: param_labels(params, keys),
    )
    # float16 compute: the loss scale wraps the whole optimiser, so an overflowed step moves nothing.
    return loss_scale.dynamic(tx) if loss_scale.active(cfg.loss_scale, cfg.compute_dtype) else tx
