"""The quantized frozen body (wake2vec.models.quant): closed-form properties of int8 and NF4, the
model's projections reading either representation, a train step, the mesh and the launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tests.conftest import REPO_ROOT
from tests.test_train_p1 import final_table, launch_here, read_jsonl
from wake2vec.models import model, quant
from wake2vec.training import optim, train
from wake2vec.phases import prepare
from wake2vec.config import FlagError, ModelConfig, TrainConfig

# in = 200 for down_proj: three full NF4 blocks and a last one of 8 rows.
CFG = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=200, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _params() -> dict:
    return jax.tree_util.tree_map(np.asarray, model.init_params(CFG, jax.random.PRNGKey(0)))


def _dequantized(node):
    """The same tree with every quantized Linear's leaves replaced by its float32 kernel."""
    if not isinstance(node, dict):
        return node
    fmt = quant.stored_format(node)
    if fmt is None:
        return {k: _dequantized(v) for k, v in node.items()}
    rest = {k: v for k, v in node.items() if k not in quant.LEAVES[fmt]}
    return {"kernel": np.asarray(quant.dequantize(node)), **rest}


# ----------------------------------------------------------------------------- int8


def test_int8_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((3, 40, 24)) * rng.uniform(0.01, 3, (1, 1, 24))).astype(np.float32)
    stored = quant.quantize(w, "int8")
    q, scale = stored["kernel_int8"], stored["kernel_scale"]
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (3, 24) and scale.dtype == np.float32
    np.testing.assert_array_equal(scale, np.max(np.abs(w), axis=1) / np.float32(127))
    assert np.abs(q.astype(np.int32)).max() == 127
    error = np.abs(w - np.asarray(quant.dequantize(stored)))
    # Half a step, plus float32 rounding of w / scale and of q * scale: each at most 2^-24
    # relative to a value <= 127 steps, so 2 * 127 * 2^-24 < 2e-5 steps in all.
    assert np.all(error <= scale[:, None, :] * (0.5 + 2e-5))


def test_int8_is_exact_on_its_grid():
    rng = np.random.default_rng(1)
    q = rng.integers(-127, 128, (2, 30, 8))
    q[:, 0, :] = 127 * rng.choice([-1, 1], (2, 8))  # each column's absmax: 127 steps
    step = (2.0 ** -rng.integers(0, 12, (2, 1, 8))).astype(np.float32)  # powers of two: q * step exact
    w = (q * step).astype(np.float32)
    stored = quant.quantize(w, "int8")
    np.testing.assert_array_equal(stored["kernel_int8"], q)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(stored)), w)


def test_int8_zero_columns_are_safe():
    w = np.random.default_rng(2).standard_normal((1, 16, 5)).astype(np.float32)
    w[..., 2] = 0
    stored = quant.quantize(w, "int8")
    deq = np.asarray(quant.dequantize(stored))
    assert stored["kernel_scale"][0, 2] == 0 and np.all(deq[..., 2] == 0) and np.all(np.isfinite(deq))
    alone = quant.quantize(np.delete(w, 2, axis=-1), "int8")
    np.testing.assert_array_equal(np.delete(stored["kernel_int8"], 2, axis=-1), alone["kernel_int8"])


# ----------------------------------------------------------------------------- nf4


def test_nf4_codes_are_qloras_normal_quantiles():
    """bitsandbytes' construction (create_normal_map, offset 0.9677083 = the mean of 1 - 1/30 and
    1 - 1/32): 8 positive and 7 negative N(0, 1) quantiles plus an exact zero, divided by the
    largest. The published table was computed in float32, so it agrees within a few float32
    ulps (6e-8 at 0.7): 2e-7."""
    offset = 0.9677083
    positive = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(quant.NF4_CODES, values / values.max(), rtol=0, atol=2e-7)
    assert quant.NF4_CODES[7] == 0 and quant.NF4_CODES[0] == -1 and quant.NF4_CODES[-1] == 1


def test_nf4_maps_each_weight_to_its_nearest_code_times_its_block_absmax():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 200, 12)).astype(np.float32)
    w[1, 64:128, 3] = 0  # a zero block
    w[0, :64, 0] = 0
    w[0, :12, 0] = np.float32(0.5) * quant.NF4_CODES[4:]  # a block on the grid, absmax 0.5
    stored = quant.quantize(w, "nf4")
    codes, absmax = stored["kernel_nf4"], stored["kernel_absmax"]
    assert codes.dtype == np.uint8 and codes.shape == (2, 100, 12)
    assert absmax.dtype == np.float32 and absmax.shape == (2, 4, 12)
    blocks = [slice(0, 64), slice(64, 128), slice(128, 192), slice(192, 200)]
    for b, rows in enumerate(blocks):
        np.testing.assert_array_equal(absmax[:, b], np.max(np.abs(w[:, rows]), axis=1))  # exactly recovered
    per_row = np.concatenate([np.repeat(absmax[:, b:b + 1], r.stop - r.start, axis=1) for b, r in enumerate(blocks)], 1)
    # Brute force: the argmin over the 16 published values of |w / absmax - value|.
    normalized = w / np.where(per_row == 0, 1, per_row)
    nearest = np.argmin(np.abs(normalized[..., None].astype(np.float64) - quant.NF4_CODES.astype(np.float64)), axis=-1)
    deq = np.asarray(quant.dequantize(stored))
    np.testing.assert_array_equal(deq, quant.NF4_CODES[nearest] * per_row)  # every value is code x absmax
    assert np.all(deq[1, 64:128, 3] == 0)
    np.testing.assert_array_equal(deq[0, :12, 0], w[0, :12, 0])


