"""Bytes on disk of one checkpoint of a TinyLlama-sized run, against the table's bytes.

    python -m benchmarks.checkpoint_size [--dir=/tmp/wake2vec_checkpoint_size] [--keep]

Builds the state a Phase 1 run checkpoints, without the model: the padded, tied table
(76,544 x 2,048 fp32, TinyLlama's 76,500 tokens padded to a multiple of 128), and the
default optimiser's state for it, initialised on the table plus one frozen leaf so that
optax.partition's masked structure is the real one. One optimiser update with a random
gradient gives the Adafactor factors realistic (incompressible) values, and the table is
random too, as a trained one is; zeros would compress away and flatter the figure.
Then it saves one checkpoint with wake2vec.training.checkpoint and reports its size and timings.
The issue's bound: at most 1.1 x the table's bytes.
"""

from __future__ import annotations

import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from wake2vec.training import checkpoint, optim, train
from wake2vec.config import TrainConfig

_DIR = flags.DEFINE_string("dir", "/tmp/wake2vec_checkpoint_size", "checkpoint directory (emptied first)")
_KEEP = flags.DEFINE_bool("keep", False, "keep the checkpoint afterwards")
_ROWS = flags.DEFINE_integer("rows", 76_544, "table rows (TinyLlama's 76,500 tokens, padded to 128)")
_DIM = flags.DEFINE_integer("dim", 2048, "table width (TinyLlama's hidden size)")
_BASE_VOCAB = 32_000


def tinyllama_state(rows: int, dim: int) -> train.TrainState:
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((rows, dim), dtype=np.float32) * 0.02)
    frozen = {"norm": {"scale": jnp.ones((dim,), jnp.float32)}}
    tx = optim.make_optimizer(TrainConfig(), _BASE_VOCAB)
    state = train.init_state({"embedding": table}, frozen, tx)
    grads = optim.gradient_tree({"embedding": jnp.asarray(rng.standard_normal((rows, dim), dtype=np.float32))}, frozen)
    _, opt_state = tx.update(grads, state.opt_state, {**frozen, **state.trainable})
    return train.TrainState(state.step + 1, state.trainable, opt_state)


def _bytes_on_disk(directory: pathlib.Path) -> tuple[int, int, int]:
    """(sum of file sizes, allocated bytes, number of files) under directory."""
    files = [p for p in directory.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_blocks * 512 for p in files), len(files)


def main(argv) -> None:
    del argv
    directory = pathlib.Path(_DIR.value)
    shutil.rmtree(directory, ignore_errors=True)
    state = tinyllama_state(_ROWS.value, _DIM.value)
    table_bytes = state.trainable["embedding"].nbytes
    opt_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state))

    start = time.perf_counter()
    checkpoint.tree_checksums(state)
    checksum_s = time.perf_counter() - start

    ckpt = checkpoint.Checkpointer(directory, keep=1, async_save=False)
    start = time.perf_counter()
    ckpt.save(state)
    ckpt.close()
    save_s = time.perf_counter() - start

    size, allocated, nfiles = _bytes_on_disk(directory / "1")
    # OCDBT keeps the arrays' chunks under ocdbt.process_0/d/ of each item.
    items = (checkpoint.TRAINABLE, checkpoint.OPT_STATE)
    array_files = sum(_bytes_on_disk(directory / "1" / item / "ocdbt.process_0" / "d")[0] for item in items)
    estimate = checkpoint.checkpoint_nbytes(state)
    print(f"table            {table_bytes:>13,} bytes ({_ROWS.value:,} x {_DIM.value:,} fp32)")
    print(f"optimiser state  {opt_bytes:>13,} bytes (Adafactor row + column factors)")
    print(f"checkpoint       {size:>13,} bytes in {nfiles} files ({allocated:,} allocated)")
    print(f"  array data     {array_files:>13,} bytes; Orbax metadata and markers {size - array_files:,} bytes")
    print(f"ratio            {size / table_bytes:.4f} x the table (bound 1.1); "
          f"allocated {allocated / table_bytes:.4f} x")
    print(f"estimate         {estimate:>13,} bytes (checkpoint_nbytes)")
    print(f"timings          checksums {checksum_s:.2f} s, synchronous save {save_s:.2f} s")
    if not _KEEP.value:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
