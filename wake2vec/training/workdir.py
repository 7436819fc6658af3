"""What a run leaves in its workdir, besides checkpoints: its record.

* `config.json`: every flag, library versions, the sources and their hashes, vocab and data
  figures. On a rerun it is the reference the new invocation is compared with
  (`config_differences`), so a resumed run cannot silently train under other settings.
* `metrics.jsonl`: one JSON object per log or eval event, appended and flushed as they
  happen, so a crash loses nothing already logged. Each line ends with a CRC-32 of the
  event, so a garbled line is found and skipped (never the lines after it). Every start
  first drops the events after its checkpoint (`truncate_metrics`): they are re-logged
  identically, so a restart never duplicates one.
* `loss_table.md` and `loss_curve.png`: the study's report, derived from metrics.jsonl.

Every file is written to a temporary name and renamed, so a kill never leaves half a file;
derived arrays are checked against the sha256 recorded in config.json when read
(`verified_npy`). Files are written by process 0 only (`hosts.writer_only`): the other
processes of a multi-host run write nothing here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import platform
import sys
import zlib
from typing import Any, Iterable

from wake2vec.training import hosts
from wake2vec.config import TrainConfig
from wake2vec.errors import UserError

CONFIG = "config.json"
HASH_CACHE = "hash_cache.json"
METRICS = "metrics.jsonl"
LOSS_TABLE = "loss_table.md"
LOSS_CURVE = "loss_curve.png"

# Flags that change what a run reports or how it is launched, not what it computes.
# extend_schedule acts once, on the rerun that changes --max_steps; its effect is recorded
# in config.json's schedule_starts.
NON_SEMANTIC_FLAGS = frozenset({"workdir", "analyze", "generate_at_end", "allow_config_change", "distributed", "extend_schedule",
                                "coordinator_address", "num_processes", "process_id", "coordinator_timeout_s",
                                "heartbeat_timeout_s"})


class ConfigMismatchError(UserError, ValueError):
    """A rerun on an existing workdir asks for different settings."""


class OutputDirError(UserError, OSError):
    """A directory a command must write into cannot be created or written."""


def open_lock(workdir: pathlib.Path):
    """Creates workdir and opens its .lock for writing, or says the workdir is not writable."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        return open(workdir / ".lock", "w")
    except OSError as e:
        raise OutputDirError(f"cannot write to {workdir} ({e.strerror}); pass a writable --workdir") from e


class DerivedFileError(UserError, ValueError):
    """A file the run derived (embeddings_pre.npy, the tokenizer) is missing or no longer matches its hash."""


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


@hosts.writer_only
def atomic_save_npz(path: pathlib.Path, **arrays) -> None:
    """np.savez, as atomic_save_npy: a crash leaves the previous file whole."""
    import numpy as np

    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class _Sha256Sink:
    """A write-only file object that hashes what is written to it."""

    def __init__(self):
        self.digest = hashlib.sha256()

    def write(self, data) -> int:
        self.digest.update(data)
        return len(data)


def npy_sha256(array) -> str:
    """The sha256 of the file np.save(path, array) writes, computed without writing it.

    Every process of a multi-host run can so know a file's hash while only the writer writes
    it: no process reads a file another one may still be writing.
    """
    import numpy as np

    sink = _Sha256Sink()
    np.save(sink, array)
    return sink.digest.hexdigest()


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cached_digest(workdir: pathlib.Path, name: str, files: list[pathlib.Path], compute) -> str:
    """`compute()`, a content hash over `files`, unless this workdir hashed the same files
    (path, size, mtime) before: a resumed TinyLlama run then skips re-reading 2.2 GB.

    The cache trusts file metadata, which a rewrite changes; exports, which write the
    body out, hash in full (runs.load_params). A cache that does not parse is
    ignored and rewritten: it only ever saves time.
    """
    cache_path = workdir / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    key = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    entry = cache.get(name) if isinstance(cache, dict) else None
    if isinstance(entry, dict) and entry.get("files") == key and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = compute()
    cache = cache if isinstance(cache, dict) else {}
    cache[name] = {"files": key, "sha256": digest}
    atomic_write_text(cache_path, json.dumps(cache, indent=1) + "\n")
    return digest


def writable_dir(directory: pathlib.Path, flag: str) -> pathlib.Path:
    """Creates `directory` and proves it writable (a probe file), before any work is done,
    so a read-only or mistyped output path is one line naming `flag`, not a late traceback."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OutputDirError(f"cannot write to {directory} ({e.strerror}); pass a writable {flag}") from None
    return directory


def array_sha256(array) -> str:
    """sha256 over an array's dtype, shape and bytes (C order)."""
    import numpy as np

    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


