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
tokenizer is loaded as training loads it (wake2vec.vocab.load_base_tokenizer).

Writes W/generations.md (wake2vec.generate.write_generations): the prompt and settings,
then one section per temperature (0 means greedy); prints one line per temperature.
W/generations.json holds the same, with the ids; where W/config.json gives the base
vocabulary size, both report the share of new (Wake) tokens in each continuation.
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

from absl import app, flags
import transformers

from wake2vec import config, convert, generate, vocab, workdir as records
from wake2vec.config import ModelConfig

_STUDY = generate.GenerationSettings()


def define_flags() -> None:
    """Defines this launcher's flags; called only when it runs, so importing it for its
    functions (tests, other launchers) never collides with another launcher's flags."""
    flags.DEFINE_string("workdir", None, "Run directory; generations.md is written here.")
    flags.DEFINE_integer("step", None, "Checkpoint step to decode; default: the latest.")
    flags.DEFINE_string(
        "model", "", "Decode this HF checkpoint directory instead of the workdir's trained model."
    )
    flags.DEFINE_string(
        "tokenizer", "", "Tokenizer directory (save_pretrained); default: W/tokenizer, or the --model directory."
    )
    flags.DEFINE_string("prompt", _STUDY.prompt, "Text to continue.")
    flags.DEFINE_string(
        "temperatures", ",".join(f"{t:g}" for t in _STUDY.temperatures),
        "Comma-separated temperatures, one section each; 0 is greedy.",
    )
    flags.DEFINE_integer("max_new_tokens", _STUDY.max_new_tokens, "Tokens generated after the prompt.")
    flags.DEFINE_integer("top_k", _STUDY.top_k, "Sample among the k most likely tokens; 0 disables.")
    flags.DEFINE_float("top_p", _STUDY.top_p, "Nucleus sampling mass; 1 disables.")
    flags.DEFINE_float(
        "repetition_penalty", _STUDY.repetition_penalty,
        "transformers' repetition penalty on ids already in the text; 1 disables.",
    )
    flags.DEFINE_integer("seed", _STUDY.seed, "Sampling seed; the same seed writes the same file.")
    flags.DEFINE_string("compute_dtype", "float32", "Matmul and KV-cache dtype: float32 | bfloat16.")


FLAGS = flags.FLAGS


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'0.5,0.7' -> (0.5, 0.7); raises ValueError naming the bad entry (ranges: GenerationSettings)."""
    entries = [entry.strip() for entry in text.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(
            f"--temperatures={text!r} has an empty entry; pass comma-separated numbers such as 0.5,0.7,0.9"
        )
    temperatures = []
    for entry in entries:
        try:
            temperatures.append(float(entry))
        except ValueError:
            raise ValueError(
                f"--temperatures={text!r}: {entry!r} is not a number; pass comma-separated numbers such as 0.5,0.7"
            ) from None
    return tuple(temperatures)


def load_model(
    workdir: str, step: int | None, model_dir: str, tokenizer_dir: str
) -> tuple[ModelConfig, Any, int | None, transformers.PreTrainedTokenizerBase, str]:
    """(cfg, params, checkpoint step or None, tokenizer, a description of the source).

    The tokenizer is read as training reads it (wake2vec.vocab: tokenizer.json as saved), so
    the prompt splits exactly as the corpus did.
    """
    if model_dir:
        if step is not None:
            raise ValueError("--step selects a workdir checkpoint; it has no meaning with --model")
        cfg, params = convert.load_hf(model_dir)
        return cfg, params, None, vocab.load_base_tokenizer(tokenizer_dir or model_dir), f"HF checkpoint {model_dir}"
    # Imported here: the checkpoint module pulls in Orbax, which --model runs never need.
    from wake2vec import checkpoint

    cfg, params, loaded_step = checkpoint.load_params(workdir, step)
    tokenizer = vocab.load_base_tokenizer(tokenizer_dir or pathlib.Path(workdir) / "tokenizer")
    return cfg, params, loaded_step, tokenizer, f"run {workdir}"


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; every input is a --flag")
    try:
        settings = generate.GenerationSettings(
            prompt=FLAGS.prompt, temperatures=parse_temperatures(FLAGS.temperatures),
            max_new_tokens=FLAGS.max_new_tokens, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
            repetition_penalty=FLAGS.repetition_penalty, seed=FLAGS.seed,
        )
        compute_dtype = config.dtype_from_name(FLAGS.compute_dtype)
        cfg, params, step, tokenizer, source = load_model(
            FLAGS.workdir, FLAGS.step, FLAGS.model, FLAGS.tokenizer
        )
    except (ValueError, FileNotFoundError) as err:
        raise app.UsageError(str(err)) from err
    run_config = records.read_config(pathlib.Path(FLAGS.workdir)) or {}
    out = generate.write_generations(
        FLAGS.workdir, cfg, params, tokenizer,
        step=step, settings=settings, source=source, compute_dtype=compute_dtype,
        base_vocab_size=run_config.get("vocab", {}).get("base_size"),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
