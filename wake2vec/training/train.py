"""Phase 1 training steps: pure, jitted, sharded functions of (state, frozen, batch).

* `train_step(state, frozen, batch) -> (state, metrics)` differentiates only
  `state.trainable` (the table, and an untied head). The frozen body is a separate,
  non-differentiated argument, so XLA never builds a gradient for a frozen weight.
* Gradient accumulation is a `lax.scan` over microbatches inside the step: one compiled
  program, one optimiser update per step, as HF Trainer's gradient_accumulation_steps.
* The loss never materialises (tokens x vocab) logits: `chunked_cross_entropy` scans over
  token chunks and, under differentiation, forms the loss and both gradients from each
  chunk's logits in one pass (a custom VJP), so logits are neither stored nor recomputed.
  Padding rows of the vocabulary are masked out of the softmax.
* Loss semantics follow HF's causal-LM loss: each block of T tokens gives T - 1
  next-token predictions; the step's loss is their mean over every block of the step.
* Phase 2 (`StepSettings.lora`) trains LoRA adapters, `trainable = {"lora": adapters}`,
  with the table among the frozen leaves. Their dropout masks are a function of
  (seed, step, microbatch) alone (`dropout_key`), so a resumed run draws the masks the
  uninterrupted one did; evaluation never drops.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from wake2vec.models import model
from wake2vec.training import loss_scale, optim, parallel
from wake2vec.config import ModelConfig, dtype_from_name
from wake2vec.models.lora import LoraSpec


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint holds: the step, the trainable rows and their optimiser state."""

    step: jax.Array
    trainable: dict
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the compiled step (hashable: they select the program)."""

    model_cfg: ModelConfig
    compute_dtype: Any = jnp.float32
    remat: str = "full"
    loss_chunk: int = 1024
    # LoRA adapters on the body (Phases 2 and 3); None: Phase 1's plain model.
    lora: LoraSpec | None = None
    # Seeds the step's randomness as fold_in(seed, step): the adapters' dropout masks
    # (see dropout_key) and Phase 3's sampled pairs.
    seed: int = 0
    # float16 compute with --loss_scale=dynamic: the chunked cross-entropy scales its logit
    # gradient by loss_scale.LOGIT_GRAD_SCALE before the float16 cast (the dynamic loss scale
    # itself lives in the optimiser state).
    loss_scale: bool = False


def settings_for(cfg, model_cfg: ModelConfig, **extra) -> StepSettings:
    """A phase's step settings from its flags (a RunConfig); `extra` adds the phase's own (lora, seed)."""
    return StepSettings(model_cfg, dtype_from_name(cfg.compute_dtype), cfg.remat, cfg.loss_chunk,
                        loss_scale=loss_scale.active(cfg.loss_scale, cfg.compute_dtype), **extra)


def _chunked(hidden, targets, weights, chunk):
    """(N, D), (N,), (N[, K]) -> chunks of `chunk` tokens; padding tokens carry weight 0.

    Token i goes to chunk i % count, position i // count: interleaved, not consecutive,
    so that a token axis split over the devices stays split inside every chunk (a
    consecutive chunk would sit on a few devices, and the others would repeat its work).
    """
    n, dim = hidden.shape
    chunk = min(chunk, n)
    pad = -n % chunk
    split = lambda x: jnp.swapaxes(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(chunk, -1, *x.shape[1:]), 0, 1)  # noqa: E731
    return split(hidden), split(targets), split(weights)


def _unchunked(chunks, n):
    """The inverse of `_chunked` for a (count, chunk, D) stack: (N, D), padding dropped."""
    return jnp.swapaxes(chunks, 0, 1).reshape(-1, chunks.shape[-1])[:n]


def _masked_logits(h, head, vocab_size, compute_dtype, softcap):
    """(chunk, rows) float32 logits, soft-capped (Gemma 2), the padding rows of the vocabulary at -inf."""
    logits = jnp.dot(h.astype(compute_dtype), head.astype(compute_dtype).T, preferred_element_type=jnp.float32)
    logits = model.soft_cap(logits, softcap)
    return jnp.where(jnp.arange(head.shape[0]) < vocab_size, logits, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def chunked_cross_entropy(
    hidden, head, targets, weights, vocab_size: int, chunk: int, compute_dtype=jnp.float32, softcap: float | None = None,
    grad_scale: float = 1.0,
):
    """Sum over tokens of weights * -log softmax(hidden @ head^T)[target].

    hidden (N, D) float32, head (rows, D) with rows >= vocab_size (padding rows get no
    probability and exactly zero gradient), targets (N,), weights (N,). Evaluation may pass
    weights (N, K), one column per category of tokens, and gets the K sums from one pass
    over the logits (differentiation takes (N,) weights only). Tokens go `chunk` at
    a time, so at most one (chunk x rows) block of logits exists: the full (N x rows) logits
    never do. Under differentiation the forward pass also forms both gradients from the
    same block (softmax - one-hot, times the head / the hidden states), so the backward pass
    only scales them: no logits are stored and none are recomputed. Evaluation, which does
    not differentiate, computes the loss alone. `softcap` is Gemma 2's final-logit cap.
    `grad_scale` multiplies the logit gradient before its cast to `compute_dtype` and
    divides the float32 products back: float16 would flush its small entries to zero.
    """
    h_chunks, t_chunks, w_chunks = _chunked(hidden, targets, weights, chunk)

    def body(total, xs):
        h, t, w = xs
        h = parallel.shard_loss_chunk(h)
        logits = _masked_logits(h, head, vocab_size, compute_dtype, softcap)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        losses = jax.nn.logsumexp(logits, axis=-1) - target_logit
        return total + jnp.sum(w * losses.reshape(losses.shape + (1,) * (w.ndim - 1)), axis=0), None

    return jax.lax.scan(body, jnp.zeros(weights.shape[1:], jnp.float32), (h_chunks, t_chunks, w_chunks))[0]


def _cross_entropy_with_grads(hidden, head, targets, weights, vocab_size, chunk, compute_dtype, softcap, grad_scale):
    if weights.ndim != 1:
        raise ValueError(f"chunked_cross_entropy is differentiated with one weight per token, got weights {weights.shape}")
    h_chunks, t_chunks, w_chunks = _chunked(hidden, targets, weights, chunk)
    head_c = head.astype(compute_dtype)

    def body(carry, xs):
        total, head_grad = carry
        h, t, w = xs
        h = parallel.shard_loss_chunk(h)
        logits = _masked_logits(h, head, vocab_size, compute_dtype, softcap)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        # d loss / d logits = w * (softmax - one_hot(target))
        logit_grad = jnp.exp(logits - lse[:, None]) * w[:, None]
        logit_grad = logit_grad.at[jnp.arange(t.shape[0]), t].add(-w)
        if softcap is not None:
            # Through cap * tanh(z / cap): d/dz = 1 - tanh^2. Padding rows (-inf) have zero gradient already.
            logit_grad = logit_grad * (1 - jnp.square(jnp.where(jnp.isfinite(logits), logits, 0.0) / softcap))
        if grad_scale != 1.0:
            logit_grad = logit_grad * grad_scale
        logit_grad = logit_grad.astype(compute_dtype)
        hidden_grad = jnp.dot(logit_grad, head_c, preferred_element_type=jnp.float32)
        head_grad = head_grad + jnp.dot(logit_grad.T, h.astype(compute_dtype), preferred_element_type=jnp.float32)
        if grad_scale != 1.0:
            hidden_grad = hidden_grad / grad_scale
        return (total + jnp.sum(w * (lse - target_logit)), head_grad), hidden_grad

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, head_grad), hidden_grad = jax.lax.scan(body, init, (h_chunks, t_chunks, w_chunks))
    hidden_grad = _unchunked(hidden_grad, hidden.shape[0])
    if grad_scale != 1.0:
        head_grad = head_grad / grad_scale
    return total, (hidden_grad, head_grad.astype(head.dtype))


def _cross_entropy_backward(vocab_size, chunk, compute_dtype, softcap, grad_scale, residuals, cotangent):
    del vocab_size, chunk, compute_dtype, softcap, grad_scale
    hidden_grad, head_grad = residuals
    # Targets are integers and weights are data: neither is differentiated.
    return cotangent * hidden_grad, cotangent * head_grad, None, None


chunked_cross_entropy.defvjp(_cross_entropy_with_grads, _cross_entropy_backward)


def weighted_loss_sum(
    trainable: dict, frozen: dict, ids: jax.Array, weights: jax.Array, settings: StepSettings,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Sum of the next-token losses of blocks ids (B, T), weighted by weights (B, T-1).

    Weights (B, T-1, K) give the K weighted sums at once (one column per category).
    `dropout_key` turns on the LoRA adapters' dropout (training steps only).
    """
    cfg = settings.model_cfg
    params = {**frozen, **trainable}
    hidden = model.hidden_states(
        cfg, params, ids[:, :-1], compute_dtype=settings.compute_dtype, remat=settings.remat,
        lora=settings.lora, dropout_key=dropout_key,
    ).hidden
    batch, length = ids[:, 1:].shape
    return chunked_cross_entropy(
        hidden.reshape(batch * length, -1),
        model.head_matrix(cfg, params),
        ids[:, 1:].reshape(-1),
        weights.reshape(batch * length, *weights.shape[2:]),
        cfg.vocab_size,
        settings.loss_chunk,
        settings.compute_dtype,
        cfg.final_logit_softcapping,
        loss_scale.LOGIT_GRAD_SCALE if settings.loss_scale else 1.0,
    )


