"""A finished or running workdir as the later tools read it: its record, its tables, its model.

Everything after training (analysis, generation, export, Phases 2 and 3) starts from a
workdir. This module reads one: `run_record` checks the config.json fields the loaders
need, `load_table` / `load_params` rebuild the trained table or the whole model from the
checkpoint plus the frozen source, and `recorded_phase1_tables` returns the Phase 1 table
a Phase 2 or 3 run was built on, verified by the sha256 its record holds. It sits above
wake2vec.training.checkpoint (which only saves and restores steps) so that neither the checkpoint
nor the phases import each other.
"""

from __future__ import annotations

import hashlib
import pathlib

import jax.numpy as jnp
import numpy as np

from wake2vec.models import convert
from wake2vec.models import padding
from wake2vec.training import workdir as records
from wake2vec.training.checkpoint import CheckpointError, load_trainable
from wake2vec.config import ModelConfig
from wake2vec.models.lora_spec import LoraSpec


def run_record(workdir) -> dict:
    """The run's config.json, with the fields the loaders need checked."""
    workdir = pathlib.Path(workdir)
    record = records.read_config(workdir)
    if record is None:
        raise CheckpointError(f"{workdir / records.CONFIG} not found: is {workdir} a wake2vec training workdir?")
    if "tie_word_embeddings" not in record.get("model", {}) and "tie_embeddings" not in record.get("flags", {}):
        raise CheckpointError(f"{workdir / records.CONFIG} has no model.tie_word_embeddings; it was not written by a training run")
    for path in (("vocab", "total"), ("model_source",), ("source_hash",)):
        node = record
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise CheckpointError(
                    f"{workdir / records.CONFIG} has no {'.'.join(path)}; it was not written by a training run"
                )
            node = node[key]
    return record


def load_table(workdir, step: int | None = None) -> tuple[np.ndarray, int]:
    """(trained input table (V, D) float32, step), V = the run's real vocabulary size.

    The stored table may have padding rows (the vocabulary is padded to shard evenly);
    they are no tokens and are cut off here.
    """
    record = run_record(workdir)
    if record.get("phase") == 2:
        raise CheckpointError(
            f"{workdir} is a Phase 2 run: it trains adapters over its Phase 1 table, which it leaves unchanged (verified "
            f"in analysis/phase2.json); analyse the table of {record['phase1']['workdir']} (step {record['phase1']['step']})")
    total = int(record["vocab"]["total"])
    trainable, step = load_trainable(workdir, step)
    table = trainable["embedding"]
    if table.shape[0] < total:
        raise CheckpointError(f"step {step}: the table has {table.shape[0]} rows but config.json says {total} tokens")
    return np.asarray(padding.unpad_table(table, total), np.float32), step


def is_tied(record: dict) -> bool:
    """Whether the run's table is its head: the model record's tying (every phase writes it),
    or Phase 1's flag in records written before the model record held it."""
    model = record.get("model", {})
    return bool(model["tie_word_embeddings"] if "tie_word_embeddings" in model else record["flags"]["tie_embeddings"])


def lora_spec(record: dict):
    """The run's adapter settings (a LoraSpec), or None for a Phase 1 run."""
    if "lora" not in record:
        return None
    fields = record["lora"]
    return LoraSpec(tuple(fields["targets"]), int(fields["rank"]), float(fields["alpha"]), float(fields["dropout"]))


def load_params(workdir, step: int | None = None, *, as_numpy: bool = False,
                body_dtype=jnp.float32) -> tuple[ModelConfig, dict, int]:
    """(cfg, params, step) of the trained model: the source body with the trained table(s).

    The frozen body is read (in `body_dtype`) from the run's model source, refused if its
    content hash differs from the one the run started with; the trained rows stay float32.
    cfg is the source's with the grown vocabulary and the run's tying; when tied, the
    source's own lm_head is dropped (the table is the head). `as_numpy` keeps host arrays,
    as convert.load_hf does. A Phase 2 or 3 run adds its adapters as params["lora"] (apply
    them with `lora_spec(record)`); a Phase 2 run's table is its Phase 1 checkpoint's.
    """
    record = run_record(workdir)
    source = pathlib.Path(record["model_source"])
    if not source.exists():
        raise CheckpointError(
            f"the run's model source {source} (config.json model_source) is missing; the frozen body is "
            "read from it, so restore it at that path"
        )
    digest = convert.source_hash(source)
    if digest != record["source_hash"]:
        raise CheckpointError(
            f"the model source {source} changed since the run started: its content hash was "
            f"{record['source_hash'][:16]}..., it is now {digest[:16]}...; the trained table belongs to the old "
            "weights, so restore them"
        )
    trainable, step = load_trainable(workdir, step)
    total = int(record["vocab"]["total"])
    tied = is_tied(record)
    adapters = trainable.pop("lora", None)
    if record.get("phase") == 2 or (record.get("phase") == 3 and not tied):
        # Phase 2 keeps Phase 1's table and head; Phase 3 trains the table and keeps an untied head.
        tables = recorded_phase1_tables(record)
        trainable = {**tables, **trainable}
    source_cfg, params = convert.load_hf(str(source), dtype=body_dtype, as_numpy=True)
    params.pop("lm_head", None)
    if not tied:
        if "lm_head" not in trainable:
            raise CheckpointError(f"config.json says the run is untied, but step {step} holds no trained lm_head")
    else:
        trainable.pop("lm_head", None)
    params.update(padding.unpad(trainable, total))
    if adapters is not None:
        params["lora"] = adapters
    cfg = source_cfg.replace(vocab_size=total, tie_word_embeddings=tied)
    if not as_numpy:
        params = convert.to_device(params)
    return cfg, params, step


def table_sha256(tables: dict) -> str:
    """One digest over the table and an untied head (float32 bytes, row-major): the identity
    of a frozen table that the analysis checks at the end."""
    digest = hashlib.sha256()
    for key in ("embedding", "lm_head"):
        if key in tables:
            leaf = tables[key] if key == "embedding" else tables[key]["kernel"]
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return digest.hexdigest()


def phase1_tables(phase1: pathlib.Path, step: int, total: int, tied: bool) -> dict:
    """The Phase 1 table (and an untied head) of `step`, padding rows cut."""
    trainable, _ = load_trainable(phase1, step)
    tables = padding.unpad(trainable, total)
    if tied:
        tables.pop("lm_head", None)
    elif "lm_head" not in tables:
        raise CheckpointError(f"{phase1}: the run is untied, but step {step} holds no trained lm_head")
    return {k: np.asarray(v, np.float32) if k == "embedding" else {"kernel": np.asarray(v["kernel"], np.float32)}
            for k, v in tables.items()}


def recorded_phase1_tables(record: dict) -> dict:
    """The Phase 1 table (and an untied head) a Phase 2 or 3 run's record names, checked
    against the sha256 that record holds: a rewritten Phase 1 checkpoint is refused."""
    phase1, step = pathlib.Path(record["phase1"]["workdir"]), int(record["phase1"]["step"])
    tables = phase1_tables(phase1, step, int(record["vocab"]["total"]), is_tied(record))
    if table_sha256(tables) != record["phase1_table_sha256"]:
        raise CheckpointError(f"the Phase 1 checkpoint {phase1} step {step} no longer holds the table this run started "
                              "from; restore it")
    return tables
