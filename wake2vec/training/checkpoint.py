"""Checkpoints of a Phase 1 run: the trainable rows, their optimiser state and the step.

The reference run lost work to each of the failures this module is shaped around:

* **Only what training changes is saved.** A checkpoint holds the table (and an untied
  head), their optimiser state and the step, never the frozen body, which is re-read from
  its source on resume (wake2vec.phases.prepare checks the source's content hash). With the default
  Adafactor one TinyLlama-sized checkpoint is about 0.63 GB instead of 4.4 GB.
* **A step exists only once it is committed.** Orbax writes a save into
  `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when every file is written;
  `all_steps` lists committed steps only, and a Checkpointer deletes the leftovers of a
  save that was killed. Old checkpoints are deleted only after a newer one has committed.
* **Every array carries a checksum.** Orbax's storage has none: bytes garbled on disk (a
  flaky disk, a half-synced Drive mount) restore silently as wrong numbers. Each save
  records a checksum per array in its `meta` item and every restore recomputes them; a
  checkpoint that fails to read or to match is skipped, with a warning, for the one before.
* **The latest `keep` plus the best by validation loss are kept.** The validation loss
  lives in the step's own `meta` item and a small preservation policy reads it from there.
  Orbax's own `best_fn` would keep it in a `metrics` item that every CheckpointManager
  parses for every step when it starts, so one unreadable file would stop every later run
  from starting at all.
* **A full disk is an error that says what to do,** checked before each save and
  recognised in the write's own failure (tensorstore reports ENOSPC as a ValueError
  "... No space left on device [os_error_code='28']"), naming the directory and the
  bytes needed. The previous checkpoints are untouched by a failed save.

Layout of a run: `workdir/checkpoints/<step>/{trainable, opt_state, meta}`; checkpoints
that failed to restore are moved to `workdir/checkpoints_corrupt/` rather than deleted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from wake2vec.training import hosts
from wake2vec.training.checkpoint_checks import (  # noqa: F401 (re-exported: checkpoint.CheckpointError, ...)
    METADATA_ALLOWANCE, CheckpointDiskFullError, CheckpointError, check_disk_space, checkpoint_nbytes, free_bytes, gb,
    is_disk_full, tree_checksums, verify_checksums)
from wake2vec.training.train import TrainState

CHECKPOINTS = "checkpoints"
TRAINABLE, OPT_STATE, META = "trainable", "opt_state", "meta"

def checkpoint_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / CHECKPOINTS


def committed_steps(workdir) -> list[int]:
    """The committed checkpoint steps of a workdir, from a directory listing (nothing restored)."""
    directory = checkpoint_dir(workdir)
    return _committed_steps(directory) if directory.is_dir() else []


# --------------------------------------------------------------------------- sizes and disk


# --------------------------------------------------------------------------- orbax plumbing


def _item_handlers() -> dict:
    return {
        TRAINABLE: ocp.PyTreeCheckpointHandler(),
        OPT_STATE: ocp.PyTreeCheckpointHandler(),
        META: ocp.JsonCheckpointHandler(),
    }


def _committed_steps(directory: pathlib.Path) -> list[int]:
    """Steps whose save committed (renamed from its temporary name), read from disk."""
    return sorted(ocp.path.step.checkpoint_steps(directory))


@dataclasses.dataclass
class _LowestValLoss:
    """Orbax preservation policy: keep the checkpoint with the lowest recorded val loss.

    `val_losses` is the Checkpointer's own {step: val_loss}, so the policy sees a loss as
    soon as its save starts. Checkpoints without one are left to the other policies.
    """

    val_losses: dict[int, float]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        scored = [(self.val_losses[c.step], c.step) for c in checkpoints if c.step in self.val_losses]
        best = min(scored)[1] if scored else None
        return [c.step == best for c in checkpoints]


def _short(error: BaseException) -> str:
    """First line of an error, bounded: tensorstore errors carry whole JSON specs."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text[:400]}"


