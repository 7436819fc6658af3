"""Everything a Phase 1 run does before step 0, cheap checks first.

Order matters to a user on a rented GPU: every check that can fail on bad input (flag
values, paths, encodings, lexicon, tokenizer vs model size, seq_len vs positions, a
changed config or source on an existing workdir) runs before the weights are read or the
corpus is tokenized, so a mistake costs seconds, not a model load.

The result is a `PreparedRun`: the grown model config, host arrays split into the
trainable rows and the frozen body, the blocks, and the record written to config.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import pathlib

import numpy as np

from wake2vec import convert, data, demo, hosts, vocab, workdir as records
from wake2vec.config import DEMO_SOURCE, ModelConfig, TrainConfig, dtype_from_name
from wake2vec.errors import UserError
from wake2vec.model import REMAT_POLICIES

EMBEDDINGS_PRE = "embeddings_pre.npy"


class SourceChangedError(UserError, ValueError):
    """The frozen body, corpus or lexicon differs from what the workdir's run started with."""


@dataclasses.dataclass
class PreparedRun:
    model_cfg: ModelConfig  # vocabulary grown, tying as --tie_embeddings says
    trainable: dict  # host float32: {"embedding": (V, D)} and, untied, {"lm_head": {"kernel": (D, V)}}
    frozen: dict  # host arrays in --frozen_dtype
    tokenizer: object
    vocab_stats: vocab.VocabStats
    corpus_stats: data.CorpusStats
    train_blocks: np.ndarray
    val_blocks: np.ndarray
    record: dict  # what config.json holds


