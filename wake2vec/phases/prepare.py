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
import logging
import math
import pathlib
import shutil
import time

import numpy as np

from wake2vec.models import convert, quant
from wake2vec.training import data, hosts, loss_scale, optim, parallel, workdir as records
from wake2vec import demo
from wake2vec.phases import distill
from wake2vec.tokens import segmentation, vocab
from wake2vec.config import DEMO_SOURCE, FlagError, ModelConfig, RunConfig, TrainConfig, dtype_from_name
from wake2vec.errors import UserError
from wake2vec.models.model import REMAT_POLICIES

EMBEDDINGS_PRE = "embeddings_pre.npy"
# --init=distill's rows done so far and their hidden-state MSE (wake2vec.phases.distill.distill).
DISTILL_PROGRESS = "distill_progress.npz"


class SourceChangedError(UserError, ValueError):
    """The frozen body, corpus or lexicon differs from what the workdir's run started with."""


@dataclasses.dataclass
class PreparedRun:
    model_cfg: ModelConfig  # vocabulary grown, tying as --tie_embeddings says
    trainable: dict  # host float32: {"embedding": (V, D)} and, untied, {"lm_head": {"kernel": (D, V)}}
    frozen: dict | None  # host arrays in --frozen_dtype; None with --max_steps=0, which trains nothing
    tokenizer: object
    vocab_stats: vocab.VocabStats
    corpus_stats: data.CorpusStats
    train_blocks: np.ndarray
    val_blocks: np.ndarray
    record: dict  # what config.json holds
    # (val blocks, seq_len) bool: base-token positions inside words the injection re-segmented.
    val_resegmented: np.ndarray | None = None
    # What wake2vec.phases.base_cost reads to score the base model on the validation characters.
    base_tokenizer: object = None
    corpus_text: str | None = None
    corpus_ids: np.ndarray | None = None
    lexicon: list[str] | None = None
    source_head: dict | None = None  # the checkpoint's own untied head, {"kernel": (D, base)}, tied or not


