"""tools.answer_page: its answers follow the data, from hand-written workdirs (no training)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from tools import answer_page


def _eval(step, *, seen_word, base_seen=20.0, delta=-0.1, seen=8.0, unseen=8.0, val=6.0):
    base_npc = 2.0
    return {"step": step, "val_loss": val, "val_tokens": 1000, "val_loss_new_seen": seen, "val_tokens_new_seen": 90,
            "val_loss_new_unseen": unseen, "val_tokens_new_unseen": 10,
            "val_nats_per_char": base_npc + delta, "base_nats_per_char": base_npc, "delta_nats_per_char": delta,
            "val_bits_per_byte": (base_npc + delta) * 1.44, "base_bits_per_byte": base_npc * 1.44,
            "delta_bits_per_byte": delta * 1.44, "val_word_nats_seen": seen_word, "base_word_nats_seen": base_seen,
            "word_occurrences_seen": 50, "val_word_nats_unseen": 25.0, "base_word_nats_unseen": 22.0,
            "word_occurrences_unseen": 5}


def _workdir(root: pathlib.Path, name: str, evals: list[dict], *, init="mean_noise", lr=5e-4, train_blocks=100,
             batch_size=1, grad_accum=4, seq_len=256, injection="whole_word") -> pathlib.Path:
    workdir = root / name
    workdir.mkdir(parents=True)
    config = {"flags": {"batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "init": init, "lr": lr,
                        "injection": injection},
              "data": {"corpus_tokens": train_blocks * seq_len * 2, "seq_len": seq_len, "train_blocks": train_blocks,
                       "val_blocks": 10},
              "wake_targets": {"new_rows": 500, "new_rows_never_in_training": 120, "val_new_targets": 100,
                               "val_new_targets_unseen": 10, "val_unseen_share": 0.1}}
    (workdir / "config.json").write_text(json.dumps(config))
    lines = []
    for e in evals:  # a training-log event between evaluations, as the loop writes them
        lines.append(json.dumps({"step": e["step"], "train_loss": 6.5, "lr": lr}))
        lines.append(json.dumps(e))
    (workdir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return workdir


def _page(tmp_path, runs, sweep=()):
    loaded = [answer_page.load_run(d) for d in runs]
    swept = [answer_page.load_run(d) for d in sweep]
    return answer_page.render(loaded, swept, answer_page.command_line(loaded, swept, tmp_path / "page.md"), "page.png")


def _answer(page: str) -> str:
    """The first paragraph after the title and any banner."""
    return next(p for p in page.split("\n\n") if p.startswith("**Seen"))


def test_seen_word_cost_below_base_is_answered_yes(tmp_path):
    run = _workdir(tmp_path, "below", [_eval(0, seen_word=24.0), _eval(50, seen_word=15.0)])
    answer = _answer(_page(tmp_path, [run]))
    assert "`mean_noise`: yes, at step 50 a seen Wake word costs 15.000 nats against the base model's 20.000" in answer
    assert "(below it; at step 0 24.000, above)" in answer


def test_seen_word_cost_above_base_is_answered_no(tmp_path):
    run = _workdir(tmp_path, "above", [_eval(0, seen_word=26.0), _eval(50, seen_word=21.0)])
    answer = _answer(_page(tmp_path, [run]))
    assert "`mean_noise`: no, at step 50" in answer and "not below it" in answer


def test_per_character_answer_follows_the_sign_of_delta(tmp_path):
    better = _workdir(tmp_path, "better", [_eval(0, seen_word=20, delta=0.05), _eval(50, seen_word=20, delta=-0.25)],
                      init="mean_noise")
    worse = _workdir(tmp_path, "worse", [_eval(0, seen_word=20, delta=-0.05), _eval(50, seen_word=20, delta=0.125)],
                     init="subword_mean")
    answer = _answer(_page(tmp_path, [better, worse]))
    assert "`mean_noise`: below the base by 0.2500 nats/char at step 50 (Δ +0.0500 at step 0)" in answer
    assert "`subword_mean`: not below the base (+0.1250 nats/char) at step 50 (Δ -0.0500 at step 0)" in answer
    assert "bits/byte 2.9520 → 2.5200 against the base's 2.8800" in answer


def test_unseen_rising_while_seen_falls_adds_the_adafactor_reading(tmp_path):
    diverging = _workdir(tmp_path, "diverging", [_eval(0, seen_word=20, seen=9.0, unseen=9.0),
                                                 _eval(50, seen_word=20, seen=7.0, unseen=10.5)])
    page = _page(tmp_path, [diverging])
    assert "the loss on never-trained targets rose (9.000 → 10.500)" in _answer(page)
    assert "while the seen targets' fell (9.000 → 7.000)" in _answer(page)
    assert "*A reading, not a tested claim:* Adafactor" in page


def test_no_adafactor_reading_when_unseen_falls_too(tmp_path):
    both_fall = _workdir(tmp_path, "both_fall", [_eval(0, seen_word=20, seen=9.0, unseen=9.0),
                                                 _eval(50, seen_word=20, seen=7.0, unseen=8.5)])
    page = _page(tmp_path, [both_fall])
    assert "never-trained targets fell" in _answer(page)
    assert "not a tested claim" not in page


def test_the_turn_is_the_step_of_the_minimum(tmp_path):
    turning = _workdir(tmp_path, "turning", [_eval(0, seen_word=20, val=7.0, delta=0.0),
                                             _eval(25, seen_word=20, val=6.0, delta=-0.2),
                                             _eval(50, seen_word=20, val=6.5, delta=-0.3)])
    answer = _answer(_page(tmp_path, [turning]))
    assert "validation loss turns at step 25 (6.0000), +0.5000 by step 50" in answer
    assert "delta nats/char lowest at the last evaluation (step 50), no turn yet" in answer


@pytest.mark.parametrize("steps, provisional", [(49, True), (50, False)])
def test_provisional_banner_below_two_epochs(tmp_path, steps, provisional):
    # 100 training blocks of 256 tokens; a step reads 1 x 4 blocks: 2 epochs are 50 steps.
    run = _workdir(tmp_path, "run", [_eval(0, seen_word=20), _eval(steps, seen_word=20)])
    page = _page(tmp_path, [run])
    paragraphs = page.split("\n\n")
    assert paragraphs[1].startswith("> **Provisional.**") is provisional
    if provisional:
        assert "at most 1.96 epochs" in paragraphs[1] and "49 steps × 1 × 4 blocks of 256 tokens" in paragraphs[1]
    assert paragraphs[2 if provisional else 1].startswith("**Seen Wake words")


def test_sweep_table_and_regenerating_command(tmp_path):
    runs_dir = tmp_path / "runs"
    main = _workdir(runs_dir, "real_mean_noise", [_eval(0, seen_word=20, val=7.0), _eval(20, seen_word=20, val=6.0),
                                                 _eval(40, seen_word=20, val=6.2, delta=-0.4, seen=7.5, unseen=9.5)])
    high = _workdir(runs_dir, "sweep_lr5e-2", [_eval(0, seen_word=20, val=7.0), _eval(20, seen_word=20, val=9.0)],
                    lr=5e-2)
    page = _page(tmp_path, [main], [high, main])
    assert "| 0.0005 | `runs/real_mean_noise` | 40 | 6.2000 | 6.0000 (20) | -0.4000 | -0.4000 (40) | 7.5000 | 9.5000 |" in page
    assert "| 0.05 | `runs/sweep_lr5e-2` | 20 | 9.0000 | 7.0000 (0) | -0.1000 | -0.1000 (0) | 8.0000 | 8.0000 |" in page
    assert page.index("| 0.0005 |") < page.index("| 0.05 |")
    assert "`python -m tools.answer_page --runs=runs/real_mean_noise --sweep=runs/sweep_lr5e-2,runs/real_mean_noise" in page


def test_main_writes_the_page_and_figure(tmp_path):
    run = _workdir(tmp_path, "run", [_eval(0, seen_word=20), _eval(10, seen_word=18)])
    out, archive = tmp_path / "out" / "answer.md", tmp_path / "archive"
    subprocess.run([sys.executable, "-m", "tools.answer_page", f"--runs={run}", f"--out={out}", f"--archive={archive}"],
                   cwd=answer_page.ROOT, check=True, capture_output=True)
    page = out.read_text()
    assert page.startswith("# Phase 1")
    assert (tmp_path / "out" / "answer.png").stat().st_size > 0
    # The page is computed from, and names, the archived record, so it regenerates once the workdir is gone.
    for name in answer_page.RECORD_FILES:
        assert (archive / "run" / name).read_bytes() == (run / name).read_bytes()
    assert f"--runs={archive / 'run'} " in page
    for name in answer_page.RECORD_FILES:
        (run / name).unlink()
    subprocess.run([sys.executable, "-m", "tools.answer_page", f"--runs={archive / 'run'}", f"--out={out}",
                    f"--archive={archive}"], cwd=answer_page.ROOT, check=True, capture_output=True)
    assert out.read_text() == page


def test_rows_moved_by_exposure_come_from_the_runs_analysis(tmp_path):
    """The page's drift table is the run's own analysis (wake2vec.analysis on a table whose
    never-trained rows moved twice as far), read back and archived with the record."""
    import numpy as np

    from wake2vec import analysis

    rng = np.random.default_rng(0)
    n_base, n_new = 40, 30
    pre = rng.standard_normal((n_base + n_new, 8))
    counts = np.where(np.arange(n_new) % 3 == 0, 0, 2).astype(np.int32)
    step = np.where(counts == 0, 0.2, 0.1)[:, None] * rng.standard_normal((n_new, 8))
    post = pre.copy()
    post[n_base:] += step
    summary = analysis.analyze(post, n_base, E_pre=pre, seed=0, train_counts=counts)
    run = _workdir(tmp_path / "runs", "run", [_eval(0, seen_word=20), _eval(10, seen_word=18)])
    (run / "analysis").mkdir()
    (run / answer_page.SUMMARY).write_text(json.dumps(summary))
    page = _page(tmp_path, [answer_page.archive_run(run, tmp_path / "archive")])
    for key, label in answer_page.EXPOSURE_GROUPS:
        drift = summary["drift"][key]
        l2 = drift["l2"]["quantiles"]
        assert (f"| {label} | {drift['l2']['n']:,} | {l2['0.5']:.4f} ({l2['0.05']:.4f}-{l2['0.95']:.4f}) | "
                f"{drift['cosine']['quantiles']['0.5']:.4f} | {summary['norms'][key]['quantiles']['0.5']:.4f} |") in page
    assert summary["drift"]["new_unseen"]["l2"]["quantiles"]["0.5"] > summary["drift"]["new_seen"]["l2"]["quantiles"]["0.5"]
    assert (tmp_path / "archive" / "run" / answer_page.SUMMARY).read_bytes() == (run / answer_page.SUMMARY).read_bytes()
    # A run without an analysis gets no such table.
    bare = _workdir(tmp_path / "runs", "bare", [_eval(0, seen_word=20), _eval(10, seen_word=18)])
    assert "How far the rows moved" not in _page(tmp_path, [bare])


def test_each_run_says_the_command_that_made_it(tmp_path):
    run = _workdir(tmp_path / "runs", "run", [_eval(0, seen_word=20), _eval(10, seen_word=18)])
    config = json.loads((run / "config.json").read_text())
    config["command"] = "/somewhere/repo/experiments/train_p1.py --flagfile=f.flags --init=mean_noise --workdir=runs/run"
    (run / "config.json").write_text(json.dumps(config))
    assert "Made with `python -m experiments.train_p1 --flagfile=f.flags --init=mean_noise --workdir=runs/run`." in _page(
        tmp_path, [run])


def test_seen_loss_by_training_count_at_the_first_and_last_evaluation(tmp_path):
    def bucketed(step, once, often):
        return {**_eval(step, seen_word=20), "val_loss_new_seen_1": once, "val_tokens_new_seen_1": 60,
                "val_loss_new_seen_2_4": often, "val_tokens_new_seen_2_4": 30, "val_loss_new_seen_5_19": None,
                "val_tokens_new_seen_5_19": 0, "val_loss_new_seen_20_plus": often - 1, "val_tokens_new_seen_20_plus": 1}
    run = _workdir(tmp_path / "runs", "run", [bucketed(0, 15.0, 15.0), bucketed(10, 14.0, 13.0), bucketed(20, 16.0, 12.5)])
    page = _page(tmp_path, [run])
    assert "| Times in training | Targets | Loss at step 0 | Loss at step 20 | Change |" in page
    assert "| 1 | 60 | 15.0000 | 16.0000 | +1.0000 |" in page
    assert "| 2-4 | 30 | 15.0000 | 12.5000 | -2.5000 |" in page
    assert "| 5-19 | 0 | – | – | – |" in page and "| 20+ | 1 | 14.0000 | 11.5000 | -2.5000 |" in page
    assert "Times in training" not in _page(tmp_path, [_workdir(tmp_path / "runs", "bare", [_eval(0, seen_word=20)])])


def test_runs_are_named_by_injection_and_init_where_they_differ(tmp_path):
    evals = [_eval(0, seen_word=24.0), _eval(50, seen_word=15.0)]
    whole = _workdir(tmp_path, "whole", evals)
    reference = _workdir(tmp_path, "ref", evals, injection="reference")
    again = _workdir(tmp_path, "ref_again", evals, injection="reference")
    answer = _answer(_page(tmp_path, [whole, reference]))
    assert "`whole_word`, `mean_noise`: yes" in answer and "`reference`, `mean_noise`: yes" in answer
    answer = _answer(_page(tmp_path, [reference, again]))
    assert "`ref` (`mean_noise`): yes" in answer and "`ref_again` (`mean_noise`): yes" in answer
    page = _page(tmp_path, [whole, again, reference])
    assert "`ref_again` (`reference`, `mean_noise`): yes" in _answer(page)
    assert "## `" + str(reference) + "`: injection `reference`, init `mean_noise`, lr 0.0005" in page


def test_each_run_says_which_targets_its_evaluations_read(tmp_path):
    run = _workdir(tmp_path, "scoped", [_eval(0, seen_word=24.0), _eval(50, seen_word=15.0)])
    config = json.loads((run / "config.json").read_text())
    config["flags"]["eval_blocks"] = 4
    (run / "config.json").write_text(json.dumps(config))
    page = _page(tmp_path, [run])
    assert ("The evaluations read the first 4 of 10 validation blocks: 90 seen and 10 never-trained new-token "
            "targets, 50 seen and 5 unseen Wake-word occurrences.") in page
