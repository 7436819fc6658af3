"""Device mesh and partition rules for the Phase 1 step.

The mesh has two axes, ('data', 'model'):

* the batch is split over every device, ('data', 'model') together, so each device
  computes the body for its own blocks and per-device FLOPs do not depend on how the
  devices are arranged (with the batch on 'data' alone, every device of a 'model' group
  repeated the same forward and backward);
* the vocabulary axis of the trainable table, of an untied head and of every optimiser
  state leaf that carries that axis (Adafactor's row factors, Adam's moments) is split
  over 'model'. Phase 1 is vocab-heavy: the table (76,500 x 2,048) and its optimiser
  state are the only per-step-updated memory, so they are what is worth sharding;
* the frozen body is fully sharded: each stacked layer matrix (layers, in, out) is split
  over every device along its largest divisible non-layer axis, and gathered one layer
  at a time inside the layer scan (`gather_weights`, called by the model's projections).
  Per-device body memory is the body / device count plus one gathered layer, so a body
  larger than one device (Llama-3.1-8B: 16 GB in bf16) runs on 16 GB devices. Norm
  scales, a few KB per layer, stay replicated.

The vocabulary is padded to a multiple of lcm(128, |model|) so the table shards evenly and
XLA tiles the head matmul cleanly; wake2vec.models.padding adds and cuts those rows and says
why no statistic sees them.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from wake2vec.models import padding
from wake2vec.errors import UserError
from wake2vec.launcher import EXIT_USER_ERROR

DATA, MODEL = "data", "model"


class DistributedFlagsError(UserError, ValueError):
    """The multi-host flags do not name a run this process can join."""


class DistributedStartError(UserError, RuntimeError):
    """jax.distributed could not start: no cluster detected, or the coordinator never answered."""


def _check_coordinator_address(address: str) -> None:
    """host:port with a port number and a host name that resolves (JAX itself fails on
    "nohost" with an IndexError from deep inside)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedFlagsError(f"--coordinator_address={address!r}: give the coordinator as HOST:PORT, "
                                    "e.g. 10.0.0.2:8476 (process 0 listens there)")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port))
    except OSError as error:
        raise DistributedFlagsError(f"--coordinator_address={address!r}: the host {host!r} does not resolve "
                                    f"({error.strerror or error}); give process 0's address") from None


def check_distributed_flags(cfg) -> None:
    """Refuses multi-host flags that would be ignored or that JAX would fail on obscurely."""
    explicit = [name for name, unset in (("coordinator_address", ""), ("num_processes", 0), ("process_id", -1))
                if getattr(cfg, name) != unset]
    if explicit and not cfg.distributed:
        raise DistributedFlagsError(f"{', '.join('--' + n for n in explicit)}: used only with --distributed; "
                                    "add --distributed (or drop them for a single-process run)")
    if not cfg.distributed:
        return
    if cfg.coordinator_timeout_s < 1 or cfg.heartbeat_timeout_s < 1:
        raise DistributedFlagsError("--coordinator_timeout_s and --heartbeat_timeout_s must be at least 1 second")
    if cfg.coordinator_address:
        _check_coordinator_address(cfg.coordinator_address)
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise DistributedFlagsError(
                f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < --num_processes "
                f"(got {cfg.num_processes} and {cfg.process_id})")
    elif explicit:
        raise DistributedFlagsError(f"{', '.join('--' + n for n in explicit)} need --coordinator_address=HOST:PORT "
                                    "(without it JAX detects the cluster and numbers the processes itself)")


_JAX_DEADLINE_MARGIN_S = 30


def _give_up_waiting(seconds: int, where: str) -> None:
    """Runs on the watchdog thread: one line, then exit at once (the main thread is inside JAX's C++ wait)."""
    logging.error("gave up after %d s waiting for the other processes at the coordinator %s: start every process "
                  "(with the same --coordinator_address and --num_processes) within that time, or raise "
                  "--coordinator_timeout_s", seconds, where)
    logging.shutdown()
    os._exit(EXIT_USER_ERROR)


def maybe_initialize_distributed(cfg) -> None:
    """Multi-host runs (TPU pod slices, multi-node GPU) must initialise before any jax call.

    `cfg` is the run's TrainConfig. Without --coordinator_address JAX detects the cluster
    (Cloud TPU, SLURM, Open MPI, Kubernetes); with it, the processes are named explicitly
    (--num_processes, --process_id), as on hosts JAX does not know how to detect. Waiting
    for the others is announced and bounded (--coordinator_timeout_s), and a process that
    dies mid-run is noticed within --heartbeat_timeout_s.
    """
    check_distributed_flags(cfg)
    if not cfg.distributed:
        return
    where = cfg.coordinator_address or "the address the cluster environment gives"
    who = f"process {cfg.process_id} of {cfg.num_processes}" if cfg.coordinator_address else "this process"
    if cfg.coordinator_address:  # a detected cluster announces itself
        logging.info("jax.distributed: %s waiting up to %d s for every process at the coordinator %s",
                     who, cfg.coordinator_timeout_s, where)
    # JAX aborts the interpreter (a C++ check failure) when its own deadline passes, so the
    # clear message has to come first: a watchdog ends the wait a little before JAX would.
    watchdog = threading.Timer(cfg.coordinator_timeout_s, _give_up_waiting, (cfg.coordinator_timeout_s, where))
    watchdog.daemon = True
    watchdog.start()
    timeouts = dict(initialization_timeout=cfg.coordinator_timeout_s + _JAX_DEADLINE_MARGIN_S,
                    heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    try:
        if cfg.coordinator_address:
            jax.distributed.initialize(cfg.coordinator_address, cfg.num_processes, cfg.process_id, **timeouts)
        else:
            jax.distributed.initialize(**timeouts)
    except ValueError as error:
        if "coordinator_address should be defined" not in str(error):
            raise
        raise DistributedStartError(
            "--distributed found no cluster to join (no Cloud TPU, SLURM, Open MPI or Kubernetes environment): pass "
            "--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process") from None
    finally:
        watchdog.cancel()
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def parse_mesh(spec: str, num_devices: int) -> tuple[int, int]:
    """'data,model' -> (data, model); empty puts every device on 'model'.

    With the batch and the body on every device either way, the axes differ only in the
    table: 'model' splits it, 'data' replicates it. All on 'model' is the least memory
    and the same per-device FLOPs; 'data' > 1 only pays where the devices of a 'model'
    group have fast links and 'data' spans slower ones (the table's all-gathers stay in
    the group, only its gradient crosses).
    """
    if not spec:
        return 1, num_devices
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
    """The table's row count on this mesh (wake2vec.models.padding owns the rule)."""
    return padding.padded_rows(vocab_size, mesh.shape[MODEL])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int) -> NamedSharding:
    """Splits axis `batch_axis` of an `ndim`-dimensional batch over every device ('data', 'model')."""
    spec = [None] * ndim
    spec[batch_axis] = (DATA, MODEL)
    return NamedSharding(mesh, P(*spec))


