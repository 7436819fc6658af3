"""Device mesh and partition rules for the Phase 1 step.

The mesh has two axes, ('data', 'model'):

* the batch is split over 'data' (each data slice sees different blocks);
* the vocabulary axis of the trainable table, of an untied head and of every optimiser
  state leaf that carries that axis (Adafactor's row factors, Adam's moments) is split
  over 'model'. Phase 1 is vocab-heavy: the table (76,500 x 2,048) and its optimiser
  state are the only per-step-updated memory, so they are what is worth sharding;
* the frozen body is replicated. It is read-only, so replicas never diverge, and at
  TinyLlama's size it is 2.2 GB in bf16 per device.

The vocabulary is padded to a multiple of 128 x |model| so the table shards evenly and
XLA tiles the head matmul cleanly; wake2vec.padding adds and cuts those rows and says
why no statistic sees them.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wake2vec import padding

DATA, MODEL = "data", "model"


def maybe_initialize_distributed(enabled: bool) -> None:
    """Multi-host runs (TPU pod slices, multi-node GPU) must initialise before any jax call."""
    if enabled:
        jax.distributed.initialize()
        logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def parse_mesh(spec: str, num_devices: int) -> tuple[int, int]:
    """'data,model' -> (data, model); empty puts every device on 'data'."""
    if not spec:
        return num_devices, 1
    try:
        data, model = (int(x) for x in spec.split(","))
    except ValueError as e:
        raise ValueError(f"--mesh={spec!r}: expected two integers 'data,model', e.g. '8,1' or '4,2'") from e
    if data * model != num_devices:
        raise ValueError(f"--mesh={spec!r} needs {data * model} devices but {num_devices} are available")
    return data, model


def make_mesh(spec: str = "", devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    data, model = parse_mesh(spec, len(devices))
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def padded_vocab(vocab_size: int, mesh: Mesh) -> int:
    """The table's row count on this mesh (wake2vec.padding owns the rule)."""
    return padding.padded_rows(vocab_size, mesh.shape[MODEL])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    """Splits axis `batch_axis` of an `ndim`-dimensional batch over 'data'."""
    spec = [None] * ndim
    spec[batch_axis] = DATA
    return NamedSharding(mesh, P(*spec))


def vocab_sharded_like(tree, mesh: Mesh, vocab_rows: int):
    """A sharding per leaf: the first axis of length `vocab_rows` goes on 'model', the rest replicated.

    Used for the trainable table, the head and their optimiser state, whose vocabulary axis
    sits in different positions ((V, D) table, (D, V) head, (V,) Adafactor row factors).
    Leaves without such an axis (scalars, column factors, counters) are replicated.
    """

    def rule(leaf):
        shape = getattr(leaf, "shape", ())
        for axis, size in enumerate(shape):
            if size == vocab_rows:
                spec = [None] * len(shape)
                spec[axis] = MODEL
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map(rule, tree)
