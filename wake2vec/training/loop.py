"""The training loop every phase shares: place on the mesh, resume, train, evaluate, save, report.

A phase (Phase 1 here, wake2vec.phases.phase2, wake2vec.phases.phase3) prepares a `Job`: its blocks,
the host arrays it trains and those it keeps frozen, its step settings and what to do at
the end; `train_job` runs it. Phase 1's `run` is prepare -> job -> train_job.

Interruption is a non-event by construction:

* a checkpoint holds only (step, trainable rows, optimiser state); the frozen body is
  re-read from its source, whose hash prepare() checks;
* the batch of step s is `data.train_batch(train_blocks, s, seed=...)`, a pure function,
  and the step itself has no randomness, so a resumed run computes what the uninterrupted
  one would have, bit for bit on CPU;
* every save step is also a log step, so the "mean training loss since the previous log"
  windows never straddle a restore point; metrics.jsonl is cut back to the checkpoint and
  the rest is re-logged identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import pathlib
import time

import jax
import numpy as np

from wake2vec.training import (checkpoint, data, hosts, interrupt, loss_scale, optim, parallel, placement, precision,
                               tboard, train, workdir as records)
from wake2vec.training import progress as progress_log
from wake2vec.training import step_window
from wake2vec.models import padding
from wake2vec.phases import base_cost, prepare
from typing import Callable

from wake2vec.config import DEMO_SOURCE, FlagError, ModelConfig, RunConfig, TrainConfig
from wake2vec.errors import UserError


class NonFiniteStepError(UserError, RuntimeError):
    """A step's loss, gradient or update became NaN or infinite; it was not applied."""


