"""A plain (non-editable) `pip install .` carries the launchers: they run from any directory.

The package is installed into a temporary target (no dependencies, no build isolation, so
nothing is downloaded), and the launcher is started from an unrelated directory with only
that target ahead of the installed dependencies, so neither the checkout nor an editable
install can answer for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow  # builds and installs the package


def test_a_plain_install_runs_the_launchers_from_anywhere(tmp_path):
    target, elsewhere, source = tmp_path / "site", tmp_path / "elsewhere", tmp_path / "source"
    elsewhere.mkdir()
    # A copy, since setuptools builds in the source tree: its build/ would go into the checkout, and a
    # stale one could install modules that no longer exist.
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "runs", "*.egg-info", "__pycache__"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert (target / "experiments" / "train_p1.py").is_file() and (target / "wake2vec" / "demo").is_dir()
    env = {**os.environ, "PYTHONPATH": str(target), "JAX_PLATFORMS": "cpu"}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=600)

    where = run("-c", "import experiments, wake2vec; print(experiments.__file__); print(wake2vec.__file__)")
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(line.startswith(str(target)) for line in where.stdout.split()), where.stdout
    assert "--max_steps" in run("-m", "experiments.train_p1", "--help").stdout
    prepared = run("-m", "experiments.train_p1", f"--workdir={tmp_path / 'run'}", "--max_steps=0")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert (tmp_path / "run" / "config.json").is_file()
    # Our own progress lines pass the console filter from site-packages too (a library's INFO would not).
    assert " INFO " in prepared.stderr, prepared.stderr[-3000:]
