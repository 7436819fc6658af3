"""A real two-process run on this machine: 2 processes x 4 CPU devices = one 8-device run.

Both processes run the real launcher with --distributed and a coordinator on 127.0.0.1;
JAX's CPU client talks between them over gloo (TCP on loopback). The run is killed with
SIGKILL after a checkpoint commits, rerun and finished, and compared with the same run in
one process of 8 forced host devices. Every launcher runs under tests/audited_launch.py,
which records the files each process writes.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

# slow tier: real jax.distributed processes and kill/resume chains
pytestmark = pytest.mark.slow

# The mesh puts every device on 'model', so the table's rows are split across the two
# processes: host copies must really be gathered, and no process holds the whole table.
FLAGS = ["--seq_len=32", "--batch_size=8", "--grad_accum=1", "--log_every=2", "--eval_blocks=8",
         "--analyze=false", "--generate_at_end=false", "--max_steps=12", "--eval_every=4",
         "--save_every=4", "--snapshot_every=4", "--mesh=1,8"]
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: pathlib.Path, audit: pathlib.Path, devices: int, *extra: str,
          launcher: str = "train_p1", flags: list[str] = FLAGS) -> subprocess.Popen:
    """A launcher process whose stderr goes to a file beside its audit: a pipe nobody reads
    while we poll would fill (64 KB) and stall the run, which looked like a flaky timeout."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
    log = audit.with_suffix(".stderr")
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tests.audited_launch", str(audit), launcher, "--",
                                 f"--workdir={workdir}", *flags, *extra],
                                cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    proc.log = log
    return proc


def start_pair(workdir: pathlib.Path, audits: pathlib.Path, run: int | str, *extra: str,
               **launch) -> list[subprocess.Popen]:
    coordinator = f"--coordinator_address=127.0.0.1:{free_port()}"
    return [start(workdir, audits / f"run{run}_process{i}.jsonl", 4, "--distributed", coordinator,
                  "--num_processes=2", f"--process_id={i}", *extra, **launch) for i in range(2)]


def stderr_tail(proc: subprocess.Popen) -> str:
    return f"process {proc.args[-1]} (rc {proc.returncode}):\n" + proc.log.read_text()[-3000:]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def finish(procs: list[subprocess.Popen]) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
            assert proc.returncode == 0, stderr_tail(proc)
    finally:
        stop(procs)


def kill_after_commit(procs: list[subprocess.Popen], checkpoints: pathlib.Path, step: int) -> None:
    """SIGKILLs every process once `step` has committed; polls with a deadline, no fixed sleep."""
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (checkpoints / str(step)).is_dir():
            for proc in procs:
                assert proc.poll() is None, stderr_tail(proc)
            assert time.monotonic() < deadline, "no checkpoint appeared in time:\n" + stderr_tail(procs[0])
            time.sleep(0.05)
    finally:
        stop(procs)


def writers(audit_files) -> dict[str, set[int]]:
    """{path under the workdir: the processes that wrote it}, checkpoints/ left out (Orbax's
    saves are collective by design); `mkdir` of an existing directory writes nothing and is
    left out too."""
    out = collections.defaultdict(set)
    for process, path in audit_files:
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["path"].split(os.sep)[0] in ("checkpoints", "checkpoints_corrupt"):
                continue
            if event["event"] == "os.mkdir" and event["path"] == ".":
                continue  # workdir.mkdir(exist_ok=True): process 0 created it before the others started
            out[event["path"]].add(process)
    return out


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_processes_killed_and_resumed_equal_one_process(tmp_path):
    from wake2vec.training import checkpoint
    from wake2vec.phases import runs

    audits = tmp_path / "audit"
    audits.mkdir()
    one = tmp_path / "one_process"
    finish([start(one, audits / "one.jsonl", 8)])

    two = tmp_path / "two_processes"
    kill_after_commit(start_pair(two, audits, 0), two / "checkpoints", 4)
    _, interrupted_at = checkpoint.load_trainable(two)
    assert interrupted_at < 12, "the run finished before the kill; the test proved nothing"
    finish(start_pair(two, audits, 1))

    # Not bit-identical: the cross-process all-reduces (gloo) add the devices' partial sums
    # in another order than the in-process ones. Losses are float32 sums (about 1,800 for
    # one eval batch, where one ulp is 1.2e-4), so they agree to a relative 1e-6 (a few
    # ulps); the table, whose entries are about 0.02, to 1e-6 absolute.
    table_one, _ = runs.load_table(one)
    table_two, step = runs.load_table(two)
    assert step == 12
    np.testing.assert_allclose(table_two, table_one, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.load(two / "snapshots" / "embeddings_step_12.npy"), table_two)

    events_one, events_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
    # compile_s rides on each launch's first log event, and the two-process run launched twice.
    keys = lambda events: [(e["step"], sorted(set(e) - {"compile_s"})) for e in events]  # noqa: E731
    assert keys(events_two) == keys(events_one)  # each event once, in order, after the kill and resume
    kind = lambda e: next(k for k in ("train_loss", "val_loss", "save_s") if k in e)  # noqa: E731
    assert len({(e["step"], kind(e)) for e in events_two}) == len(events_two)
    for a, b in zip(events_two, events_one):
        for name in ("train_loss", "val_loss", "lr"):
            if name in a:
                np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=0, err_msg=f"step {a['step']} {name}")

    # Each file in the workdir is written by one process, process 0, in both invocations.
    written = writers((int(p.stem[-1]), p) for p in audits.glob("run*_process*.jsonl"))
    assert written and all(processes == {0} for processes in written.values()), written
    for name in ("config.json", "metrics.jsonl", "embeddings_pre.npy", "loss_table.md", "loss_curve.png",
                 "snapshots/embeddings_step_12.npy", "tokenizer"):  # the tokenizer directory is renamed into place
        assert name in written, name
    leftovers = [p.name for p in two.rglob("*") if ".tmp" in p.name and "checkpoints" not in p.parts]
    assert not leftovers, leftovers


