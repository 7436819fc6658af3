"""The real launchers on the real SmolLM2-135M GGUF file and the whole Wake lexicon.

One short Phase 1 run (`--model=FILE.gguf`, 3 steps of 2 x 64 tokens on the Wake's first
pages) is shared by the module: its workdir must record the file's own sha256, its
training must move the table, `export_hf` of it must give a directory transformers loads
with logits equal to wake2vec's, and `experiments.generate --model=FILE.gguf` must run.
Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from experiments import export_hf
from tests.conftest import REPO_ROOT, SHARED_DATA
from tests.hf_oracle import hf_logits, transformers
from wake2vec.phases import runs
from wake2vec.models import convert, model
from wake2vec.training import workdir as records

# slow tier: runs the launchers on the real SmolLM2 GGUF fixture
pytestmark = pytest.mark.slow

GGUF = SHARED_DATA / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # PROVENANCE.md


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    if not GGUF.is_file():
        pytest.skip(f"real model not found at {GGUF}")
    root = tmp_path_factory.mktemp("real")
    corpus = root / "wake_head.txt"
    corpus.write_text((SHARED_DATA / "finnegans_wake.txt").read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    workdir = root / "run"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train_p1", f"--workdir={workdir}", f"--model={GGUF}", f"--corpus={corpus}",
         f"--lexicon={SHARED_DATA / 'wake_lexicon.txt'}", "--seq_len=64", "--batch_size=1", "--grad_accum=2",
         "--max_steps=3", "--eval_every=3", "--save_every=3", "--log_every=1", "--eval_blocks=2", "--remat=none",
         "--analyze=false", "--injection=reference"],  # the study's add_tokens, whose figures the issue quotes
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return workdir


def test_phase1_run_on_the_gguf_file(real_run):
    config = json.loads((real_run / "config.json").read_text())
    assert config["source_hash"] == GGUF_SHA256 and config["model_source"] == str(GGUF.resolve())
    vocab = config["vocab"]
    assert {k: vocab[k] for k in ("injection", "base_size", "lexicon_words", "already_in_base", "added", "total")} == {
        "injection": "reference", "base_size": 49_152, "lexicon_words": 44_990, "already_in_base": 574,
        "added": 44_416, "total": 93_568}
    assert config["model"]["tie_word_embeddings"] and config["model"]["num_hidden_layers"] == 30
    events = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in events if "train_loss" in e]
    assert len(losses) == 3 and all(np.isfinite(losses))
    val = [e["val_loss"] for e in events if "val_loss" in e]
    # The 4-bit instruct model on the Wake's opening: between a fluent-English loss (~3 nats)
    # and a uniform guess over 93,568 tokens (11.4 nats).
    assert len(val) == 2 and all(3.0 < v < 11.4 for v in val)
    trained, _ = runs.load_table(real_run)
    assert np.abs(trained - np.load(real_run / "embeddings_pre.npy")).max() > 0


def test_export_of_the_gguf_run_loads_in_transformers(real_run, tmp_path):
    out = tmp_path / "exported"
    export_hf.export(real_run, out)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ids = np.asarray([tokenizer("riverrun, past Eve and Adam's, from swerve of shore to bend of bay, brings us by a "
                                "commodius vicus of recirculation back to Howth Castle and Environs.",
                                add_special_tokens=False)["input_ids"]])
    assert (ids >= 49_152).sum() >= 2  # Wake words went in as the new tokens
    cfg, params, _ = runs.load_params(real_run)
    state = exported.state_dict()
    for name, weight in convert.hf_state_dict(cfg, params).items():
        np.testing.assert_array_equal(state[name].numpy(), weight, err_msg=name)
    # The same float32 weights, so only summation order differs; on this 30-layer model with
    # logits up to |37| that alone is ~1.2e-4 (test_gguf measures it against float64: both
    # float32 forwards sit that far from the exact logits), hence 2e-4 rather than 1e-4.
    np.testing.assert_allclose(hf_logits(exported, ids), np.asarray(model.forward(cfg, params, ids)), atol=2e-4, rtol=0)


def test_generate_launcher_reads_the_gguf_file(tmp_path):
    if not GGUF.is_file():
        pytest.skip(f"real model not found at {GGUF}")
    out = subprocess.run(
        [sys.executable, "-m", "experiments.generate", f"--workdir={tmp_path}", f"--model={GGUF}",
         "--temperatures=0.7", "--max_new_tokens=8"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "generations.md").read_text()
    assert "riverrun, past Eve and Adam's," in text and str(GGUF) in text


def test_experiment_end_to_end_on_a_tiny_gguf_model(tmp_path):
    """experiments.real_model's whole path (init table, run, neighbours, generations, reports),
    on a tiny random GGUF model so that it costs seconds; the real run is the README's."""
    from experiments import real_model
    from tests.test_gguf import TOKENS, tiny_hf, write_gguf

    gguf_path = write_gguf(tmp_path / "tiny.gguf", tiny_hf(num_hidden_layers=1))
    words = ["thethe", "inthe", "hethin", "tinnet"]
    rng = np.random.default_rng(0)
    pieces = words + ["the", "in", "he", "net", "tin", "a", "is"]
    (tmp_path / "corpus.txt").write_text(" ".join(rng.choice(pieces, 3000)), encoding="utf-8")
    (tmp_path / "lexicon.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    cfg = real_model.RealModelConfig(
        out=str(tmp_path / "out"), model=str(gguf_path), corpus=str(tmp_path / "corpus.txt"),
        lexicon=str(tmp_path / "lexicon.txt"), start_marker="", seq_len=32, grad_accum=1, max_steps=4, eval_every=2,
        log_every=2, eval_blocks=3, words="thethe,notaword", words_per_segment=1, prompt="the thin", max_new_tokens=4)
    out = tmp_path / "out"
    out.mkdir()
    results = {"reference": real_model.run_mode(cfg, "reference", out)}
    real_model.write_reports(cfg, out, results)
    rows = results["reference"]["init_table"]
    assert [r["init"] for r in rows] == [None, "mean_noise", "spherical", "subword_mean", "hewitt"]
    events = [e for e in records.read_metrics(out / "reference" / "phase1") if "val_loss" in e]
    # An init's row is the step-0 evaluation a run of that init logs: the run (init=mean_noise,
    # the same seed) logged exactly these figures, by the same code.
    assert rows[1]["eval"] == {k: v for k, v in events[0].items() if k in rows[1]["eval"]}
    assert rows[1]["eval"]["val_tokens"] == 3 * 31 and "val_loss_new_seen" in rows[1]["eval"]
    base = rows[0]["eval"]
    for row in rows[1:]:  # every init is measured against the same base figures on the same characters
        e = row["eval"]
        assert (e["base_nats_per_char"], e["base_word_nats_seen"]) == (base["val_nats_per_char"], base["val_word_nats_seen"])
        assert e["delta_nats_per_char"] == pytest.approx(e["val_nats_per_char"] - base["val_nats_per_char"], abs=1e-12)
        assert e["val_tokens_new_seen"] + e["val_tokens_new_unseen"] == e["val_tokens_new"] and row["init_cpu_s"] >= 0
    table = (out / "init_table.md").read_text()
    assert "new unseen (nats/token)" in table and f"{rows[3]['eval']['val_loss_new_seen']:.4f}" in table
    assert results["reference"]["neighbours"]["skipped"] == ["notaword"]
    assert set(results["reference"]["generations"]) == {"base model", "injected, step 0 (init=mean_noise)", "trained, step 4"}
    for name in ("init_table.md", "neighbours.md", "generations.md", "loss_table_reference.md", "loss_curve_reference.png",
                 "embedding_analysis_reference.png", "results.json"):
        assert (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["settings"]["max_steps"] == 4
    assert len(TOKENS) == results["reference"]["init_table"][1]["vocab"]["base_size"]
    # Where the loss goes: the run's own first and last eval events, by target type.
    where = results["reference"]["where_the_loss_goes"]
    assert list(where["validation"]) == ["step 0", "step 4"]
    assert where["validation"]["step 4"]["val_loss_new"] == events[-1]["val_loss_new"]
    assert where["validation"]["step 0"]["val_tokens"] == events[0]["val_tokens_new"] + events[0]["val_tokens_base"]
    assert where["new_token_share"]["base model"] == 0.0  # the base vocabulary has no new ids
    table = (out / "where_the_loss_goes.md").read_text()
    assert f"{events[-1]['val_loss']:.4f} ({events[-1]['val_tokens']:,})" in table

    # --max_steps=0 writes the init tables alone, with the same figures; distill is an init like the others.
    only = dataclasses.replace(cfg, out=str(tmp_path / "inits"), inits="mean_noise,distill", max_steps=0,
                               injections="reference")
    real_model.run(only)
    alone = json.loads((tmp_path / "inits" / "results.json").read_text())["results"]["reference"]
    assert list(alone) == ["init_table"] and alone["init_table"][1]["eval"] == rows[1]["eval"]
    distilled = alone["init_table"][2]
    assert distilled["init"] == "distill" and distilled["init_cpu_s"] > 0
    # distill starts from the subword_mean rows and moves them: its step-0 figures are its own.
    assert distilled["eval"]["val_loss"] != rows[3]["eval"]["val_loss"] and np.isfinite(distilled["eval"]["val_loss"])
    assert sorted(p.name for p in (tmp_path / "inits").iterdir()) == ["init_table.md", "results.json"]


def test_experiment_injection_modes_follow_train_config():
    from experiments import real_model

    cfg = real_model.RealModelConfig()
    for mode in ("reference", "whole_word"):
        tc = real_model.train_config(cfg, mode, "hewitt", "w", 5)
        assert (tc.injection, tc.init, tc.max_steps) == (mode, "hewitt", 5)
    with pytest.raises(real_model.StudyError, match="--injections: unknown mode 'sideways'"):
        real_model.train_config(cfg, "sideways", "hewitt", "w", 5)

def test_phases_2_and_3_on_the_gguf_run(real_run, tmp_path):
    """Phases 2 and 3 start from the GGUF-sourced Phase 1 run: they rebuild its split from the
    .gguf model source and tokenizer source, verify its table, and continue its losses."""
    from wake2vec.phases import phase2, phase3
    from wake2vec.config import Phase2Config, Phase3Config

    short = dict(batch_size=1, grad_accum=1, max_steps=1, eval_every=1, save_every=1, log_every=1, eval_blocks=2, keep=1,
                 remat="none", frozen_dtype="float32", compute_dtype="float32")
    p2, p3 = tmp_path / "p2", tmp_path / "p3"
    phase2.run(Phase2Config(workdir=str(p2), phase1=str(real_run), phase1_step="latest", lr=2e-4, **short))
    # Two steps: the warmup's first learning rate is 0, so one step would move no row.
    phase3.run(Phase3Config(workdir=str(p3), phase2=str(p2), phase2_step="latest", lambda_device=0.0, analyze=False,
                            **{**short, "max_steps": 2, "eval_every": 2, "save_every": 2}))
    for run in (p2, p3):
        config = json.loads((run / "config.json").read_text())
        assert config["model_source"] == config["tokenizer_source"] == str(GGUF.resolve())
        assert config["source_hash"] == GGUF_SHA256
    assert json.loads((p2 / "analysis" / "phase2.json").read_text())["table"]["unchanged"]
    # B starts at zero, so each phase's first validation is the previous phase's last.
    last_val = [[e["val_loss"] for e in records.read_metrics(run) if "val_loss" in e] for run in (real_run, p2, p3)]
    assert last_val[1][0] == pytest.approx(last_val[0][-1], abs=1e-5)
    assert last_val[2][0] == pytest.approx(last_val[1][-1], abs=1e-5)
    base = json.loads((real_run / "config.json").read_text())["vocab"]["base_size"]
    start, _ = runs.load_table(real_run)
    end, _ = runs.load_table(p3)
    np.testing.assert_array_equal(end[:base], start[:base])
    assert np.abs(end[base:] - start[base:]).max() > 0