TOKENIZER_DIR = "tokenizer"


def verified_tokenizer_dir(workdir: pathlib.Path, record: dict) -> pathlib.Path:
    """workdir/tokenizer, after checking its tokenizer.json against config.json's tokenizer_sha256.

    Runs recorded before the hash existed are read unchecked.
    """
    directory = workdir / TOKENIZER_DIR
    remedy = "rerun the training command on this workdir (it rewrites the tokenizer), or use the run's backup"
    if not (directory / "tokenizer.json").is_file():
        raise DerivedFileError(f"{directory} holds no tokenizer.json; {remedy}")
    expected = record.get("tokenizer_sha256")
    if expected is not None and file_sha256(directory / "tokenizer.json") != expected:
        raise DerivedFileError(f"{directory / 'tokenizer.json'} does not match the sha256 recorded in {CONFIG}; {remedy}")
    return directory


def verified_npy(path: pathlib.Path, expected_sha256: str | None, remedy: str):
    """np.load of a derived array after checking its file against the hash its writer recorded."""
    import numpy as np

    if not path.is_file():
        raise DerivedFileError(f"{path} is missing; {remedy}")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise DerivedFileError(f"{path} does not match the sha256 recorded in {CONFIG} (it was changed or damaged); {remedy}")
    try:
        return np.load(path)
    except (OSError, ValueError) as e:
        raise DerivedFileError(f"{path} cannot be read ({e}); {remedy}") from None


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
    """{flag: (stored, requested)} for every semantic flag that differs.

    A flag the record predates (added to wake2vec after the run started) is not compared:
    the record cannot say what it was, and refusing would strand every older run.
    """
    requested = dataclasses.asdict(cfg)
    return {
        name: (stored_flags[name], value)
        for name, value in requested.items()
        if name not in NON_SEMANTIC_FLAGS and name in stored_flags and stored_flags[name] != value
    }


