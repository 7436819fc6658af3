"""A Flax (Linen) Llama-family decoder: Llama 2/3.x, Mistral, Qwen2, Phi-3 and Gemma 2.

Why one network driven by config features rather than a module per family: the five
architectures differ in a handful of switches on one pre-norm decoder (a RoPE frequency
rule, q/k/v biases, per-layer sliding windows, Gemma's (1 + w) norms and extra post-norms,
GeGLU, soft-capping, an embedding multiplier), while everything that matters for Phase 1
(the scanned layer stack, remat, the dtype policy, the KV cache, the head kept outside
for the chunked loss) is shared. Five copies of that would drift apart; one model with
each switch a `ModelConfig` field (or a family trait derived from `model_type`) keeps
every family on the code path the Llama tests already cover. Layout-only differences
(Phi-3's fused qkv_proj / gate_up_proj) live in wake2vec.models.convert, not here.

Why this shape:

* Parameter names follow HF's (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...)
  and RoPE is HF's rotate-half layout, so conversion (wake2vec.models.convert) is a rename plus a
  transpose, with no permutation of q/k rows.
* The decoder layers are one `nn.scan`: their weights are stacked on a leading layer axis
  and XLA compiles one layer body instead of 22. Per-layer differences (Gemma 2's
  alternating local/global attention) are a scanned array of windows, not separate bodies.
  `nn.remat` around the body trades recomputation for activation memory
  (`remat="full" | "dots" | "none"`).
* Storage dtype and compute dtype are independent: weights are cast to `compute_dtype` at
  the matmul, while the residual stream, RMSNorm, RoPE, the softmax and the logits stay in
  float32. Frozen weights can therefore live in bf16 while the trainable table is fp32.
* The embedding table may have more rows than `cfg.vocab_size` (padding so the vocab axis
  shards evenly); `forward` returns logits for the real vocabulary only.
* A KV cache (`init_cache`, `forward_with_cache`) is a plain pytree threaded through the
  scan, so decoding one token costs one position of attention against a preallocated cache.
  A sliding window is a mask over that cache (not a ring buffer), so the cache is the
  same for every family.
* Phase 2's LoRA adapters (wake2vec.models.lora) are a second variable collection, "lora", read by
  the adapted projections and scanned on the layer axis like the weights; without a
  `LoraSpec` no projection reads it and the model is exactly Phase 1's.

The public entry points are the functions at the bottom; the modules are internal.
"""

from __future__ import annotations

import functools

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from wake2vec.models import padding
from wake2vec.models import quant
from wake2vec.config import ModelConfig
from wake2vec.models.lora_spec import LoraSpec
from wake2vec.models.rope import apply_rope, rope_cos_sin


Params = dict[str, Any]