class WorkdirBusyError(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


@dataclasses.dataclass
class RunResult:
    workdir: pathlib.Path
    final_step: int
    last_train_loss: float | None
    last_val_loss: float | None


@dataclasses.dataclass
class Job:
    """What a phase hands the loop. Host arrays are consumed (set to None) as they move.

    `trainable` holds the subtrees that learn ({"embedding"} in Phase 1, {"lora"} in
    Phase 2, both in Phase 3), `frozen` the rest of the parameters; a table in either is
    unpadded (the loop pads it for the mesh). `regularizer(trainable, frozen, key)` adds
    terms to the training loss (Phase 3; wake2vec.training.train.make_train_step). `finish(state,
    frozen)` runs on every process after the last step (analysis, generations).
    """

    cfg: RunConfig
    model_cfg: ModelConfig
    trainable: dict | None
    frozen: dict | None
    base_size: int
    train_blocks: np.ndarray
    val_blocks: np.ndarray
    val_resegmented: np.ndarray | None
    record: dict
    settings: train.StepSettings
    lr_by_key: dict[str, float] | None = None
    regularizer: Callable | None = None
    finish: Callable[[train.TrainState, dict], None] | None = None
    char_cost: base_cost.Setup | None = None  # Phase 1: bits per character against the base model
    curve_title: str = "Phase 1: embedding-only training"


def _eval_batches(val_blocks: np.ndarray, val_resegmented: np.ndarray, extra: np.ndarray, batch: int, max_blocks: int):
    """Fixed-shape eval batches (ids, block weights, re-segmented mask, extra weight columns):
    a short last batch is padded with zero-weight blocks."""
    masks, extras = data.eval_batches(val_resegmented, batch, max_blocks), data.eval_batches(extra, batch, max_blocks)
    for ids, mask, more in zip(data.eval_batches(val_blocks, batch, max_blocks), masks, extras):
        weights = np.ones(batch, np.float32)
        if len(ids) < batch:
            weights[len(ids):] = 0.0
            pad = ((0, batch - len(ids)), (0, 0))
            ids, mask, more = np.pad(ids, pad), np.pad(mask, pad), np.pad(more, pad + ((0, 0),))
        yield ids, weights, mask.astype(bool), more.astype(np.float32)


def _timed(fn, *args):
    """(fn(*args), seconds), blocking on the result so that asynchronous dispatch is not
    mistaken for speed."""
    started = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - started


@contextlib.contextmanager
def exclusive_workdir(workdir: pathlib.Path):
    """Holds workdir/.lock for the run: a second run on the same workdir would otherwise
    clear the first one's unfinished checkpoint saves and interleave its metrics.

    Process 0 (the writer) takes the lock for every process of the run, and tells the others
    whether it got it, so all of them stop together on a busy workdir."""
    with contextlib.ExitStack() as held:
        busy = None
        if hosts.is_writer():
            try:
                fcntl.flock(held.enter_context(records.open_lock(workdir)), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, records.OutputDirError) as e:
                busy = e
        if hosts.agree(isinstance(busy, records.OutputDirError)):
            raise busy if busy is not None else records.OutputDirError(f"cannot write to {workdir}; pass a writable --workdir")
        if hosts.agree(busy is not None):
            raise WorkdirBusyError(f"{workdir} is in use by another wake2vec run; wait for it or choose another --workdir") from busy
        yield


def run(cfg: TrainConfig) -> RunResult:
    """Phase 1: prepare the workdir, then train the table."""
    return run_phase(cfg, prepare.validate_flags, _phase1_job)


def run_phase(cfg: RunConfig, validate: Callable[[RunConfig], None], make_job: Callable[[RunConfig], Job | None]) -> RunResult:
    """Any phase: validate its flags, hold its workdir, prepare its job and train it.

    `make_job` returns None when there is nothing to train (--max_steps=0 prepares only).
    """
    parallel.maybe_initialize_distributed(cfg)
    validate(cfg)  # before the lock file: a bad flag leaves nothing behind
    # The effective precision is what the record's flags hold: a resumed run under another policy is a config change.
    cfg = dataclasses.replace(cfg, matmul_precision=precision.effective(cfg.matmul_precision, cfg.compute_dtype))
    precision.apply(cfg.matmul_precision)
    workdir = pathlib.Path(cfg.workdir)
    with exclusive_workdir(workdir):
        job = make_job(cfg)
        if job is None:
            logging.info("--max_steps=0: workdir %s prepared; no training", workdir)
            return RunResult(workdir, 0, None, None)
        return train_job(job)


def _phase1_job(cfg: TrainConfig) -> Job | None:
    prepared = prepare.prepare(cfg)
    logging.info("vocab %s; data %s", prepared.vocab_stats.as_dict(), prepared.corpus_stats.as_dict())
    if cfg.max_steps == 0:
        return None
    settings = train.settings_for(cfg, prepared.model_cfg)
    job = Job(cfg, prepared.model_cfg, prepared.trainable, prepared.frozen, prepared.vocab_stats.base_size,
              prepared.train_blocks, prepared.val_blocks, prepared.val_resegmented, prepared.record, settings,
              char_cost=base_cost.setup(prepared, cfg))
    prepared.trainable = prepared.frozen = None  # the job owns the host arrays now

    def finish(state: train.TrainState, frozen: dict) -> None:
        if cfg.analyze:
            _analyze(pathlib.Path(cfg.workdir), _trained_table(state, prepared.model_cfg.vocab_size), prepared, int(state.step))
        if cfg.generate_at_end:
            generate_at_end(cfg, prepared.model_cfg, {**frozen, **state.trainable}, prepared.tokenizer, int(state.step),
                            demo=cfg.model == DEMO_SOURCE, base_size=prepared.vocab_stats.base_size)

    job.finish = finish
    return job


def _evals_since_best(events: list[dict]) -> int:
    """Evaluations since the lowest validation loss so far (0: the latest is the lowest).

    Read from metrics.jsonl's eval events, so early stopping resumes with the count the
    interrupted run had."""
    best, since = float("inf"), 0
    for event in events:
        loss = event.get("val_loss")
        if loss is None:
            continue
        best, since = (loss, 0) if loss < best else (best, since + 1)
    return since


def wake_target_record(train_counts: np.ndarray, val_blocks: np.ndarray, base_size: int) -> dict:
    """config.json's account of what the training split can teach: how many new rows never
    occur in a training block, and what share of the validation new-token targets are such
    rows (their loss can only rise: the row is trained only as a negative)."""
    targets = np.asarray(val_blocks)[:, 1:].ravel()
    new_targets = targets[targets >= base_size]
    unseen = int(np.sum(train_counts[new_targets] == 0))
    return {
        "new_rows": int(train_counts.size - base_size),
        "new_rows_never_in_training": int(np.sum(train_counts[base_size:] == 0)),
        "val_new_targets": int(new_targets.size),
        "val_new_targets_unseen": unseen,
        "val_unseen_share": unseen / new_targets.size if new_targets.size else None,
    }


def train_job(job: Job) -> RunResult:
    cfg, record = job.cfg, job.record
    workdir = pathlib.Path(cfg.workdir)
    mesh = parallel.make_mesh(cfg.mesh)  # its fit to the devices and the batch: the phase's validate
    rows = record.get("padded_vocab") or parallel.padded_vocab(job.model_cfg.vocab_size, mesh)
    if rows % mesh.shape[parallel.MODEL]:  # a run padded under the older 128 x |model| rule resumes as it was
        raise FlagError(f"this run's table has {rows} rows, which do not split over a model axis of {mesh.shape[parallel.MODEL]}; resume with the original --mesh")
    base_size, vocab_size = job.base_size, job.model_cfg.vocab_size
    train_counts = train.training_counts(job.train_blocks, vocab_size)
    if "padded_vocab" not in record or "wake_targets" not in record:
        record["padded_vocab"] = rows
        record["wake_targets"] = wake_target_record(train_counts, job.val_blocks, base_size)
        records.write_config(workdir, record)
    logging.info("new rows never in a training block: %(new_rows_never_in_training)d of %(new_rows)d; validation "
                 "new-token targets whose token is never in training: %(val_new_targets_unseen)d of %(val_new_targets)d",
                 record["wake_targets"])
    schedule = optim.make_schedule(cfg, record.get("schedule_starts", [0]))
    tx = optim.make_optimizer(cfg, base_size, vocab_size, schedule, trainable_keys=tuple(job.trainable), lr_by_key=job.lr_by_key)
    settings = job.settings

    # Host copies are consumed leaf by leaf as they move (TinyLlama's body: 4.4 GB in fp32).
    placed = placement.place(job.trainable, job.frozen, tx, mesh, rows)
    frozen, abstract = placed.frozen, placed.abstract_state
    job.frozen = job.trainable = None
    char_cost = job.char_cost
    # (val blocks, T-1, K) weight columns the eval adds to its categories: the Wake-word costs, or none.
    extra = char_cost.spans.run_word_weights if char_cost else np.zeros((*job.val_blocks[:, 1:].shape, 0), np.float32)
    base_figures = char_cost and base_cost.base_figures(workdir, frozen, char_cost.base, char_cost.spans, job.settings,
                                                        cfg.batch_size, char_cost.body)
    if char_cost:
        char_cost.base = None  # scored: the host copy of the base rows is not needed again

    # The disk check comes before the Checkpointer, and a failed restore closes it: an Orbax
    # manager left open at exit prints a thread traceback under the one-line error.
    one = checkpoint.checkpoint_nbytes(abstract)
    logging.info("checkpoints: %s", checkpoint.check_disk_space(workdir / "checkpoints", one, cfg.keep))
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.keep, abstract_state=abstract)
    try:
        committed = ckpt.all_steps()
        loss_scale.check_resumable(ckpt.recorded_opt_state_paths(committed[-1]) if committed else None,
                                   job.settings.loss_scale)
        state = ckpt.restore_latest()
    except BaseException:
        ckpt.close()
        raise
    if state is None:
        state = placement.initial_state(placed, tx)
        start = 0
    else:
        start = int(state.step)
        logging.info("resuming from the committed checkpoint at step %d", start)
    # On every start, also before any commit: what follows `start` is re-logged identically.
    records.truncate_metrics(workdir, start)
    hosts.barrier("metrics truncated")  # every process reads metrics.jsonl as the writer left it
    history = records.read_metrics(workdir)
    scalars = hosts.writer_only(tboard.ScalarWriter)(workdir, history)  # None elsewhere
    eval_events = [e for e in history if "val_loss" in e]

    def log_event(event: dict) -> None:
        records.append_metrics(workdir, event)
        if scalars is not None:
            scalars.add(event)
    placed.trainable = None  # the state holds its own copy

    eval_fn = jax.jit(train.make_eval_step(settings, base_size))
    train_counts_on_device = jax.device_put(train_counts, parallel.replicated(mesh))
    eval_ids_sharding, eval_weights_sharding = parallel.batch_sharding(mesh, 2, 0), parallel.batch_sharding(mesh, 1, 0)
    val_resegmented = job.val_resegmented
    if val_resegmented is None:
        val_resegmented = np.zeros(job.val_blocks.shape, bool)

    # Both programs are compiled ahead of time, so that their compile time is measured and
    # reported as such instead of inflating the first step and the first evaluation.
    # Lowered with the mesh in context, so the body's per-layer gathers
    # (parallel.gather_weights) are traced into the programs.
    compile_started = time.perf_counter()
    batch_shape = (cfg.grad_accum, cfg.batch_size, job.train_blocks.shape[1])
    eval_shape = (cfg.batch_size, job.val_blocks.shape[1])
    step_fn = placement.compile_train_step(train.make_train_step(tx, schedule, settings, regularizer=job.regularizer),
                                           placed, state, batch_shape)
    step_compile_s = time.perf_counter() - compile_started
    with jax.set_mesh(mesh):
        eval_fn = eval_fn.lower(
            state.trainable, frozen,
            jax.ShapeDtypeStruct(eval_shape, np.int32, sharding=eval_ids_sharding),
            jax.ShapeDtypeStruct((cfg.batch_size,), np.float32, sharding=eval_weights_sharding),
            jax.ShapeDtypeStruct(eval_shape, np.bool_, sharding=eval_ids_sharding),
            train_counts_on_device,
            jax.ShapeDtypeStruct((*eval_shape[:1], eval_shape[1] - 1, extra.shape[-1]), np.float32, sharding=eval_ids_sharding),
        ).compile()
    compile_s = time.perf_counter() - compile_started
    logging.info("compiled the train step in %.1f s and the eval step in %.1f s", step_compile_s, compile_s - step_compile_s)

    def evaluate(trainable_now) -> dict:
        """The eval event's fields: the validation loss overall and by target type, with counts."""
        columns = len(train.EVAL_CATEGORIES)
        sums = counts = np.zeros(columns + extra.shape[-1])
        for ids, weights, mask, more in _eval_batches(job.val_blocks, val_resegmented, extra, cfg.batch_size, cfg.eval_blocks):
            loss_sums, n = eval_fn(trainable_now, frozen, jax.device_put(ids, eval_ids_sharding),
                                   jax.device_put(weights, eval_weights_sharding), jax.device_put(mask, eval_ids_sharding),
                                   train_counts_on_device, jax.device_put(more, eval_ids_sharding))
            sums, counts = sums + np.asarray(loss_sums, np.float64), counts + np.asarray(n, np.float64)
        fields = records.val_loss_fields(train.EVAL_CATEGORIES, sums[:columns], counts[:columns])
        if char_cost:
            fields.update(base_cost.eval_fields(sums[0], sums[columns:], char_cost.spans, base_figures))
        return fields

    tokens_per_step = cfg.batch_size * cfg.grad_accum * job.train_blocks.shape[1]
    progress = progress_log.Progress(cfg, tokens_per_step, compile_s)
    last_val = None
    if start == 0 and not history:
        fields, eval_s = _timed(evaluate, state.trainable)
        last_val = fields["val_loss"]
        eval_events.append(fields)
        log_event({**progress.note_eval(0, last_val, eval_s), **fields})

    stopped = cfg.early_stop_patience and start > 0 and _evals_since_best(eval_events) >= cfg.early_stop_patience
    if stopped:
        logging.info("this run stopped early at step %d (%d evaluations without a lower validation loss); nothing to resume",
                     start, cfg.early_stop_patience)

    def non_finite(done: int, metrics: dict) -> NonFiniteStepError:
        # The step left the state as it was (train.make_train_step) and a boundary resolves its window before it saves.
        ckpt.wait()  # an async save in flight is the last good checkpoint once it commits
        saved = ckpt.all_steps()
        return NonFiniteStepError(
            f"step {done}: not finite (loss {float(metrics['loss'])}, gradient norm {float(metrics['grad_norm'])}, or "
            f"the update); the step was not applied and nothing from it was saved. The last good checkpoint is "
            f"step {saved[-1] if saved else 'none'}. Lower --lr, check --frozen_dtype/--compute_dtype "
            "(fp16 overflows easily), then rerun with --allow_config_change to resume from it")

    def put_batch(step: int):
        return jax.device_put(data.train_batch(job.train_blocks, step, seed=cfg.seed, batch_size=cfg.batch_size,
                                               grad_accum=cfg.grad_accum), placed.batch_sharding)

    window, end = step_window.StepWindow(), cfg.max_steps if not stopped else start
    try:
        batch = put_batch(start) if start < end else None
        with interrupt.at_step_boundaries() as interrupt_requested:
            for step in range(start, end):
                if interrupt_requested():
                    raise KeyboardInterrupt
                # Dispatched, not awaited: batch k+1 is placed while step k runs; figures are read at boundaries (step_window).
                state, device_metrics = step_fn(state, frozen, batch)
                batch = put_batch(step + 1) if step + 1 < end else None
                done = step + 1
                window.add(done, device_metrics)
                is_last = done == cfg.max_steps
                if not (done % cfg.log_every == 0 or done % cfg.save_every == 0 or done % cfg.eval_every == 0 or is_last
                        or (cfg.snapshot_every and done % cfg.snapshot_every == 0)):
                    continue
                metrics = window.resolve(progress, log_event, non_finite)
                logged = False
                if done % cfg.log_every == 0 or done % cfg.save_every == 0 or is_last:
                    log_event({**progress.flush(done, float(metrics["lr"])), **_step_fields(metrics)})
                    logged = True
                val_loss = None
                if done % cfg.eval_every == 0 or is_last:
                    fields, eval_s = _timed(evaluate, state.trainable)
                    val_loss = last_val = fields["val_loss"]
                    eval_events.append(fields)
                    log_event({**progress.note_eval(done, val_loss, eval_s), **fields})
                    stopped = bool(cfg.early_stop_patience) and _evals_since_best(eval_events) >= cfg.early_stop_patience
                if stopped and not logged:  # a save step is a log step: the resumed run's windows start here
                    log_event({**progress.flush(done, float(metrics["lr"])), **_step_fields(metrics)})
                if done % cfg.save_every == 0 or is_last or stopped:
                    _, save_s = _timed(lambda: ckpt.save(state, val_loss=val_loss))
                    log_event(progress.note_save(done, save_s))
                if cfg.snapshot_every and done % cfg.snapshot_every == 0:
                    records.atomic_save_npy(workdir / "snapshots" / f"embeddings_step_{done}.npy", _trained_table(state, vocab_size))
                window.started = time.perf_counter()  # the boundary's evals and saves are no step time
                if stopped:
                    logging.info("step %d: early stop, %d evaluations without a lower validation loss (--early_stop_patience)",
                                 done, cfg.early_stop_patience)
                    log_event({"step": done, "early_stop": True})
                    break
    except BaseException as error:
        _close(ckpt, scalars, workdir, job.curve_title, failed=error)
        raise
    _close(ckpt, scalars, workdir, job.curve_title, failed=None)

    if job.finish is not None:
        job.finish(state, frozen)
    return RunResult(workdir, int(state.step), progress.last_train, last_val)