def _restore_newest(
    steps: Sequence[int], restore_one: Callable[[int], Any], directory: pathlib.Path
) -> tuple[Any, int, list[int]] | None:
    """Restores the newest step that restores; (result, step, newer steps that failed).

    Any exception while restoring a step marks that checkpoint unusable (Orbax and
    tensorstore raise many types for missing, truncated or garbled files), and the step
    before it is tried. None when there are no steps; CheckpointError when none restores,
    listing why, since starting over silently would discard the run.
    """
    failures: list[tuple[int, str]] = []
    for step in reversed(steps):
        try:
            result = restore_one(step)
        except Exception as error:  # whatever the type, this checkpoint is unusable
            failures.append((step, _short(error)))
            logging.warning("checkpoint step %d in %s cannot be restored (%s); trying the previous one",
                            step, directory, _short(error))
            continue
        if failures:
            logging.warning("restored step %d of %s instead of the newer unusable step(s) %s",
                            step, directory, [s for s, _ in failures])
        return result, step, [s for s, _ in failures]
    if failures:
        listing = "; ".join(f"step {s}: {reason}" for s, reason in failures)
        raise CheckpointError(
            f"no checkpoint in {directory} can be restored ({listing}). If the run's settings changed "
            "shape (vocabulary, tying, optimiser), rerun with the stored ones; otherwise move the directory "
            "away to start over"
        )
    return None


# --------------------------------------------------------------------------- the run's checkpointer


class Checkpointer:
    """Saves and restores a run's TrainState in `directory` (workdir/checkpoints).

    `abstract_state` (a TrainState of jax.ShapeDtypeStruct with shardings) is the restore
    target: restored arrays land with the run's shardings, and the optimiser state gets
    back its exact tree (optax's MaskedNode / EmptyState nodes included). It is needed by
    `restore_latest` only.
    """

    def __init__(
        self,
        directory: pathlib.Path,
        *,
        keep: int,
        abstract_state: TrainState | None = None,
        async_save: bool = True,
    ):
        if keep < 1:
            raise ValueError(f"--keep={keep} must be at least 1")
        # Orbax's tensorstore layer accepts absolute paths only; users pass relative workdirs.
        self.directory = pathlib.Path(directory).absolute()
        self._abstract = abstract_state
        self._val_losses: dict[int, float] = {}
        self._pending_step: int | None = None
        self._pending_nbytes = 0
        policy = checkpoint_managers.AnyPreservationPolicy(
            [checkpoint_managers.LatestN(n=keep), _LowestValLoss(self._val_losses)]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # the remains of a killed save
            lightweight_initialize=True,  # read no per-step metadata at start: a garbled file must not stop it
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        for step in self.all_steps():
            loss = self._recorded_val_loss(step)
            if loss is not None:
                self._val_losses[step] = loss

    def _record(self, step: int) -> dict | None:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as error:  # unreadable: restore_latest will judge this step
            logging.warning("checkpoint step %d: its record cannot be read (%s)", step, _short(error))
            return None

    def _recorded_val_loss(self, step: int) -> float | None:
        return (self._record(step) or {}).get("val_loss")

    def recorded_opt_state_paths(self, step: int) -> set[str] | None:
        """The optimiser-state leaves (jax keystr paths) step `step` holds; None if its record is unreadable."""
        record = self._record(step)
        return None if record is None else set(record["checksums"][OPT_STATE])

    # -- saving

    def save(self, state: TrainState, *, val_loss: float | None = None) -> None:
        """Starts saving `state` at step int(state.step); returns once it may be mutated.

        The write may finish in the background: the step counts as saved only once
        `wait` returns (or the next save starts). A non-finite val_loss is not recorded,
        so it can never be "best". Saving a step that is already committed does nothing:
        a run's state at a step is a pure function of its flags.
        """
        step = int(state.step)
        self.wait()  # a failed earlier save is reported under its own step
        committed = self.all_steps()
        if hosts.agree(step in committed):  # the save is collective: every process must skip it, or none
            logging.info("step %d is already checkpointed in %s", step, self.directory)
            return
        if committed and step < committed[-1]:
            raise CheckpointError(
                f"cannot save step {step}: {self.directory} already holds the later step {committed[-1]}"
            )
        needed = checkpoint_nbytes(state)
        free = free_bytes(self.directory)
        if free < needed:
            raise CheckpointDiskFullError(self._disk_full_message(step, needed, free))
        meta = {
            "step": step,
            "val_loss": float(val_loss) if val_loss is not None and math.isfinite(val_loss) else None,
            "checksums": {TRAINABLE: tree_checksums(state.trainable), OPT_STATE: tree_checksums(state.opt_state)},
        }
        if meta["val_loss"] is not None:
            self._val_losses[step] = meta["val_loss"]
        else:
            self._val_losses.pop(step, None)
        self._pending_step, self._pending_nbytes = step, needed
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(**{
                    TRAINABLE: ocp.args.PyTreeSave(state.trainable),
                    OPT_STATE: ocp.args.PyTreeSave(state.opt_state),
                    META: ocp.args.JsonSave(meta),
                }),
            )
        except Exception as error:
            raise self._save_error(error) from error

    def wait(self) -> None:
        """Blocks until the pending save has committed; raises its error if it failed."""
        try:
            self._manager.wait_until_finished()
        except Exception as error:
            raise self._save_error(error) from error
        finally:
            self._pending_step = None

    def _save_error(self, error: Exception) -> CheckpointError:
        step = self._pending_step
        self._val_losses.pop(step, None)
        if is_disk_full(error):
            return CheckpointDiskFullError(
                self._disk_full_message(step, self._pending_nbytes, free_bytes(self.directory))
            )
        return CheckpointError(
            f"saving step {step} to {self.directory} failed ({_short(error)}); the committed checkpoints "
            f"{self.all_steps()} are untouched"
        )

    def _disk_full_message(self, step: int | None, needed: int, free: int) -> str:
        return (
            f"disk full: saving step {step} to {self.directory} needs about {needed} bytes ({gb(needed)}), "
            f"{free} bytes ({gb(free)}) are free. The committed checkpoints {self.all_steps()} are intact. "
            "Free space there (or move the workdir to a larger disk) and rerun the same command to resume"
        )

    # -- reading

    def all_steps(self) -> list[int]:
        """Committed steps, oldest first (a save still in flight is not among them)."""
        return _committed_steps(self.directory)

    @property
    def best_step(self) -> int | None:
        """The committed step with the lowest val_loss among those saved with one."""
        committed = set(self.all_steps())
        scored = [(loss, step) for step, loss in self._val_losses.items() if step in committed]
        return min(scored)[1] if scored else None

    def restore_latest(self) -> TrainState | None:
        """The state of the latest committed step that restores intact; None if there is none.

        A newer checkpoint that fails to read or to match its checksums is skipped with a
        warning and moved to `<directory>_corrupt/`, so the resumed run can write that step
        again. Raises CheckpointError when checkpoints exist but none restores.
        """
        if self._abstract is None:
            raise ValueError("restore_latest needs the Checkpointer's abstract_state (the restore target)")
        self.wait()
        found = _restore_newest(self.all_steps(), self._restore, self.directory)
        if found is None:
            return None
        state, _, unusable = found
        for step in unusable:
            self._set_aside(step)
        if unusable:
            self._manager.reload()
        return state

    def _restore(self, step: int) -> TrainState:
        abstract = self._abstract
        args = ocp.args.Composite(**{
            TRAINABLE: _restore_args_like(abstract.trainable),
            OPT_STATE: _restore_args_like(abstract.opt_state),
            META: ocp.args.JsonRestore(),
        })
        restored = self._manager.restore(step, args=args)
        meta = restored[META]
        if meta.get("step") != step:
            raise CheckpointError(f"step {step}: its record says step {meta.get('step')}")
        verify_checksums(step, TRAINABLE, restored[TRAINABLE], meta["checksums"][TRAINABLE])
        verify_checksums(step, OPT_STATE, restored[OPT_STATE], meta["checksums"][OPT_STATE])
        step_array = np.asarray(step, abstract.step.dtype)
        sharding = getattr(abstract.step, "sharding", None)
        step_array = jax.device_put(step_array, sharding) if sharding is not None else jnp.asarray(step_array)
        return TrainState(step_array, restored[TRAINABLE], restored[OPT_STATE])

    def _set_aside(self, step: int) -> None:
        """Moves an unusable step out of the manager's directory (kept for inspection)."""
        aside = self.directory.with_name(self.directory.name + "_corrupt")
        target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if hosts.is_writer():
            aside.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), target)
        hosts.barrier(f"checkpoint {step} set aside")  # before any process lists the steps again
        self._val_losses.pop(step, None)
        logging.warning("moved the unusable checkpoint step %d to %s", step, target)

    def close(self) -> None:
        """Waits for the pending save, then releases Orbax's threads."""
        try:
            self.wait()
        finally:
            self._manager.close()


