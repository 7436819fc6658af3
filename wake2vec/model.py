"""A Flax (Linen) Llama: the network TinyLlama-1.1B and other Llama checkpoints use.

Why this shape:

* Parameter names follow HF's (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...)
  and RoPE is HF's rotate-half layout, so conversion (wake2vec.convert) is a rename plus a
  transpose, with no permutation of q/k rows.
* The decoder layers are one `nn.scan`: their weights are stacked on a leading layer axis
  and XLA compiles one layer body instead of 22. `nn.remat` around the body trades
  recomputation for activation memory (`remat="full" | "dots" | "none"`).
* Storage dtype and compute dtype are independent: weights are cast to `compute_dtype` at
  the matmul, while the residual stream, RMSNorm, RoPE, the softmax and the logits stay in
  float32. Frozen weights can therefore live in bf16 while the trainable table is fp32.
* The embedding table may have more rows than `cfg.vocab_size` (padding so the vocab axis
  shards evenly); `forward` returns logits for the real vocabulary only.
* A KV cache (`init_cache`, `forward_with_cache`) is a plain pytree threaded through the
  scan, so decoding one token costs one position of attention against a preallocated cache.

The public entry points are the functions at the bottom; the modules are internal.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wake2vec import parallel
from wake2vec.config import ModelConfig

Params = dict[str, Any]

_INIT_STD = 0.02  # HF's initializer_range for Llama

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Per-layer keys and values, (layers, batch, max_len, kv_heads, head_dim) each."""

    k: jax.Array
    v: jax.Array


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape (..., T, head_dim) for HF's rotate-half RoPE, in float32.

    The frequencies are duplicated (concatenated, not interleaved) because rotate-half pairs
    dimension i with i + head_dim/2, which is what lets HF weights load unpermuted.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates (B, T, heads, head_dim) queries or keys; cos/sin are (B, T, head_dim)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * scale.astype(jnp.float32)


class Linear(nn.Module):
    """A bias-free projection whose kernel is (in, out): HF's weight transposed."""

    features: int
    compute_dtype: Any
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.initializers.normal(_INIT_STD), (x.shape[-1], self.features), self.param_dtype
        )
        kernel = parallel.gather_weights(kernel)  # the body is sharded; this layer is gathered here
        return jnp.dot(x.astype(self.compute_dtype), kernel.astype(self.compute_dtype))


class Attention(nn.Module):
    cfg: ModelConfig
    compute_dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        cfg = self.cfg
        hd, heads, kv_heads = cfg.dim_per_head, cfg.num_attention_heads, cfg.num_key_value_heads
        groups = heads // kv_heads
        batch, length, _ = x.shape
        proj = lambda n, name: Linear(n, self.compute_dtype, self.param_dtype, name=name)  # noqa: E731
        q = proj(heads * hd, "q_proj")(x).reshape(batch, length, heads, hd)
        k = proj(kv_heads * hd, "k_proj")(x).reshape(batch, length, kv_heads, hd)
        v = proj(kv_heads * hd, "v_proj")(x).reshape(batch, length, kv_heads, hd)
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(self.compute_dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(self.compute_dtype)

        new_cache = None
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            start = (0, cache_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_cache = (cache_k, cache_v)
            k, v = cache_k.astype(self.compute_dtype), cache_v.astype(self.compute_dtype)

        # Query head h reads KV head h // groups (HF's repeat_kv), so split heads as (kv, group).
        q = q.reshape(batch, length, kv_heads, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(hd))
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.compute_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, heads * hd)
        return proj(cfg.hidden_size, "o_proj")(out).astype(jnp.float32), new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    compute_dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        proj = lambda n, name: Linear(n, self.compute_dtype, self.param_dtype, name=name)  # noqa: E731
        gate = proj(self.cfg.intermediate_size, "gate_proj")(x)
        up = proj(self.cfg.intermediate_size, "up_proj")(x)
        return proj(self.cfg.hidden_size, "down_proj")(nn.silu(gate) * up).astype(jnp.float32)


class DecoderLayer(nn.Module):
    """One pre-norm block; the scan carry is the float32 residual stream."""

    cfg: ModelConfig
    compute_dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_index, layer_cache):
        cfg, cd, pd = self.cfg, self.compute_dtype, self.param_dtype
        h = RMSNorm(cfg.rms_norm_eps, pd, name="input_layernorm")(x)
        attn, new_cache = Attention(cfg, cd, pd, name="self_attn")(h, cos, sin, mask, layer_cache, cache_index)
        x = x + attn
        h = RMSNorm(cfg.rms_norm_eps, pd, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, cd, pd, name="mlp")(h)
        return x, (new_cache, x)


