"""Integration: the real launcher, as a subprocess, on the embedded demo with a tiny schedule."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from tests.conftest import REPO_ROOT

# A few seconds per run: short blocks, few steps, no analysis (tested on its own).
FAST = ["--seq_len=32", "--batch_size=2", "--grad_accum=2", "--log_every=2", "--eval_blocks=4",
        "--analyze=false", "--generate_at_end=false"]


def launch(workdir: pathlib.Path, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}", *FAST, *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_table(workdir: pathlib.Path) -> np.ndarray:
    from wake2vec import checkpoint

    table, _ = checkpoint.load_table(workdir)
    return table


def test_demo_run_leaves_a_complete_workdir(tmp_path):
    out = launch(tmp_path, "--max_steps=6", "--eval_every=3", "--save_every=3", "--snapshot_every=3")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["flags"]["max_steps"] == 6 and config["flags"]["seq_len"] == 32
    assert config["vocab"]["added"] > 100 and config["vocab"]["total"] == config["vocab"]["base_size"] + config["vocab"]["added"]
    assert set(config["data"]) == {"corpus_tokens", "train_blocks", "val_blocks", "seq_len"}
    assert len(config["source_hash"]) == 64 and config["versions"]["jax"]
    pre = np.load(tmp_path / "embeddings_pre.npy")
    assert pre.shape[0] == config["vocab"]["total"]
    events = read_jsonl(tmp_path / "metrics.jsonl")
    train_events = [e for e in events if "train_loss" in e]
    assert [e["step"] for e in train_events] == [2, 3, 4, 6]  # every log step, plus every save step
    assert all(set(e) == {"step", "train_loss", "lr", "tokens_per_s"} for e in train_events)
    assert [e["step"] for e in events if "val_loss" in e] == [0, 3, 6]
    vocab = config["vocab"]
    assert vocab["injection"] == "whole_word" and vocab["collateral"] == 0.0 and vocab["round_trip_exact"]
    assert all(e["val_tokens"] == e["val_tokens_new"] + e["val_tokens_base"] > 0 and e["val_tokens_resegmented"] == 0
               for e in events if "val_loss" in e)
    table = (tmp_path / "loss_table.md").read_text().splitlines()
    assert table[0].startswith("| Step | Training Loss | Validation Loss | Val: new tokens (n) |") and len(table) == 5
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    trained = final_table(tmp_path)
    assert trained.shape == pre.shape and np.abs(trained - pre).max() > 0
    snapshots = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snapshots == ["embeddings_step_3.npy", "embeddings_step_6.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "snapshots" / "embeddings_step_6.npy"), trained)

    analysed = subprocess.run([sys.executable, "-m", "experiments.analyze", f"--workdir={tmp_path}"],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["meta"]["n_new"] == config["vocab"]["added"]
    assert summary["drift"]["base"]["cosine"]["min"] < 1.0  # the tied base rows trained too
    assert (tmp_path / "analysis" / "embedding_analysis.png").stat().st_size > 50_000


def test_max_steps_zero_prepares_and_exits(tmp_path):
    out = launch(tmp_path, "--max_steps=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "embeddings_pre.npy").is_file()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_changed_config_is_refused_then_accepted_with_the_flag(tmp_path):
    assert launch(tmp_path, "--max_steps=2", "--eval_every=2", "--save_every=2").returncode == 0
    stored_lr = json.loads((tmp_path / "config.json").read_text())["flags"]["lr"]
    refused = launch(tmp_path, "--max_steps=4", "--eval_every=2", "--save_every=2", f"--lr={stored_lr * 2}")
    assert refused.returncode != 0
    assert f"--lr: {stored_lr!r} -> {stored_lr * 2!r}" in refused.stderr and "--max_steps: 2 -> 4" in refused.stderr
    accepted = launch(tmp_path, "--max_steps=4", "--eval_every=2", "--save_every=2", "--allow_config_change")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config_changes"][-1]["changes"] == {"max_steps": [2, 4]}
    assert max(e["step"] for e in read_jsonl(tmp_path / "metrics.jsonl")) == 4


def test_bad_input_fails_fast_with_a_message(tmp_path):
    out = launch(tmp_path, "--corpus=/nonexistent/wake.txt")
    assert out.returncode != 0 and "/nonexistent/wake.txt" in out.stderr
    out = launch(tmp_path, "--model=/nonexistent/model", "--corpus=x", "--lexicon=y")
    assert out.returncode != 0 and "/nonexistent/model" in out.stderr
    out = launch(tmp_path, "--optimizer=sgd")
    assert out.returncode != 0 and "--optimizer='sgd'" in out.stderr


def _wait_for_commit(checkpoints: pathlib.Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 300
    while not (checkpoints / str(step)).is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def test_sigkill_after_a_commit_then_resume_is_bit_identical(tmp_path):
    schedule = ["--max_steps=24", "--eval_every=4", "--save_every=4"]
    whole = tmp_path / "whole"
    assert launch(whole, *schedule).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "experiments.train_p1", f"--workdir={killed}", *FAST, *schedule],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_commit(killed / "checkpoints", proc, 8)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from wake2vec import checkpoint

    _, interrupted_at = checkpoint.load_trainable(killed)
    assert interrupted_at < 24, "the run finished before the kill; the test proved nothing"

    resumed = launch(killed, *schedule)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the committed checkpoint" in resumed.stderr
    np.testing.assert_array_equal(final_table(killed), final_table(whole))
    strip = lambda events: [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in events]  # noqa: E731
    assert strip(read_jsonl(killed / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    assert (killed / "loss_table.md").read_text() == (whole / "loss_table.md").read_text()


def test_flagfile_is_honoured(tmp_path):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--max_steps=2\n--eval_every=2\n--save_every=2\n--lr=0.002\n")
    out = launch(tmp_path / "w", f"--flagfile={flagfile}")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["flags"]["lr"] == 0.002 and config["flags"]["max_steps"] == 2


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands in for a live run
        out = launch(tmp_path, "--max_steps=2")
    assert out.returncode != 0 and "in use by another wake2vec run" in out.stderr


def test_relative_workdir(tmp_path):
    """The demo's default workdir is relative (runs/demo); Orbax needs absolute paths."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-m", "experiments.train_p1", "--workdir=rel/run", *FAST,
                          "--max_steps=2", "--eval_every=2", "--save_every=1"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "rel/run/checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # No warmup and an absurd constant rate: step 1 is computed on the initial table (finite)
    # and its update overflows the table, so step 2's loss is not finite.
    out = launch(tmp_path, "--max_steps=5", "--save_every=1", "--eval_every=5", "--lr=1e38",
                 "--warmup_ratio=0", "--schedule=constant")
    assert out.returncode != 0
    assert "step 2: training loss is" in out.stderr and "last good checkpoint is step 1" in out.stderr
    committed = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert committed == [1]
    events = read_jsonl(tmp_path / "metrics.jsonl")  # strict JSON: a NaN would not parse back
    assert max(e["step"] for e in events) == 1
