"""Exports a trained run as a HuggingFace model directory that transformers loads as is.

    python -m experiments.export_hf --workdir=W --out=DIR [--step=N]

DIR gets the run's source model with the trained table merged in (and the trained head,
when the run was untied), a config.json with the grown vocabulary and the run's tying,
the augmented tokenizer exactly as the run saved it, and `wake2vec_export.json` saying
which run and step it came from. Then, with no wake2vec installed:

    model = transformers.AutoModelForCausalLM.from_pretrained(DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DIR)

The frozen body is read from the run's model source and refused if its content hash
changed since training (the trained rows belong to those weights). It is written in the
source's dtype (the one its config.json names, as transformers' dtype="auto" reads it;
float32 when it names none), so a bf16 TinyLlama run exports at about 2.6 GB, not 4.5 GB;
`--body_dtype=float32` writes it upcast (exactly). The trained table (and head) is written
float32, as trained, and config.json names float32 then, so `from_pretrained(DIR)` loads
the table bit for bit (and the body upcast exactly); `dtype=torch.bfloat16` there rounds
the table. config.json is the source's as it came (a list eos_token_id stays a list),
with the grown vocab_size, the run's tying and the dtype. Problems raise an exception
that says what to fix, and the process exits non-zero.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Sequence

from absl import app, flags, logging

from wake2vec import checkpoint, convert, vocab
from wake2vec.config import dtype_from_name


def define_flags() -> None:
    """Defines this launcher's flags; called only when it runs, so importing it for its
    functions (tests, other launchers) never collides with another launcher's flags."""
    flags.DEFINE_string("workdir", None, "Training workdir to export.", required=True)
    flags.DEFINE_string("out", None, "Output directory (new or empty).", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step to export; default the latest committed one.")
    flags.DEFINE_enum("body_dtype", SOURCE_DTYPE, [SOURCE_DTYPE, "float32"],
                      "Dtype of the frozen body in the export: the source's own, or float32.")


FLAGS = flags.FLAGS

PROVENANCE = "wake2vec_export.json"
SOURCE_DTYPE = "source"


class ExportError(RuntimeError):
    """The workdir or the output directory cannot make a consistent export."""


def source_dtype(source_config: dict) -> str:
    """The dtype a source's config.json names (transformers 5's "dtype", then "torch_dtype")."""
    name = source_config.get("dtype") or source_config.get("torch_dtype") or "float32"
    return name.removeprefix("torch.")


def export(workdir, out, step: int | None = None, body_dtype: str = SOURCE_DTYPE) -> int:
    """Writes the HF directory `out` from the run in `workdir`; returns the exported step."""
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out={out} is not empty; export into a new or empty directory")
    record = checkpoint.run_record(workdir)
    source_config_path = pathlib.Path(record["model_source"]) / "config.json"
    # load_params below says what to do when the source is missing.
    source_config = json.loads(source_config_path.read_text()) if source_config_path.is_file() else None
    if body_dtype == SOURCE_DTYPE:
        body_dtype = source_dtype(source_config or {})
    cfg, params, step = checkpoint.load_params(workdir, step, as_numpy=True, body_dtype=dtype_from_name(body_dtype))
    tokenizer_dir = workdir / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ExportError(f"{tokenizer_dir} holds no tokenizer.json; the training run writes it before step 0")
    tokens = len(vocab.load_base_tokenizer(tokenizer_dir))
    if tokens != cfg.vocab_size:
        raise ExportError(
            f"{tokenizer_dir} has {tokens} tokens but the run's model has {cfg.vocab_size}; the workdir is inconsistent"
        )
    convert.save_hf(cfg, params, out, source_config=source_config)
    # The tokenizer files are copied, not re-serialised, so the export tokenizes exactly
    # as the run did.
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)
    provenance = {"workdir": str(workdir.resolve()), "step": step, "model_source": record["model_source"],
                  "source_hash": record["source_hash"], "vocab": record["vocab"], "body_dtype": body_dtype}
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return step


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    step = export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.body_dtype)
    logging.info("exported step %d of %s to %s", step, FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
