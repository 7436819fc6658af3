r"""Exports a trained run as a HuggingFace model directory that transformers loads as is.

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
with the grown vocab_size, the run's tying and the dtype. Problems are one line saying
what to fix, and the process exits 1.

A Phase 2 or 3 run (LoRA adapters) exports three directories under DIR: `base/` (the
model as above, with the run's table and no adapters), `adapter/` (a PEFT adapter:
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR/adapter)`)
and `merged/` (the adapters merged into the body, loadable with transformers alone).
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
    # Dtype of the frozen body in the export: "source" (the source's own) or "float32".
    body_dtype: str = "source"


PROVENANCE = "wake2vec_export.json"
# A Phase 2 or 3 run exports three directories under --out.
BASE_DIR, ADAPTER_DIR, MERGED_DIR = "base", "adapter", "merged"
SOURCE_DTYPE = ExportConfig.body_dtype


class ExportError(UserError, RuntimeError):
    """The workdir or the output directory cannot make a consistent export."""


def source_dtype(source_config: dict) -> str:
    """The dtype a source's config.json names (transformers 5's "dtype", then "torch_dtype")."""
    name = source_config.get("dtype") or source_config.get("torch_dtype") or "float32"
    return name.removeprefix("torch.")


def export(workdir, out, step: int | None = None, body_dtype: str = SOURCE_DTYPE) -> int:
    """Writes the HF directory `out` from the run in `workdir`; returns the exported step."""
    from wake2vec.phases import runs
    from wake2vec.tokens import vocab
    from wake2vec.training import workdir as records
    from wake2vec.config import dtype_from_name

    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out={out} is not empty; export into a new or empty directory")
    records.writable_dir(out, "--out")
    record = runs.run_record(workdir)
    source_config_path = pathlib.Path(record["model_source"]) / "config.json"
    # load_params below says what to do when the source is missing.
    source_config = json.loads(source_config_path.read_text()) if source_config_path.is_file() else None
    if body_dtype == SOURCE_DTYPE:
        body_dtype = source_dtype(source_config or {})
    cfg, params, step = runs.load_params(workdir, step, as_numpy=True, body_dtype=dtype_from_name(body_dtype))
    tokenizer_dir = records.verified_tokenizer_dir(workdir, record)
    tokens = len(vocab.load_base_tokenizer(tokenizer_dir))
    if tokens != cfg.vocab_size:
        raise ExportError(
            f"{tokenizer_dir} has {tokens} tokens but the run's model has {cfg.vocab_size}; the workdir is inconsistent"
        )
    provenance = {"workdir": str(workdir.resolve()), "step": step, "model_source": record["model_source"],
                  "source_hash": record["source_hash"], "vocab": record["vocab"], "body_dtype": body_dtype}
    adapters = params.pop("lora", None)
    if adapters is None:
        _write_model(out, cfg, params, source_config, tokenizer_dir)
    else:
        from wake2vec.models import lora

        spec = runs.lora_spec(record)
        _write_model(out / BASE_DIR, cfg, params, source_config, tokenizer_dir)
        lora.export_peft(out / ADAPTER_DIR, adapters, spec, cfg, str((out / BASE_DIR).resolve()))
        _write_model(out / MERGED_DIR, cfg, lora.merge(params, adapters, spec), source_config, tokenizer_dir)
        provenance.update(phase=record["phase"], lora=record["lora"],
                          layout={BASE_DIR: "the run's table without adapters: PEFT's base model",
                                  ADAPTER_DIR: "the adapters, for PeftModel.from_pretrained(base, adapter)",
                                  MERGED_DIR: "the adapters merged into the body (W + alpha/r A B, in float32, then body_dtype)"})
    (out / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return step


def _write_model(out: pathlib.Path, cfg, params: dict, source_config: dict | None, tokenizer_dir: pathlib.Path) -> None:
    from wake2vec.models import convert

    convert.save_hf(cfg, params, out, source_config=source_config)
    # The tokenizer files are copied, not re-serialised, so the export tokenizes exactly
    # as the run did.
    for path in tokenizer_dir.iterdir():
        if path.is_file():
            shutil.copy2(path, out / path.name)


def run(cfg: ExportConfig) -> str:
    if not (cfg.workdir and cfg.out):
        raise FlagError("--workdir and --out are both required: the run to export and a new or empty directory")
    if cfg.body_dtype not in (SOURCE_DTYPE, "float32"):
        raise FlagError(f"--body_dtype={cfg.body_dtype!r}; choose {SOURCE_DTYPE!r} (the source's own dtype) or 'float32'")
    step = export(cfg.workdir, cfg.out, cfg.step, cfg.body_dtype)
    return f"exported step {step} of {cfg.workdir} to {cfg.out}"


if __name__ == "__main__":
    launcher.launch(ExportConfig, run, __doc__)
