"""wake2vec.training.checkpoint: exact round trips, retention, and each fault the issue names.

The states are real: a tiny random Llama trained for a few jitted steps with the run's
optimiser, so the optimiser state has optax.partition's MaskedNode / EmptyState nodes.
Faults are made for real where a test can (SIGKILL of a saving subprocess, bytes garbled
or cut on disk, a tiny tmpfs when the test may mount one) and injected at the array
writer otherwise.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.serialization import serialization as orbax_serialization

from benchmarks.checkpoint_size import tinyllama_state
from wake2vec.training import checkpoint, optim, train
from wake2vec.phases import runs
from wake2vec.models import model
from wake2vec.training.checkpoint import CheckpointDiskFullError, CheckpointError, Checkpointer
from wake2vec.config import ModelConfig, TrainConfig

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB, ROWS = 200, 256  # real tokens, and table rows padded as a run pads them
MODEL_CFG = ModelConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
TRAIN_CFG = TrainConfig(max_steps=20, batch_size=2, grad_accum=2, seq_len=16, warmup_ratio=0.1)


class TinyRun:
    """Frozen body, optimiser and jitted step of a tiny untied run, and its state after 2 steps."""

    def __init__(self):
        params = model.init_params(MODEL_CFG, jax.random.key(0))
        params["embedding"] = jnp.pad(params["embedding"], ((0, ROWS - VOCAB), (0, 0)))
        params["lm_head"]["kernel"] = jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, ROWS - VOCAB)))
        trainable, self.frozen = optim.split_params(params)
        tx = optim.make_optimizer(TRAIN_CFG, base_vocab_size=150)
        settings = train.StepSettings(MODEL_CFG, remat="none", loss_chunk=16)
        self.step_fn = jax.jit(train.make_train_step(tx, optim.make_schedule(TRAIN_CFG), settings))
        self.initial = train.init_state(trainable, self.frozen, tx)
        self.state = self.advance(self.initial, 2)

    def advance(self, state, n: int):
        for _ in range(n):
            ids = jax.random.randint(jax.random.key(100 + int(state.step)), (2, 2, 16), 0, VOCAB, dtype=jnp.int32)
            state, _ = self.step_fn(state, self.frozen, ids)
        return state

    def at_step(self, step: int):
        """A distinct state labelled `step` (cheap: no training), for retention tests."""
        return self.state.replace(
            step=jnp.asarray(step, jnp.int32),
            trainable=jax.tree_util.tree_map(lambda x: x + step, self.state.trainable),
        )


@pytest.fixture(scope="module")
def run() -> TinyRun:
    return TinyRun()


def abstract_of(state):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)


def assert_same_state(actual, expected):
    """Same tree (node types included) and bit-identical leaves."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def write_run_config(workdir: pathlib.Path, total: int = VOCAB) -> None:
    record = {
        "flags": {"tie_embeddings": False}, "model_source": str(workdir / "no_source"), "source_hash": "0" * 64,
        "vocab": {"base_size": 150, "lexicon_words": 60, "already_in_base": 10, "added": 50, "total": total},
        "padded_vocab": ROWS,
    }
    (workdir / "config.json").write_text(json.dumps(record))


def fake_disk_usage(free: int):
    usage = collections.namedtuple("usage", "total used free")
    return lambda path: usage(10 * free + 1, 0, free)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_exact_and_training_continues_identically(tmp_path, run, async_save):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=async_save)
    ckpt.save(run.state, val_loss=3.5)
    ckpt.close()

    resumed = Checkpointer(tmp_path / "checkpoints", keep=2, abstract_state=abstract_of(run.state))
    restored = resumed.restore_latest()
    resumed.close()
    assert int(restored.step) == 2
    assert_same_state(restored, run.state)
    for leaf, ref in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(run.state)):
        assert leaf.sharding == ref.sharding
    # The optimiser state is live, not just equal: the next step is the uninterrupted one's.
    assert_same_state(run.advance(restored, 1), run.advance(run.state, 1))