_INIT_STD = 0.02  # HF's initializer_range for Llama

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_ACTIVATIONS = {"silu": nn.silu, "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True)}


class KVCache(NamedTuple):
    """Per-layer keys and values, (layers, batch, max_len, kv_heads, head_dim) each."""

    k: jax.Array
    v: jax.Array


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's cap * tanh(x / cap): smooth, bounded by +-cap; the identity when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w) in float32; Gemma stores w around 0 with offset 1."""

    eps: float
    param_dtype: Any = jnp.float32
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * (scale.astype(jnp.float32) + self.offset)  # + 0.0 is exact: Llama's x * w


class Linear(nn.Module):
    """A projection whose kernel is (in, out): HF's weight transposed; bias only for Qwen2's q/k/v.

    When its name is one of `lora.targets` it adds PEFT's LoRA update
    scale * (dropout(x) @ a) @ b, with a (in, r) and b (r, out) read from the "lora"
    collection (float32 in storage, cast to the compute dtype at the matmul like the
    kernel). The module only declares their shapes (zeros): wake2vec.models.lora.init_adapters
    draws the values. Dropout is inverted (kept values scaled by 1 / (1 - rate), as torch)
    and runs only when a "dropout" rng is given, so evaluation is deterministic.
    """

    features: int
    compute_dtype: Any
    param_dtype: Any = jnp.float32
    use_bias: bool = False
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # A float kernel, or int8 / NF4 leaves dequantized after their gather (wake2vec.models.quant).
        kernel = quant.read_kernel(self, (x.shape[-1], self.features), self.param_dtype, nn.initializers.normal(_INIT_STD))
        y = jnp.dot(x.astype(self.compute_dtype), kernel.astype(self.compute_dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(y.dtype)
        if self.lora is not None and self.name in self.lora.targets:
            y = y + self._lora_update(x)
        return y

    def _lora_update(self, x: jax.Array) -> jax.Array:
        spec, cd = self.lora, self.compute_dtype
        a = self.variable("lora", "a", jnp.zeros, (x.shape[-1], spec.rank), jnp.float32).value
        b = self.variable("lora", "b", jnp.zeros, (spec.rank, self.features), jnp.float32).value
        x = nn.Dropout(spec.dropout, deterministic=not self.has_rng("dropout"))(x)
        # PEFT's order: lora_B(lora_A(dropout(x))) * scaling.
        return jnp.dot(jnp.dot(x.astype(cd), a.astype(cd)), b.astype(cd)) * jnp.asarray(spec.scale, cd)


class Attention(nn.Module):
    cfg: ModelConfig
    compute_dtype: Any
    param_dtype: Any
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        cfg = self.cfg
        hd, heads, kv_heads = cfg.dim_per_head, cfg.num_attention_heads, cfg.num_key_value_heads
        groups = heads // kv_heads
        batch, length, _ = x.shape

        def proj(n, name, bias=False):
            return Linear(n, self.compute_dtype, self.param_dtype, use_bias=bias, lora=self.lora, name=name)

        q = proj(heads * hd, "q_proj", cfg.qkv_bias)(x).reshape(batch, length, heads, hd)
        k = proj(kv_heads * hd, "k_proj", cfg.qkv_bias)(x).reshape(batch, length, kv_heads, hd)
        v = proj(kv_heads * hd, "v_proj", cfg.qkv_bias)(x).reshape(batch, length, kv_heads, hd)
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
        scores = scores * jnp.float32((cfg.query_pre_attn_scalar or hd) ** -0.5)
        scores = soft_cap(scores, cfg.attn_logit_softcapping)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.compute_dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, heads * hd)
        return proj(cfg.hidden_size, "o_proj")(out).astype(jnp.float32), new_cache


class MLP(nn.Module):
    cfg: ModelConfig
    compute_dtype: Any
    param_dtype: Any
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x):
        proj = lambda n, name: Linear(n, self.compute_dtype, self.param_dtype, lora=self.lora, name=name)  # noqa: E731
        gate = proj(self.cfg.intermediate_size, "gate_proj")(x)
        up = proj(self.cfg.intermediate_size, "up_proj")(x)
        act = _ACTIVATIONS[self.cfg.hidden_act]
        return proj(self.cfg.hidden_size, "down_proj")(act(gate) * up).astype(jnp.float32)


def window_mask(mask: jax.Array, positions: jax.Array, window: jax.Array) -> jax.Array:
    """Narrows a causal (B, T, S) mask to keys fewer than `window` positions back (0: no window).

    transformers' sliding_window_overlay: key s is visible to a query at p iff s > p - window.
    """
    back = positions[:, :, None] - jnp.arange(mask.shape[-1])[None, None, :]
    return mask & ((window == 0) | (back < window))


class DecoderLayer(nn.Module):
    """One pre-norm block; the scan carry is the float32 residual stream.

    Gemma 2 adds a norm after attention and one after the MLP (its post_attention_layernorm
    normalises the attention output, where Llama's is the pre-MLP norm: HF names kept).
    """

    cfg: ModelConfig
    compute_dtype: Any
    param_dtype: Any
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, x, cos, sin, mask, positions, cache_index, window, layer_cache):
        cfg, cd, pd = self.cfg, self.compute_dtype, self.param_dtype
        offset = 1.0 if cfg.gemma_norms else 0.0
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, pd, offset, name=name)  # noqa: E731
        mask = window_mask(mask, positions, window)
        h = norm("input_layernorm")(x)
        attn, new_cache = Attention(cfg, cd, pd, self.lora, name="self_attn")(h, cos, sin, mask, layer_cache, cache_index)
        if cfg.gemma_norms:
            x = x + norm("post_attention_layernorm")(attn)
            h = norm("pre_feedforward_layernorm")(x)
            x = x + norm("post_feedforward_layernorm")(MLP(cfg, cd, pd, self.lora, name="mlp")(h))
        else:
            x = x + attn
            h = norm("post_attention_layernorm")(x)
            x = x + MLP(cfg, cd, pd, self.lora, name="mlp")(h)
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
    # LoRA adapters on the body's projections (Phase 2); None: the plain model.
    lora: LoraSpec | None = None

    @nn.compact
    def __call__(self, input_ids, positions, mask, cache=None, cache_index=0):
        cfg = self.cfg
        rows = self.table_rows or cfg.vocab_size
        table = self.param(
            "embedding", nn.initializers.normal(_INIT_STD), (rows, cfg.hidden_size), jnp.float32
        )
        x = jnp.take(table, input_ids, axis=0).astype(jnp.float32)
        if cfg.pad_token_id is not None:
            # transformers builds the embedding with padding_idx=pad_token_id, and torch's
            # nn.Embedding gives that row no gradient from the lookup: Phase 1 under HF
            # Trainer never moved it through the input side, so neither does this.
            x = jnp.where((input_ids == cfg.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        if cfg.gemma_norms:
            x = x * jnp.float32(cfg.hidden_size**0.5)
        cos, sin = rope_cos_sin(cfg, positions)

        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        layer_cls = DecoderLayer
        if self.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        broadcast = nn.broadcast
        # Adapters stack on the layer axis like the weights; each layer draws its own dropout masks.
        stack = nn.scan(
            layer_cls,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(broadcast, broadcast, broadcast, broadcast, broadcast, 0, 0),
            length=cfg.num_hidden_layers,
        )(cfg, self.compute_dtype, self.param_dtype, self.lora, name="layers")
        layer_cache = None if cache is None else (cache.k, cache.v)
        windows = jnp.asarray(cfg.layer_windows, jnp.int32)
        x, (new_cache, per_layer) = stack(x, cos, sin, mask, positions, cache_index, windows, layer_cache)
        x = RMSNorm(cfg.rms_norm_eps, self.param_dtype, 1.0 if cfg.gemma_norms else 0.0, name="norm")(x)
        new_cache = None if new_cache is None else KVCache(*new_cache)
        return x, per_layer, new_cache


class HiddenOutput(NamedTuple):
    hidden: jax.Array  # (B, T, D) float32, after the final norm
    per_layer: jax.Array  # (L, B, T, D) float32, the residual stream after each decoder layer


def _module(cfg: ModelConfig, params: Params, compute_dtype, remat: str, lora: LoraSpec | None) -> LlamaModel:
    return LlamaModel(cfg, compute_dtype=compute_dtype, remat=remat, table_rows=params["embedding"].shape[0], lora=lora)


def _backbone_params(params: Params, lora: LoraSpec | None) -> dict[str, Params]:
    """LlamaModel's variables: the body's "params" (the head is applied outside) and, with a
    spec, the adapters `params["lora"]` as the "lora" collection.

    Adapters without a spec (or a spec without adapters) are refused rather than ignored:
    either would silently evaluate a different model than the caller holds.
    """
    if (lora is None) != ("lora" not in params):
        raise ValueError(
            "params hold LoRA adapters but no LoraSpec was given" if lora is None
            else "a LoraSpec was given but params have no 'lora' adapters"
        )
    variables = {"params": {k: v for k, v in params.items() if k not in ("lm_head", "lora")}}
    if lora is not None:
        variables["lora"] = params["lora"]
    return variables


@functools.lru_cache(maxsize=8)
def _jitted_init(cfg: ModelConfig, dtype):
    return jax.jit(LlamaModel(cfg, param_dtype=dtype).init)


def init_params(cfg: ModelConfig, rng: jax.Array, dtype=jnp.float32) -> Params:
    """Random weights (normal 0.02, norm gains at 1, biases 0) in HF's layout; the table is always fp32.

    Jitted: called eagerly, Flax's init dispatches every primitive of a forward pass one by one
    (about 4 CPU-s for the demo's model, against 1.3 s compiled once and nothing after).
    """
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = _jitted_init(cfg, jnp.dtype(dtype))(rng, ids, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1, 1), bool))
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
    """(B, T, D) hidden -> (B, T, cfg.vocab_size) float32 logits (padding rows dropped, soft-capped for Gemma 2)."""
    head = padding.unpad_table(head_matrix(cfg, params), cfg.vocab_size)
    logits = jnp.einsum("btd,vd->btv", hidden, head.astype(jnp.float32), preferred_element_type=jnp.float32)
    return soft_cap(logits, cfg.final_logit_softcapping)


