r"""Exports a trained run as a HuggingFace model directory that transformers loads as is.

    python -m experiments.export_hf --workdir=W --out=DIR [--step=N]

DIR gets the run's source model with the trained table merged in (and the trained head,
when the run was untied), a config.json with the grown vocabulary and the run's tying,
the augmented tokenizer exactly as the run saved it, and `wake2vec_export.json` saying
which run and step it came from. Then, with no wake2vec installed:

    model = transformers.AutoModelForCausalLM.from_pretrained(DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DIR)

The frozen body is read from the run's model source and refused if its content hash
changed since training (the trained rows belong to those weights); it is written in
float32, which holds bf16 / fp16 sources exactly. Problems are one line saying what to
fix, and the process exits 1.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import ClassVar

from wake2vec import launcher
from wake2vec.config import FlagError
from wake2vec.errors import UserError


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Flags of experiments.export_hf."""

    PATH_FIELDS: ClassVar[tuple[str, ...]] = ("workdir", "out")

    # Training workdir to export.
    workdir: str = ""
    # Output directory (new or empty).
    out: str = ""
    # Checkpoint step to export; default the latest committed one.
    step: int | None = None


PROVENANCE = "wake2vec_export.json"


class ExportError(UserError, RuntimeError):
    """The workdir or the output directory cannot make a consistent export."""


def export(workdir, out, step: int | None = None) -> int:
    """Writes the HF directory `out` from the run in `workdir`; returns the exported step."""
    from wake2vec import checkpoint, convert, vocab, workdir as records

    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out={out} is not empty; export into a new or empty directory")
    records.writable_dir(out, "--out")
    cfg, params, step = checkpoint.load_params(workdir, step, as_numpy=True)
    record = records.read_config(workdir)
    tokenizer_dir = records.verified_tokenizer_dir(workdir, record)
    tokens = len(vocab.load_base_tokenizer(tokenizer_dir))
    if tokens != cfg.vocab_size:
        raise ExportError(
            f"{tokenizer_dir} has {tokens} tokens but the run's model has {cfg.vocab_size}; the workdir is inconsistent"
        )
    convert.save_hf(cfg, params, out)
    # The tokenizer files are copied, not re-serialised, so the export tokenizes exactly
    # as the run did.
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    provenance = {"workdir": str(workdir.resolve()), "step": step, "model_source": record["model_source"],
                  "source_hash": record["source_hash"], "vocab": record["vocab"]}
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return step


def run(cfg: ExportConfig) -> str:
    if not (cfg.workdir and cfg.out):
        raise FlagError("--workdir and --out are both required: the run to export and a new or empty directory")
    step = export(cfg.workdir, cfg.out, cfg.step)
    return f"exported step {step} of {cfg.workdir} to {cfg.out}"


if __name__ == "__main__":
    launcher.launch(ExportConfig, run, __doc__)