def validate_flags(cfg: TrainConfig) -> None:
    """Rejects impossible flag values with the flag's name, before anything is loaded."""
    choices = {
        "optimizer": ("adafactor", "adamw"),
        "schedule": ("cosine", "linear", "constant"),
        "init": vocab.INIT_METHODS,
        "remat": tuple(REMAT_POLICIES),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name}={getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")
    for name in ("frozen_dtype", "compute_dtype"):
        dtype_from_name(getattr(cfg, name))
    positive = ("seq_len", "batch_size", "grad_accum", "eval_every", "save_every", "log_every", "keep", "loss_chunk")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if cfg.max_steps < 0:
        raise ValueError(f"--max_steps={cfg.max_steps} must be >= 0 (0 prepares the workdir and exits)")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(f"--val_fraction={cfg.val_fraction} must be strictly between 0 and 1")
    if not 0.0 <= cfg.warmup_ratio < 1.0:
        raise ValueError(f"--warmup_ratio={cfg.warmup_ratio} must be in [0, 1)")
    if cfg.model != DEMO_SOURCE and not (cfg.corpus and cfg.lexicon):
        raise ValueError(
            f"--model={cfg.model!r} is a real checkpoint, so --corpus and --lexicon are required "
            "(only the embedded demo, --model=demo, brings its own text and lexicon)"
        )


def file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_against_stored(stored: dict, cfg: TrainConfig, hashes: dict[str, str]) -> list[dict]:
    """Refuses a rerun whose settings or sources differ; returns the config-change history."""
    history = list(stored.get("config_changes", []))
    diffs = records.config_differences(stored.get("flags", {}), cfg)
    if diffs:
        listing = records.describe_differences(diffs)
        if not cfg.allow_config_change:
            raise records.ConfigMismatchError(
                f"{cfg.workdir} holds a run with other settings: {listing}. Rerun with the stored flags "
                "(see config.json), choose a fresh --workdir, or pass --allow_config_change to accept them"
            )
        logging.warning("accepting changed settings (--allow_config_change): %s", listing)
        history.append({"at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "changes": {k: [old, new] for k, (old, new) in diffs.items()}})
    for name, digest in hashes.items():
        before = stored.get(name)
        if before and before != digest:
            raise SourceChangedError(
                f"{name} changed since this run started: it was {before[:16]}..., it is now {digest[:16]}... "
                f"A resumed run must read the same {name.replace('_hash', '')} it started with; restore it or use a fresh --workdir"
            )
    return history


def _grow(table: np.ndarray, stats: vocab.VocabStats, cfg: TrainConfig, seed: int, piece_ids) -> np.ndarray:
    return vocab.grow_table(
        table, stats.added, cfg.init, seed=seed, noise_scale=cfg.init_noise_scale,
        sphere_factor=cfg.init_sphere_factor, hewitt_eps=cfg.init_hewitt_eps, piece_ids=piece_ids,
    )


def prepare(cfg: TrainConfig) -> PreparedRun:
    validate_flags(cfg)
    workdir = pathlib.Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    corpus_path, lexicon_path, model_spec = cfg.corpus, cfg.lexicon, cfg.model
    if cfg.model == DEMO_SOURCE:
        sources = hosts.writer_first(demo.build_sources, workdir, cfg.seed)
        model_spec = str(sources.model_dir)
        corpus_path = corpus_path or str(sources.corpus)
        lexicon_path = lexicon_path or str(sources.lexicon)

    model_dir = convert.resolve_checkpoint(model_spec)
    source_cfg = convert.read_config(model_dir)
    tokenizer_path = cfg.tokenizer or str(model_dir)
    tokenizer = vocab.load_base_tokenizer(tokenizer_path)
    vocab.check_tokenizer_matches_model(len(tokenizer), source_cfg.vocab_size, tokenizer_source=tokenizer_path, model_source=model_spec)
    data.check_seq_len(cfg.seq_len, source_cfg.max_position_embeddings, model_spec)
    words = vocab.load_lexicon(lexicon_path)
    text = data.read_corpus(corpus_path, strip_banners=cfg.strip_banners, start_marker=cfg.start_marker)

    hashes = {
        "source_hash": convert.source_hash(model_dir),
        "corpus_hash": file_sha256(pathlib.Path(corpus_path)),
        "lexicon_hash": file_sha256(pathlib.Path(lexicon_path)),
    }
    stored = records.read_config(workdir)
    hosts.barrier("config read")  # before the writer rewrites it: every process compares with the same record
    history = _check_against_stored(stored, cfg, hashes) if stored else []

    vocab_stats = vocab.augment_tokenizer(tokenizer, words)
    ids = data.tokenize_corpus(tokenizer, text, cache_dir=workdir)
    blocks = data.make_blocks(ids, cfg.seq_len)
    train_blocks, val_blocks = data.split_blocks(blocks, cfg.val_fraction, cfg.split_shuffle_seed)
    corpus_stats = data.CorpusStats(len(ids), len(train_blocks), len(val_blocks), cfg.seq_len)
    hosts.writer_only(vocab.save_tokenizer)(tokenizer, workdir)

    logging.info("reading %s (frozen body as %s)", model_dir, cfg.frozen_dtype)
    _, params = convert.load_hf(str(model_dir), dtype=dtype_from_name(cfg.frozen_dtype), as_numpy=True)
    piece_ids = None
    if cfg.init == "subword_mean":
        piece_ids = vocab.subword_piece_ids(vocab.load_base_tokenizer(tokenizer_path), vocab.added_words(tokenizer, vocab_stats.base_size))
    table = _grow(params.pop("embedding"), vocab_stats, cfg, cfg.seed, piece_ids)
    trainable = {"embedding": table}
    source_head = params.pop("lm_head", None)
    if cfg.tie_embeddings and source_head is not None:
        logging.warning(
            "%s ships an untied LM head; --tie_embeddings=true drops its trained head and uses the "
            "input table as the head (one unified matrix, as the reference run did)", model_spec)
    if not cfg.tie_embeddings:
        base_head = source_head["kernel"].T if source_head is not None else table[: vocab_stats.base_size]
        # A different seed, so the head's new rows are not copies of the input rows.
        trainable["lm_head"] = {"kernel": np.ascontiguousarray(_grow(base_head, vocab_stats, cfg, cfg.seed + 1, piece_ids).T)}

    if stored is None or not (workdir / EMBEDDINGS_PRE).is_file():
        records.atomic_save_npy(workdir / EMBEDDINGS_PRE, table)

    model_cfg = source_cfg.replace(vocab_size=vocab_stats.total, tie_word_embeddings=cfg.tie_embeddings)
    record = {
        **(stored or {}),
        "flags": dataclasses.asdict(cfg),
        "command": records.command_line(),
        "versions": records.library_versions(),
        "model_spec": cfg.model,
        "model_source": str(model_dir.resolve()),
        "tokenizer_source": str(pathlib.Path(tokenizer_path).resolve()),
        "corpus": str(pathlib.Path(corpus_path).resolve()),
        "lexicon": str(pathlib.Path(lexicon_path).resolve()),
        **hashes,
        "model": dataclasses.asdict(model_cfg),
        "vocab": vocab_stats.as_dict(),
        "data": corpus_stats.as_dict(),
        "config_changes": history,
    }
    records.write_config(workdir, record)
    return PreparedRun(model_cfg, trainable, params, tokenizer, vocab_stats, corpus_stats, train_blocks, val_blocks, record)