def causal_mask(query_positions: jax.Array, key_length: int) -> jax.Array:
    """(B, T, S) boolean: key s is visible to a query at position p iff s <= p."""
    return jnp.arange(key_length)[None, None, :] <= query_positions[:, :, None]


def hidden_states(
    cfg: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    *,
    compute_dtype=jnp.float32,
    remat: str = "none",
    lora: LoraSpec | None = None,
    dropout_key: jax.Array | None = None,
) -> HiddenOutput:
    """Final-normed hidden states and every layer's output for a full causal pass.

    With `lora`, `params["lora"]` holds the adapters (wake2vec.models.lora.init_adapters' tree);
    `dropout_key` turns on their dropout (training), and without it the pass is
    deterministic (evaluation).
    """
    batch, length = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    rngs = {} if dropout_key is None else {"dropout": dropout_key}
    hidden, per_layer, _ = _module(cfg, params, compute_dtype, remat, lora).apply(
        _backbone_params(params, lora), input_ids, positions, causal_mask(positions, length), rngs=rngs
    )
    return HiddenOutput(hidden, per_layer)


def forward(
    cfg: ModelConfig, params: Params, input_ids: jax.Array, *, compute_dtype=jnp.float32, lora: LoraSpec | None = None
) -> jax.Array:
    """Logits (B, T, cfg.vocab_size) in float32 for token ids (B, T); `lora` as in `hidden_states`, no dropout."""
    hidden = hidden_states(cfg, params, input_ids, compute_dtype=compute_dtype, lora=lora).hidden
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
    lora: LoraSpec | None = None,
) -> tuple[jax.Array, KVCache]:
    """Runs ids (B, T) at positions cache_index .. cache_index+T-1 against the cache.

    Writes their keys/values into the cache and attends over every cached position up to
    each query's own, so a prefill (T = prompt length) and a decode step (T = 1) are the same
    function. Returns float32 logits (B, T, vocab) and the updated cache. `lora` as in
    `forward` (adapters in `params["lora"]`, no dropout).
    """
    batch, length = input_ids.shape
    positions = cache_index + jnp.broadcast_to(jnp.arange(length)[None, :], (batch, length))
    mask = causal_mask(positions, cache.k.shape[2])
    hidden, _, new_cache = _module(cfg, params, compute_dtype, "none", lora).apply(
        _backbone_params(params, lora), input_ids, positions, mask, cache, cache_index
    )
    return logits_from_hidden(cfg, params, hidden), new_cache