def loss_sum_and_count(
    trainable: dict, frozen: dict, ids: jax.Array, block_weights: jax.Array, settings: StepSettings,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token losses, number of predicted tokens) for blocks ids (B, T).

    `block_weights` (B,) is 1 for real blocks and 0 for padding blocks of a short last
    eval batch, so padding never counts in the mean.
    """
    batch, length = ids[:, 1:].shape
    weights = jnp.broadcast_to(block_weights[:, None].astype(jnp.float32), (batch, length))
    return weighted_loss_sum(trainable, frozen, ids, weights, settings, dropout_key), jnp.sum(weights)


def dropout_key(seed: int, step: jax.Array, microbatch: jax.Array) -> jax.Array:
    """The dropout key of microbatch `microbatch` of step `step`: fold_in(fold_in(PRNGKey(seed), step), microbatch).

    Nothing but these three numbers enters it (no key is carried in the state), so a run
    resumed from a checkpoint draws exactly the masks the uninterrupted run drew.
    """
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), microbatch)


def all_finite(tree) -> jax.Array:
    """True if every floating-point element of every leaf is finite."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.asarray(True)


def make_train_step(
    tx: optax.GradientTransformation, schedule: optax.Schedule, settings: StepSettings, *, regularizer: Callable | None = None
) -> Callable:
    """train_step(state, frozen, batch (accum, B, T)) -> (state, metrics); not yet jitted.

    metrics: `loss` (mean next-token loss of the step, computed before its update),
    `grad_norm` (global L2 norm of the trainable rows' gradient before any mask or clip,
    the figure HF Trainer logs), `lr` (the rate this step used) and `finite`: False when
    the loss, the gradient or the new state holds a NaN or an inf, in which case the
    returned state is the input state, unchanged (step counter included).
    Under a loss scale (float16 compute, wake2vec.training.loss_scale) also `loss_scale`
    (the scale this step used) and `skipped`: True when its gradient overflowed, the update
    was skipped and the scale halved; such a step is finite (committed, its counter advances).

    `regularizer(trainable, frozen, key) -> {"total": weighted sum, name: term, ...}` adds
    batch-independent terms (Phase 3's alignment losses) to the objective. They are
    differentiated once per step, not per microbatch, so accumulation never scales them;
    `loss` stays the language-model loss alone and metrics["terms"] holds each term.
    Its key is a function of (seed, step) alone (`dropout_key(seed, step, accum)`, an index
    no microbatch uses), so a resumed run samples what the uninterrupted one did.
    """

    def mean_loss(trainable, frozen, ids, key, scale):
        total, count = loss_sum_and_count(trainable, frozen, ids, jnp.ones(ids.shape[0]), settings, key)
        loss = total / count
        # The scaled loss is differentiated; the loss itself is reported.
        return (loss if scale is None else loss * scale), loss

    grad_fn = jax.value_and_grad(mean_loss, has_aux=True)
    drops = settings.lora is not None and settings.lora.dropout > 0

    def regularizer_total(trainable, frozen, key):
        terms = regularizer(trainable, frozen, key)
        return terms["total"], terms

    def train_step(state: TrainState, frozen: dict, batch: jax.Array):
        accum = batch.shape[0]
        scale = loss_scale.current_scale(state.opt_state)  # None unless float16 compute scales its loss

        def microbatch(carry, xs):
            grads, loss = carry
            ids, index = xs
            key = dropout_key(settings.seed, state.step, index) if drops else None
            (_, micro_loss), micro_grads = grad_fn(state.trainable, frozen, ids, key, scale)
            # Every microbatch predicts the same number of tokens, so the mean of the
            # microbatch means is the mean over the whole step.
            grads = jax.tree_util.tree_map(lambda a, g: a + g / accum, grads, micro_grads)
            return (grads, loss + micro_loss / accum), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        (grads, loss), _ = jax.lax.scan(microbatch, (zeros, jnp.zeros((), jnp.float32)), (batch, jnp.arange(accum)))
        if scale is not None:
            grads = jax.tree_util.tree_map(lambda g: g / scale, grads)
        terms = {}
        if regularizer is not None:
            # The key of microbatch number `accum`, which no microbatch has: its own stream.
            key = dropout_key(settings.seed, state.step, jnp.asarray(accum))
            (_, terms), term_grads = jax.value_and_grad(regularizer_total, has_aux=True)(state.trainable, frozen, key)
            grads = jax.tree_util.tree_map(jnp.add, grads, term_grads)
        full_params = {**frozen, **state.trainable}
        updates, opt_state = tx.update(optim.gradient_tree(grads, frozen), state.opt_state, full_params)
        trainable = optax.apply_updates(state.trainable, {k: updates[k] for k in state.trainable})
        new_state = TrainState(state.step + 1, trainable, opt_state)
        # A finite loss says nothing about the update it produced (an overflowing lr x update,
        # an inf gradient), so the state itself is checked: a non-finite step is not applied.
        # Under a loss scale a non-finite gradient is an overflow of the scale, not a failure:
        # the optimiser skipped it and halved the scale, and the step is committed as such.
        checked = (trainable, opt_state, terms) if scale is not None else (grads, trainable, opt_state, terms)
        finite = jnp.isfinite(loss) & all_finite(checked)
        new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), "finite": finite}
        if scale is not None:
            metrics["loss_scale"], metrics["skipped"] = scale, ~all_finite(grads)
        if terms:
            metrics["terms"] = terms
        return new_state, metrics

    return train_step


