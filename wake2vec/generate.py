"""Autoregressive decoding with a preallocated KV cache: greedy, temperature, top-k, top-p.

Phase 1 is judged largely by reading what a checkpoint writes, so decoding has to be both
cheap and trustworthy:

* **Cheap.** The prompt is prefilled in one `model.forward_with_cache` call, then every new
  token is one single-position step against the cache inside one `lax.while_loop`, all in
  one jitted function. A step never re-runs the prefix: it attends over the preallocated
  buffer (unwritten positions masked), so its cost is the same at position 10 or 1,000.
* **Comparable with transformers.** The logits pipeline is transformers' sampling order
  (`GenerationMixin._get_logits_processor`): repetition penalty, then temperature, then
  top-k, then top-p, then a categorical draw; temperature 0 is greedy (the penalty still
  applies, as in transformers). Each stage is a public pure function so the tests can hold
  it against transformers' own processor.
* **Reproducible.** The draw for the token at position p uses `fold_in(key, p)`, the
  call's key being `PRNGKey(seed)` unless one is passed: no RNG state is carried between
  calls, so the same arguments and key give the same tokens every time, and a greedy run
  draws nothing.
* **Independent samples.** `write_generations` gives every (prompt, temperature, sample)
  its own key, `fold_in(PRNGKey(seed), hash)` with a stable hash of the triple
  (`sample_key`), and records it: with one key for all, a temperature sweep drew the same
  uniform numbers at every temperature, so 1.0 and 1.2 could write the same text.

What is static and what is traced: the model config, the prompt length, `max_new_tokens`,
`top_k` (its value sets a `lax.top_k` shape) and whether a stage exists at all (greedy vs
sampling, top-p on or off) are static, mirroring transformers, which only builds the
processors a call asks for. Temperature, top-p, the penalty and the eos id are traced, so
sweeping temperatures (as experiments/generate.py does) compiles the sampler once.

End of sequence: once a row emits `eos_id` (or any of several ids: Llama 3 lists its
end-of-turn tokens), every later position of that row is the (first) `eos_id`
(transformers writes its pad token there instead; writing eos keeps "everything after the
first eos" trivially strippable with `skip_special_tokens`). When every row has finished
the loop stops early, so an eos-terminated batch costs only the steps it used.

The second half of the module turns decoding into the artefact the study reads:
`write_generations` continues one prompt at several temperatures and writes
generations.md and generations.json, the same samples with their keys and token ids
(`GenerationSettings` holds the study's defaults), with how much of each continuation is
the injected Wake vocabulary (`new_token_usage`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import pathlib
import re
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec import hosts, model
from wake2vec.config import ModelConfig, UnsupportedConfigError
from wake2vec.errors import UserError

# The eos id the jitted loop sees when the caller wants no stopping: no token equals it.
_NO_EOS = -1


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """transformers' RepetitionPenaltyLogitsProcessor on (B, V) logits.

    For every id already in the sequence (`seen`, a (B, V) boolean), a negative logit is
    multiplied by `penalty` and a non-negative one divided by it, so the penalty always
    lowers the token's probability whatever the logit's sign. `penalty` 1.0 is the identity
    bit for bit (x * 1 and x / 1 are exact), which is why it needs no on/off switch.
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_candidates(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest logits of each row and their token ids, (B, k) each, best first.

    transformers' TopKLogitsWarper masks everything else to -inf; returning the survivors
    instead lets top-p and the draw work on k values rather than sort the whole vocabulary
    (76,500 ids after injection) at every step. A tie with the k-th value keeps exactly k,
    where transformers keeps every tied token.
    """
    return jax.lax.top_k(logits, min(k, logits.shape[-1]))


def top_p_filter(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Nucleus filtering as transformers' TopPLogitsWarper defines it, on (B, V) logits.

    transformers sorts ascending and removes a token when the probability mass of it and
    every less likely token is <= 1 - top_p, always keeping the most likely token. The removed
    tokens are therefore a prefix of the ascending order, and keeping every logit >= the
    smallest kept one gives the same set without scattering a mask back through the sort.
    The one difference: a tie straddling the cut keeps all tied tokens, where transformers
    keeps whichever its sort put last.
    """
    ascending = jnp.sort(logits, axis=-1)
    mass_up_to = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    removed = jnp.sum(mass_up_to[..., :-1] <= 1.0 - top_p, axis=-1, keepdims=True)
    smallest_kept = jnp.take_along_axis(ascending, removed, axis=-1)
    return jnp.where(logits < smallest_kept, -jnp.inf, logits)


class SamplerValues(NamedTuple):
    """The traced values of the logits pipeline (which stages run, and k, are static)."""

    temperature: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array


def next_token(
    logits: jax.Array,
    seen: jax.Array,
    key: jax.Array,
    sampler: SamplerValues,
    *,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
) -> jax.Array:
    """Picks one token id per row from (B, V) float32 logits; returns (B,) int32."""
    logits = apply_repetition_penalty(logits, seen, sampler.repetition_penalty)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampler.temperature
    candidates = jnp.broadcast_to(jnp.arange(logits.shape[-1]), logits.shape)
    if top_k:
        logits, candidates = top_k_candidates(logits, top_k)
    if use_top_p:
        logits = top_p_filter(logits, sampler.top_p)
    choice = jax.random.categorical(key, logits, axis=-1)
    return jnp.take_along_axis(candidates, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


class _LoopState(NamedTuple):
    tokens: jax.Array  # (B, T_prompt + new) int32: the prompt, then what has been emitted
    cache: model.KVCache
    seen: jax.Array  # (B, V) bool: ids present in the row so far, for the repetition penalty
    done: jax.Array  # (B,) bool: the row has emitted eos
    position: jax.Array  # int32 scalar: where the next emitted token goes


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "greedy", "top_k", "use_top_p", "compute_dtype", "lora")
)
def _decode(
    params: Any,
    prompt_ids: jax.Array,
    key: jax.Array,
    sampler: SamplerValues,
    eos_ids: jax.Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    greedy: bool,
    top_k: int,
    use_top_p: bool,
    compute_dtype: Any,
    lora: Any = None,
) -> jax.Array:
    """Prefill, then the decode loop; `generate` has validated every argument."""
    batch, prompt_len = prompt_ids.shape
    total = prompt_len + max_new_tokens
    rows = jnp.arange(batch)
    # After eos a row keeps writing eos; without an eos id nothing ever reads this fill.
    fill = jnp.where(eos_ids[0] == _NO_EOS, 0, eos_ids[0]).astype(jnp.int32)

    def emit(logits: jax.Array, state: _LoopState) -> _LoopState:
        token = next_token(
            logits, state.seen, jax.random.fold_in(key, state.position), sampler,
            greedy=greedy, top_k=top_k, use_top_p=use_top_p,
        )
        token = jnp.where(state.done, fill, token)
        return _LoopState(
            tokens=jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.position)),
            cache=state.cache,
            seen=state.seen.at[rows, token].set(True),
            done=state.done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1),
            position=state.position + 1,
        )

    # The last emitted token is never fed back, so the cache needs one position fewer than the output.
    cache = model.init_cache(cfg, batch, total - 1, compute_dtype)
    logits, cache = model.forward_with_cache(cfg, params, prompt_ids, cache, 0, compute_dtype=compute_dtype, lora=lora)
    state = emit(
        logits[:, -1],
        _LoopState(
            tokens=jnp.concatenate([prompt_ids, jnp.full((batch, max_new_tokens), fill, jnp.int32)], axis=1),
            cache=cache,
            seen=jnp.zeros((batch, cfg.vocab_size), bool).at[rows[:, None], prompt_ids].set(True),
            done=jnp.zeros((batch,), bool),
            position=jnp.int32(prompt_len),
        ),
    )

    def unfinished(state: _LoopState) -> jax.Array:
        return (state.position < total) & ~jnp.all(state.done)

    def step(state: _LoopState) -> _LoopState:
        last = jax.lax.dynamic_slice_in_dim(state.tokens, state.position - 1, 1, axis=1)
        logits, cache = model.forward_with_cache(
            cfg, params, last, state.cache, state.position - 1, compute_dtype=compute_dtype, lora=lora
        )
        return emit(logits[:, 0], state._replace(cache=cache))

    return jax.lax.while_loop(unfinished, step, state).tokens


