r"""Decode speed of wake2vec.models.generate, and what the KV cache buys.

    python -m benchmarks.bench_decode [--hidden=512 --layers=8 --heads=8 --kv_heads=2 \
        --vocab=32000 --prompt_len=100 --new_tokens=1000 --cache_len=1200 --repeats=20]

On a random mid-size Llama (batch 1) it reports:

* end-to-end decode throughput of `generate.generate`, greedy and with the study's sampling
  settings (top-k 50, top-p 0.92, penalty 1.15), compile excluded;
* the time of one jitted cached decode step at position ~100 and ~1000 of the cache: with
  the cache a step attends over a fixed buffer, so the two should be close;
* for contrast, one cache-free forward over the whole prefix at those lengths, which is
  what each token would cost without a cache.

Timings are medians over --repeats runs after a warm-up call, each ended by
block_until_ready.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from wake2vec import config
from wake2vec.models import generate, model
from wake2vec.config import ModelConfig

_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_HEADS = flags.DEFINE_integer("heads", 8, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 2, "Key/value heads (GQA).")
_INTERMEDIATE = flags.DEFINE_integer("intermediate", 1408, "MLP width.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 100, "Prompt tokens for the throughput runs.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 1000, "Tokens generated per throughput run.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 1200, "Cache length for the per-step timings.")
_POSITIONS = flags.DEFINE_list("positions", ["100", "1000"], "Cache positions of the per-step timings.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed repetitions per step measurement (median reported).")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16.")


def median_seconds(run: Callable[[], jax.Array], repeats: int) -> float:
    """Median wall time of `run` after one untimed warm-up (which absorbs compilation)."""
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_throughput(cfg: ModelConfig, params, prompt: np.ndarray, new_tokens: int, compute_dtype, **sampling) -> float:
    """Generated tokens per second of one batch-1 `generate` call (median of 3 after warm-up)."""
    seconds = median_seconds(
        lambda: generate.generate(cfg, params, prompt, new_tokens, compute_dtype=compute_dtype, **sampling), 3
    )
    return new_tokens / seconds


def bench_cached_step(cfg: ModelConfig, params, cache_len: int, position: int, compute_dtype, repeats: int) -> float:
    """Seconds of one single-token `forward_with_cache` at `position` of a `cache_len` cache."""
    step = jax.jit(
        lambda p, ids, cache, index: model.forward_with_cache(cfg, p, ids, cache, index, compute_dtype=compute_dtype),
        donate_argnums=2,  # the cache is updated in place, as inside the decode loop
    )
    state = {"cache": model.init_cache(cfg, 1, cache_len, compute_dtype)}
    token, index = jnp.ones((1, 1), jnp.int32), jnp.int32(position)

    def run():
        logits, state["cache"] = step(params, token, state["cache"], index)
        return logits

    return median_seconds(run, repeats)


def bench_full_forward(cfg: ModelConfig, params, length: int, compute_dtype, repeats: int) -> float:
    """Seconds of one cache-free forward over `length` tokens: a token's cost without a cache."""
    forward = jax.jit(lambda p, ids: model.forward(cfg, p, ids, compute_dtype=compute_dtype)[:, -1])
    ids = jnp.ones((1, length), jnp.int32)
    return median_seconds(lambda: forward(params, ids), repeats)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every input is a --flag")
    positions = [int(p) for p in _POSITIONS.value]
    if max(positions) >= _CACHE_LEN.value:
        raise app.UsageError(f"--positions {positions} must lie below --cache_len={_CACHE_LEN.value}")
    compute_dtype = config.dtype_from_name(_COMPUTE_DTYPE.value)
    cfg = ModelConfig(
        vocab_size=_VOCAB.value, hidden_size=_HIDDEN.value, intermediate_size=_INTERMEDIATE.value,
        num_hidden_layers=_LAYERS.value, num_attention_heads=_HEADS.value, num_key_value_heads=_KV_HEADS.value,
        max_position_embeddings=max(_CACHE_LEN.value, _PROMPT_LEN.value + _NEW_TOKENS.value),
    )
    params = model.init_params(cfg, jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, _PROMPT_LEN.value))
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(
        f"model: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads / "
        f"{cfg.num_key_value_heads} kv, MLP {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
        f"{cfg.num_params / 1e6:.1f} M params, compute {_COMPUTE_DTYPE.value}, batch 1"
    )
    new = _NEW_TOKENS.value
    greedy = bench_throughput(cfg, params, prompt, new, compute_dtype)
    sampled = bench_throughput(
        cfg, params, prompt, new, compute_dtype, temperature=0.9, top_k=50, top_p=0.92, repetition_penalty=1.15
    )
    print(f"decode, prompt {_PROMPT_LEN.value} + {new} new: greedy {greedy:.0f} tokens/s, "
          f"sampled (T 0.9, top-k 50, top-p 0.92, penalty 1.15) {sampled:.0f} tokens/s")
    print(f"| position | cached step, cache {_CACHE_LEN.value} (ms) | full re-run of the prefix (ms) |")
    print("|--:|--:|--:|")
    for position in positions:
        cached = bench_cached_step(cfg, params, _CACHE_LEN.value, position, compute_dtype, _REPEATS.value)
        full = bench_full_forward(cfg, params, position + 1, compute_dtype, _REPEATS.value)
        print(f"| {position} | {cached * 1e3:.2f} | {full * 1e3:.2f} |")


if __name__ == "__main__":
    app.run(main)
