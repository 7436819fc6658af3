r"""Writes what a checkpoint generates from a prompt at several temperatures.

    python -m experiments.generate --workdir=W [--step=N] \
        [--prompt="riverrun, past Eve and Adam's," --temperatures=0.5,0.7,0.9,1.0,1.2 \
         --max_new_tokens=256 --top_k=50 --top_p=0.92 --repetition_penalty=1.15 --seed=0]
    python -m experiments.generate --workdir=W --model=HF_DIR [--tokenizer=TOKENIZER_DIR]

The defaults are the study's settings (../shared/ORIGINAL.md): Phase 1 is judged largely by
reading these continuations. With only --workdir the run's trained model is decoded with
its augmented tokenizer (W/tokenizer); --model decodes any HF checkpoint directory instead
(its tokenizer from --tokenizer, else from the same directory), so a base model can be
read beside the trained one. The prompt is encoded with the tokenizer's special tokens
(Llama's BOS in front), as the study did; a row stops at the tokenizer's EOS. The
tokenizer is loaded as training loads it (wake2vec.tokens.vocab.load_base_tokenizer).

Writes --out (default W/generations.md) through wake2vec.models.generate.write_generations: the
prompt and settings, then one section per temperature and sample (0 means greedy) with the sample's
key, and generations.json beside it with the same samples, keys and token ids; prints
one line per sample. An existing file, such as the training run's own generations.md, is
never replaced unless --overwrite is given; the file appears whole or not at all.
Where W/config.json gives the base vocabulary size, both report the share of new (Wake)
tokens in each continuation.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import tempfile
from typing import Any, ClassVar

from wake2vec import launcher
from wake2vec.config import FlagError

# The study's settings (wake2vec.models.generate.GenerationSettings), repeated as flag defaults so
# --help need not import JAX; a test keeps the two equal.
STUDY_PROMPT = "riverrun, past Eve and Adam's,"


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """Flags of experiments.generate."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir", "model", "tokenizer", "out")

    # Run directory: its trained model is decoded (unless --model) and the file goes here by default.
    workdir: str = ""
    # Checkpoint step to decode; default: the latest.
    step: int | None = None
    # Decode this HF checkpoint directory instead of the workdir's trained model.
    model: str = ""
    # Tokenizer directory (save_pretrained); default: W/tokenizer, or the --model directory.
    tokenizer: str = ""
    # Markdown file to write; empty: W/generations.md.
    out: str = ""
    # Replace --out if it exists (the training run's generations.md included).
    overwrite: bool = False
    # Text to continue.
    prompt: str = STUDY_PROMPT
    # Comma-separated temperatures, one section each; 0 is greedy.
    temperatures: str = "0.5,0.7,0.9,1,1.2"
    # Tokens generated after the prompt.
    max_new_tokens: int = 256
    # Sample among the k most likely tokens; 0 disables.
    top_k: int = 50
    # Nucleus sampling mass; 1 disables.
    top_p: float = 0.92
    # transformers' repetition penalty on ids already in the text; 1 disables.
    repetition_penalty: float = 1.15
    # Sampling seed; the same seed writes the same file.
    seed: int = 0
    # Samples per temperature, each with its own recorded key.
    samples: int = 1
    # Matmul and KV-cache dtype: float32 | bfloat16.
    compute_dtype: str = "float32"


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'0.5,0.7' -> (0.5, 0.7); raises FlagError naming the bad entry (ranges: GenerationSettings)."""
    entries = [entry.strip() for entry in text.split(",")]
    if any(not entry for entry in entries):
        raise FlagError(
            f"--temperatures={text!r} has an empty entry; pass comma-separated numbers such as 0.5,0.7,0.9"
        )
    temperatures = []
    for entry in entries:
        try:
            temperatures.append(float(entry))
        except ValueError:
            raise FlagError(
                f"--temperatures={text!r}: {entry!r} is not a number; pass comma-separated numbers such as 0.5,0.7"
            ) from None
    return tuple(temperatures)


def load_model(workdir: str, step: int | None, model_dir: str, tokenizer_dir: str) -> tuple[Any, Any, int | None, Any, str]:
    """(cfg, params, checkpoint step or None, tokenizer, a description of the source).

    The tokenizer is read as training reads it (wake2vec.tokens.vocab: tokenizer.json as saved), so
    the prompt splits exactly as the corpus did; a run's own tokenizer is checked against
    the hash its config.json recorded.
    """
    from wake2vec.models import convert
    from wake2vec.tokens import vocab
    from wake2vec.training import workdir as records

    if model_dir:
        if step is not None:
            raise FlagError("--step selects a workdir checkpoint; it has no meaning with --model")
        cfg, params = convert.load_hf(model_dir)
        return cfg, params, None, vocab.load_base_tokenizer(tokenizer_dir or model_dir), f"HF checkpoint {model_dir}"
    # Imported here: the checkpoint module pulls in Orbax, which --model runs never need.
    from wake2vec.phases import runs

    cfg, params, loaded_step = runs.load_params(workdir, step)
    if not tokenizer_dir:
        tokenizer_dir = records.verified_tokenizer_dir(pathlib.Path(workdir), records.read_config(pathlib.Path(workdir)) or {})
    return cfg, params, loaded_step, vocab.load_base_tokenizer(tokenizer_dir), f"run {workdir}"


def output_path(cfg: GenerateConfig) -> pathlib.Path:
    """Where the file goes, refused before any model is read if it would replace a file unasked."""
    from wake2vec.models import generate

    out = pathlib.Path(cfg.out) if cfg.out else pathlib.Path(cfg.workdir) / generate.GENERATIONS_FILE
    if out.is_dir():
        raise FlagError(f"--out={out} is a directory; name the markdown file to write")
    if out.exists() and not cfg.overwrite:
        raise FlagError(f"{out} exists (the training run's generations?); pass --out=OTHER.md, or --overwrite to replace it")
    return out


def run(cfg: GenerateConfig) -> str:
    if not cfg.workdir:
        raise FlagError("--workdir is required: the run to decode, or where to write with --model")
    from wake2vec import config
    from wake2vec.models import generate

    temperatures = parse_temperatures(cfg.temperatures)
    try:
        settings = generate.GenerationSettings(
            prompt=cfg.prompt, temperatures=temperatures,
            max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty, seed=cfg.seed, samples=cfg.samples,
        )
        compute_dtype = config.dtype_from_name(cfg.compute_dtype)
    except ValueError as err:  # GenerationSettings and dtype names check ranges with plain ValueErrors
        raise FlagError(str(err)) from None
    from wake2vec.training import workdir as records

    out = output_path(cfg)
    records.writable_dir(out.parent, "--out")
    model_cfg, params, step, tokenizer, source = load_model(cfg.workdir, cfg.step, cfg.model, cfg.tokenizer)
    # The run's base vocabulary size says which ids are new; a bare --model has none to say.
    record = {} if cfg.model else records.read_config(pathlib.Path(cfg.workdir)) or {}
    base_vocab_size = record.get("vocab", {}).get("base_size")
    adapters = None
    if "lora" in record:  # a Phase 2 or 3 run: its adapters apply unmerged, as trained
        from wake2vec.phases import runs

        adapters = runs.lora_spec(record)
    # Written beside --out and renamed onto it: a kill never leaves half a file. The JSON
    # twin (the same samples, keys and token ids) takes --out's name with .json.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".generate.") as staging:
        written = generate.write_generations(
            staging, model_cfg, params, tokenizer,
            step=step, settings=settings, source=source, compute_dtype=compute_dtype, base_vocab_size=base_vocab_size,
            lora=adapters,
        )
        os.replace(written.with_suffix(".json"), out.with_suffix(".json"))
        os.replace(written, out)
    return f"wrote {out} and {out.with_suffix('.json')}"


if __name__ == "__main__":
    launcher.launch(GenerateConfig, run, __doc__)
