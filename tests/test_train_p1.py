"""Integration: the real launcher on the embedded demo with a tiny schedule.

The complete run and the kill chains start it as a subprocess, as a user does; the refusals and
faults run it in-process (tests.launchers.invoke), which parses the same command line."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.launchers import run_here

# A few seconds per run: short blocks, few steps, no analysis (tested on its own).
FAST = ["--seq_len=32", "--batch_size=2", "--grad_accum=2", "--log_every=2", "--eval_blocks=4",
        "--analyze=false", "--generate_at_end=false"]


def launch(workdir: pathlib.Path, *flags: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}", *FAST, *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def launch_here(capsys, workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    """`launch`, run in this process."""
    return run_here(capsys, "train", f"--workdir={workdir}", *FAST, *flags)


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The events as logged, without each line's checksum."""
    from wake2vec.training.workdir import CRC_KEY

    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in e.items() if k != CRC_KEY} for e in events]


def final_table(workdir: pathlib.Path) -> np.ndarray:
    from wake2vec.phases import runs

    table, _ = runs.load_table(workdir)
    return table


def test_demo_run_leaves_a_complete_workdir(tmp_path, capsys):
    out = launch(tmp_path, "--max_steps=6", "--eval_every=3", "--save_every=3", "--snapshot_every=3")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["flags"]["max_steps"] == 6 and config["flags"]["seq_len"] == 32
    assert config["vocab"]["added"] > 100 and config["vocab"]["total"] == config["vocab"]["base_size"] + config["vocab"]["added"]
    assert set(config["data"]) == {"corpus_tokens", "train_blocks", "val_blocks", "seq_len"}
    assert len(config["source_hash"]) == 64 and config["versions"]["jax"]
    # What the training split can teach, and the new-token targets split by it at every evaluation.
    wake = config["wake_targets"]
    assert wake["new_rows"] == config["vocab"]["total"] - config["vocab"]["base_size"]
    assert 0 <= wake["new_rows_never_in_training"] <= wake["new_rows"]
    assert 0 <= wake["val_new_targets_unseen"] <= wake["val_new_targets"] > 0
    assert wake["val_unseen_share"] == wake["val_new_targets_unseen"] / wake["val_new_targets"]
    evals = [e for e in read_jsonl(tmp_path / "metrics.jsonl") if "val_loss" in e]
    assert all(e["val_tokens_new_seen"] + e["val_tokens_new_unseen"] == e["val_tokens_new"] for e in evals)
    assert all(sum(e[f"val_tokens_new_seen_{b}"] for b in ("1", "2_4", "5_19", "20_plus")) == e["val_tokens_new_seen"]
               for e in evals)
    pre = np.load(tmp_path / "embeddings_pre.npy")
    assert pre.shape[0] == config["vocab"]["total"]
    events = read_jsonl(tmp_path / "metrics.jsonl")
    train_events = [e for e in events if "train_loss" in e]
    assert [e["step"] for e in train_events] == [2, 3, 4, 6]  # every log step, plus every save step
    timing = {"step", "train_loss", "lr", "tokens_per_s", "step_s", "grad_norm"}
    assert set(train_events[0]) == timing | {"compile_s"}  # compilation is reported once, apart
    assert all(set(e) == timing for e in train_events[1:])
    assert all(e["tokens_per_s"] == 2 * 2 * 32 / e["step_s"] for e in train_events)  # the step's own rate
    assert [e["step"] for e in events if "val_loss" in e] == [0, 3, 6]
    assert all(e["eval_s"] > 0 for e in events if "val_loss" in e)
    assert [e["step"] for e in events if "save_s" in e] == [3, 6]
    vocab = config["vocab"]
    assert vocab["injection"] == "whole_word" and vocab["collateral"] == 0.0 and vocab["round_trip_exact"]
    assert all(e["val_tokens"] == e["val_tokens_new"] + e["val_tokens_base"] > 0 and e["val_tokens_resegmented"] == 0
               for e in events if "val_loss" in e)
    table = (tmp_path / "loss_table.md").read_text().splitlines()
    assert table[0].startswith("| Step | Training Loss | Validation Loss | Val: new tokens (n) |") and len(table) == 5
    # The demo's table shows the seen / unseen split and the run against the base model per character and word.
    for column in ("Val: new, seen in training (n)", "Val: new, never in training (n)", "Val nats/char (base; Δ)",
                   "Wake word nats, seen (base; n)", "Wake word nats, unseen (base; n)"):
        assert f"| {column} |" in table[0], column
    # The split is the data's, not the table's: the same counts at every evaluation (of the first
    # --eval_blocks blocks; config.json counts every validation block).
    assert len({(e["val_tokens_new_seen"], e["val_tokens_new_unseen"]) for e in evals}) == 1
    assert evals[0]["val_tokens_new_unseen"] <= wake["val_new_targets_unseen"]
    assert all(e["delta_nats_per_char"] == pytest.approx(e["val_nats_per_char"] - e["base_nats_per_char"]) for e in evals)
    assert (tmp_path / "loss_curve.png").stat().st_size > 10_000
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    trained = final_table(tmp_path)
    assert trained.shape == pre.shape and np.abs(trained - pre).max() > 0
    snapshots = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert snapshots == ["embeddings_step_3.npy", "embeddings_step_6.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "snapshots" / "embeddings_step_6.npy"), trained)

    analysed = run_here(capsys, "analyze", f"--workdir={tmp_path}")
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["meta"]["n_new"] == config["vocab"]["added"]
    projector = (tmp_path / "tensorboard" / "projector_config.pbtxt").read_text()
    assert f"tensor_shape: {trained.shape[0]}" in projector and 'tensor_name: "trained table, step 6"' in projector
    np.testing.assert_array_equal(np.fromfile(tmp_path / "tensorboard" / "embeddings.bin", "<f4").reshape(trained.shape),
                                  trained)
    assert summary["drift"]["base"]["cosine"]["min"] < 1.0  # the tied base rows trained too
    assert (tmp_path / "analysis" / "embedding_analysis.png").stat().st_size > 50_000
    assert summary["source_rank"]["builtin"]["listed"] > 0 and (tmp_path / "analysis" / "source_ranks.png").is_file()
    assert "source rank among" in analysed.stderr and "new-token usage in generations" in analysed.stderr


def test_max_steps_zero_prepares_and_exits(tmp_path, capsys):
    out = launch_here(capsys, tmp_path, "--max_steps=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "config.json").is_file() and (tmp_path / "embeddings_pre.npy").is_file()
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow  # chain of four launcher runs
def test_changed_config_is_refused_then_accepted_with_the_flag(tmp_path):
    assert launch(tmp_path, "--max_steps=2", "--eval_every=2", "--save_every=2").returncode == 0
    stored_lr = json.loads((tmp_path / "config.json").read_text())["flags"]["lr"]
    refused = launch(tmp_path, "--max_steps=4", "--eval_every=2", "--save_every=2", f"--lr={stored_lr * 2}")
    assert refused.returncode != 0
    assert f"--lr: {stored_lr!r} -> {stored_lr * 2!r}" in refused.stderr and "--max_steps: 2 -> 4" in refused.stderr
    # A longer run must say what its schedule does past the old end (issue 11, item 7).
    unchosen = launch(tmp_path, "--max_steps=4", "--eval_every=2", "--save_every=2", "--allow_config_change")
    assert unchosen.returncode != 0 and "--extend_schedule=restart" in unchosen.stderr
    accepted = launch(tmp_path, "--max_steps=4", "--eval_every=2", "--save_every=2", "--allow_config_change",
                      "--extend_schedule=restart")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config_changes"][-1]["changes"] == {"max_steps": [2, 4]}
    assert config["schedule_starts"] == [0, 2]
    assert config["schedule_extensions"] == [{"max_steps": [2, 4], "extend_schedule": "restart"}]
    # Steps 3-4 are a fresh segment of 2 steps: warmup ceil(2 x 0.05) = 1, so step 3 runs at lr 0.
    assert [e["lr"] for e in read_jsonl(tmp_path / "metrics.jsonl") if e["step"] == 4 and "lr" in e] == [
        pytest.approx(config["flags"]["lr"], rel=1e-6)]  # float32 of the flag
    assert max(e["step"] for e in read_jsonl(tmp_path / "metrics.jsonl")) == 4


def test_bad_input_fails_fast_with_a_message(tmp_path, capsys):
    out = launch_here(capsys, tmp_path, "--corpus=/nonexistent/wake.txt")
    assert out.returncode != 0 and "/nonexistent/wake.txt" in out.stderr
    out = launch_here(capsys, tmp_path, "--model=/nonexistent/model", "--corpus=x", "--lexicon=y")
    assert out.returncode != 0 and "/nonexistent/model" in out.stderr
    out = launch_here(capsys, tmp_path, "--optimizer=sgd")
    assert out.returncode != 0 and "--optimizer='sgd'" in out.stderr


def _wait_for_commit(checkpoints: pathlib.Path, proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 300
    while not (checkpoints / str(step)).is_dir():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.01)


def kill_after_commit(launcher: str, workdir: pathlib.Path, flags: list[str], step: int) -> None:
    """Starts `experiments.<launcher>` on `workdir` and SIGKILLs it once step `step` has committed."""
    proc = subprocess.Popen([sys.executable, "-m", f"experiments.{launcher}", f"--workdir={workdir}", *flags],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_commit(workdir / "checkpoints", proc, step)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # kill/resume chain of launcher runs
def test_sigkill_after_a_commit_then_resume_is_bit_identical(tmp_path):
    schedule = ["--max_steps=24", "--eval_every=4", "--save_every=4"]
    whole = tmp_path / "whole"
    assert launch(whole, *schedule).returncode == 0

    killed = tmp_path / "killed"
    kill_after_commit("train_p1", killed, [*FAST, *schedule], 8)
    from wake2vec.training import checkpoint

    _, interrupted_at = checkpoint.load_trainable(killed)
    assert interrupted_at < 24, "the run finished before the kill; the test proved nothing"

    resumed = launch(killed, *schedule)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the committed checkpoint" in resumed.stderr
    np.testing.assert_array_equal(final_table(killed), final_table(whole))
    timings = {"tokens_per_s", "step_s", "eval_s", "save_s", "compile_s"}
    strip = lambda events: [{k: v for k, v in e.items() if k not in timings} for e in events]  # noqa: E731
    assert strip(read_jsonl(killed / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    assert (killed / "loss_table.md").read_text() == (whole / "loss_table.md").read_text()
    # TensorBoard shows what metrics.jsonl says, each step once (the killed run's extra steps gone).
    from tests.test_tboard import expected_scalars, read_scalars

    assert read_scalars(killed / "tensorboard") == expected_scalars(read_jsonl(killed / "metrics.jsonl"))


def test_flagfile_is_honoured(tmp_path, capsys):
    flagfile = tmp_path / "run.flags"
    flagfile.write_text("--max_steps=0\n--eval_every=2\n--save_every=2\n--lr=0.002\n")  # preparing records them
    out = launch_here(capsys, tmp_path / "w", f"--flagfile={flagfile}")
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    assert config["flags"]["lr"] == 0.002 and config["flags"]["max_steps"] == 0 and config["flags"]["eval_every"] == 2


def test_a_second_run_on_a_busy_workdir_is_refused(tmp_path, capsys):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # stands in for a live run
        out = launch_here(capsys, tmp_path, "--max_steps=2")
    assert out.returncode != 0 and "in use by another wake2vec run" in out.stderr


def test_relative_workdir(tmp_path, monkeypatch, capsys):
    """The demo's default workdir is relative (runs/demo); Orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    out = launch_here(capsys, pathlib.Path("rel/run"), "--max_steps=2", "--eval_every=2", "--save_every=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "rel/run/checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]


def test_a_non_finite_update_is_never_committed(tmp_path, capsys):
    # An absurd rate after one step of warmup at lr 0: the loss stays finite (it is computed
    # before the update) while lr x update overflows the table. Before issue 11 that state was
    # committed and then named "the last good checkpoint".
    out = launch_here(capsys, tmp_path, "--max_steps=6", "--save_every=1", "--eval_every=6", "--lr=3e38",
                 "--warmup_ratio=0.2", "--schedule=constant")
    assert out.returncode != 0
    failed = int(out.stderr.split(": not finite (loss ")[0].rsplit("step ", 1)[1])
    assert failed >= 2, out.stderr[-3000:]
    assert "loss nan" not in out.stderr and "loss inf" not in out.stderr  # the loss itself was finite
    assert f"last good checkpoint is step {failed - 1}" in out.stderr
    committed = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert committed == list(range(1, failed))
    from wake2vec.training import checkpoint

    trainable, step = checkpoint.load_trainable(tmp_path)
    assert step == failed - 1 and np.isfinite(trainable["embedding"]).all()
    events = read_jsonl(tmp_path / "metrics.jsonl")  # strict JSON: a NaN would not parse back
    assert max(e["step"] for e in events) == failed - 1


def test_eta_is_the_median_step_plus_the_evals_and_saves_still_due():
    from wake2vec.training import progress as progress_log
    from wake2vec.config import TrainConfig

    progress = progress_log.Progress(TrainConfig(max_steps=10, eval_every=5, save_every=4), tokens_per_step=64, compile_s=9.0)
    for seconds in (1.0, 30.0, 2.0):  # one step slowed by a busy host does not set the rate
        progress.note_step(4.0, seconds)
    progress.note_eval(3, 5.0, seconds=4.0)
    progress.note_save(3, seconds=0.5)
    # Steps 4..10 at the median 2 s; evals at 5 and 10; saves at 4, 8 and 10.
    assert progress.eta(3) == 7 * 2.0 + 2 * 4.0 + 3 * 0.5
    event = progress.flush(3, lr=1e-3)
    assert event["step_s"] == 11.0 and event["tokens_per_s"] == 64 / 11.0 and event["compile_s"] == 9.0
    progress.note_step(4.0, 2.0)
    assert "compile_s" not in progress.flush(4, lr=1e-3)  # reported once per launch


def test_a_non_finite_step_mid_window_is_named_and_never_committed(tmp_path, capsys):
    # The host reads a step's figures only at log/eval/save boundaries (step_window): a NaN at
    # step 3 of a 5-step log window must still be named as step 3, before any save.
    out = launch_here(capsys, tmp_path, "--max_steps=10", "--log_every=5", "--save_every=5", "--eval_every=10", "--lr=1e38",
                 "--warmup_ratio=0.2", "--schedule=constant")
    assert out.returncode != 0
    assert "step 3: not finite" in out.stderr, out.stderr[-3000:]
    assert "last good checkpoint is step none" in out.stderr
    ckpts = tmp_path / "checkpoints"
    assert not [p for p in (ckpts.iterdir() if ckpts.exists() else []) if p.name.isdigit() and int(p.name) >= 3]


def test_the_step_window_names_its_first_non_finite_step():
    import jax.numpy as jnp
    from wake2vec.training import step_window

    class Progress:
        losses: list = []

        def note_step(self, loss, seconds, terms):
            self.losses.append(loss)

    window = step_window.StepWindow()
    for done, finite in ((1, True), (2, True), (3, False), (4, False), (5, True)):
        window.add(done, {"loss": jnp.float32(done), "finite": jnp.bool_(finite)})
    with pytest.raises(ValueError, match="^3$"):
        window.resolve(Progress(), lambda e: None, lambda done, m: ValueError(str(done)))