def test_nf4_pack_unpack_round_trip():
    codes = np.random.default_rng(4).integers(0, 16, (3, 10, 7)).astype(np.uint8)
    packed = quant.pack_nibbles(codes)
    assert packed.dtype == np.uint8 and packed.shape == (3, 5, 7)
    np.testing.assert_array_equal(packed, codes[:, 0::2] + 16 * codes[:, 1::2])
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(jnp.asarray(packed))), codes)


def test_nf4_refuses_an_odd_input_size_naming_the_flag():
    with pytest.raises(quant.QuantShapeError, match=r"--frozen_dtype=nf4 .* 7 input rows"):
        quant.quantize(np.zeros((1, 7, 4), np.float32), "nf4")


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantize_body_replaces_only_the_layer_kernels(fmt):
    params = _params()
    body = quant.quantize_body(params, fmt)
    assert body["embedding"] is params["embedding"] and body["lm_head"] is params["lm_head"]
    assert body["norm"] is params["norm"]
    assert body["layers"]["input_layernorm"]["scale"] is params["layers"]["input_layernorm"]["scale"]
    for group in ("self_attn", "mlp"):
        for name, leaves in body["layers"][group].items():
            assert set(leaves) == set(quant.LEAVES[fmt]), (group, name)
    assert "kernel" in params["layers"]["mlp"]["up_proj"]  # the input is left as it was
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), body)
    assert jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), quant.abstract_body(params, fmt)) == shapes


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_quantized_forward_equals_the_dequantized_float_forward(fmt):
    """The projections read the quantized leaves as the float32 kernel they stand for: the same
    values reach the same matmuls, so only XLA's fusion order can differ (float32 rounding; the
    logits are O(1), so 1e-5 is ~100 ulps)."""
    forward = jax.jit(model.forward, static_argnums=0)  # one program per tree, not one per primitive
    body = quant.quantize_body(_params(), fmt)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (2, 33)))
    quantized = forward(CFG, body, ids)
    floats = forward(CFG, _dequantized(body), ids)
    np.testing.assert_allclose(np.asarray(quantized), np.asarray(floats), rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(quantized - forward(CFG, _params(), ids)))) > 1e-4  # it is quantized


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_train_step_runs_with_a_quantized_frozen_body(fmt):
    trainable, frozen = optim.split_params(quant.quantize_body(_params(), fmt))
    tc = TrainConfig(max_steps=3, lr=1e-2, warmup_ratio=0.0)
    tx = optim.make_optimizer(tc, 200)
    step = jax.jit(train.make_train_step(tx, optim.make_schedule(tc), train.StepSettings(CFG, loss_chunk=64)))
    batch = jnp.asarray(np.random.default_rng(6).integers(0, CFG.vocab_size, (2, 2, 17)), jnp.int32)
    state, metrics = step(train.init_state(trainable, frozen, tx), frozen, batch)
    _, float_metrics = step(train.init_state(trainable, _dequantized(frozen), tx), _dequantized(frozen), batch)
    assert bool(metrics["finite"]) and int(state.step) == 1
    assert np.abs(np.asarray(state.trainable["embedding"]) - trainable["embedding"]).max() > 0
    # The same loss as the dequantized body's (float32 rounding of a loss near log(300) ~ 5.7).
    assert abs(float(metrics["loss"]) - float(float_metrics["loss"])) <= 1e-5


def test_frozen_dtype_flag_accepts_the_formats_and_names_them_when_wrong():
    for fmt in quant.FORMATS:
        prepare.validate_flags(TrainConfig(frozen_dtype=fmt, max_steps=0))
    with pytest.raises(FlagError, match=r"--frozen_dtype: unknown dtype 'int4'.*int8, nf4"):
        prepare.validate_flags(TrainConfig(frozen_dtype="int4", max_steps=0))
    with pytest.raises(FlagError, match=r"--compute_dtype: unknown dtype 'int8'"):
        prepare.validate_flags(TrainConfig(compute_dtype="int8", max_steps=0))


@pytest.mark.slow  # 8-device mesh
def test_quantized_leaves_shard_and_gather_on_a_mesh():
    """4,2 of 8 forced host devices = one device with the same quantized body; every
    compressed 3-axis leaf split over all devices, and the gathers move int8 / uint8."""
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-m", "tests.mesh_equivalence", *quant.FORMATS], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == set(quant.FORMATS)
    # As tests/test_parallel.py: sharding reorders float32 reductions only.
    assert all(max(diffs.values()) <= 1e-5 for diffs in report.values()), report


# int8 in the fast tier; nf4 (the same launcher path, another format) in the slow one.
@pytest.mark.parametrize("fmt", [pytest.param(f, marks=pytest.mark.slow) if f == "nf4" else f for f in quant.FORMATS])
def test_launcher_trains_the_demo_with_a_quantized_body(tmp_path, fmt, capsys):
    out = launch_here(capsys, tmp_path, "--max_steps=2", "--eval_every=2", "--save_every=2", f"--frozen_dtype={fmt}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "config.json").read_text())["flags"]["frozen_dtype"] == fmt
    events = read_jsonl(tmp_path / "metrics.jsonl")
    assert [e["step"] for e in events if "val_loss" in e] == [0, 2]
    assert all(np.isfinite(e["train_loss"]) for e in events if "train_loss" in e)
    assert np.abs(final_table(tmp_path) - np.load(tmp_path / "embeddings_pre.npy")).max() > 0