def describe_differences(diffs: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"--{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(diffs.items()))


def command_line() -> str:
    return " ".join(sys.argv)


# ---------------------------------------------------------------------------- metrics


CRC_KEY = "crc32"


def _metrics_line(event: dict) -> str:
    """The event as JSON with a CRC-32 of its own serialisation as the last key."""
    payload = json.dumps(event, allow_nan=False)
    return f'{payload[:-1]}, "{CRC_KEY}": "{zlib.crc32(payload.encode()):08x}"}}\n'


def _parse_metrics_line(line: str) -> dict | None:
    """The event of a line, or None when it is torn or garbled (its CRC, if any, disagrees)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("step"), int):
        return None
    crc = event.pop(CRC_KEY, None)
    if crc is not None and crc != f"{zlib.crc32(json.dumps(event, allow_nan=False).encode()):08x}":
        return None
    return event


@hosts.writer_only
def append_metrics(workdir: pathlib.Path, event: dict) -> None:
    with open(workdir / METRICS, "a", encoding="utf-8") as f:
        f.write(_metrics_line(event))
        f.flush()
        os.fsync(f.fileno())


def read_metrics(workdir: pathlib.Path) -> list[dict]:
    """Every intact event, in order. A damaged line is skipped, never what follows it: a
    kill can only tear the last line (dropped quietly), and a line garbled later costs
    that one event, with a warning."""
    path = workdir / METRICS
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    events = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        event = _parse_metrics_line(line)
        if event is not None:
            events.append(event)
        elif number < len(lines):
            logging.warning("%s line %d is damaged; skipped (the events after it are kept)", path, number)
    return events


def truncate_metrics(workdir: pathlib.Path, last_step: int) -> None:
    """Keeps only intact events at steps <= last_step: the run resumes there and re-logs
    the rest identically, so a restart never duplicates an event."""
    if not (workdir / METRICS).is_file():
        return
    kept = [e for e in read_metrics(workdir) if e["step"] <= last_step]
    atomic_write_text(workdir / METRICS, "".join(_metrics_line(e) for e in kept))


def loss_rows(events: Iterable[dict]) -> list[tuple[int, float | None, float]]:
    """(step, training loss logged at that step or None, validation loss) per eval event."""
    events = list(events)
    train_at = {e["step"]: e["train_loss"] for e in events if "train_loss" in e}
    return [(e["step"], train_at.get(e["step"]), e["val_loss"]) for e in events if "val_loss" in e]


# Validation loss by target type (wake2vec.training.train.EVAL_CATEGORIES): metrics.jsonl key suffix,
# loss-table header and curve label.
VAL_BY_TYPE = (
    ("new", "Val: new tokens (n)", "validation, targets new tokens"),
    ("base", "Val: base tokens (n)", "validation, targets base tokens"),
    ("resegmented", "Val: re-segmented (n)", "validation, base tokens in re-segmented words"),
    ("wake_windows", "Val: windows with Wake tokens (n)", "validation, windows holding a new token"),
    ("plain_windows", "Val: windows without (n)", "validation, windows without a new token"),
    ("new_seen", "Val: new, seen in training (n)", "validation, new tokens that occur in training"),
    ("new_unseen", "Val: new, never in training (n)", "validation, new tokens no training block holds"),
)


def val_loss_fields(categories: Iterable[str], sums, counts) -> dict:
    """The eval event's fields: `val_loss` / `val_tokens` for "all", `val_loss_<c>` /
    `val_tokens_<c>` for each other category; a mean over no token is None (JSON null)."""
    fields = {}
    for category, total, count in zip(categories, sums, counts):
        suffix = "" if category == "all" else f"_{category}"
        fields[f"val_loss{suffix}"] = float(total / count) if count else None
        fields[f"val_tokens{suffix}"] = int(count)
    return fields


def _by_type_cell(event: dict, category: str) -> str:
    if f"val_tokens_{category}" not in event:  # logged before the split existed
        return ""
    loss = event[f"val_loss_{category}"]
    return f"{'–' if loss is None else f'{loss:.4f}'} ({event[f'val_tokens_{category}']:,})"


# Against the base model (wake2vec.phases.base_cost), Phase 1 only: loss-table header, then the
# metrics.jsonl fields of the run's figure and the base's.
VAL_VS_BASE = (
    ("Val nats/char (base; Δ)", "val_nats_per_char", "base_nats_per_char"),
    ("Val bits/byte (base; Δ)", "val_bits_per_byte", "base_bits_per_byte"),
    ("Wake word nats, seen (base; n)", "val_word_nats_seen", "base_word_nats_seen"),
    ("Wake word nats, unseen (base; n)", "val_word_nats_unseen", "base_word_nats_unseen"),
)


def _vs_base_cell(event: dict, run_key: str, base_key: str) -> str:
    if run_key not in event:  # another phase, or logged before the figure existed
        return ""
    run, base = event[run_key], event[base_key]
    if run is None:  # no such word in the validation blocks
        return "–"
    if "word" in run_key:
        return f"{run:.4f} ({base:.4f}; {event[run_key.replace('val_word_nats', 'word_occurrences')]:,})"
    return f"{run:.4f} ({base:.4f}; Δ {run - base:+.4f})"  # the headline: negative, the run reads the Wake better


def write_loss_table(workdir: pathlib.Path, events: Iterable[dict]) -> None:
    """`| Step | Training Loss | Validation Loss |` at each eval, as the study reports it,
    then the validation loss by target type with its token count, then the run against the
    base model per character and per Wake word."""
    events = list(events)
    by_step = {e["step"]: e for e in events if "val_loss" in e}
    headers = [h for _, h, _ in VAL_BY_TYPE] + [h for h, _, _ in VAL_VS_BASE]
    header = " | ".join(["Step", "Training Loss", "Validation Loss"] + headers)
    lines = [f"| {header} |", "|:--" * (3 + len(headers)) + "|"]
    for step, train_loss, val_loss in loss_rows(events):
        shown = "" if train_loss is None else f"{train_loss:.4f}"
        cells = [_by_type_cell(by_step[step], c) for c, _, _ in VAL_BY_TYPE]
        cells += [_vs_base_cell(by_step[step], run, base) for _, run, base in VAL_VS_BASE]
        lines.append(f"| {step} | {shown} | {val_loss:.4f} | " + " | ".join(cells) + " |")
    atomic_write_text(workdir / LOSS_TABLE, "\n".join(lines) + "\n")


@hosts.writer_only
def write_loss_curve(workdir: pathlib.Path, events: Iterable[dict], title: str = "Phase 1: embedding-only training") -> None:
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
    colors = ("tab:purple", "tab:green", "tab:orange", "tab:brown", "tab:gray", "tab:olive", "tab:cyan")
    for (category, _, label), color in zip(VAL_BY_TYPE, colors):
        points = [(e["step"], e[f"val_loss_{category}"]) for e in events if e.get(f"val_loss_{category}") is not None]
        if points:
            ax.plot(*zip(*points), "--", marker=".", label=label, color=color)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = workdir / (LOSS_CURVE + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, workdir / LOSS_CURVE)