def _step_fields(metrics: dict) -> dict:
    """A log event's fields from the step's own metrics: the gradient norm, and the loss scale when there is one."""
    fields = {"grad_norm": float(metrics["grad_norm"])}
    if "loss_scale" in metrics:
        fields["loss_scale"] = float(metrics["loss_scale"])
    return fields


def _close(ckpt: checkpoint.Checkpointer, scalars: tboard.ScalarWriter | None, workdir: pathlib.Path, title: str, *,
           failed: BaseException | None) -> None:
    """Waits for the saves, closes Orbax and the TensorBoard writer, writes the loss table and curve.

    After a failure each part is tried and its own error only logged: the user must see
    the first error (a CheckpointDiskFullError, say), not the one the report then hits
    on the same full disk.
    """
    def report():
        events = records.read_metrics(workdir)
        records.write_loss_table(workdir, events)
        records.write_loss_curve(workdir, events, title)

    for part in (ckpt.wait, ckpt.close, *([scalars.close] if scalars is not None else []), report):
        if failed is None:
            part()
            continue
        try:
            part()
        except Exception as later:
            logging.warning("after %s, stopping also failed: %s: %s", type(failed).__name__, type(later).__name__, later)


def _trained_table(state: train.TrainState, vocab_size: int) -> np.ndarray:
    """The table on the host, padding rows cut: the (vocab, D) matrix the analysis reads."""
    return padding.unpad_table(hosts.host_array(state.trainable["embedding"]), vocab_size)


