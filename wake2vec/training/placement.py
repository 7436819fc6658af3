"""A train step's arrays placed on the mesh, and the step compiled there: the one recipe
the loop runs and the benchmarks time.

A benchmark that jits the step on one device measures another program than the launcher's:
no per-layer gathers of the body, no vocabulary-split table, other buffer donation. Both
build the step from these functions, so what is timed is what trains.

The order is the loop's: pad the host trees to the mesh's row count, move them leaf by leaf
(wake2vec.models.convert.to_device empties the host trees as it goes), then derive the
TrainState's shardings from its abstract shape, which is also what a checkpoint restores into.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from wake2vec.models import convert, padding
from wake2vec.training import parallel, train


@dataclasses.dataclass
class Placement:
    """The arrays on the mesh and the shardings the compiled step is built with.

    `trainable` is the placed table (and adapters) a fresh state is initialised from; set it
    to None once the state exists, so its buffers can go. `abstract_state` carries shapes,
    dtypes and shardings: a checkpoint restores into it without touching a device.
    """

    mesh: Mesh
    rows: int
    frozen: dict
    frozen_sharding: dict
    trainable: dict | None
    state_sharding: train.TrainState
    abstract_state: train.TrainState

    @property
    def batch_sharding(self):
        """How a step's (accum, B, T) token batch is laid out: B over every device."""
        return parallel.batch_sharding(self.mesh, 3, 1)


def place(trainable_host: dict, frozen_host: dict, tx: optax.GradientTransformation, mesh: Mesh, rows: int) -> Placement:
    """Pads both trees to `rows` table rows and moves them onto `mesh`; the host trees are consumed."""
    frozen_host = padding.pad(frozen_host, rows)
    frozen_sharding = parallel.frozen_sharding(frozen_host, mesh, rows)
    frozen = convert.to_device(frozen_host, frozen_sharding)
    trainable_host = padding.pad(trainable_host, rows)
    trainable = convert.to_device(trainable_host, parallel.vocab_sharded_like(trainable_host, mesh, rows))
    abstract = jax.eval_shape(lambda t, f: train.init_state(t, f, tx), trainable, frozen)
    state_sharding = parallel.state_sharding(abstract, mesh, rows)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    return Placement(mesh, rows, frozen, frozen_sharding, trainable, state_sharding, abstract)


def initial_state(placed: Placement, tx: optax.GradientTransformation) -> train.TrainState:
    """A fresh TrainState at step 0, laid out as the step expects it (its own copy of the table)."""
    return jax.jit(lambda t, f: train.init_state(t, f, tx), out_shardings=placed.state_sharding)(placed.trainable, placed.frozen)


def compile_train_step(step_fn, placed: Placement, state: train.TrainState, batch_shape: tuple[int, int, int]):
    """`step_fn(state, frozen, batch (accum, B, T))` jitted with the placement's shardings and
    compiled ahead of time (so compile time is not mistaken for the first step's) for `state`
    as it will be passed (restored or fresh: lowered from the arrays themselves, weak types and all).

    Lowered inside the mesh, so the body's per-layer gathers (parallel.gather_weights) are
    traced into the program; the compiled step is then called with or without the mesh set.
    """
    jitted = parallel.jit_train_step(step_fn, placed.mesh, placed.state_sharding, placed.frozen_sharding)
    batch = jax.ShapeDtypeStruct(batch_shape, np.int32, sharding=placed.batch_sharding)
    with jax.set_mesh(placed.mesh):
        return jitted.lower(state, placed.frozen, batch).compile()