# The validation loss by target type: every prediction, those whose target is a new (Wake)
# token, those whose target is a base token, and the base-token targets inside words the
# injection re-segmented (wake2vec.tokens.segmentation), which tell the injection's damage apart
# from the model's trouble with the new words. Then by window: the predictions inside
# windows of WAKE_WINDOW consecutive targets that hold at least one new token, and those in
# windows that hold none, which tell whether a phase helped the model read the Wake's own
# words in context or only the plain text around them (Phase 2 trains the body for this).
# And the new-token targets split by whether their token occurs anywhere in the training
# blocks (as input or target), then by how often: most Wake coinages occur once in the
# book, so most validation Wake targets are words whose row no training block ever holds.
# Embedding-only training cannot teach such a row; it can only push it down as a negative.
EVAL_CATEGORIES = ("all", "new", "base", "resegmented", "wake_windows", "plain_windows",
                   "new_seen", "new_unseen", "new_seen_1", "new_seen_2_4", "new_seen_5_19", "new_seen_20_plus")
WAKE_WINDOW = 32
# Training-count buckets of the seen new targets: [low, high) occurrences in the training blocks.
SEEN_BUCKETS = ((1, 2), (2, 5), (5, 20), (20, None))


def training_counts(train_blocks, vocab_size: int):
    """(vocab_size,) int32: how often each token id occurs in the training blocks (inputs and targets)."""
    import numpy as np

    return np.bincount(np.asarray(train_blocks).ravel(), minlength=vocab_size).astype(np.int32)[:vocab_size]