def test_an_async_save_is_safe_from_the_next_step_donating_the_state(tmp_path, run):
    # Orbax copies the arrays to host before save() returns, so the training loop may
    # donate (overwrite) the state's buffers while the write goes on in the background.
    expected = jax.tree_util.tree_map(lambda x: np.array(x, copy=True), run.state)
    state = jax.tree_util.tree_map(jnp.copy, run.state)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, abstract_state=abstract_of(run.state))
    ckpt.save(state)
    overwrite = jax.jit(lambda s: jax.tree_util.tree_map(lambda x: x * 0 + 7, s), donate_argnums=0)
    jax.block_until_ready(overwrite(state))
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state)), "the buffers were donated"
    ckpt.wait()
    assert_same_state(jax.tree_util.tree_map(np.asarray, ckpt.restore_latest()), expected)
    ckpt.close()


# Two host devices, the table's vocabulary axis split over 'model' as a run shards it.
_SHARDED_SAVER = """
import pathlib, sys
import jax
from jax.sharding import PartitionSpec as P
from benchmarks.checkpoint_size import tinyllama_state
from wake2vec.training import checkpoint, parallel, train
from wake2vec.phases import runs

directory = pathlib.Path(sys.argv[1])
mesh = parallel.make_mesh("1,2")
host_state = tinyllama_state(rows=256, dim=64)
shardings = train.TrainState(
    parallel.replicated(mesh),
    parallel.vocab_sharded_like(host_state.trainable, mesh, 256),
    parallel.vocab_sharded_like(host_state.opt_state, mesh, 256),
)
state = jax.device_put(host_state, shardings)
abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
ckpt = checkpoint.Checkpointer(directory, keep=1, abstract_state=abstract)
ckpt.save(state)
restored = ckpt.restore_latest()
ckpt.close()
table = restored.trainable["embedding"]
assert len(table.sharding.device_set) == 2 and table.sharding.spec == P("model", None), table.sharding
assert checkpoint.tree_checksums(state) == checkpoint.tree_checksums(jax.device_get(host_state))
print("sharded round trip ok")
"""


def test_a_sharded_save_restores_with_its_shardings_and_loads_on_one_device(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    saver = subprocess.run([sys.executable, "-c", _SHARDED_SAVER, str(tmp_path / "checkpoints")],
                           cwd=REPO, env=env, capture_output=True, text=True)
    assert saver.returncode == 0 and "sharded round trip ok" in saver.stdout, saver.stderr[-3000:]
    # This process has one device: the analysis / export path must not need the saving topology.
    trainable, step = checkpoint.load_trainable(tmp_path)
    assert step == 1
    assert_same_state(trainable, jax.tree_util.tree_map(np.asarray, tinyllama_state(rows=256, dim=64).trainable))


def test_restore_latest_of_an_empty_directory_is_none(tmp_path, run):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, abstract_state=abstract_of(run.state))
    assert ckpt.restore_latest() is None
    assert ckpt.all_steps() == [] and ckpt.best_step is None
    ckpt.close()


def test_only_the_trainable_state_is_written(tmp_path, run):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, async_save=False)
    ckpt.save(run.state)
    ckpt.close()
    write_run_config(tmp_path)
    trainable, step = checkpoint.load_trainable(tmp_path)
    assert step == 2 and set(trainable) == {"embedding", "lm_head"}
    assert all(isinstance(leaf, np.ndarray) for leaf in jax.tree_util.tree_leaves(trainable))
    on_disk = sum(p.stat().st_size for p in (tmp_path / "checkpoints" / "2").rglob("*") if p.is_file())
    state_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(run.state))
    assert checkpoint.checkpoint_nbytes(abstract_of(run.state)) == state_bytes + checkpoint.METADATA_ALLOWANCE
    assert on_disk <= checkpoint.checkpoint_nbytes(run.state)


