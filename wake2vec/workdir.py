"""What a run leaves in its workdir, besides checkpoints: its record.

* `config.json`: every flag, library versions, the sources and their hashes, vocab and data
  figures. On a rerun it is the reference the new invocation is compared with
  (`config_differences`), so a resumed run cannot silently train under other settings.
* `metrics.jsonl`: one JSON object per log or eval event, appended and flushed as they
  happen, so a crash loses nothing already logged. A resumed run first drops the events
  after its checkpoint (`truncate_metrics`): they are re-logged identically.
* `loss_table.md` and `loss_curve.png`: the study's report, derived from metrics.jsonl.

Every file is written to a temporary name and renamed, so a kill never leaves half a file,
and by process 0 only (`hosts.writer_only`): the other processes of a multi-host run write
nothing here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import sys
from typing import Any, Iterable

from wake2vec import hosts
from wake2vec.config import TrainConfig
from wake2vec.errors import UserError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LOSS_TABLE = "loss_table.md"
LOSS_CURVE = "loss_curve.png"

# Flags that change what a run reports or how it is launched, not what it computes.
NON_SEMANTIC_FLAGS = frozenset({"workdir", "analyze", "generate_at_end", "allow_config_change", "distributed",
                                "coordinator_address", "num_processes", "process_id"})


class ConfigMismatchError(UserError, ValueError):
    """A rerun on an existing workdir asks for different settings."""


@hosts.writer_only
def atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@hosts.writer_only
def atomic_save_npy(path: pathlib.Path, array) -> None:
    """np.save to a per-process temporary name, then rename: readers never see half a file."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    import flax
    import jax
    import numpy
    import optax
    import orbax.checkpoint
    import transformers

    import wake2vec

    return {
        "python": platform.python_version(),
        "wake2vec": wake2vec.__version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "orbax-checkpoint": orbax.checkpoint.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }


def read_config(workdir: pathlib.Path) -> dict | None:
    path = workdir / CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigMismatchError(f"{path} is not valid JSON ({e}); restore it or use a fresh --workdir") from e


def write_config(workdir: pathlib.Path, record: dict) -> None:
    atomic_write_text(workdir / CONFIG, json.dumps(record, indent=2, sort_keys=True, allow_nan=False) + "\n")


def config_differences(stored_flags: dict, cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """{flag: (stored, requested)} for every semantic flag that differs."""
    requested = dataclasses.asdict(cfg)
    return {
        name: (stored_flags.get(name), value)
        for name, value in requested.items()
        if name not in NON_SEMANTIC_FLAGS and stored_flags.get(name) != value
    }


def describe_differences(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"--{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(diffs.items()))


def command_line() -> str:
    return " ".join(sys.argv)


# ---------------------------------------------------------------------------- metrics


@hosts.writer_only
def append_metrics(workdir: pathlib.Path, event: dict) -> None:
    with open(workdir / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps(event, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / METRICS
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is unreliable
    return events


def truncate_metrics(workdir: pathlib.Path, last_step: int) -> None:
    """Keeps only events at steps <= last_step (a resume re-logs the rest identically)."""
    kept = [e for e in read_metrics(workdir) if e["step"] <= last_step]
    atomic_write_text(workdir / METRICS, "".join(json.dumps(e, allow_nan=False) + "\n" for e in kept))


def loss_rows(events: Iterable[dict]) -> list[tuple[int, float | None, float]]:
    """(step, training loss logged at that step or None, validation loss) per eval event."""
    events = list(events)
    train_at = {e["step"]: e["train_loss"] for e in events if "train_loss" in e}
    return [(e["step"], train_at.get(e["step"]), e["val_loss"]) for e in events if "val_loss" in e]


def write_loss_table(workdir: pathlib.Path, events: Iterable[dict]) -> None:
    """`| Step | Training Loss | Validation Loss |` at each eval, as the study reports it."""
    lines = ["| Step | Training Loss | Validation Loss |", "|:--|:--|:--|"]
    for step, train_loss, val_loss in loss_rows(events):
        shown = "" if train_loss is None else f"{train_loss:.4f}"
        lines.append(f"| {step} | {shown} | {val_loss:.4f} |")
    atomic_write_text(workdir / LOSS_TABLE, "\n".join(lines) + "\n")


@hosts.writer_only
def write_loss_curve(workdir: pathlib.Path, events: Iterable[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = list(events)
    train = [(e["step"], e["train_loss"]) for e in events if "train_loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss (mean since previous log)", color="tab:blue")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", color="tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Phase 1: embedding-only training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = workdir / (LOSS_CURVE + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, workdir / LOSS_CURVE)
