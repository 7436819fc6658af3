"""wake2vec.phases.distill on a tiny random Llama: the objective, its fixed point and determinism."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO_ROOT

from wake2vec.phases import distill
from wake2vec.models import model
from wake2vec.config import ModelConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
SETTINGS = distill.Settings(contexts=2, prefix_tokens=4, suffix_tokens=3, max_spelling=3, words_per_step=4, steps=40,
                            lr=0.05)


def _setup(spell_lens, seed=0):
    params = model.init_params(CFG, jax.random.key(seed))
    params = jax.tree_util.tree_map(np.asarray, params)
    base = params.pop("embedding")
    rng = np.random.default_rng(seed)
    n, c = len(spell_lens), SETTINGS.contexts
    ctx = distill.Contexts(
        prefix=rng.integers(1, 64, (n, c, 4)).astype(np.int32), prefix_len=np.full((n, c), 4, np.int32),
        spell=rng.integers(1, 64, (n, c, 3)).astype(np.int32), spell_len=np.tile(np.asarray(spell_lens)[:, None], (1, c)),
        suffix=rng.integers(1, 64, (n, c, 3)).astype(np.int32), suffix_len=np.full((n, c), 3, np.int32),
        context_len=np.full(n, c, np.int32), from_training=np.ones(n, bool))
    ctx.spell[np.asarray(spell_lens) == 1, :, 0] = ctx.spell[np.asarray(spell_lens) == 1, :1, 0]  # one word, one token
    return params, base, ctx


def test_the_step_reduces_the_mse():
    params, base, ctx = _setup([2, 3, 2, 3, 2])
    start = base[1:6] * 0.0 + base.mean(0)
    result = distill.distill(CFG, params, base, ctx, start, SETTINGS, progress=lambda _: None)
    assert np.all(result.mse_after < result.mse_before)


def test_single_piece_spelling_recovers_the_base_row():
    params, base, ctx = _setup([1, 1, 1])
    target = base[ctx.spell[:, 0, 0]]
    # The base row reproduces the teacher exactly: a fixed point with zero loss.
    fixed = distill.distill(CFG, params, base, ctx, target, dataclasses.replace(SETTINGS, steps=0), progress=lambda _: None)
    assert np.all(fixed.mse_after < 1e-10)
    start = np.tile(base.mean(0), (3, 1))
    result = distill.distill(CFG, params, base, ctx, start, dataclasses.replace(SETTINGS, steps=300),
                             progress=lambda _: None)
    before = np.linalg.norm(start - target, axis=1)
    after = np.linalg.norm(result.rows - target, axis=1)
    assert np.all(after < 0.2 * before), (before, after)


def test_distill_is_deterministic():
    params, base, ctx = _setup([2, 1, 3])
    start = np.tile(base.mean(0), (3, 1))
    a = distill.distill(CFG, params, base, ctx, start, SETTINGS, progress=lambda _: None).rows
    b = distill.distill(CFG, params, base, ctx, start, SETTINGS, progress=lambda _: None).rows
    np.testing.assert_array_equal(a, b)


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_rows(tmp_path):
    params, base, ctx = _setup([2, 3, 2, 3, 2, 1, 2, 3, 2])  # 9 words: batches of 4, 4 and 1
    start = np.tile(base.mean(0), (9, 1))
    quiet = dict(progress=lambda _: None)
    whole = distill.distill(CFG, params, base, ctx, start, SETTINGS, **quiet)
    path = tmp_path / "distill_progress.npz"

    def stop(_line):  # a crash right after the first batch
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill.distill(CFG, params, base, ctx, start, SETTINGS, progress=stop, progress_file=path, save_every_s=0)
    with np.load(path) as saved:
        assert int(saved["done"]) == 4
    lines = []
    resumed = distill.distill(CFG, params, base, ctx, start, SETTINGS, progress=lines.append, progress_file=path,
                              save_every_s=0)
    assert resumed.resumed_rows == 4 and lines[0].startswith("distill: 4/9 rows read back")
    for got, want in ((resumed.rows, whole.rows), (resumed.mse_before, whole.mse_before),
                      (resumed.mse_after, whole.mse_after)):
        np.testing.assert_array_equal(got, want)  # rows do not depend on the batch they are in
    finished = distill.distill(CFG, params, base, ctx, start, SETTINGS, progress_file=path, **quiet)
    assert finished.resumed_rows == 9
    np.testing.assert_array_equal(finished.rows, whole.rows)
    # Other inputs: the file is not theirs, and they start from the beginning.
    other = distill.distill(CFG, params, base, ctx, start + 1e-3, SETTINGS, progress_file=path, **quiet)
    assert other.resumed_rows == 0 and not np.array_equal(other.rows, whole.rows)


@pytest.mark.slow
def test_launcher_accepts_init_distill_on_the_demo(tmp_path):
    out = subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={tmp_path}", "--model=demo",
                          "--init=distill", "--distill_steps=5", "--max_steps=2", "--eval_every=2", "--save_every=2",
                          "--analyze=false", "--generate_at_end=false"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "distill: " in out.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["flags"]["init"] == "distill"
    pre = np.load(tmp_path / "embeddings_pre.npy")
    base = config["vocab"]["base_size"]
    # Moved away from subword_mean's starting rows, and finite.
    assert np.isfinite(pre).all() and pre.shape[0] == config["vocab"]["total"]
    assert np.abs(pre[base:]).sum() > 0
