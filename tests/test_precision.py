"""The float32 matmul precision policy reaches every jitted path and is recorded per run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from tests.launchers import invoke
from wake2vec.models import decode, model
from wake2vec.training import optim, precision, train
from wake2vec.config import FlagError, ModelConfig

TINY = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)


@pytest.fixture
def policy():
    before = jax.config.jax_default_matmul_precision
    yield precision.apply
    jax.config.update("jax_default_matmul_precision", before)  # as the other tests expect it (conftest)


def dot_precisions(lowered) -> set[str]:
    """The precision of every stablehlo.dot_general in a lowered program."""
    lines = [line for line in lowered.as_text().splitlines() if "dot_general" in line]
    assert lines, "the program has no matmul to check"
    return {line.split("precision = [")[1].split(",")[0] for line in lines}


def test_the_policy_resolves_auto_by_compute_dtype_and_the_env_overrides(monkeypatch):
    monkeypatch.delenv(precision.ENV, raising=False)
    assert precision.effective("auto", "float32") == "highest"
    assert precision.effective("auto", "bfloat16") == "default"
    assert precision.effective("high", "float32") == "high"
    monkeypatch.setenv(precision.ENV, "default")
    assert precision.effective("highest", "float32") == "default"
    monkeypatch.setenv(precision.ENV, "tf32")
    with pytest.raises(FlagError, match=r"\$WAKE2VEC_MATMUL_PRECISION='tf32'; choose one of auto, default"):
        precision.effective("auto", "float32")


@pytest.mark.parametrize("choice, expected", [("highest", "HIGHEST"), ("high", "HIGH"), ("default", "DEFAULT")])
def test_it_reaches_the_eval_step_the_model_and_the_decoder(policy, monkeypatch, choice, expected):
    policy(choice)
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    trainable, frozen = optim.split_params(params)
    ids = jnp.zeros((2, 9), jnp.int32)
    settings = train.StepSettings(TINY, remat="none", loss_chunk=16)
    eval_step = jax.jit(train.make_eval_step(settings, 40))
    assert dot_precisions(eval_step.lower(trainable, frozen, ids, jnp.ones(2), jnp.zeros((2, 9), bool), jnp.zeros(64, jnp.int32))) == {expected}
    forward = jax.jit(lambda p, i: model.forward(TINY, p, i))
    assert dot_precisions(forward.lower(params, ids)) == {expected}
    # The decoder's own jitted loop (prefill and cached steps), lowered as generate calls it.
    lowered = {}
    original = decode._decode

    def spy(*args, **kwargs):
        lowered["decode"] = original.lower(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "_decode", spy)
    decode.generate(TINY, params, np.array([[1, 2, 3]]), max_new_tokens=2)
    assert dot_precisions(lowered["decode"]) == {expected}


def test_config_json_records_the_effective_precision(tmp_path):
    def recorded(name):
        return json.loads((tmp_path / name / "config.json").read_text())["flags"]["matmul_precision"]

    # auto for bfloat16 resolves in-process (test_the_policy_resolves_auto_...); the recorded default
    # in-process too, and the env override in a launcher run of its own, since only a fresh process reads it.
    assert invoke("train", f"--workdir={tmp_path / 'fp32'}", "--max_steps=0") == 0
    assert recorded("fp32") == "highest"
    out = subprocess.run([sys.executable, "-m", "experiments.train_p1", f"--workdir={tmp_path / 'env'}", "--max_steps=0"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, precision.ENV: "high"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert recorded("env") == "high"
