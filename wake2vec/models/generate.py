"""The generations a checkpoint writes for the study to read: generations.md and .json.

This module turns decoding (wake2vec.models.decode, re-exported here) into the artefact the study reads:
`write_generations` continues one prompt at several temperatures and writes
generations.md and generations.json, the same samples with their keys and token ids
(`GenerationSettings` holds the study's defaults), with how much of each continuation is
the injected Wake vocabulary (`new_token_usage`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import pathlib
import re
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wake2vec.training import hosts
from wake2vec.config import ModelConfig
from wake2vec.models.decode import (  # noqa: F401 (re-exported: generate.generate, generate.next_token, ...)
    PromptTooLongError, SamplerValues, apply_repetition_penalty, generate, next_token, top_k_candidates, top_p_filter,
    validate_sampler)


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
            validate_sampler(temperature, self.top_k, self.top_p, self.repetition_penalty)


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