def test_a_process_alone_gives_up_waiting_with_one_line(tmp_path):
    alone = start(tmp_path / "w", tmp_path / "alone.jsonl", 2, "--distributed",
                  f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2", "--process_id=1",
                  "--coordinator_timeout_s=5")
    try:
        alone.wait(timeout=TIMEOUT)
    finally:
        stop([alone])
    log = alone.log.read_text()
    assert alone.returncode == 1, stderr_tail(alone)
    assert "process 1 of 2 waiting up to 5 s" in log and "gave up after 5 s waiting for the other processes" in log, log
    assert "Traceback" not in log and "Check failure" not in log, log


def test_a_killed_peer_ends_the_survivor_promptly_and_both_resume(tmp_path):
    """Where the survivor notices depends on what it was doing. In a collective (gloo) the
    error reaches Python and wake2vec ends it at once with one line (exit 3). Waiting inside
    JAX's coordination service (Orbax's commit barrier) it never returns to Python: JAX
    aborts it (SIGABRT) once the peer misses --heartbeat_timeout_s of heartbeats. Either way
    it stops within that timeout, and both restarted processes resume to the end."""
    audits = tmp_path / "audit"
    audits.mkdir()
    two = tmp_path / "two_processes"
    heartbeat = 15
    pair = start_pair(two, audits, 0, f"--heartbeat_timeout_s={heartbeat}")
    deadline = time.monotonic() + TIMEOUT
    try:
        while not (two / "checkpoints" / "4").is_dir():
            assert all(proc.poll() is None for proc in pair), stderr_tail(pair[0]) + stderr_tail(pair[1])
            assert time.monotonic() < deadline, "no checkpoint appeared in time:\n" + stderr_tail(pair[0])
            time.sleep(0.05)
        pair[1].kill()
        killed_at = time.monotonic()
        pair[0].wait(timeout=TIMEOUT)
        waited = time.monotonic() - killed_at
    finally:
        stop(pair)
    log = pair[0].log.read_text()
    if pair[0].returncode == 0:
        pytest.skip("process 0 finished before it needed process 1 again; the kill came too late to test anything")
    assert pair[0].returncode in (3, -signal.SIGABRT), stderr_tail(pair[0])
    if pair[0].returncode == 3:
        assert "error: lost contact with process 1 of the run (this is process 0 of 2)" in log, log
    # Within the heartbeat timeout (plus the machine's slack), not JAX's 300 s shutdown barrier.
    assert waited < heartbeat + 30, f"the survivor took {waited:.0f} s to stop"
    finish(start_pair(two, audits, 1))
    from wake2vec.phases import runs

    assert runs.load_table(two)[1] == 12


# Phases 2 and 3 at the demo's float32, with LoRA dropout on (the study's 0.1), so the two
# processes must also draw the same dropout masks.
ADAPTER_FLAGS = ["--batch_size=8", "--grad_accum=1", "--log_every=2", "--eval_blocks=8", "--analyze=false",
                 "--generate_at_end=false", "--frozen_dtype=float32", "--compute_dtype=float32", "--lr=1e-3",
                 "--max_steps=6", "--eval_every=3", "--save_every=3", "--mesh=1,8"]


def test_phases_2_and_3_in_two_processes_equal_one_process(tmp_path):
    """Each adapter phase, run by two processes from the same start, ends where one process of
    8 devices ends, to the tolerance of the first test (gloo's other summation order), and
    every file in its workdir is written by process 0 alone."""
    import jax
    from wake2vec.training import checkpoint

    audits = tmp_path / "audit"
    audits.mkdir()
    phase1 = tmp_path / "p1"
    finish([start(phase1, audits / "p1.jsonl", 8, "--max_steps=4")])
    starts = {"train_p2": [f"--phase1={phase1}", "--phase1_step=latest"],
              "train_p3": [f"--phase2={tmp_path / 'train_p2_one'}", "--phase2_step=latest", "--lambda_device=0",
                           "--wake_lr=1e-2"]}
    for launcher, origin in starts.items():
        one, two = tmp_path / f"{launcher}_one", tmp_path / f"{launcher}_two"
        finish([start(one, audits / f"{launcher}_one.jsonl", 8, *origin, launcher=launcher, flags=ADAPTER_FLAGS)])
        finish(start_pair(two, audits, launcher, *origin, launcher=launcher, flags=ADAPTER_FLAGS))

        (state_one, step_one), (state_two, step_two) = checkpoint.load_trainable(one), checkpoint.load_trainable(two)
        assert step_one == step_two == 6, launcher
        jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, err_msg=launcher),
                     state_one, state_two)
        events_one, events_two = read_jsonl(one / "metrics.jsonl"), read_jsonl(two / "metrics.jsonl")
        assert [e["step"] for e in events_two] == [e["step"] for e in events_one], launcher
        for a, b in zip(events_two, events_one):
            for name in ("train_loss", "val_loss", "lr"):
                if name in a:
                    np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=0,
                                               err_msg=f"{launcher} step {a['step']} {name}")
        written = writers((int(p.stem[-1]), p) for p in audits.glob(f"run{launcher}_process*.jsonl"))
        assert "config.json" in written and "metrics.jsonl" in written, (launcher, written)
        assert all(processes == {0} for processes in written.values()), (launcher, written)