def frozen_sharding(tree, mesh: Mesh, vocab_rows: int | None = None):
    """A sharding per frozen leaf: stacked layer matrices split over every device, the rest replicated.

    A leaf with at least three axes is a (layers, in, out) stack; its largest axis after the
    layer axis that divides by the device count is split over ('data', 'model'). The layer
    axis itself is never split: the scan slices it, and a split one would be gathered whole.
    A frozen table (Phase 2 trains the adapters over Phase 1's table) and an untied head
    are split on their vocabulary axis as a trainable one is (`vocab_sharded_like`).
    """
    devices = mesh.devices.size
    tables = {k: tree[k] for k in ("embedding", "lm_head") if k in tree}
    if tables:
        if vocab_rows is None:
            raise ValueError("a frozen tree holding the table needs its padded row count")
        body = {k: v for k, v in tree.items() if k not in tables}
        return {**frozen_sharding(body, mesh), **vocab_sharded_like(tables, mesh, vocab_rows)}

    replicated_bytes = []

    def rule(leaf):
        shape = getattr(leaf, "shape", ())
        spec = [None] * len(shape)
        if len(shape) >= 3:
            axes = [a for a in range(1, len(shape)) if shape[a] % devices == 0]
            if axes:
                spec[max(axes, key=lambda a: shape[a])] = (DATA, MODEL)
            elif devices > 1:
                replicated_bytes.append((shape, math.prod(shape) * np.dtype(leaf.dtype).itemsize))
        return NamedSharding(mesh, P(*spec))

    shardings = jax.tree_util.tree_map(rule, tree)
    if replicated_bytes:
        # Correct, but each device then holds the whole matrix: say so, with what it costs.
        logging.warning(
            "%d frozen body matrices (shapes %s) have no axis divisible by the %d devices, so every device holds "
            "them whole: %.2f GB more per device than split; a device count dividing the model's dimensions avoids it",
            len(replicated_bytes), sorted({shape for shape, _ in replicated_bytes}), devices,
            sum(n for _, n in replicated_bytes) * (1 - 1 / devices) / 1e9)
    return shardings


def shard_loss_chunk(hidden: jax.Array) -> jax.Array:
    """One chunk of the loss's hidden states (tokens, D), its tokens split over 'data' only.

    The head's rows are split over 'model', so each device then forms the logits of its
    data slice's tokens against its own rows: (tokens / |data|) x (rows / |model|), the
    same per-device work on every mesh. Gathering a chunk over 'model' costs tokens x D,
    far less than moving the head. No-op outside a mesh context.
    """
    if jax.sharding.get_abstract_mesh().empty:
        return hidden
    return jax.lax.with_sharding_constraint(hidden, P(DATA, None))


def gather_weights(kernel: jax.Array) -> jax.Array:
    """One layer's frozen matrix, replicated on every device of the current mesh.

    Called inside the layer scan, so XLA all-gathers each layer just before its matmuls (and
    again in the rematerialised backward pass) instead of keeping the whole body on every
    device. Outside a mesh context (`jax.set_mesh`), e.g. single-device generation, it does
    nothing.
    """
    if jax.sharding.get_abstract_mesh().empty:
        return kernel
    return jax.lax.with_sharding_constraint(kernel, P())


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


def state_sharding(abstract_state, mesh: Mesh, rows: int):
    """The TrainState's shardings: step replicated, table and optimiser state vocab-sharded."""
    return abstract_state.replace(
        step=replicated(mesh),
        trainable=vocab_sharded_like(abstract_state.trainable, mesh, rows),
        opt_state=vocab_sharded_like(abstract_state.opt_state, mesh, rows),
    )


def jit_train_step(step_fn, mesh: Mesh, state_shardings, frozen_shardings):
    """`train_step(state, frozen, batch (accum, B, T))` jitted with the run's shardings.

    Call it (or `.lower` it) inside `jax.set_mesh(mesh)`, so the body's
    per-layer gathers are traced.
    """
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, frozen_shardings, batch_sharding(mesh, 3, 1)),
        out_shardings=(state_shardings, replicated(mesh)),
        donate_argnums=(0,),
    )
