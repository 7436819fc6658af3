"""Weight-only quantized frozen body: int8 and NF4 kernels, dequantized one layer at a time.

Phase 1 trains the embedding table and Phase 2 LoRA adapters; neither differentiates the
decoder's projection kernels, so those can be stored compressed and turned back into
floats just before their matmul. The table, the adapters, norms, biases and the head stay
float32; only `params["layers"][...]["kernel"]` stacks (layers, in, out) are replaced.

Formats (`FORMATS`, the values --frozen_dtype accepts besides the float dtypes):

* int8: symmetric, one float32 scale per output channel per layer, scale = absmax over the
  `in` axis / 127, weights rounded to the nearest multiple of it. Leaves `kernel_int8`
  (layers, in, out) int8 and `kernel_scale` (layers, out) float32.
* nf4: bitsandbytes' 4-bit NormalFloat (Dettmers et al., QLoRA, arXiv:2305.14314, App. E;
  the 16 values of bitsandbytes' `get_4bit_type("nf4")` / its CUDA lookup table). Blocks of
  64 consecutive weights along `in` (a last, shorter block when `in` is not a multiple of
  64), each scaled by its float32 absmax, each weight mapped to the nearest code (as
  bitsandbytes' midpoint decision tree does); no double quantization of the absmax. For
  `in` a multiple of 64 these are bitsandbytes' blocks exactly: its (out, in) weight
  flattened row-major blocks 64 consecutive `in` entries of one output row. Two codes per
  byte, rows 2i (low nibble) and 2i+1 (high nibble) of `in`: leaves `kernel_nf4`
  (layers, in / 2, out) uint8 and `kernel_absmax` (layers, ceil(in / 64), out) float32.

Why this layout: every quantized leaf keeps the (layers, ..., out) shape of a stacked
matrix, so parallel.frozen_sharding splits it like any other body matrix (along its
largest divisible non-layer axis) and `read_kernel` all-gathers the compressed layer
(4 or 8 bits a weight over the links, not 16 or 32) before dequantizing it on each device.
Scales of int8 are (layers, out), a 2-axis leaf, and stay replicated: 4 bytes per
output channel per layer.

Why our own module and not qwix: qwix quantizes by intercepting `dot_general` calls, while
wake2vec's projections gather one layer's kernel inside the layer scan and then multiply
explicitly; the quantity to compress is the stored, sharded, scanned parameter, which a
dot_general interception never sees as such.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.training import parallel
from wake2vec.errors import UserError

FORMATS = ("int8", "nf4")
NF4_BLOCK = 64
# bitsandbytes' NF4 code values (functional.get_4bit_type("nf4"), csrc nf4 lookup table),
# the quantiles of N(0, 1) normalised to [-1, 1] with an exact 0 (QLoRA, Appendix E).
NF4_CODES = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# Each format's leaves, in the order dequantize reads them: (codes, scales).
LEAVES = {"int8": ("kernel_int8", "kernel_scale"), "nf4": ("kernel_nf4", "kernel_absmax")}
# Decision boundaries between consecutive codes, in float64 (exact for float32 codes).
_NF4_MIDPOINTS = (NF4_CODES[:-1].astype(np.float64) + NF4_CODES[1:].astype(np.float64)) / 2


class QuantShapeError(UserError, ValueError):
    """A kernel cannot be stored in the requested --frozen_dtype format."""


def _int8_layer(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) float32 -> int8 codes and (out,) scales; a zero column gets scale 0 and codes 0."""
    scale = np.max(np.abs(w), axis=0) / np.float32(127)
    q = np.rint(w / np.where(scale == 0, np.float32(1), scale))
    return np.clip(q, -127, 127).astype(np.int8), scale.astype(np.float32)