# (flag, holds, what the flag must be): every numeric range, checked by name.
_RANGES = (
    ("seq_len", lambda v: v >= 2, "at least 2 (a block predicts seq_len - 1 tokens)"),
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("grad_accum", lambda v: v >= 1, "at least 1"),
    ("eval_every", lambda v: v >= 1, "at least 1"),
    ("save_every", lambda v: v >= 1, "at least 1"),
    ("log_every", lambda v: v >= 1, "at least 1"),
    ("keep", lambda v: v >= 1, "at least 1"),
    ("loss_chunk", lambda v: v >= 1, "at least 1"),
    ("max_steps", lambda v: v >= 0, ">= 0 (0 prepares the workdir and exits)"),
    ("eval_blocks", lambda v: v >= 0, ">= 0 (0 evaluates every validation block)"),
    ("snapshot_every", lambda v: v >= 0, ">= 0 (0 disables snapshots)"),
    ("early_stop_patience", lambda v: v >= 0, ">= 0 (0 never stops early)"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("weight_decay", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 disables it)"),
    ("clip_norm", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 disables the clip)"),
    ("val_fraction", lambda v: 0.0 < v < 1.0, "strictly between 0 and 1"),
    ("warmup_ratio", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    ("init_noise_scale", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    ("init_sphere_factor", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("init_hewitt_eps", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("distill_contexts", lambda v: v >= 1, "at least 1"),
    ("distill_steps", lambda v: v >= 0, ">= 0 (0 keeps the subword_mean rows)"),
    ("distill_lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("distill_batch", lambda v: v >= 1, "at least 1"),
    # Phase 2's adapters
    ("lora_rank", lambda v: v >= 1, "at least 1"),
    ("lora_alpha", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("lora_dropout", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    # Phase 3's alignment terms and Wake rows
    *((name, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0 leaves the term out)")
      for name in ("lambda_morph", "lambda_device", "lambda_rep", "lambda_norm")),
    ("wake_lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("min_group_pairs", lambda v: v >= 1, "at least 1"),
)


def validate_run_flags(cfg: RunConfig) -> None:
    """Rejects impossible values of the flags a phase's config declares, with the flag's name.

    The checks are one table for every phase: each applies to the configs that have its
    field. The mesh is checked here too (it needs only the device count), so a run that
    cannot start never leaves a config.json that a corrected command would be compared with.
    """
    if not cfg.workdir.strip():
        raise FlagError("--workdir is empty; name the run directory, e.g. --workdir=runs/demo")
    choices = {
        "optimizer": tuple(optim.OPTIMIZERS),
        "schedule": tuple(optim.SCHEDULES),
        "init": vocab.INIT_METHODS + ("distill",),
        "distill_output": distill.OUTPUT_CHOICES,
        "injection": vocab.INJECTION_MODES,
        "remat": tuple(REMAT_POLICIES),
        "extend_schedule": ("",) + optim.EXTENSIONS,
        "loss_scale": loss_scale.CHOICES,
    }
    for name, allowed in choices.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in allowed:
            raise FlagError(f"--{name}={getattr(cfg, name)!r}; choose one of {', '.join(allowed)}")
    for name in ("frozen_dtype", "compute_dtype"):
        if name == "frozen_dtype" and cfg.frozen_dtype in quant.FORMATS:
            continue  # a weight-only quantized body (wake2vec.models.quant)
        try:
            dtype_from_name(getattr(cfg, name))
        except ValueError as e:
            formats = f", or a quantized body: {', '.join(quant.FORMATS)}" if name == "frozen_dtype" else ""
            raise FlagError(f"--{name}: {e}{formats}") from None
    for name, holds, requirement in _RANGES:
        if hasattr(cfg, name) and not holds(getattr(cfg, name)):
            raise FlagError(f"--{name}={getattr(cfg, name)} must be {requirement}")
    # Whatever --max_steps is: a --max_steps=0 run records the flags, and a mesh recorded there
    # that no device count fits would refuse the corrected command later.
    _validate_mesh(cfg)


def validate_flags(cfg: TrainConfig) -> None:
    """Phase 1's flags: the shared checks, then a model and, for a real one, its text and lexicon."""
    if not cfg.model.strip():
        raise FlagError(f"--model is empty; pass a HF hub id, a checkpoint directory, or {DEMO_SOURCE!r}")
    validate_run_flags(cfg)
    if cfg.model != DEMO_SOURCE and not (cfg.corpus and cfg.lexicon):
        raise FlagError(
            f"--model={cfg.model!r} is a real checkpoint, so --corpus and --lexicon are required "
            "(only the embedded demo, --model=demo, brings its own text and lexicon)"
        )


def _validate_mesh(cfg: RunConfig) -> None:
    import jax

    try:
        parallel.parse_mesh(cfg.mesh, jax.device_count())
    except ValueError as e:
        raise FlagError(str(e)) from None
    if cfg.batch_size % jax.device_count():
        raise FlagError(f"--batch_size={cfg.batch_size} must be a multiple of the device count ({jax.device_count()}): "
                        "the batch is split over every device; change --batch_size")


def check_against_stored(stored: dict, cfg: RunConfig, hashes: dict[str, str], workdir: pathlib.Path) -> list[dict]:
    """Refuses a rerun whose settings or sources differ; returns the config-change history."""
    from wake2vec.training import checkpoint  # Orbax: only a rerun on an existing run needs it

    steps = checkpoint.committed_steps(workdir)
    if cfg.max_steps and steps and steps[-1] > cfg.max_steps:
        raise records.ConfigMismatchError(
            f"{workdir} already holds a checkpoint at step {steps[-1]}, past --max_steps={cfg.max_steps}; "
            f"a run cannot be shortened: pass --max_steps={steps[-1]} or more, or use a fresh --workdir"
        )
    history = list(stored.get("config_changes", []))
    diffs = records.config_differences(stored.get("flags", {}), cfg)
    if stored.get("flags", {}).get("max_steps") == 0:
        # --max_steps=0 only prepared the workdir: the step count it gave is no setting.
        diffs.pop("max_steps", None)
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


def source_hashes(workdir: pathlib.Path, model_dir: pathlib.Path, corpus: pathlib.Path, lexicon: pathlib.Path) -> dict[str, str]:
    """Content hashes of the three sources, each computed once per file state (cached)."""
    return {
        "source_hash": records.cached_digest(workdir, "source", convert.source_files(model_dir),
                                             lambda: convert.source_hash(model_dir)),
        "corpus_hash": records.cached_digest(workdir, "corpus", [corpus], lambda: records.file_sha256(corpus)),
        "lexicon_hash": records.cached_digest(workdir, "lexicon", [lexicon], lambda: records.file_sha256(lexicon)),
    }


def corpus_ids(tokenizer, text: str, workdir: pathlib.Path, expected: str | None) -> np.ndarray:
    """The corpus's token ids, from the workdir's cache when it still holds what the run recorded.

    A cache whose content no longer matches config.json's corpus_tokens_sha256 is rebuilt
    with a warning: the ids are a pure function of the tokenizer and the (hash-checked) text.
    """
    ids = data.tokenize_corpus(tokenizer, text, cache_dir=workdir)
    if expected is None or records.array_sha256(ids) == expected:
        return ids
    logging.warning("the corpus token cache in %s does not match config.json (damaged?); re-tokenizing", workdir)
    # Not through the cache: on another host the writer may not have replaced it yet.
    ids = data.tokenize_corpus(tokenizer, text)
    if records.array_sha256(ids) != expected:
        raise SourceChangedError(
            f"the corpus now tokenizes to other ids than this run recorded in {workdir / records.CONFIG}; "
            "restore the corpus, lexicon and tokenizer it started with, or use a fresh --workdir"
        )
    if hosts.is_writer():
        for stale in workdir.glob("corpus_tokens_*.npy"):
            stale.unlink(missing_ok=True)
        records.atomic_save_npy(data.corpus_cache_path(workdir, tokenizer, text), ids)
    return ids


def corpus_split(cfg: TrainConfig, base_tokenizer, tokenizer, words: list[str], text: str, base_size: int,
                 cache_dir: pathlib.Path, expected_ids_sha256: str | None):
    """(ids, train blocks, validation blocks, validation re-segmented mask, segmentation report).

    A pure function of the Phase 1 flags and sources, which is what lets Phase 2 and 3 train
    and validate on exactly Phase 1's blocks: they call it with the Phase 1 run's flags.
    """
    ids = corpus_ids(tokenizer, text, cache_dir, expected_ids_sha256)
    seg_report, resegmented = segmentation.measure(base_tokenizer, tokenizer, text, words, base_size, cfg.injection)
    logging.info("segmentation (%s): %s", cfg.injection, seg_report.as_dict())
    train_blocks, val_blocks = data.split_ids(ids, cfg.seq_len, cfg.val_fraction, cfg.split_shuffle_seed)
    val_resegmented = data.split_ids(resegmented, cfg.seq_len, cfg.val_fraction, cfg.split_shuffle_seed)[1]
    return ids, train_blocks, val_blocks, val_resegmented.astype(bool), seg_report


def _embeddings_pre(workdir: pathlib.Path, table: np.ndarray, expected: str | None, resumed: bool) -> str:
    """Writes (or keeps) embeddings_pre.npy, the table before training; returns its sha256.

    A resumed run keeps the file it started with: the one matching the recorded hash, or,
    for a run recorded before hashes were, the file as it is. The grown table is a pure
    function of the hash-checked sources and the seed, so a file that no longer matches
    the recorded hash is rewritten from it, with a warning.

    Multi-host: only the writer writes, and no process reads a file the writer may be
    writing. A file that is read was there before this run started and is left as it is;
    a file that is (re)written is known by the hash of what it will hold (npy_sha256),
    which every process computes from its own copy of the table.
    """
    path = workdir / EMBEDDINGS_PRE
    if path.is_file():
        digest = records.file_sha256(path)
        if digest == expected or (expected is None and resumed):
            return digest
        if expected is not None:
            logging.warning("%s does not match the sha256 in config.json (damaged?); rewriting it", path)
    digest = records.npy_sha256(table)
    if expected is not None and digest != expected:
        raise SourceChangedError(
            f"the initial table no longer matches {path}'s recorded sha256: its sources or --init flags changed; "
            "restore them or use a fresh --workdir"
        )
    records.atomic_save_npy(path, table)
    return digest


def save_tokenizer(tokenizer, workdir: pathlib.Path) -> str:
    """Writes workdir/tokenizer/ by renaming a complete copy into place; returns tokenizer.json's sha256.

    A kill leaves the old directory or the new one, plus at most a staging or retired
    sibling that the next run clears; readers check tokenizer.json against config.json.
    """
    final = workdir / records.TOKENIZER_DIR
    staging, retired = workdir / ".tokenizer.new", workdir / ".tokenizer.old"
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    written = vocab.save_tokenizer(tokenizer, staging)
    if final.exists():
        final.rename(retired)
    written.rename(final)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(retired, ignore_errors=True)
    return records.file_sha256(final / "tokenizer.json")


def read_frozen_body(model_dir: pathlib.Path, frozen_dtype: str) -> dict:
    """The source's transformer body as host arrays in --frozen_dtype, without the table and head.

    A quantized format (int8, nf4) reads the float32 weights, then quantizes every decoder
    kernel from those exact values (wake2vec.models.quant.quantize_body).
    """
    logging.info("reading %s (frozen body as %s)", model_dir, frozen_dtype)
    quantized = frozen_dtype in quant.FORMATS
    _, params = convert.load_hf(str(model_dir), dtype=np.float32 if quantized else dtype_from_name(frozen_dtype),
                                as_numpy=True)
    params.pop("embedding")
    params.pop("lm_head", None)
    return quant.quantize_body(params, frozen_dtype) if quantized else params


def _grow(table: np.ndarray, stats: vocab.VocabStats, cfg: TrainConfig, seed: int, piece_ids) -> np.ndarray:
    return vocab.grow_table(
        table, stats.added, cfg.init, seed=seed, noise_scale=cfg.init_noise_scale,
        sphere_factor=cfg.init_sphere_factor, hewitt_eps=cfg.init_hewitt_eps, piece_ids=piece_ids,
    )


def _distilled(cfg: TrainConfig, model_cfg, frozen, base_table, base_tokenizer, tokenizer, forms, train_blocks,
               piece_ids):
    """(table, new rows) for --init=distill: subword_mean rows moved by wake2vec.phases.distill on the
    training blocks' text (never the validation blocks). The rows done so far are kept in the
    workdir's DISTILL_PROGRESS, so an interrupted preparation resumes and a resumed run reads
    them back instead of distilling again."""
    if cfg.tie_embeddings and cfg.distill_output in ("subword_mean", "first_piece"):
        raise FlagError(f"--distill_output={cfg.distill_output} sets an untied head's rows; with "
                        "--tie_embeddings=true the head is the table: use input or joint")
    settings = distill.Settings(layer=cfg.distill_layer, contexts=cfg.distill_contexts, steps=cfg.distill_steps,
                                lr=cfg.distill_lr, words_per_step=cfg.distill_batch, output=cfg.distill_output)
    texts = tokenizer.batch_decode([list(b) for b in train_blocks])
    contexts = distill.build_contexts(base_tokenizer, forms, texts, settings)
    start = vocab.init_new_rows(base_table, len(forms), "subword_mean", seed=cfg.seed, piece_ids=piece_ids)
    result = distill.distill(model_cfg, frozen, base_table, contexts, start, settings,
                             progress_file=pathlib.Path(cfg.workdir) / DISTILL_PROGRESS)
    logging.info("distill: %d rows (%d with training contexts) in %.1f s, hidden-state MSE %.4g -> %.4g",
                 len(forms), int(contexts.from_training.sum()), result.seconds, float(result.mse_before.mean()),
                 float(result.mse_after.mean()))
    return np.concatenate([np.asarray(base_table, np.float32), result.rows]), result.rows


def prepare(cfg: TrainConfig) -> PreparedRun:
    validate_flags(cfg)
    workdir = pathlib.Path(cfg.workdir)
    stored = records.read_config(workdir)  # before anything is written: a bad record fails first
    hosts.barrier("config read")  # before the writer rewrites it: every process compares with the same record
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
    base_tokenizer = vocab.load_base_tokenizer(tokenizer_path)
    vocab.check_tokenizer_matches_model(len(base_tokenizer), source_cfg.vocab_size, tokenizer_source=tokenizer_path, model_source=model_spec)
    data.check_seq_len(cfg.seq_len, source_cfg.max_position_embeddings, model_spec)
    words = vocab.load_lexicon(lexicon_path)
    text = data.read_corpus(corpus_path, strip_banners=cfg.strip_banners, start_marker=cfg.start_marker)

    hashes = source_hashes(workdir, model_dir, pathlib.Path(corpus_path), pathlib.Path(lexicon_path))
    history = check_against_stored(stored, cfg, hashes, workdir) if stored else []
    schedule = optim.schedule_record(stored, cfg)
    stored = stored or {}

    tokenizer, vocab_stats, new_forms = vocab.inject(base_tokenizer, words, cfg.injection, text)
    split = corpus_split(cfg, base_tokenizer, tokenizer, words, text, vocab_stats.base_size, workdir,
                         stored.get("corpus_tokens_sha256"))
    ids, train_blocks, val_blocks, val_resegmented, seg_report = split
    corpus_stats = data.CorpusStats(len(ids), len(train_blocks), len(val_blocks), cfg.seq_len)
    tokenizer_sha256 = hosts.writer_only(save_tokenizer)(tokenizer, workdir)

    params = convert.drop_padding_rows(convert.load_vocab_rows(model_dir), vocab_stats.base_size)
    # Read (and so checked) before config.json is written; preparing alone needs only the rows.
    frozen = read_frozen_body(model_dir, cfg.frozen_dtype) if cfg.max_steps or cfg.init == "distill" else None
    piece_ids = None
    init_started = time.process_time()
    if cfg.init in ("subword_mean", "distill"):
        piece_ids = vocab.subword_piece_ids(base_tokenizer, new_forms)
    if cfg.init == "distill":
        table, distilled = _distilled(cfg, source_cfg, frozen, params.pop("embedding"), base_tokenizer, tokenizer,
                                      new_forms, train_blocks, piece_ids)
    else:
        table = _grow(params.pop("embedding"), vocab_stats, cfg, cfg.seed, piece_ids)
    # The first preparation's cost is the init's: a resume rebuilds a cheap init, or reads distill's rows back.
    init_cost = stored.get("init_cost") or {"init": cfg.init, "cpu_s": round(time.process_time() - init_started, 2)}
    trainable = {"embedding": table}
    source_head = params.pop("lm_head", None)
    if cfg.tie_embeddings and source_head is not None:
        logging.warning(
            "%s ships an untied LM head; --tie_embeddings=true drops its trained head and uses the "
            "input table as the head (one unified matrix, as the reference run did)", model_spec)
    if not cfg.tie_embeddings:
        base_head = source_head["kernel"].T if source_head is not None else table[: vocab_stats.base_size]
        # A different seed, so the head's new rows are not copies of the input rows.
        if cfg.init == "distill":
            head = np.concatenate([base_head, distill.output_rows(cfg.distill_output, base_head, piece_ids, distilled)])
        else:
            head = _grow(base_head, vocab_stats, cfg, cfg.seed + 1, piece_ids)
        trainable["lm_head"] = {"kernel": np.ascontiguousarray(head.T)}

    embeddings_pre_sha256 = _embeddings_pre(workdir, table, stored.get("embeddings_pre_sha256"), resumed=bool(stored))

    model_cfg = source_cfg.replace(vocab_size=vocab_stats.total, tie_word_embeddings=cfg.tie_embeddings)
    record = {
        **stored,
        "flags": dataclasses.asdict(cfg),
        "command": records.command_line(),
        "versions": records.library_versions(),
        "model_spec": cfg.model,
        "model_source": str(model_dir.resolve()),
        "tokenizer_source": str(pathlib.Path(tokenizer_path).resolve()),
        "corpus": str(pathlib.Path(corpus_path).resolve()),
        "lexicon": str(pathlib.Path(lexicon_path).resolve()),
        **hashes,
        # What later steps trust is checked against these when read.
        "corpus_tokens_sha256": records.array_sha256(ids),
        "tokenizer_sha256": tokenizer_sha256,
        "embeddings_pre_sha256": embeddings_pre_sha256,
        "model": dataclasses.asdict(model_cfg),
        "vocab": {**vocab_stats.as_dict(), **seg_report.as_dict()},
        "data": corpus_stats.as_dict(),
        "init_cost": init_cost,
        "config_changes": history,
        **schedule,
    }
    records.write_config(workdir, record)
    return PreparedRun(model_cfg, trainable, frozen, tokenizer, vocab_stats, corpus_stats, train_blocks, val_blocks, record,
                       val_resegmented=val_resegmented, base_tokenizer=base_tokenizer, corpus_text=text, corpus_ids=ids,
                       lexicon=words, source_head=source_head)