class PromptTooLongError(UserError, ValueError):
    """The prompt and the requested continuation do not fit the model's positions."""


def _validated_prompt(cfg: ModelConfig, prompt_ids: Any, max_new_tokens: int) -> np.ndarray:
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 2:
        raise ValueError(
            f"prompt_ids has shape {prompt.shape}; pass a (batch, length) array of equal-length prompts, "
            "e.g. [ids] for one prompt"
        )
    if prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(
            f"prompt_ids has shape {prompt.shape}; every row needs at least one token (start from the BOS id, "
            f"{cfg.bos_token_id}, to generate from nothing)"
        )
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(
            f"prompt_ids holds ids in [{prompt.min()}, {prompt.max()}] but the model's vocabulary is "
            f"[0, {cfg.vocab_size}); was the prompt encoded with another tokenizer?"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; ask for at least one new token")
    room = cfg.max_position_embeddings - prompt.shape[1]
    if room < 1:
        raise PromptTooLongError(
            f"the prompt is {prompt.shape[1]} tokens, which leaves no room for new tokens within the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt to under that"
        )
    if max_new_tokens > room:
        raise PromptTooLongError(
            f"prompt of {prompt.shape[1]} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or lower "
            f"max_new_tokens to at most {room}"
        )
    scaling = cfg.rope_scaling
    if scaling is not None and scaling.rope_type == "longrope":
        # Longrope changes every frequency once a pass reaches past the original context;
        # transformers then recomputes the whole cache. A cache that crosses the switch is
        # not implemented: the keys already cached would be rotated by the wrong factors.
        switch, last_fed = scaling.original_max_position_embeddings, prompt.shape[1] + max_new_tokens - 1
        if prompt.shape[1] <= switch < last_fed:
            raise UnsupportedConfigError(
                f"longrope (rope_scaling of this Phi-3 checkpoint) switches to its long factors past position "
                f"{switch}; decoding across it is not implemented: keep prompt + max_new_tokens <= {switch + 1}, "
                f"or give a prompt longer than {switch} tokens"
            )
    return prompt.astype(np.int32)


def _validate_sampler(temperature: float, top_k: int, top_p: float, repetition_penalty: float) -> None:
    if not (np.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature={temperature}; use 0 for greedy decoding or a positive number to sample")
    if top_k < 0:
        raise ValueError(f"top_k={top_k}; use 0 to disable top-k filtering or a positive count")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p}; it must lie in (0, 1], and 1 disables nucleus filtering")
    if not (np.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty={repetition_penalty}; it must be positive, and 1 disables it")


def generate(
    cfg: ModelConfig,
    params: Any,
    prompt_ids: Sequence[Sequence[int]] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_id: int | Sequence[int] | None = None,
    seed: int = 0,
    key: jax.Array | None = None,
    compute_dtype: Any = jnp.float32,
    lora: Any = None,
) -> jax.Array:
    """Continues equal-length prompts (B, T) by `max_new_tokens`; returns (B, T + max_new_tokens) int32.

    temperature 0 decodes greedily; otherwise tokens are drawn after the repetition penalty,
    temperature, top-k (0: off) and top-p (1: off), in transformers' order. With `eos_id`
    (one id, or several as Llama 3 lists them), a row that emits one is padded with the
    first to the end. The same arguments and seed (or `key`, which replaces PRNGKey(seed))
    always give the same tokens. `compute_dtype` is the matmul and KV-cache dtype (see
    wake2vec.model). `lora` (a wake2vec.lora.LoraSpec) applies the adapters in
    params["lora"] unmerged, as Phase 2 trained them.
    Raises ValueError, naming the fix, for an empty or over-long prompt or a bad setting.
    """
    prompt = _validated_prompt(cfg, prompt_ids, max_new_tokens)
    _validate_sampler(temperature, top_k, top_p, repetition_penalty)
    eos_ids = [] if eos_id is None else [int(e) for e in np.atleast_1d(eos_id)]
    if not all(0 <= e < cfg.vocab_size for e in eos_ids):
        raise ValueError(f"eos_id={eos_id} is outside the vocabulary [0, {cfg.vocab_size}); pass None to never stop")
    greedy = temperature == 0
    sampler = SamplerValues(
        temperature=jnp.float32(1.0 if greedy else temperature),
        top_p=jnp.float32(top_p),
        repetition_penalty=jnp.float32(repetition_penalty),
    )
    return _decode(
        params,
        jnp.asarray(prompt),
        jax.random.PRNGKey(seed) if key is None else key,
        sampler,
        jnp.asarray(eos_ids or [_NO_EOS], jnp.int32),
        cfg=cfg,
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
        # Sampling-only stages do not exist in a greedy program, so greedy calls share one compile.
        top_k=0 if greedy else int(top_k),
        use_top_p=not greedy and top_p < 1.0,
        compute_dtype=compute_dtype,
        lora=lora,
    )


# ---------------------------------------------------------------------------------------
# generations.md: the continuations the study reads, written by the training loop at the
# end of a run and by experiments/generate.py for any checkpoint.

STUDY_PROMPT = "riverrun, past Eve and Adam's,"
GENERATIONS_FILE = "generations.md"
GENERATIONS_JSON = "generations.json"  # beside it: the same samples, keys, ids and usage
# New tokens listed per sample in generations.md (all of them are in the JSON).
MD_NEW_TOKENS_SHOWN = 20


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """One prompt, continued once per temperature with shared sampling settings.

    The defaults are the study's (../shared/ORIGINAL.md); a temperature of 0 is greedy.
    Settings are checked on construction, so a bad flag fails before any model is loaded.
    """

    prompt: str = STUDY_PROMPT
    temperatures: tuple[float, ...] = (0.5, 0.7, 0.9, 1.0, 1.2)
    max_new_tokens: int = 256
    top_k: int = 50
    top_p: float = 0.92
    repetition_penalty: float = 1.15
    seed: int = 0
    # Samples per temperature, each with its own key; greedy (temperature 0) writes one.
    samples: int = 1

    def __post_init__(self):
        if not self.prompt.strip():
            raise ValueError(f"the prompt is empty; give text to continue, e.g. the study's {STUDY_PROMPT!r}")
        if not self.temperatures:
            raise ValueError("no temperatures given; list at least one, e.g. 0.5,0.7,0.9,1.0,1.2 (0 is greedy)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; ask for at least one new token")
        if self.samples < 1:
            raise ValueError(f"samples={self.samples}; ask for at least one sample per temperature")
        for temperature in self.temperatures:
            _validate_sampler(temperature, self.top_k, self.top_p, self.repetition_penalty)


# The demo (wake2vec.demo) memorises its own sample text, not the Wake, so it is prompted
# with that text's opening, as the study prompts with the Wake's; and it trains on
# 128-token blocks, so longer continuations would read past anything it learned.
DEMO_SETTINGS = GenerationSettings(prompt="Riverrunning, the Liffeyling came down", max_new_tokens=128)


def _fenced(text: str) -> str:
    """A code fence longer than any backtick run in `text`, so Wake text never breaks the Markdown."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def sample_key(seed: int, prompt: str, temperature: float, sample: int) -> tuple[int, jax.Array]:
    """(the folded-in value, the key) of one sample: fold_in(PRNGKey(seed), h), where h is
    the first 32 bits of sha256 over (prompt, temperature, sample).

    A hash rather than a counter, so that a sample's key does not depend on which other
    temperatures or prompts the same call asked for: rerunning one of them reproduces it.
    """
    triple = json.dumps([prompt, float(temperature), int(sample)], ensure_ascii=False)
    folded = int.from_bytes(hashlib.sha256(triple.encode("utf-8")).digest()[:4], "big")
    return folded, jax.random.fold_in(jax.random.PRNGKey(seed), folded)


def new_token_usage(generated_ids: Sequence[int], base_vocab_size: int) -> dict[str, Any]:
    """How much of a continuation is new (Wake) vocabulary: ids >= base_vocab_size.

    `generated_ids` are the tokens after the prompt, the eos that ends a row excluded (it is
    no text). Returns the counts, the share (None for an empty continuation, never NaN) and
    each new id used with its count, most used first (ties by id).
    """
    counts = collections.Counter(int(i) for i in generated_ids if int(i) >= base_vocab_size)
    n_generated, n_new = len(generated_ids), sum(counts.values())
    return {
        "generated_tokens": n_generated,
        "new_tokens": n_new,
        "share_new": n_new / n_generated if n_generated else None,
        "distinct_new": len(counts),
        "new_ids": sorted(counts.items(), key=lambda item: (-item[1], item[0])),
    }


def _distinct_new(usages: Sequence[dict]) -> int:
    """Distinct new ids over all continuations (usages as `_named_usage` lists them)."""
    return len({row["id"] for usage in usages for row in usage["new_ids"]})


def _named_usage(usage: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """`usage` with each new id listed as {id, token, count}, as generations.json records it."""
    rows = [{"id": i, "token": tokenizer.convert_ids_to_tokens(i), "count": count} for i, count in usage["new_ids"]]
    return {**usage, "new_ids": rows}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One continuation and everything needed to draw it again."""

    temperature: float
    sample: int
    key_fold: int | None  # None: greedy, nothing is drawn
    key: tuple[int, ...] | None  # the raw key data (jax.random.key_data), as passed to generate
    new_tokens: int
    token_ids: tuple[int, ...]
    text: str
    # The continuation after the prompt, its closing eos excluded.
    generated_ids: tuple[int, ...] = ()
    # new_token_usage of generated_ids (new ids listed with their token names); None when the
    # base vocabulary size is not known.
    usage: dict[str, Any] | None = None


def _sample_title(sample: Sample, samples: int) -> str:
    title = f"temperature {sample.temperature:g}" + (" (greedy)" if sample.temperature == 0 else "")
    return title + (f", sample {sample.sample + 1}" if samples > 1 and sample.temperature != 0 else "")


def _key_line(sample: Sample, seed: int) -> str:
    if sample.key is None:
        return "Greedy: no key (nothing is drawn)."
    return (f"Key: `fold_in(PRNGKey({seed}), {sample.key_fold})` = `{list(sample.key)}` "
            "(fold-in value: sha256 of prompt, temperature, sample).")


def _sample_label(sample: Sample, samples: int) -> str:
    return f"{sample.temperature:g}" + (f" #{sample.sample + 1}" if samples > 1 and sample.temperature != 0 else "")


def _usage_table(samples: Sequence[Sample], per_temperature: int, all_distinct: int) -> list[str]:
    lines = ["", "New (Wake) tokens in the continuations (prompt and the closing eos not counted):", "",
             "| temperature | generated tokens | new tokens | share new | distinct new |", "|--:|--:|--:|--:|--:|"]
    for sample in samples:
        usage = sample.usage
        share = "n/a" if usage["share_new"] is None else f"{usage['share_new']:.1%}"
        lines.append(f"| {_sample_label(sample, per_temperature)} | {usage['generated_tokens']} | {usage['new_tokens']} | "
                     f"{share} | {usage['distinct_new']} |")
    lines += ["", f"Distinct new tokens over all temperatures: {all_distinct}."]
    return lines


def render_generations(prompt: str, header: dict[str, Any], samples: Sequence[Sample], *, seed: int,
                       per_temperature: int = 1) -> str:
    """The generations.md text: the prompt, a settings table, the new-token usage table (when
    the samples carry usage), one section per sample with its key and the new tokens it used."""
    lines = ["# Generations", "", "Prompt:", "", _fenced(prompt), "", "| setting | value |", "|:--|:--|"]
    lines += [f"| {name} | {value} |" for name, value in header.items()]
    counted = bool(samples) and all(sample.usage is not None for sample in samples)
    if counted:
        lines += _usage_table(samples, per_temperature, _distinct_new([s.usage for s in samples]))
    for sample in samples:
        lines += ["", f"## {_sample_title(sample, per_temperature)}", "", _fenced(sample.text), "",
                  _key_line(sample, seed)]
        if counted and sample.usage["new_ids"]:
            shown = sample.usage["new_ids"][:MD_NEW_TOKENS_SHOWN]
            more = len(sample.usage["new_ids"]) - len(shown)
            listed = ", ".join(f"`{row['token']}` ({row['count']})" for row in shown)
            lines += ["", f"New tokens used: {listed}" + (f", and {more} more" if more > 0 else "") + "."]
    return "\n".join(lines) + "\n"


def write_generations(
    workdir: str | pathlib.Path,
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    *,
    step: int | None = None,
    settings: GenerationSettings | None = None,
    demo: bool = False,
    source: str = "the run's trained model",
    compute_dtype: Any = jnp.float32,
    log: Callable[[str], None] = print,
    base_vocab_size: int | None = None,
    lora: Any = None,
) -> pathlib.Path:
    """Decodes the prompt `samples` times per temperature and writes workdir/generations.md
    and workdir/generations.json; returns the Markdown's path.

    `tokenizer` is a transformers tokenizer (the run's augmented one). The prompt is encoded
    with its special tokens (Llama's BOS in front), as the study did, and a row stops at its
    EOS. `settings` defaults to the study's, or to DEMO_SETTINGS when `demo`. The text of
    each section is the whole sequence, prompt included, decoded without special tokens.
    Each sample is drawn with its own recorded key (`sample_key`).
    With `base_vocab_size` (the run's vocab.base_size), ids at or above it are the new Wake
    tokens, and each continuation's share of them is reported (`new_token_usage`); without
    it the usage is not counted (null in the JSON).
    """
    if settings is None:
        settings = DEMO_SETTINGS if demo else GenerationSettings()
    if len(tokenizer) > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {cfg.vocab_size} rows; "
            "pass the tokenizer the model was trained with (the run's W/tokenizer)"
        )
    prompt_ids = tokenizer(settings.prompt, add_special_tokens=True)["input_ids"]
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else cfg.eos_token_id
    samples = []
    for temperature in settings.temperatures:
        for index in range(1 if temperature == 0 else settings.samples):
            folded, key = sample_key(settings.seed, settings.prompt, temperature, index)
            started = time.perf_counter()
            tokens = hosts.host_array(
                generate(
                    cfg, params, [prompt_ids], settings.max_new_tokens,
                    temperature=temperature, top_k=settings.top_k, top_p=settings.top_p,
                    repetition_penalty=settings.repetition_penalty, eos_id=eos_id, key=key,
                    compute_dtype=compute_dtype, lora=lora,
                )
            )[0]
            stops = np.flatnonzero(np.isin(tokens[len(prompt_ids):], eos_id)) if eos_id is not None else []
            emitted = int(stops[0] + 1 if len(stops) else settings.max_new_tokens)
            greedy = temperature == 0
            generated = [int(t) for t in tokens[len(prompt_ids): len(prompt_ids) + (int(stops[0]) if len(stops) else emitted)]]
            sample = Sample(
                temperature=float(temperature), sample=index,
                key_fold=None if greedy else folded,
                key=None if greedy else tuple(int(k) for k in np.asarray(jax.random.key_data(key))),
                new_tokens=emitted, token_ids=tuple(int(t) for t in tokens[: len(prompt_ids) + emitted]),
                text=tokenizer.decode(tokens.tolist(), skip_special_tokens=True),
                generated_ids=tuple(generated),
                usage=None if base_vocab_size is None else _named_usage(new_token_usage(generated, base_vocab_size), tokenizer),
            )
            log(f"{_sample_title(sample, settings.samples)}: {emitted} new tokens in {time.perf_counter() - started:.1f} s")
            samples.append(sample)
    header = {
        "model": source,
        "checkpoint step": "n/a" if step is None else step,
        "max_new_tokens": settings.max_new_tokens,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "repetition_penalty": settings.repetition_penalty,
        "seed": settings.seed,
        "samples per temperature": settings.samples,
        "eos id (stops a row)": "none" if eos_id is None else eos_id,
        "prompt tokens (with specials)": len(prompt_ids),
        "compute dtype": jnp.dtype(compute_dtype).name,
    }
    header["new tokens are ids from"] = "not counted (no base vocabulary size)" if base_vocab_size is None \
        else base_vocab_size
    out = pathlib.Path(workdir) / GENERATIONS_FILE
    if hosts.is_writer():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_generations(settings.prompt, header, samples, seed=settings.seed,
                                          per_temperature=settings.samples), encoding="utf-8")
        record = {"prompt": settings.prompt, "prompt_ids": [int(t) for t in prompt_ids], "settings": header,
                  "samples": [dataclasses.asdict(sample) for sample in samples],
                  "distinct_new_all_temperatures": None if base_vocab_size is None
                  else _distinct_new([sample.usage for sample in samples])}
        (out.parent / GENERATIONS_JSON).write_text(json.dumps(record, indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                                                   encoding="utf-8")
    return out