def category_weights(ids: jax.Array, block_weights: jax.Array, resegmented: jax.Array, base_size: int,
                     train_counts: jax.Array) -> jax.Array:
    """(B, T-1, len(EVAL_CATEGORIES)) float32 weights of the predictions of blocks ids (B, T).

    The prediction at position j has target ids[:, j + 1], so its categories are read at
    j + 1: `resegmented` (B, T) is the per-token mask aligned with ids. Windows are cut
    from each block's targets, WAKE_WINDOW at a time from its start (the last may be shorter).
    `train_counts` (V,) is `training_counts` of the run's training blocks: traced, so one
    compile serves every split.
    """
    targets = ids[:, 1:]
    is_new = targets >= base_size
    batch, length = targets.shape
    pad = -length % WAKE_WINDOW
    windows = jnp.pad(is_new, ((0, 0), (0, pad))).reshape(batch, -1, WAKE_WINDOW).any(axis=-1)
    in_wake_window = jnp.repeat(windows, WAKE_WINDOW, axis=1)[:, :length]
    seen_count = jnp.take(train_counts, targets, mode="clip")
    buckets = [is_new & (seen_count >= low) & (True if high is None else seen_count < high) for low, high in SEEN_BUCKETS]
    columns = (jnp.ones_like(is_new), is_new, ~is_new, resegmented[:, 1:] & ~is_new, in_wake_window, ~in_wake_window,
               is_new & (seen_count > 0), is_new & (seen_count == 0), *buckets)
    block = block_weights[:, None].astype(jnp.float32)
    return jnp.stack([block * c.astype(jnp.float32) for c in columns], axis=-1)


def make_eval_step(settings: StepSettings, base_size: int) -> Callable:
    """eval_step(trainable, frozen, ids (B, T), block_weights (B,), resegmented (B, T) bool, train_counts (V,)
    [, extra (B, T-1, K)]) -> (loss sums, weight sums) over EVAL_CATEGORIES and then the K `extra` columns
    (wake2vec.phases.base_cost's Wake-word weights), from one pass over the chunked logits."""

    def eval_step(trainable, frozen, ids, block_weights, resegmented, train_counts, extra=None):
        weights = category_weights(ids, block_weights, resegmented, base_size, train_counts)
        if extra is not None:
            weights = jnp.concatenate([weights, extra * block_weights[:, None, None]], axis=-1)
        return weighted_loss_sum(trainable, frozen, ids, weights, settings), jnp.sum(weights, axis=(0, 1))

    return eval_step


def init_state(trainable: dict, frozen: dict, tx: optax.GradientTransformation) -> TrainState:
    opt_state = tx.init({**frozen, **trainable})
    return TrainState(jnp.zeros((), jnp.int32), trainable, opt_state)
