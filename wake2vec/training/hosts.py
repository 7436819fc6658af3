"""One writer per run: which process writes the workdir, and how the others wait for it.

A multi-host run is the same program started on every host (`--distributed`). Left to
itself each copy would take the workdir lock, write config.json, the tokenizer, the caches
and every metrics line, and set checkpoints aside: N processes writing each file N times,
racing on renames, or stopping at each other's lock. So:

* **Process 0 is the writer.** Every workdir write goes through `writer_only` (a
  decorator on the write functions) or tests `is_writer()`; the other processes compute
  exactly what process 0 computes and write nothing.
* **Reads of what the writer wrote wait at a `barrier`.** All processes run the same
  control flow, so they reach each barrier in the same order.
* **Decisions that depend on a write are the writer's** (`agree`): whether the lock was
  taken, for example, is broadcast from process 0, so every process stops together.
* **Host copies of sharded arrays** (`host_array`) are gathered across processes only
  when this process does not hold every shard (a table split over a 'model' axis that
  spans hosts); a single-process run never gathers.

Orbax's CheckpointManager is already collective (every process writes its own shards,
process 0 the metadata and the commit), so checkpoints do not go through this gate.
In a single-process run every function here is the trivial one: the writer is the only
process, barriers return at once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

WRITER = 0

F = TypeVar("F", bound=Callable[..., Any])


def is_writer() -> bool:
    """True on the one process that writes the workdir (process 0)."""
    return jax.process_index() == WRITER


def writer_only(fn: F) -> F:
    """Runs `fn` (a workdir write) on the writer only; elsewhere it does nothing and returns None."""

    @functools.wraps(fn)
    def gated(*args, **kwargs):
        return fn(*args, **kwargs) if is_writer() else None

    return gated  # type: ignore[return-value]


def barrier(name: str) -> None:
    """Waits until every process has arrived here; `name` must match across processes.

    Implemented as a tiny cross-process all-gather (multihost_utils.sync_global_devices),
    which also checks that every process reached the same barrier, so a diverged control
    flow fails loudly instead of pairing the wrong barriers.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree(flag: bool) -> bool:
    """The writer's value of `flag` on every process (a broadcast; the local value elsewhere is ignored)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def writer_first(fn: F, *args, **kwargs):
    """`fn` creates files if they are missing and returns where they are: the writer runs it
    first, then, after a barrier, every other process runs it and finds them in place."""
    result = fn(*args, **kwargs) if is_writer() else None
    barrier(f"writer_first:{getattr(fn, '__qualname__', fn)}")
    return result if is_writer() else fn(*args, **kwargs)


def host_array(x) -> np.ndarray:
    """A host (NumPy) copy of an array that may be sharded over devices of several processes.

    Collective when the array is not fully addressable (every process must call it, in the
    same order); otherwise a plain device_get.
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