def test_adafactor_checkpoint_is_within_1_1x_the_table(tmp_path):
    # The bound at a tenth of TinyLlama's scale (experiments/checkpoint_size.py
    # measures the full size); random values, so compression cannot flatter it.
    state = tinyllama_state(rows=7_680, dim=256)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=1, async_save=False)
    ckpt.save(state)
    ckpt.close()
    on_disk = sum(p.stat().st_size for p in (tmp_path / "checkpoints" / "1").rglob("*") if p.is_file())
    assert on_disk <= 1.1 * state.trainable["embedding"].nbytes


# --------------------------------------------------------------------------- retention and save rules


def test_keeps_the_latest_and_the_best_by_val_loss(tmp_path, run):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep=2, async_save=True)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.5), (4, None), (5, 2.0), (6, float("nan"))]:
        ckpt.save(run.at_step(step), val_loss=loss)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6]
    assert ckpt.best_step == 2
    ckpt.close()

    # The best survives a restart (its loss is read back from the step's record) ...
    reopened = Checkpointer(directory, keep=2, abstract_state=abstract_of(run.state))
    assert reopened.best_step == 2
    reopened.save(run.at_step(7), val_loss=2.2)
    reopened.wait()
    assert reopened.all_steps() == [2, 6, 7]
    # ... until a better one replaces it.
    reopened.save(run.at_step(8), val_loss=0.5)
    reopened.wait()
    assert reopened.all_steps() == [7, 8] and reopened.best_step == 8
    assert_same_state(reopened.restore_latest(), run.at_step(8))
    reopened.close()


def test_save_of_a_committed_step_is_a_no_op_and_of_an_older_step_an_error(tmp_path, run):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=False)
    ckpt.save(run.at_step(5))
    ckpt.save(run.at_step(5))
    assert ckpt.all_steps() == [5]
    with pytest.raises(CheckpointError, match="later step 5"):
        ckpt.save(run.at_step(4))
    ckpt.close()


# --------------------------------------------------------------------------- SIGKILL during a save

# Saves step 1, then starts saving step 2 with Orbax stalled at the chosen point, and
# signals the parent through a marker file. The stall patches an Orbax internal at the
# exact moment: a kill "somewhere in a save" would make the test depend on timing.
_KILLED_SAVER = """
import pathlib, sys, time
from benchmarks.checkpoint_size import tinyllama_state
from wake2vec.training import checkpoint
from wake2vec.phases import runs

directory, where, marker = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
state = tinyllama_state(rows=256, dim=64)
ckpt = checkpoint.Checkpointer(directory, keep=3)
ckpt.save(state)
ckpt.wait()

async def stall(*args, **kwargs):
    marker.write_text("stalled")
    time.sleep(600)

if where == "before_commit":  # every file written, the final rename not done
    from orbax.checkpoint._src.path import atomicity
    atomicity.on_commit_callback = stall
else:  # the step's directory created, no array data written yet
    from orbax.checkpoint._src.serialization import serialization
    serialization.async_serialize_from_host = stall
ckpt.save(state.replace(step=state.step + 1, trainable={"embedding": state.trainable["embedding"] + 1}))
ckpt.wait()
"""


@pytest.mark.parametrize("where", ["mid_write", "before_commit"])
def test_sigkill_during_a_save_resumes_from_the_previous_commit(tmp_path, where):
    directory, marker = tmp_path / "checkpoints", tmp_path / "stalled"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    saver = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SAVER, str(directory), where, str(marker)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert saver.poll() is None, saver.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the saver never reached the stall"
            time.sleep(0.05)
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        saver.wait()
        saver.stderr.close()
    assert saver.returncode == -signal.SIGKILL
    assert any(p.name.startswith("2.") for p in directory.iterdir()), "step 2's temporary directory should exist"

    state = tinyllama_state(rows=256, dim=64)
    ckpt = Checkpointer(directory, keep=3, abstract_state=abstract_of(state))
    assert ckpt.all_steps() == [1]
    assert_same_state(ckpt.restore_latest(), state)
    # The killed save's leftovers are cleared, and step 2 can be written again.
    ckpt.save(state.replace(step=state.step + 1))
    ckpt.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


# --------------------------------------------------------------------------- corrupted checkpoints


def _largest_file(directory: pathlib.Path) -> pathlib.Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _garble(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0x5A for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    # bytes flipped inside the table's data: Orbax reads it without complaint, the checksum catches it
    "garbled_table": lambda step_dir: _garble(_largest_file(step_dir / "trainable")),
    "truncated_optimizer_state": lambda step_dir: os.truncate(_largest_file(step_dir / "opt_state"), 10),
    "garbled_record": lambda step_dir: (step_dir / "meta" / "metadata").write_text("{not json"),
    "missing_item": lambda step_dir: shutil.rmtree(step_dir / "opt_state"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_the_previous_with_a_warning(tmp_path, run, caplog, corruption):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    ckpt.save(run.at_step(1), val_loss=2.0)
    ckpt.save(run.at_step(2), val_loss=1.0)
    ckpt.close()
    CORRUPTIONS[corruption](directory / "2")

    resumed = Checkpointer(directory, keep=3, abstract_state=abstract_of(run.state))
    with caplog.at_level(logging.WARNING):
        restored = resumed.restore_latest()
    assert_same_state(restored, run.at_step(1))
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "step 2" in warnings and str(directory) in warnings
    if corruption == "garbled_table":
        assert "checksum" in warnings
    # The unusable step is set aside (not deleted), so the resumed run can write step 2 again.
    assert resumed.all_steps() == [1]
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints_corrupt").iterdir()] == ["2"]
    resumed.save(run.at_step(2))
    resumed.wait()
    assert resumed.all_steps() == [1, 2]
    assert_same_state(resumed.restore_latest(), run.at_step(2))
    resumed.close()


def test_no_restorable_checkpoint_is_an_error_not_a_fresh_start(tmp_path, run):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    ckpt.save(run.at_step(1))
    ckpt.close()
    CORRUPTIONS["garbled_table"](directory / "1")
    resumed = Checkpointer(directory, keep=3, abstract_state=abstract_of(run.state))
    with pytest.raises(CheckpointError, match=r"no checkpoint .* can be restored .*step 1: .*checksum"):
        resumed.restore_latest()
    assert resumed.all_steps() == [1], "nothing is set aside when there is nothing to fall back to"
    resumed.close()


# --------------------------------------------------------------------------- disk full


def test_disk_full_before_a_save_names_the_directory_and_the_bytes(tmp_path, run, monkeypatch):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep=3, async_save=False)
    ckpt.save(run.at_step(1))
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(free=1000))
    with pytest.raises(CheckpointDiskFullError) as error:
        ckpt.save(run.at_step(2))
    message = str(error.value)
    assert str(directory) in message and str(checkpoint.checkpoint_nbytes(run.state)) in message
    assert "1000 bytes" in message and "[1]" in message
    monkeypatch.undo()
    ckpt.close()
    assert sorted(p.name for p in directory.iterdir()) == ["1"]


TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "embedding/0.0" in OCDBT database at local file "...": Failed to write '
    "1745682 bytes to file 4: No space left on device [os_error_code='28']"
)


@pytest.mark.parametrize("async_save", [True, False])
@pytest.mark.parametrize("failure", ["oserror", "tensorstore"])
def test_disk_full_during_a_save_keeps_earlier_checkpoints(tmp_path, run, monkeypatch, async_save, failure):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, keep=1, async_save=async_save)
    ckpt.save(run.at_step(1), val_loss=1.0)
    ckpt.wait()

    async def full_disk(*args, **kwargs):
        if failure == "oserror":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise TENSORSTORE_ENOSPC

    monkeypatch.setattr(orbax_serialization, "async_serialize_from_host", full_disk)
    with pytest.raises(CheckpointDiskFullError) as error:
        ckpt.save(run.at_step(2), val_loss=0.5)
        ckpt.wait()  # an async save reports here
    message = str(error.value)
    assert "step 2" in message and str(directory) in message
    assert str(checkpoint.checkpoint_nbytes(run.state)) in message
    assert ckpt.all_steps() == [1] and ckpt.best_step == 1
    monkeypatch.undo()
    ckpt.close()

    # keep=1 would have deleted step 1 had step 2 committed; it must still load exactly.
    resumed = Checkpointer(directory, keep=1, abstract_state=abstract_of(run.state))
    assert_same_state(resumed.restore_latest(), run.at_step(1))
    resumed.close()