def _nf4_codes(normalized: np.ndarray) -> np.ndarray:
    """Index (uint8, 0..15) of the NF4 value nearest each entry of `normalized` (in [-1, 1]); ties go to the lower."""
    return np.searchsorted(_NF4_MIDPOINTS, normalized.astype(np.float64), side="left").astype(np.uint8)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """(..., 2n, out) codes 0..15 -> (..., n, out) uint8: row 2i in the low nibble, row 2i+1 in the high one."""
    return (codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)).astype(np.uint8)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
    """The inverse of `pack_nibbles` (jit-friendly): (..., n, out) uint8 -> (..., 2n, out) uint8."""
    low, high = packed & 15, packed >> 4
    stacked = jnp.stack([low, high], axis=-2)
    return stacked.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def _nf4_layer(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(in, out) float32 -> (in / 2, out) packed codes and (ceil(in / 64), out) float32 block absmax."""
    rows = w.shape[0]
    blocks = math.ceil(rows / NF4_BLOCK)
    padded = np.zeros((blocks * NF4_BLOCK, w.shape[1]), np.float32)
    padded[:rows] = w
    padded = padded.reshape(blocks, NF4_BLOCK, -1)
    absmax = np.max(np.abs(padded), axis=1)
    normalized = padded / np.where(absmax == 0, np.float32(1), absmax)[:, None, :]
    codes = _nf4_codes(normalized.reshape(-1, w.shape[1])[:rows])
    return pack_nibbles(codes), absmax.astype(np.float32)


_LAYER_QUANTIZERS: dict[str, Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "int8": _int8_layer,
    "nf4": _nf4_layer,
}


def quantize(kernel: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """Host (..., in, out) kernel (any float dtype) -> {codes leaf, scales leaf} of format `fmt`.

    Layer by layer: only one layer's float32 copy exists beside the output, so a 22-layer
    stack never doubles the host memory it already takes.
    """
    if fmt not in FORMATS:
        raise QuantShapeError(f"--frozen_dtype={fmt!r} is no quantized format; choose one of {', '.join(FORMATS)}")
    rows, cols = kernel.shape[-2:]
    if fmt == "nf4" and rows % 2:
        raise QuantShapeError(f"--frozen_dtype=nf4 packs two input rows per byte, but a kernel has {rows} input rows "
                              "(odd); use --frozen_dtype=int8")
    lead = kernel.shape[:-2]
    layers = kernel.reshape(-1, rows, cols)
    pieces = [_LAYER_QUANTIZERS[fmt](np.asarray(layer, np.float32)) for layer in layers]
    codes, scales = (np.stack(part).reshape(*lead, *part[0].shape) for part in zip(*pieces))
    return dict(zip(LEAVES[fmt], (codes, scales)))


def stored_format(stored: dict) -> str | None:
    """The quantized format whose leaves `stored` (a Linear's params) holds; None for a float kernel."""
    for fmt, (codes, _) in LEAVES.items():
        if codes in stored:
            return fmt
    return None


def dequantize(stored: dict, dtype=jnp.float32) -> jax.Array:
    """The float (..., in, out) kernel of quantized leaves, computed in float32 and cast to `dtype`.

    Works on one layer (inside the scan) or a whole stack (..., in, out).
    """
    fmt = stored_format(stored)
    codes, scales = (stored[name] for name in LEAVES[fmt])
    if fmt == "int8":
        kernel = codes.astype(jnp.float32) * scales[..., None, :].astype(jnp.float32)
    else:
        values = jnp.asarray(NF4_CODES)[unpack_nibbles(codes).astype(jnp.int32)]
        rows = values.shape[-2]
        per_row = jnp.repeat(scales.astype(jnp.float32), NF4_BLOCK, axis=-2, total_repeat_length=scales.shape[-2] * NF4_BLOCK)
        kernel = values * per_row[..., :rows, :]
    return kernel.astype(dtype)


def quantized_shapes(kernel_shape: tuple[int, ...], fmt: str) -> dict[str, jax.ShapeDtypeStruct]:
    """The leaves `quantize` makes of a (..., in, out) kernel, as shapes only (for compiling without weights)."""
    *lead, rows, cols = kernel_shape
    if fmt == "int8":
        shapes = ((*lead, rows, cols), np.int8), ((*lead, cols), np.float32)
    else:
        shapes = ((*lead, rows // 2, cols), np.uint8), ((*lead, math.ceil(rows / NF4_BLOCK), cols), np.float32)
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in zip(LEAVES[fmt], shapes)}


def _replace_kernels(params: dict, replace: Callable[[Any], dict]) -> dict:
    """`params` with each {"kernel": k} under params["layers"] swapped for replace(k)'s leaves."""

    def walk(node: dict) -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                out[key] = walk(value)
            elif key == "kernel":
                out.update(replace(value))
            else:
                out[key] = value
        return out

    return {key: walk(value) if key == "layers" else value for key, value in params.items()}


def quantize_body(params: dict, fmt: str) -> dict:
    """`params` with every stacked decoder kernel (params["layers"][...]["kernel"]) quantized.

    Each Linear's {"kernel": (L, in, out)} becomes {codes leaf, scales leaf} (plus its bias,
    if any); norms, biases, the embedding and lm_head are the same arrays. `params` itself
    is not modified.
    """
    return _replace_kernels(params, lambda kernel: quantize(kernel, fmt))


def abstract_body(params: dict, fmt: str) -> dict:
    """`quantize_body` on shapes: a tree of ShapeDtypeStructs (or arrays) in, the quantized shapes out."""
    return _replace_kernels(params, lambda kernel: quantized_shapes(kernel.shape, fmt))


def read_kernel(module: Any, shape: tuple[int, int], param_dtype: Any, init: Callable) -> jax.Array:
    """The (in, out) float kernel of a projection, from whichever representation its params hold.

    Called from a bound flax module inside the layer scan. A float kernel is declared with
    `init` as before and gathered (parallel.gather_weights). Quantized leaves are gathered
    compressed, then dequantized to float32 on each device; they are never created by
    `init`: quantize_body writes them into a loaded body.
    """
    for names in LEAVES.values():
        if module.has_variable("params", names[0]):
            stored = {name: parallel.gather_weights(module.get_variable("params", name)) for name in names}
            return dequantize(stored, jnp.float32)
    kernel = module.param("kernel", init, shape, param_dtype)
    return parallel.gather_weights(kernel)  # the body is sharded; this layer is gathered here

