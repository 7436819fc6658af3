"""Rotary position embeddings as transformers computes them, for every supported scaling.

Why a module of its own: the frequency rules (plain, linear, llama3, longrope) are the part
of the decoder most often extended for a new family, and they are checked against
transformers' modeling_rope_utils angle for angle; the decoder only needs `rope_cos_sin`
and `apply_rope`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, long: bool = False) -> np.ndarray:
    """Inverse frequencies (head_dim / 2,) float32 under the config's RoPE scaling.

    Computed on the host in float32 with transformers' operation order
    (modeling_rope_utils), so the rotation angles agree to rounding. `long` picks
    longrope's long factors (used once a pass reaches past the original context).
    """
    dim, scaling = cfg.dim_per_head, cfg.rope_scaling
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = np.float32(1.0) / (np.float32(cfg.rope_theta) ** exponents)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / np.float32(scaling.factor)
    if scaling.rope_type == "longrope":
        factors = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
        return np.float32(1.0) / (factors * np.float32(cfg.rope_theta) ** exponents)
    # llama3: long wavelengths slowed by `factor`, short ones kept, a linear blend between.
    factor, old_len = np.float32(scaling.factor), scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, blended, scaled).astype(np.float32)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables of shape (..., T, head_dim) for HF's rotate-half RoPE, in float32.

    The frequencies are duplicated (concatenated, not interleaved) because rotate-half pairs
    dimension i with i + head_dim/2, which is what lets HF weights load unpermuted.
    Longrope switches to its long factors when the pass's last position is past the
    original context, as transformers does per forward call.
    """
    inv_freq = jnp.asarray(rope_inv_freq(cfg))
    scale = 1.0
    if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "longrope":
        past_original = jnp.max(positions) + 1 > cfg.rope_scaling.original_max_position_embeddings
        inv_freq = jnp.where(past_original, jnp.asarray(rope_inv_freq(cfg, long=True)), inv_freq)
        scale = cfg.rope_scaling.cos_sin_scale
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def _rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates (B, T, heads, head_dim) queries or keys; cos/sin are (B, T, head_dim)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin
