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
import errno
import math
import os
import pathlib
import shutil
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from wake2vec.training import hosts
from wake2vec.errors import UserError
from wake2vec.training.train import TrainState

CHECKPOINTS = "checkpoints"
TRAINABLE, OPT_STATE, META = "trainable", "opt_state", "meta"

# Room for Orbax's own files beside the arrays of one checkpoint (tree and array
# metadata, shardings, OCDBT manifests, commit markers): 9 KB for a TinyLlama-sized table
# with Adafactor (notes/checkpoint_build.md), about 20 KB when the optimiser tree carries a
# whole model's masked leaves; 1 MiB leaves room for block rounding and larger trees.
METADATA_ALLOWANCE = 1 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


class CheckpointDiskFullError(CheckpointError):
    """The disk holding the checkpoints is too full for the next one."""


def checkpoint_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir).absolute() / CHECKPOINTS


def committed_steps(workdir) -> list[int]:
    """The committed checkpoint steps of a workdir, from a directory listing (nothing restored)."""
    directory = checkpoint_dir(workdir)
    return _committed_steps(directory) if directory.is_dir() else []


# --------------------------------------------------------------------------- sizes and disk


def checkpoint_nbytes(abstract_state) -> int:
    """Expected bytes of one checkpoint: every array of the state plus METADATA_ALLOWANCE.

    Accepts a TrainState of arrays or of jax.ShapeDtypeStruct. Orbax compresses chunks,
    so real checkpoints of trained (incompressible) floats come in slightly under this.
    """
    leaves = jax.tree_util.tree_leaves(abstract_state)
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves) + METADATA_ALLOWANCE


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _free_bytes(directory: pathlib.Path) -> int:
    """Free bytes on the file system that holds (or will hold) `directory`."""
    existing = pathlib.Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def check_disk_space(directory, one_checkpoint_bytes: int, keep: int) -> str:
    """A line to log before training; raises CheckpointDiskFullError below two checkpoints.

    Two is the least a run can work with: a new checkpoint is written in full before the
    one it replaces is deleted. The peak on disk is keep + 2 (the latest `keep`, the best
    kept beside them, and one being written).
    """
    directory = pathlib.Path(directory)
    free = _free_bytes(directory)
    if free < 2 * one_checkpoint_bytes:
        raise CheckpointDiskFullError(
            f"{directory}: {_gb(free)} ({free} bytes) free, but a run needs room for two checkpoints of "
            f"{_gb(one_checkpoint_bytes)} each ({2 * one_checkpoint_bytes} bytes). Free space there, or "
            "choose a --workdir on a larger disk"
        )
    line = (
        f"one checkpoint {_gb(one_checkpoint_bytes)}, keep={keep} -> {_gb(keep * one_checkpoint_bytes)} "
        f"(peak {_gb((keep + 2) * one_checkpoint_bytes)} with the best and one save in flight), "
        f"free {_gb(free)} in {directory}"
    )
    if free < (keep + 2) * one_checkpoint_bytes:
        logging.warning("%s: not enough for the peak; a later save may stop the run with a full disk", line)
    return line


def _is_disk_full(error: BaseException | None) -> bool:
    """True if the error, or any error it was raised from, is ENOSPC / EDQUOT."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        # tensorstore raises ValueError("... No space left on device [os_error_code='28']").
        if "No space left on device" in text or "os_error_code='28'" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


# --------------------------------------------------------------------------- checksums


def _as_uint32(x: jax.Array) -> jax.Array:
    """The array's raw bits as uint32 (8- and 16-bit values zero-extended)."""
    itemsize = np.dtype(x.dtype).itemsize
    if itemsize == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if itemsize in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * itemsize}")).astype(jnp.uint32)
    raise TypeError(f"checksums cover 8-, 16- and 32-bit arrays; got {x.dtype}")


def _row_major_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major position, mod 2**32, built from iotas (no reshape, so a
    sharded array is never gathered)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


@jax.jit
def _checksums(leaves: list) -> jax.Array:
    """Per array: sum over elements of bits * (2 * position + 1), mod 2**32.

    Odd weights make every single flipped bit change the sum, and position-dependent ones
    make moved or swapped blocks change it. Integer sums are exact in any order, so the
    value does not depend on sharding or device. This guards against storage faults, not
    against deliberate tampering.
    """
    return jnp.stack(
        [jnp.sum(_as_uint32(x) * (2 * _row_major_index(x.shape) + 1), dtype=jnp.uint32) for x in leaves]
    )


def tree_checksums(tree) -> dict[str, int]:
    """{path: checksum} for every array of a pytree (paths as jax.tree_util.keystr)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    values = hosts.host_array(_checksums([jnp.asarray(leaf) for _, leaf in flat]))
    return {jax.tree_util.keystr(path): int(value) for (path, _), value in zip(flat, values)}


def _verify_checksums(step: int, item: str, tree, recorded: dict[str, int]) -> None:
    actual = tree_checksums(tree)
    if set(actual) != set(recorded):
        raise CheckpointError(
            f"step {step}: {item} holds arrays {sorted(actual)} but its save recorded {sorted(recorded)}"
        )
    bad = [path for path in recorded if recorded[path] != actual[path]]
    if bad:
        more = f" and {len(bad) - 1} more array(s)" if len(bad) > 1 else ""
        raise CheckpointError(
            f"step {step}: {item}{bad[0]}{more} does not match the checksum recorded when it was saved: "
            "its files are corrupted"
        )


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
        free = _free_bytes(self.directory)
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
        if _is_disk_full(error):
            return CheckpointDiskFullError(
                self._disk_full_message(step, self._pending_nbytes, _free_bytes(self.directory))
            )
        return CheckpointError(
            f"saving step {step} to {self.directory} failed ({_short(error)}); the committed checkpoints "
            f"{self.all_steps()} are untouched"
        )

    def _disk_full_message(self, step: int | None, needed: int, free: int) -> str:
        return (
            f"disk full: saving step {step} to {self.directory} needs about {needed} bytes ({_gb(needed)}), "
            f"{free} bytes ({_gb(free)}) are free. The committed checkpoints {self.all_steps()} are intact. "
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
        _verify_checksums(step, TRAINABLE, restored[TRAINABLE], meta["checksums"][TRAINABLE])
        _verify_checksums(step, OPT_STATE, restored[OPT_STATE], meta["checksums"][OPT_STATE])
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
    _verify_checksums(step, TRAINABLE, restored[TRAINABLE], restored[META]["checksums"][TRAINABLE])
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
