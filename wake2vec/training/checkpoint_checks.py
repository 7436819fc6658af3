"""What makes a checkpoint safe to trust and to write: a checksum per array, and the disk room it needs.

Apart from the Checkpointer (wake2vec.training.checkpoint) because neither needs Orbax: the checksums are
a jitted reduction that tests and benchmarks call on any pytree, and the disk checks run before a
run starts (the loop) as well as before each save.
"""

from __future__ import annotations

import errno
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from wake2vec.errors import UserError
from wake2vec.training import hosts

# Room for Orbax's own files beside the arrays of one checkpoint (tree and array
# metadata, shardings, OCDBT manifests, commit markers): 9 KB for a TinyLlama-sized table
# with Adafactor (notes/checkpoint_build.md), about 20 KB when the optimiser tree carries a
# whole model's masked leaves; 1 MiB leaves room for block rounding and larger trees.
METADATA_ALLOWANCE = 1 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written or read; the message says which and what to do."""


class CheckpointDiskFullError(CheckpointError):
    """The disk holding the checkpoints is too full for the next one."""


def checkpoint_nbytes(abstract_state) -> int:
    """Expected bytes of one checkpoint: every array of the state plus METADATA_ALLOWANCE.

    Accepts a TrainState of arrays or of jax.ShapeDtypeStruct. Orbax compresses chunks,
    so real checkpoints of trained (incompressible) floats come in slightly under this.
    """
    leaves = jax.tree_util.tree_leaves(abstract_state)
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in leaves) + METADATA_ALLOWANCE


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def free_bytes(directory: pathlib.Path) -> int:
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
    free = free_bytes(directory)
    if free < 2 * one_checkpoint_bytes:
        raise CheckpointDiskFullError(
            f"{directory}: {gb(free)} ({free} bytes) free, but a run needs room for two checkpoints of "
            f"{gb(one_checkpoint_bytes)} each ({2 * one_checkpoint_bytes} bytes). Free space there, or "
            "choose a --workdir on a larger disk"
        )
    line = (
        f"one checkpoint {gb(one_checkpoint_bytes)}, keep={keep} -> {gb(keep * one_checkpoint_bytes)} "
        f"(peak {gb((keep + 2) * one_checkpoint_bytes)} with the best and one save in flight), "
        f"free {gb(free)} in {directory}"
    )
    if free < (keep + 2) * one_checkpoint_bytes:
        logging.warning("%s: not enough for the peak; a later save may stop the run with a full disk", line)
    return line


def is_disk_full(error: BaseException | None) -> bool:
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


def verify_checksums(step: int, item: str, tree, recorded: dict[str, int]) -> None:
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
