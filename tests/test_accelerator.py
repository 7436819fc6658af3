"""benchmarks/accelerator.py runs where it is tested: the CPU at its reduced shape, without the tests.

No GPU has run it, so this is what keeps the script a device run would start from working:
the report's structure, and figures that are at least self-consistent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks import accelerator

pytestmark = pytest.mark.slow


def test_reduced_cpu_run_writes_a_consistent_report(tmp_path):
    out_json, out_md = tmp_path / "accelerator.json", tmp_path / "accelerator.md"
    subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--tests=false", "--timed_steps=2",
                    f"--out_json={out_json}", f"--out_md={out_md}"], check=True, cwd=accelerator.ROOT, timeout=600)
    report = json.loads(out_json.read_text())
    env = report["environment"]
    assert env["platform"] == "cpu" and env["torch_device"] == "cpu"
    assert set(env["versions"]) >= {"jax", "jaxlib", "torch", "transformers"}
    assert report["shape_name"] == "reduced" and report["shape"] == accelerator.REDUCED
    assert report["tests"] == {"ran": False, "why": "--tests=false"}
    rows = report["configurations"]
    assert [(r["batch"], r["accum"], r["remat"]) for r in rows] == [(1, 4, "full"), (4, 1, "full"), (4, 1, "none")]
    page = out_md.read_text()
    for row in rows:
        ours, theirs = row["wake2vec"]["tokens_per_s"], row["pytorch"]["tokens_per_s"]
        assert ours > 0 and theirs > 0
        assert math.isclose(row["ratio"], ours / theirs, rel_tol=1e-12)
        assert math.isclose(ours, row["tokens_per_step"] / row["wake2vec"]["step_s"], rel_tol=1e-12)
        assert 0 < row["mfu"] <= 1.5
        assert row["wake2vec"]["peak_memory_bytes"] > 0 and "memory_analysis" in row["wake2vec"]["memory_source"]
        assert row["pytorch"]["peak_memory_bytes"] is None and row["pytorch"]["memory_source"] == "not available on CPU"
        assert f"| {row['configuration']} | {ours:,.0f} | {theirs:,.0f} | {row['ratio']:.2f}x |" in page
    assert report["command"] in page


def test_pytest_counts_reads_the_closing_summary():
    assert accelerator.pytest_counts("....\n12 passed, 3 skipped, 1 deselected in 30.1s\n") == {
        "passed": 12, "skipped": 3, "deselected": 1}
    assert accelerator.pytest_counts("F.\n1 failed, 10 passed, 2 errors in 3.0s") == {"failed": 1, "passed": 10, "errors": 2}
    assert accelerator.pytest_counts("no tests ran in 0.01s") == {}