class LlamaModel(nn.Module):
    """Embedding, scanned decoder stack and final norm; returns float32 hidden states.

    The LM head is applied outside (see `logits_from_hidden`) so that training can compute
    the cross-entropy in chunks without ever holding (tokens x vocab) logits.
    """

    cfg: ModelConfig
    compute_dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    # Rows of the embedding table; >= cfg.vocab_size when padded for sharding.
    table_rows: int | None = None

    @nn.compact
    def __call__(self, input_ids, positions, mask, cache=None, cache_index=0):
        cfg = self.cfg
        rows = self.table_rows or cfg.vocab_size
        table = self.param(
            "embedding", nn.initializers.normal(_INIT_STD), (rows, cfg.hidden_size), jnp.float32
        )
        x = jnp.take(table, input_ids, axis=0).astype(jnp.float32)
        cos, sin = rope_cos_sin(positions, cfg.dim_per_head, cfg.rope_theta)

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        layer_cls = DecoderLayer
        if self.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=cfg.num_hidden_layers,
        )(cfg, self.compute_dtype, self.param_dtype, name="layers")
        layer_cache = None if cache is None else (cache.k, cache.v)
        x, (new_cache, per_layer) = stack(x, cos, sin, mask, cache_index, layer_cache)
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="norm")(x)
        new_cache = None if new_cache is None else KVCache(*new_cache)
        return x, per_layer, new_cache


class HiddenOutput(NamedTuple):
    hidden: jax.Array  # (B, T, D) float32, after the final norm
    per_layer: jax.Array  # (L, B, T, D) float32, the residual stream after each decoder layer


def _module(cfg: ModelConfig, params: Params, compute_dtype, remat: str) -> LlamaModel:
    return LlamaModel(cfg, compute_dtype=compute_dtype, remat=remat, table_rows=params["embedding"].shape[0])


def _backbone_params(params: Params) -> Params:
    return {k: v for k, v in params.items() if k != "lm_head"}


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal 0.02, norms at 1) in HF's layout; the table is always fp32."""
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = LlamaModel(cfg, param_dtype=dtype).init(rng, ids, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool))
    params = dict(variables["params"])
    if not cfg.tie_word_embeddings:
        head_rng = jax.random.fold_in(rng, 1)
        params["lm_head"] = {
            "kernel": (_INIT_STD * jax.random.normal(head_rng, (cfg.hidden_size, cfg.vocab_size))).astype(jnp.float32)
        }
    return params


def head_matrix(cfg: ModelConfig, params: Params) -> jax.Array:
    """The output projection as (rows, D): the table itself when tied, lm_head^T otherwise."""
    if cfg.tie_word_embeddings:
        return params["embedding"]
    return params["lm_head"]["kernel"].T


def logits_from_hidden(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """(B, T, D) hidden -> (B, T, cfg.vocab_size) float32 logits (padding rows dropped)."""
    head = head_matrix(cfg, params)[: cfg.vocab_size]
    return jnp.einsum("btd,vd->btv", hidden, head.astype(jnp.float32), preferred_element_type=jnp.float32)


def causal_mask(query_positions: jax.Array, key_length: int) -> jax.Array:
    """(B, T, S) boolean: key s is visible to a query at position p iff s <= p."""
    return jnp.arange(key_length)[None, None, :] <= query_positions[:, :, None]


def hidden_states(
    cfg: ModelConfig, params: Params, input_ids: jax.Array, *, compute_dtype=jnp.float32, remat: str = "none"
) -> HiddenOutput:
    """Final-normed hidden states and every layer's output for a full causal pass."""
    batch, length = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    hidden, per_layer, _ = _module(cfg, params, compute_dtype, remat).apply(
        {"params": _backbone_params(params)}, input_ids, positions, causal_mask(positions, length)
    )
    return HiddenOutput(hidden, per_layer)


def forward(cfg: ModelConfig, params: Params, input_ids: jax.Array, *, compute_dtype=jnp.float32) -> jax.Array:
    """Logits (B, T, cfg.vocab_size) in float32 for token ids (B, T)."""
    hidden = hidden_states(cfg, params, input_ids, compute_dtype=compute_dtype).hidden
    return logits_from_hidden(cfg, params, hidden)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """A zeroed KV cache for `max_len` positions; positions never written stay masked."""
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.dim_per_head)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def forward_with_cache(
    cfg: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    cache: KVCache,
    cache_index: jax.Array | int,
    *,
    compute_dtype=jnp.float32,
) -> tuple[jax.Array, KVCache]:
    """Runs ids (B, T) at positions cache_index .. cache_index+T-1 against the cache.

    Writes their keys/values into the cache and attends over every cached position up to
    each query's own, so a prefill (T = prompt length) and a decode step (T = 1) are the same
    function. Returns float32 logits (B, T, vocab) and the updated cache.
    """
    batch, length = input_ids.shape
    positions = cache_index + jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    mask = causal_mask(positions, cache.k.shape[2])
    hidden, _, new_cache = _module(cfg, params, compute_dtype, "none").apply(
        {"params": _backbone_params(params)}, input_ids, positions, mask, cache, cache_index
    )
    return logits_from_hidden(cfg, params, hidden), new_cache