def test_real_enospc_on_a_full_tmpfs(mount_tmpfs, monkeypatch):
    # 3.1 MB of random table: the first checkpoint fits in 4 MiB, the second cannot.
    state = tinyllama_state(rows=3_072, dim=256)
    directory = mount_tmpfs("4m") / "checkpoints"
    # Report room to spare, so the saves get past the pre-check and really write until
    # the file system refuses.
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(free=1 << 40))
    ckpt = Checkpointer(directory, keep=1, async_save=True)
    ckpt.save(state)
    ckpt.wait()
    with pytest.raises(CheckpointDiskFullError, match=str(directory)):
        ckpt.save(state.replace(step=state.step + 1))
        ckpt.wait()
    monkeypatch.undo()
    ckpt.close()
    resumed = Checkpointer(directory, keep=1, abstract_state=abstract_of(state))
    assert_same_state(resumed.restore_latest(), state)
    resumed.close()


def test_check_disk_space_reports_and_refuses_below_two_checkpoints(tmp_path, monkeypatch, caplog):
    one = 10**9
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(free=int(2.5 * one)))
    with caplog.at_level(logging.WARNING):
        line = checkpoint.check_disk_space(tmp_path / "not" / "yet" / "made", one, keep=3)
    assert "one checkpoint 1.00 GB, keep=3 -> 3.00 GB" in line and "free 2.50 GB" in line
    assert any("peak" in r.getMessage() for r in caplog.records), "below keep + 2 deserves a warning"
    monkeypatch.setattr(shutil, "disk_usage", fake_disk_usage(free=int(1.5 * one)))
    with pytest.raises(CheckpointDiskFullError, match=rf"{tmp_path}.*{2 * one} bytes"):
        checkpoint.check_disk_space(tmp_path, one, keep=3)


# --------------------------------------------------------------------------- reading a run


def test_load_table_cuts_padding_and_load_trainable_selects_steps(tmp_path, run, caplog):
    write_run_config(tmp_path)
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(run.at_step(step))
    ckpt.close()

    table, step = runs.load_table(tmp_path)
    assert step == 3 and table.dtype == np.float32 and table.shape == (VOCAB, MODEL_CFG.hidden_size)
    np.testing.assert_array_equal(table, np.asarray(run.at_step(3).trainable["embedding"])[:VOCAB])
    trainable, step = checkpoint.load_trainable(tmp_path, step=2)
    assert step == 2
    assert_same_state(trainable, jax.tree_util.tree_map(np.asarray, run.at_step(2).trainable))
    with pytest.raises(CheckpointError, match=r"no committed checkpoint at step 7; it has \[1, 2, 3\]"):
        checkpoint.load_trainable(tmp_path, step=7)

    # A reader falls back past an unusable latest step too, but leaves the directory alone.
    CORRUPTIONS["garbled_table"](tmp_path / "checkpoints" / "3")
    with caplog.at_level(logging.WARNING):
        _, step = runs.load_table(tmp_path)
    assert step == 2 and "step 3" in caplog.text
    assert (tmp_path / "checkpoints" / "3").is_dir()
    with pytest.raises(CheckpointError, match=r"step 3 in .*checksum"):
        checkpoint.load_trainable(tmp_path, step=3)


def test_loaders_explain_a_workdir_without_run_or_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        runs.load_table(tmp_path)
    write_run_config(tmp_path)
    with pytest.raises(CheckpointError, match="no committed checkpoint in .*train first"):
        runs.load_table(tmp_path)
