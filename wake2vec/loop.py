"""The Phase 1 run: prepare, place on the mesh, resume, train, evaluate, save, report.

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
import math
import pathlib
import time

import jax
import numpy as np

from wake2vec import checkpoint, convert, data, hosts, optim, parallel, prepare, train, workdir as records
from wake2vec.config import TrainConfig, dtype_from_name
from wake2vec.errors import UserError


class NonFiniteLossError(UserError, RuntimeError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class RunResult:
    workdir: pathlib.Path
    final_step: int
    last_train_loss: float | None
    last_val_loss: float | None


def _pad_rows(trainable: dict, rows: int) -> dict:
    """Zero rows appended to the vocabulary axis (table axis 0, head kernel axis 1)."""
    table = trainable["embedding"]
    out = {"embedding": np.pad(table, ((0, rows - table.shape[0]), (0, 0)))}
    if "lm_head" in trainable:
        kernel = trainable["lm_head"]["kernel"]
        out["lm_head"] = {"kernel": np.pad(kernel, ((0, 0), (0, rows - kernel.shape[1])))}
    return out


def _eval_batches(val_blocks: np.ndarray, batch: int, max_blocks: int):
    """Fixed-shape eval batches: a short last batch is padded with zero-weight blocks."""
    for ids in data.eval_batches(val_blocks, batch, max_blocks):
        weights = np.ones(batch, np.float32)
        if len(ids) < batch:
            weights[len(ids):] = 0.0
            ids = np.concatenate([ids, np.zeros((batch - len(ids), ids.shape[1]), ids.dtype)])
        yield ids, weights


class _Progress:
    """Tracks the log window and prints step, losses, tokens/s and ETA."""

    def __init__(self, cfg: TrainConfig, start_step: int, tokens_per_step: int):
        self.cfg, self.tokens_per_step = cfg, tokens_per_step
        self.window_losses: list[float] = []
        self.window_start = time.perf_counter()
        self.run_start, self.run_start_step = self.window_start, start_step
        self.last_train: float | None = None
        self.prev_eval: tuple[float, float | None] | None = None

    def flush(self, step: int, lr: float) -> dict:
        now = time.perf_counter()
        mean = float(np.mean(self.window_losses))
        tokens_per_s = self.tokens_per_step * len(self.window_losses) / max(now - self.window_start, 1e-9)
        done = step - self.run_start_step
        eta = (now - self.run_start) / max(done, 1) * (self.cfg.max_steps - step)
        logging.info("step %d/%d  train_loss %.4f  lr %.3g  %.0f tokens/s  ETA %s",
                     step, self.cfg.max_steps, mean, lr, tokens_per_s, _duration(eta))
        self.window_losses, self.window_start, self.last_train = [], now, mean
        return {"step": step, "train_loss": mean, "lr": lr, "tokens_per_s": tokens_per_s}

    def note_eval(self, step: int, val_loss: float) -> None:
        logging.info("step %d  val_loss %.4f", step, val_loss)
        if self.prev_eval is not None:
            prev_val, prev_train = self.prev_eval
            if val_loss > prev_val and self.last_train is not None and prev_train is not None and self.last_train < prev_train:
                logging.warning(
                    "step %d: validation loss rose (%.4f -> %.4f) while training loss fell (%.4f -> %.4f): "
                    "the memorisation gap Phase 1 produces by design; training continues",
                    step, prev_val, val_loss, prev_train, self.last_train)
        self.prev_eval = (val_loss, self.last_train)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@contextlib.contextmanager
def exclusive_workdir(workdir: pathlib.Path):
    """Holds workdir/.lock for the run: a second run on the same workdir would otherwise
    clear the first one's unfinished checkpoint saves and interleave its metrics.

    Process 0 (the writer) takes the lock for every process of the run, and tells the others
    whether it got it, so all of them stop together on a busy workdir."""
    with contextlib.ExitStack() as held:
        busy = None
        if hosts.is_writer():
            workdir.mkdir(parents=True, exist_ok=True)
            lock = held.enter_context(open(workdir / ".lock", "w"))
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                busy = e
        if hosts.agree(busy is not None):
            raise RuntimeError(f"{workdir} is in use by another wake2vec run; wait for it or choose another --workdir") from busy
        yield


def run(cfg: TrainConfig) -> RunResult:
    parallel.maybe_initialize_distributed(cfg)
    with exclusive_workdir(pathlib.Path(cfg.workdir)):
        return _run_locked(cfg)


def _run_locked(cfg: TrainConfig) -> RunResult:
    prepared = prepare.prepare(cfg)
    workdir = pathlib.Path(cfg.workdir)
    record = prepared.record
    logging.info("vocab %s; data %s", prepared.vocab_stats.as_dict(), prepared.corpus_stats.as_dict())
    if cfg.max_steps == 0:
        logging.info("--max_steps=0: workdir %s prepared; no training", workdir)
        return RunResult(workdir, 0, None, None)

    mesh = parallel.make_mesh(cfg.mesh)
    if cfg.batch_size % mesh.devices.size:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of the device count ({mesh.devices.size}): the batch is split over every device")
    rows = record.get("padded_vocab") or parallel.padded_vocab(prepared.model_cfg.vocab_size, mesh)
    if rows % (128 * mesh.shape[parallel.MODEL]):
        raise ValueError(f"this run's table has {rows} rows, which do not split over a model axis of {mesh.shape[parallel.MODEL]}; resume with the original --mesh")
    if "padded_vocab" not in record:
        record["padded_vocab"] = rows
        records.write_config(workdir, record)

    base_size = prepared.vocab_stats.base_size
    tx = optim.make_optimizer(cfg, base_size)
    schedule = optim.make_schedule(cfg)
    settings = train.StepSettings(prepared.model_cfg, dtype_from_name(cfg.compute_dtype), cfg.remat, cfg.loss_chunk)

    # Host copies are consumed leaf by leaf as they move (TinyLlama's body: 4.4 GB in fp32).
    frozen_sharding = parallel.frozen_sharding(prepared.frozen, mesh)
    frozen = convert.to_device(prepared.frozen, frozen_sharding)
    trainable_host = _pad_rows(prepared.trainable, rows)
    trainable = convert.to_device(trainable_host, parallel.vocab_sharded_like(trainable_host, mesh, rows))
    prepared.frozen = prepared.trainable = None

    abstract = jax.eval_shape(lambda t, f: train.init_state(t, f, tx), trainable, frozen)
    state_sharding = parallel.state_sharding(abstract, mesh, rows)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=cfg.keep, abstract_state=abstract)
    one = checkpoint.checkpoint_nbytes(abstract)
    logging.info("checkpoints: %s", checkpoint.check_disk_space(workdir / "checkpoints", one, cfg.keep))

    state = ckpt.restore_latest()
    if state is None:
        state = jax.jit(lambda t, f: train.init_state(t, f, tx), out_shardings=state_sharding)(trainable, frozen)
        start = 0
    else:
        start = int(state.step)
        logging.info("resuming from the committed checkpoint at step %d", start)
    # Also at step 0: a run killed before its first commit left events that will be re-logged.
    records.truncate_metrics(workdir, start)
    hosts.barrier("metrics truncated")  # every process reads metrics.jsonl as the writer left it
    del trainable

    batch_sharding = parallel.batch_sharding(mesh, 3, 1)
    step_fn = parallel.under_mesh(parallel.jit_train_step(train.make_train_step(tx, schedule, settings), mesh,
                                                          state_sharding, frozen_sharding), mesh)
    eval_fn = parallel.under_mesh(jax.jit(train.make_eval_step(settings)), mesh)
    eval_ids_sharding, eval_weights_sharding = parallel.batch_sharding(mesh, 2, 0), parallel.batch_sharding(mesh, 1, 0)

    def evaluate(trainable_now) -> float:
        total, count = 0.0, 0.0
        for ids, weights in _eval_batches(prepared.val_blocks, cfg.batch_size, cfg.eval_blocks):
            loss_sum, n = eval_fn(trainable_now, frozen, jax.device_put(ids, eval_ids_sharding),
                                  jax.device_put(weights, eval_weights_sharding))
            total, count = total + float(loss_sum), count + float(n)
        return total / count

    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.seq_len
    progress = _Progress(cfg, start, tokens_per_step)
    last_val = None
    if start == 0 and not records.read_metrics(workdir):
        last_val = evaluate(state.trainable)
        records.append_metrics(workdir, {"step": 0, "val_loss": last_val})
        progress.note_eval(0, last_val)

    try:
        for step in range(start, cfg.max_steps):
            batch = data.train_batch(prepared.train_blocks, step, seed=cfg.seed, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
            state, metrics = step_fn(state, frozen, jax.device_put(batch, batch_sharding))
            loss = float(metrics["loss"])
            done = step + 1
            if not math.isfinite(loss):
                ckpt.wait()  # an async save in flight is the last good checkpoint once it commits
                saved = ckpt.all_steps()
                raise NonFiniteLossError(
                    f"step {done}: training loss is {loss}. Nothing from this step was saved; the last good checkpoint "
                    f"is step {saved[-1] if saved else 'none'}. Lower --lr, check --frozen_dtype/--compute_dtype "
                    "(fp16 overflows easily), then rerun the same command to resume from it")
            progress.window_losses.append(loss)
            is_last = done == cfg.max_steps
            save_now = done % cfg.save_every == 0 or is_last
            if done % cfg.log_every == 0 or save_now:
                records.append_metrics(workdir, progress.flush(done, float(metrics["lr"])))
            val_loss = None
            if done % cfg.eval_every == 0 or is_last:
                val_loss = last_val = evaluate(state.trainable)
                records.append_metrics(workdir, {"step": done, "val_loss": val_loss})
                progress.note_eval(done, val_loss)
            if save_now:
                ckpt.save(state, val_loss=val_loss)
            if cfg.snapshot_every and done % cfg.snapshot_every == 0:
                records.atomic_save_npy(workdir / "snapshots" / f"embeddings_step_{done}.npy", _trained_table(state, prepared))
    finally:
        ckpt.wait()
        ckpt.close()
        events = records.read_metrics(workdir)
        records.write_loss_table(workdir, events)
        records.write_loss_curve(workdir, events)

    if cfg.analyze:
        _analyze(workdir, _trained_table(state, prepared), prepared)
    if cfg.generate_at_end:
        _generate(workdir, prepared, state, frozen)
    return RunResult(workdir, cfg.max_steps, progress.last_train, last_val)


def _trained_table(state: train.TrainState, prepared: prepare.PreparedRun) -> np.ndarray:
    """The table on the host, padding rows cut: the (vocab, D) matrix the analysis reads."""
    return hosts.host_array(state.trainable["embedding"])[: prepared.model_cfg.vocab_size]


@hosts.writer_only
def _analyze(workdir: pathlib.Path, table: np.ndarray, prepared: prepare.PreparedRun) -> None:
    from wake2vec.analysis import report

    logging.info("analysing the trained table -> %s", workdir / "analysis")
    tokens = prepared.tokenizer.convert_ids_to_tokens(list(range(table.shape[0])))
    report.run_analysis(table, prepared.vocab_stats.base_size, workdir / "analysis",
                        E_pre=np.load(workdir / prepare.EMBEDDINGS_PRE), tokens=tokens, seed=0)


def _generate(workdir: pathlib.Path, prepared: prepare.PreparedRun, state: train.TrainState, frozen: dict) -> None:
    from wake2vec import generate

    # The arrays stay where they are: the model reads padded tables (it cuts logits to the
    # vocabulary), so nothing needs copying to the host and back.
    params = {**frozen, **state.trainable}
    generate.write_generations(workdir, prepared.model_cfg, params, prepared.tokenizer, step=int(state.step), demo=True)
