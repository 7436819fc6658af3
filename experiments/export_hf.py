"""Exports a trained run as a HuggingFace model directory that transformers loads as is.

    python -m experiments.export_hf --workdir=W --out=DIR [--step=N]

DIR gets the run's source model with the trained table merged in (and the trained head,
when the run was untied), a config.json with the grown vocabulary and the run's tying,
the augmented tokenizer exactly as the run saved it, and `wake2vec_export.json` saying
which run and step it came from. Then, with no wake2vec installed:

    model = transformers.AutoModelForCausalLM.from_pretrained(DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DIR)

The frozen body is read from the run's model source and refused if its content hash
changed since training (the trained rows belong to those weights); it is written in
float32, which holds bf16 / fp16 sources exactly. Problems raise an exception that says
what to fix, and the process exits non-zero.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Sequence

from absl import app, flags, logging

from wake2vec import checkpoint, convert, vocab


def define_flags() -> None:
    """Defines this launcher's flags; called only when it runs, so importing it for its
    functions (tests, other launchers) never collides with another launcher's flags."""
    flags.DEFINE_string("workdir", None, "Training workdir to export.", required=True)
    flags.DEFINE_string("out", None, "Output directory (new or empty).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest committed one.")


FLAGS = flags.FLAGS

PROVENANCE = "wake2vec_export.json"


class ExportError(RuntimeError):
    """The workdir or the output directory cannot make a consistent export."""


def export(workdir, out, step: int | None = None) -> int:
    """Writes the HF directory `out` from the run in `workdir`; returns the exported step."""
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out={out} is not empty; export into a new or empty directory")
    cfg, params, step = checkpoint.load_params(workdir, step, as_numpy=True)
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(f"{tokenizer_dir} holds no tokenizer.json; the training run writes it before step 0")
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
    record = json.loads((workdir / "config.json").read_text())
    provenance = {"workdir": str(workdir.resolve()), "step": step, "model_source": record["model_source"],
                  "source_hash": record["source_hash"], "vocab": record["vocab"]}
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return step


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    step = export(FLAGS.workdir, FLAGS.out, FLAGS.step)
    logging.info("exported step %d of %s to %s", step, FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
