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
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from wake2vec import model, optim, parallel
from wake2vec.config import ModelConfig


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


def _chunked(hidden, targets, weights, chunk):
    """(N, D), (N,), (N,) -> chunks of `chunk` tokens; padding tokens carry weight 0.

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


def _masked_logits(h, head, vocab_size, compute_dtype):
    """(chunk, rows) float32 logits with the padding rows of the vocabulary at -inf."""
    logits = jnp.dot(h.astype(compute_dtype), head.astype(compute_dtype).T, preferred_element_type=jnp.float32)
    return jnp.where(jnp.arange(head.shape[0]) < vocab_size, logits, -jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def chunked_cross_entropy(hidden, head, targets, weights, vocab_size: int, chunk: int, compute_dtype=jnp.float32):
    """Sum over tokens of weights * -log softmax(hidden @ head^T)[target].

    hidden (N, D) float32, head (rows, D) with rows >= vocab_size (padding rows get no
    probability and exactly zero gradient), targets (N,), weights (N,). Tokens go `chunk` at
    a time, so at most one (chunk x rows) block of logits exists: the full (N x rows) logits
    never do. Under differentiation the forward pass also forms both gradients from the
    same block (softmax - one-hot, times the head / the hidden states), so the backward pass
    only scales them: no logits are stored and none are recomputed. Evaluation, which does
    not differentiate, computes the loss alone.
    """
    h_chunks, t_chunks, w_chunks = _chunked(hidden, targets, weights, chunk)

    def body(total, xs):
        h, t, w = xs
        h = parallel.shard_loss_chunk(h)
        logits = _masked_logits(h, head, vocab_size, compute_dtype)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return total + jnp.sum(w * (jax.nn.logsumexp(logits, axis=-1) - target_logit)), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_chunks, t_chunks, w_chunks))[0]


def _cross_entropy_with_grads(hidden, head, targets, weights, vocab_size, chunk, compute_dtype):
    h_chunks, t_chunks, w_chunks = _chunked(hidden, targets, weights, chunk)
    head_c = head.astype(compute_dtype)

    def body(carry, xs):
        total, head_grad = carry
        h, t, w = xs
        h = parallel.shard_loss_chunk(h)
        logits = _masked_logits(h, head, vocab_size, compute_dtype)
        lse = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        # d loss / d logits = w * (softmax - one_hot(target))
        logit_grad = jnp.exp(logits - lse[:, None]) * w[:, None]
        logit_grad = logit_grad.at[jnp.arange(t.shape[0]), t].add(-w).astype(compute_dtype)
        hidden_grad = jnp.dot(logit_grad, head_c, preferred_element_type=jnp.float32)
        head_grad = head_grad + jnp.dot(logit_grad.T, h.astype(compute_dtype), preferred_element_type=jnp.float32)
        return (total + jnp.sum(w * (lse - target_logit)), head_grad), hidden_grad

    init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
    (total, head_grad), hidden_grad = jax.lax.scan(body, init, (h_chunks, t_chunks, w_chunks))
    hidden_grad = _unchunked(hidden_grad, hidden.shape[0])
    return total, (hidden_grad, head_grad.astype(head.dtype))


def _cross_entropy_backward(vocab_size, chunk, compute_dtype, residuals, cotangent):
    del vocab_size, chunk, compute_dtype
    hidden_grad, head_grad = residuals
    # Targets are integers and weights are data: neither is differentiated.
    return cotangent * hidden_grad, cotangent * head_grad, None, None


chunked_cross_entropy.defvjp(_cross_entropy_with_grads, _cross_entropy_backward)


def loss_sum_and_count(
    trainable: dict, frozen: dict, ids: jax.Array, block_weights: jax.Array, settings: StepSettings
) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token losses, number of predicted tokens) for blocks ids (B, T).

    `block_weights` (B,) is 1 for real blocks and 0 for padding blocks of a short last
    eval batch, so padding never counts in the mean.
    """
    cfg = settings.model_cfg
    params = {**frozen, **trainable}
    hidden = model.hidden_states(cfg, params, ids[:, :-1], compute_dtype=settings.compute_dtype, remat=settings.remat).hidden
    batch, length = ids[:, 1:].shape
    weights = jnp.broadcast_to(block_weights[:, None].astype(jnp.float32), (batch, length)).reshape(-1)
    total = chunked_cross_entropy(
        hidden.reshape(batch * length, -1),
        model.head_matrix(cfg, params),
        ids[:, 1:].reshape(-1),
        weights,
        cfg.vocab_size,
        settings.loss_chunk,
        settings.compute_dtype,
    )
    return total, jnp.sum(weights)


def make_train_step(tx: optax.GradientTransformation, schedule: optax.Schedule, settings: StepSettings) -> Callable:
    """train_step(state, frozen, batch (accum, B, T)) -> (state, metrics); not yet jitted."""

    def mean_loss(trainable, frozen, ids):
        total, count = loss_sum_and_count(trainable, frozen, ids, jnp.ones(ids.shape[0]), settings)
        return total / count

    grad_fn = jax.value_and_grad(mean_loss)

    def train_step(state: TrainState, frozen: dict, batch: jax.Array):
        accum = batch.shape[0]

        def microbatch(carry, ids):
            grads, loss = carry
            micro_loss, micro_grads = grad_fn(state.trainable, frozen, ids)
            # Every microbatch predicts the same number of tokens, so the mean of the
            # microbatch means is the mean over the whole step.
            grads = jax.tree_util.tree_map(lambda a, g: a + g / accum, grads, micro_grads)
            return (grads, loss + micro_loss / accum), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.trainable)
        (grads, loss), _ = jax.lax.scan(microbatch, (zeros, jnp.zeros((), jnp.float32)), batch)
        full_params = {**frozen, **state.trainable}
        updates, opt_state = tx.update(optim.gradient_tree(grads, frozen), state.opt_state, full_params)
        trainable = optax.apply_updates(state.trainable, {k: updates[k] for k in state.trainable})
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return train_step


def make_eval_step(settings: StepSettings) -> Callable:
    """eval_step(trainable, frozen, ids (B, T), block_weights (B,)) -> (loss_sum, count)."""

    def eval_step(trainable, frozen, ids, block_weights):
        return loss_sum_and_count(trainable, frozen, ids, block_weights, settings)

    return eval_step


def init_state(trainable: dict, frozen: dict, tx: optax.GradientTransformation) -> TrainState:
    opt_state = tx.init({**frozen, **trainable})
    return TrainState(jnp.zeros((), jnp.int32), trainable, opt_state)