@hosts.writer_only
def _analyze(workdir: pathlib.Path, table: np.ndarray, prepared: prepare.PreparedRun, step: int) -> None:
    from wake2vec.analysis import report

    logging.info("analysing the trained table -> %s", workdir / "analysis")
    tokens = prepared.tokenizer.convert_ids_to_tokens(list(range(table.shape[0])))
    report.run_analysis(table, prepared.vocab_stats.base_size, workdir / "analysis",
                        E_pre=records.verified_npy(workdir / prepare.EMBEDDINGS_PRE, prepared.record.get("embeddings_pre_sha256"),
                                                 "rerun the same command: it rewrites the file from the run's sources"), tokens=tokens, seed=0,
                        vs_base=base_cost.last_eval(records.read_metrics(workdir)),
                        train_counts=train.training_counts(prepared.train_blocks, table.shape[0]))  # the eval's seen/unseen split
    logging.info("exporting the table for TensorBoard's Embedding Projector -> %s", workdir / tboard.LOGDIR)
    tboard.write_projector(workdir / tboard.LOGDIR, table, prepared.vocab_stats.base_size, tokens,
                           name=f"trained table, step {step}")


def generate_at_end(cfg: RunConfig, model_cfg: ModelConfig, params: dict, tokenizer, step: int, *, demo: bool,
                    base_size: int, lora_spec=None) -> None:
    """generations.md for the trained model: the study's prompt and settings on a real model,
    the demo's own short ones on the demo. The arrays stay where they are: the model reads
    padded tables (it cuts logits to the vocabulary), so nothing is copied to the host."""
    from wake2vec.models import generate

    generate.write_generations(pathlib.Path(cfg.workdir), model_cfg, params, tokenizer, step=step, demo=demo,
                               base_vocab_size=base_size, lora=lora_spec)
