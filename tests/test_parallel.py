"""Sharded steps on 8 forced host devices equal the single-device step, at a per-device cost that
does not depend on how the devices are arranged."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from wake2vec.training import parallel


@pytest.mark.slow  # 8-device meshes
def test_data_and_model_meshes_match_one_device():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    out = subprocess.run([sys.executable, "-m", "tests.mesh_equivalence"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) == {"8,1", "4,2", "2,4"}
    for spec, diffs in report.items():
        # Sharding changes only the order of float32 reductions (psum over 'data', the
        # vocab-sharded softmax over 'model'): differences are rounding, far below 1e-5.
        assert max(diffs.values()) <= 1e-5, (spec, diffs)


@pytest.mark.slow  # compiles on several 8-device meshes
def test_per_device_flops_do_not_depend_on_the_mesh():
    """At a fixed global batch, the compiled step's per-device FLOPs are the same on 8,1 / 4,2 / 2,4.

    XLA's cost analysis counts a loop body once, not once per iteration, so the shape has one
    layer and one loss chunk (16 x 63 tokens <= 1,024): every FLOP of the step is counted.
    The analysis is deterministic; the 5% allows for work that legitimately depends on the
    mesh (the optimiser update of a table replicated over 'data', the collectives' adds).
    """
    out = subprocess.run([sys.executable, "-m", "benchmarks.mesh_cost", "--shape=tiny", "--devices=8",
                          "--meshes", "8,1", "4,2", "2,4", "--seq_len=64", "--batch_size=16"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    flops = {r["mesh"]: r["flops_per_device"] for r in map(json.loads, out.stdout.strip().splitlines())}
    assert set(flops) == {"8,1", "4,2", "2,4"}
    assert max(flops.values()) <= 1.05 * min(flops.values()), flops


def test_mesh_spec_errors_are_actionable():
    with pytest.raises(ValueError, match="expected two integers"):
        parallel.parse_mesh("8", 8)
    with pytest.raises(ValueError, match="needs 6 devices but 8"):
        parallel.parse_mesh("3,2", 8)
    assert parallel.parse_mesh("", 4) == (1, 4)


def test_vocab_padding_multiple():
    mesh = parallel.make_mesh("")
    assert parallel.padded_vocab(76_500, mesh) == 76_544
    assert parallel.padded_vocab(128, mesh) == 128


def test_a_body_matrix_no_device_count_divides_is_replicated_with_a_warning():
    """6 devices and a (layers, 64, 100) stack: neither 64 nor 100 divides by 6."""
    script = (
        "import logging, jax, numpy as np\n"
        "from wake2vec.training import parallel\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "mesh = parallel.make_mesh('1,6')\n"
        "tree = {'layers': {'w': np.zeros((2, 64, 100), np.float32), 'v': np.zeros((2, 60, 7), np.float32)}}\n"
        "s = parallel.frozen_sharding(tree, mesh)\n"
        "print(tuple(s['layers']['w'].spec), tuple(s['layers']['v'].spec))\n")
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=6", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "(None, None, None) (None, ('data', 'model'), None)", out.stdout
    # one matrix of 2 x 64 x 100 float32 = 51,200 bytes, 5/6 of it more per device than split
    assert "1 frozen body matrices (shapes [(2, 64, 100)]) have no axis divisible by the 6 devices" in out.stderr
    assert "0.00 GB more per device" in out.stderr, out.stderr
