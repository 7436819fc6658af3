"""Integration: Phase 2 and Phase 3 launchers on a short demo Phase 1 run.

They run in-process (tests.launchers.invoke), as their command lines run them; the kill and
resume chains, which need a process to kill, run them as subprocesses."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.launchers import invoke, run_here
from tests.test_train_p1 import kill_after_commit, read_jsonl

P1_FAST = ["--seq_len=32", "--batch_size=2", "--grad_accum=2", "--log_every=2", "--eval_blocks=4", "--analyze=false",
           "--generate_at_end=false", "--max_steps=8", "--eval_every=4", "--save_every=4"]
# The adapter phases at the demo's float32; dropout stays on (the study's 0.1), so resume covers its masks.
FAST = ["--batch_size=2", "--grad_accum=2", "--log_every=2", "--eval_blocks=4", "--analyze=false",
        "--generate_at_end=false", "--frozen_dtype=float32", "--compute_dtype=float32", "--lr=1e-3"]
TIMINGS = {"tokens_per_s", "step_s", "eval_s", "save_s", "compile_s"}


def launch(launcher: str, workdir: pathlib.Path, *flags: str) -> subprocess.CompletedProcess:
    """A launcher as a subprocess, for the chains that kill one."""
    return subprocess.run([sys.executable, "-m", f"experiments.{launcher}", f"--workdir={workdir}", *flags],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def refusal(capsys, name: str, *args: str) -> str:
    """The last line a launcher run in-process writes to stderr, after asserting it exited 1."""
    done = run_here(capsys, name, *args)
    assert done.returncode == 1, done.stderr[-2000:]
    return done.stderr.splitlines()[-1]


def untimed(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k not in TIMINGS} for e in events]


@pytest.fixture(scope="module")
def phase1(tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("phases") / "p1"
    assert invoke("train", f"--workdir={workdir}", *P1_FAST) == 0
    return workdir


@pytest.fixture(scope="module")
def phase2(phase1, tmp_path_factory) -> pathlib.Path:
    workdir = tmp_path_factory.mktemp("phases") / "p2"
    assert invoke("train_p2", f"--workdir={workdir}", f"--phase1={phase1}", "--phase1_step=latest", *FAST,
                  "--max_steps=6", "--eval_every=3", "--save_every=3", "--analyze=true") == 0
    return workdir


def test_phase2_trains_only_the_adapters_on_phase1s_own_blocks(phase1, phase2):
    from wake2vec.training import checkpoint

    p1_events, p2_events = read_jsonl(phase1 / "metrics.jsonl"), read_jsonl(phase2 / "metrics.jsonl")
    p1_last = [e for e in p1_events if e.get("step") == 8 and "val_loss" in e][0]
    p2_first = [e for e in p2_events if e.get("step") == 0 and "val_loss" in e][0]
    # The adapters start at B = 0, so step 0 of Phase 2 is Phase 1's model on Phase 1's
    # validation blocks: the same predictions counted, and the same loss up to the float32
    # reassociation of two differently compiled programs.
    assert p2_first["val_tokens"] == p1_last["val_tokens"] and p2_first["val_tokens_new"] == p1_last["val_tokens_new"]
    np.testing.assert_allclose(p2_first["val_loss"], p1_last["val_loss"], rtol=1e-6)
    trainable, step = checkpoint.load_trainable(phase2)
    assert step == 6 and set(trainable) == {"lora"}, "a Phase 2 checkpoint holds the adapters only"
    record = json.loads((phase2 / "config.json").read_text())
    assert record["phase"] == 2 and record["phase1"]["step"] == 8
    report = json.loads((phase2 / "analysis" / "phase2.json").read_text())
    assert report["table"]["unchanged"] and report["table"]["padding_rows_zero"]
    assert set(report["adapter_norms"]) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(v > 0 for norms in report["adapter_norms"].values() for v in norms["update"])
    losses = report["validation"]["losses"]
    assert losses["val_loss_wake_windows"]["tokens"] + losses["val_loss_plain_windows"]["tokens"] == losses["val_loss"]["tokens"]
    assert all(e["train_loss"] > 0 for e in p2_events if "train_loss" in e)


@pytest.mark.slow  # kill/resume chain of launcher runs
def test_phase2_sigkill_then_resume_is_bit_identical(phase1, tmp_path):
    from wake2vec.training import checkpoint

    schedule = [f"--phase1={phase1}", "--phase1_step=latest", *FAST, "--max_steps=12", "--eval_every=3", "--save_every=3"]
    whole = tmp_path / "whole"
    done = launch("train_p2", whole, *schedule)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    kill_after_commit("train_p2", killed, schedule, 3)
    _, interrupted_at = checkpoint.load_trainable(killed)
    assert interrupted_at < 12, "the run finished before the kill; the test proved nothing"
    resumed = launch("train_p2", killed, *schedule)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the committed checkpoint" in resumed.stderr
    ours, theirs = checkpoint.load_trainable(killed)[0], checkpoint.load_trainable(whole)[0]
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(a, b)
    assert untimed(read_jsonl(killed / "metrics.jsonl")) == untimed(read_jsonl(whole / "metrics.jsonl"))


def test_phase2_refuses_other_settings_and_a_missing_phase1(phase1, phase2, tmp_path, capsys):
    schedule = [f"--phase1={phase1}", "--phase1_step=latest", *FAST, "--max_steps=6", "--eval_every=3", "--save_every=3"]
    changed = refusal(capsys, "train_p2", f"--workdir={phase2}", *schedule, "--lora_rank=4")
    assert "--lora_rank: 8 -> 4" in changed, changed
    missing = refusal(capsys, "train_p2", f"--workdir={tmp_path / 'p2'}", f"--phase1={tmp_path / 'nowhere'}", *FAST)
    assert "no such directory; train it first" in missing
    same = refusal(capsys, "train_p2", f"--workdir={phase1}", f"--phase1={phase1}", *FAST)
    assert "each phase writes its own workdir" in same
    bad = refusal(capsys, "train_p2", f"--workdir={tmp_path / 'p2b'}", f"--phase1={phase1}", "--lora_targets=q_proj,w_proj",
                  *FAST)
    assert "--lora_targets" in bad
    # A shape change no checkpoint restores into: refused in one line before anything is recorded, flag or not.
    # (In-process, a traceback would be an exception that fails the test.)
    record_before = (phase2 / "config.json").read_bytes()
    reshaped = refusal(capsys, "train_p2", f"--workdir={phase2}", *schedule, "--lora_rank=4", "--allow_config_change")
    assert "holds adapters of rank 8" in reshaped, reshaped
    assert (phase2 / "config.json").read_bytes() == record_before
    # A rank above the adapted matrices' smaller side (the demo's hidden size is far below 100,000).
    huge = refusal(capsys, "train_p2", f"--workdir={tmp_path / 'p2c'}", f"--phase1={phase1}", "--lora_rank=100000", *FAST)
    assert "--lora_rank=100000 exceeds" in huge, huge
    assert not (tmp_path / "p2c" / "config.json").exists()
    # A Phase 2 workdir given as --phase1.
    wrong = refusal(capsys, "train_p2", f"--workdir={tmp_path / 'p2d'}", f"--phase1={phase2}", *FAST)
    assert "is a Phase 2 run" in wrong, wrong


def test_phase2_export_is_a_peft_adapter_and_a_merged_model(phase2, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from wake2vec.phases import runs
    from wake2vec.models import model

    out = tmp_path / "export"
    assert invoke("export", f"--workdir={phase2}", f"--out={out}") == 0
    cfg, params, _ = runs.load_params(phase2)
    spec = runs.lora_spec(json.loads((phase2 / "config.json").read_text()))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    ours = np.asarray(model.forward(cfg, params, jnp.asarray(ids), lora=spec))
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        peft_logits = adapted(torch.as_tensor(ids)).logits.numpy()
        merged_logits = merged(torch.as_tensor(ids)).logits.numpy()
    # float32 on both sides; the bound is the accumulation-order difference of two
    # frameworks' matmuls over a 2-layer model (as the Phase 1 export test's).
    np.testing.assert_allclose(peft_logits, ours, atol=1e-4)
    np.testing.assert_allclose(merged_logits, ours, atol=1e-4)


def test_phase2_generate_applies_the_adapters_and_analyze_points_to_phase1(phase2, tmp_path, capsys):
    out = tmp_path / "gen.md"
    assert invoke("generate", f"--workdir={phase2}", f"--out={out}", "--temperatures=0", "--max_new_tokens=6") == 0
    assert "checkpoint step" in out.read_text() and json.loads(out.with_suffix(".json").read_text())["samples"]
    assert "is a Phase 2 run" in refusal(capsys, "analyze", f"--workdir={phase2}")


def _groups_file(phase1: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    """Morpheme groups over the demo's own coinages (the demo lexicon has no English affixes):
    each coinage paired with a base word, so L_morph has pairs that touch Wake rows."""
    from wake2vec.phases import groups

    record = json.loads((phase1 / "config.json").read_text())
    words = pathlib.Path(record["lexicon"]).read_text().split()
    pairs = [(word, base) for word, base in zip(words[:12], ["the", "and", "of", "a"] * 3)]
    made = [groups.MorphemeGroup("x", "suffix", tuple(w for w, _ in pairs[i::3]), tuple(b for _, b in pairs[i::3]))
            for i in range(3)]
    groups.write_groups(path, made)
    return path


def test_phase3_keeps_the_base_rows_and_logs_each_term_apart(phase1, phase2, tmp_path):
    from wake2vec.training import checkpoint
    from wake2vec.phases import runs
    from wake2vec.models import padding

    groups_path = _groups_file(phase1, tmp_path / "groups.jsonl")
    workdir = tmp_path / "p3"
    assert invoke("train_p3", f"--workdir={workdir}", f"--phase2={phase2}", "--phase2_step=latest",
                  f"--morpheme_groups={groups_path}", "--lambda_device=0", "--lambda_morph=50", "--wake_lr=1e-2", *FAST,
                  "--max_steps=4", "--eval_every=2", "--save_every=2", "--analyze=true") == 0
    events = read_jsonl(workdir / "metrics.jsonl")
    trained = [e for e in events if "train_loss" in e]
    assert all({"train_morph", "train_rep", "train_norm", "train_device", "train_total"} <= set(e) for e in trained)
    assert any(e["train_morph"] > 0 for e in trained)
    # Validation is the LM loss alone: Phase 3's step 0 is Phase 2's final model on the same blocks.
    p2_last = [e for e in read_jsonl(phase2 / "metrics.jsonl") if e.get("step") == 6 and "val_loss" in e][0]
    p3_first = [e for e in events if e.get("step") == 0 and "val_loss" in e][0]
    np.testing.assert_allclose(p3_first["val_loss"], p2_last["val_loss"], rtol=1e-6)
    record = json.loads((workdir / "config.json").read_text())
    base, total = record["vocab"]["base_size"], record["vocab"]["total"]
    start, _ = runs.load_table(phase1, 8)
    trainable, _ = checkpoint.load_trainable(workdir)
    table = padding.unpad_table(trainable["embedding"], total)
    np.testing.assert_array_equal(table[:base], start[:base])  # bit for bit, weight decay included
    assert np.abs(table[base:] - start[base:]).max() > 0
    report = json.loads((workdir / "analysis" / "phase3.json").read_text())
    assert report["base_rows"]["unchanged"] and report["morphology"] is not None
    assert (workdir / "analysis" / "morphology.png").stat().st_size > 0
    assert record["groups"]["morph_pairs_touching_trainable"] == 12
    # analyze on a Phase 3 run measures drift against the Phase 1 table it started from.
    assert invoke("analyze", f"--workdir={workdir}", f"--out_dir={tmp_path / 'again'}") == 0
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["drift"]["base"]["l2"]["max"] == 0.0  # the base rows did not move


@pytest.mark.slow  # chain of launcher runs
def test_phase3_early_stop_survives_a_resume(phase2, tmp_path):
    workdir = tmp_path / "p3"
    # A Wake-row rate this large makes the validation loss rise at once: patience 1 stops it.
    flags = [f"--phase2={phase2}", "--lambda_device=0", *FAST, "--max_steps=12", "--eval_every=1", "--save_every=6",
             "--early_stop_patience=1", "--wake_lr=5.0", "--warmup_ratio=0"]
    first = launch("train_p3", workdir, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    events = read_jsonl(workdir / "metrics.jsonl")
    stops = [e["step"] for e in events if e.get("early_stop")]
    assert len(stops) == 1 and stops[0] < 12
    again = launch("train_p3", workdir, *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stopped early" in again.stderr and f"at step {stops[0]}" in again.stderr.splitlines()[-1]
    assert read_jsonl(workdir / "metrics.jsonl") == events


@pytest.mark.slow  # 8-device mesh
def test_phase2_step_on_a_mesh_equals_one_device():
    import os

    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-m", "tests.mesh_equivalence", "lora"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])["4,2"]
    # Three steps with dropout on, the table sharded on 'model' and the body over all 8
    # devices: the same masks (keys are sharding-independent) and the same sums, reassociated
    # (float32: measured 0 on the losses, 3.7e-7 on adapters of size ~0.1).
    assert report["loss"] < 1e-5 and report["table"] < 1e-5, report