def _restore_args_like(abstract_tree) -> ocp.args.PyTreeRestore:
    """Restore into `abstract_tree`'s structure, shapes, dtypes and shardings."""
    # A leaf without a sharding (a host array) is restored replicated over this process's own
    # devices: jax.devices()[0] belongs to process 0 and is not addressable on any other.
    default = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.local_devices()), ("local",)),
                                         jax.sharding.PartitionSpec())
    target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None) or default),
        abstract_tree,
    )
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))


# --------------------------------------------------------------------------- reading a finished run


def _reader(directory: pathlib.Path) -> ocp.CheckpointManager:
    """A read-only manager: it deletes nothing, not even a save in flight of a live run."""
    if not _committed_steps(directory):
        raise CheckpointError(
            f"no committed checkpoint in {directory}: train first (python -m experiments.train_p1 "
            f"--workdir={directory.parent}) or pass the workdir of a run that saved one"
        )
    options = ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False, lightweight_initialize=True
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def _restore_trainable_numpy(manager: ocp.CheckpointManager, step: int) -> dict:
    tree = manager.item_metadata(step)[TRAINABLE].tree
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        TRAINABLE: ocp.args.PyTreeRestore(restore_args=restore_args),
        META: ocp.args.JsonRestore(),
    }))
    verify_checksums(step, TRAINABLE, restored[TRAINABLE], restored[META]["checksums"][TRAINABLE])
    return restored[TRAINABLE]


def best_step(workdir) -> int | None:
    """The committed step of a run with the lowest recorded validation loss, read-only (no
    save of a live run is touched); None when no checkpoint recorded one. A step whose
    record cannot be read is passed over with a warning."""
    directory = checkpoint_dir(workdir)
    manager = _reader(directory)
    scored = []
    try:
        for step in _committed_steps(directory):
            try:
                loss = manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META].get("val_loss")
            except Exception as error:
                logging.warning("checkpoint step %d in %s: its record cannot be read (%s)", step, directory, _short(error))
                continue
            if loss is not None:
                scored.append((loss, step))
    finally:
        manager.close()
    return min(scored)[1] if scored else None


def load_trainable(workdir, step: int | None = None) -> tuple[dict, int]:
    """(trainable subtree as host numpy arrays, step) of a run, without its optimiser state.

    `step` None takes the latest committed step, falling back past unusable ones with a
    warning as a resumed run does; an explicit step that cannot be restored is an error.
    The table keeps its padded rows (see load_table).
    """
    directory = checkpoint_dir(workdir)
    manager = _reader(directory)
    try:
        steps = _committed_steps(directory)
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"{directory} has no committed checkpoint at step {step}; it has {steps}")
            try:
                return _restore_trainable_numpy(manager, step), step
            except Exception as error:
                raise CheckpointError(f"step {step} in {directory} cannot be restored ({_short(error)})") from error
        trainable, found_step, _ = _restore_newest(steps, lambda s: _restore_trainable_numpy(manager, s), directory)
        return trainable, found_step
    finally:
        manager.close()
