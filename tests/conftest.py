"""Shared pytest fixtures.

The real fixtures (../shared/data beside the repository) are not ours and are never copied
in; tests that need them take the `shared_data` fixture, which skips cleanly when the
folder is absent (for example on a user's clone).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

_COMPILE_CACHE = "JAX_COMPILATION_CACHE_DIR"
_OWN_COMPILE_CACHE: list[str] = []


def pytest_configure(config):
    """One XLA compilation cache for the whole session: the xdist workers and every launcher
    they start inherit it, so a program that many tests compile (the demo's train, eval and
    decode steps, at the same tiny shapes) is compiled once. It starts empty, so the tier's
    time is a cold one, and goes when the session ends. The size bound turns on JAX's file
    lock, which keeps a worker from reading an entry another is still writing. Programs that
    compile in under 0.1 s (the one-primitive programs of eager calls, hundreds per test) are
    cheaper to compile again than to write, lock and read: caching them too cost test_train_p1,
    test_quant and test_alignment 167 CPU-s against 141."""
    if _COMPILE_CACHE in os.environ:  # a worker (it inherits the controller's) or the user's own
        return
    if "not slow" in (config.option.markexpr or ""):
        # The fast tier's programs are tiny: compiling them costs more than running them, and
        # LLVM's optimisation passes are most of the compile (test_lora.py: 95 -> 55 CPU-s).
        # They change the machine code, not the HLO's arithmetic; the slow tier keeps XLA's defaults.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
                                   " --xla_cpu_multi_thread_eigen=false").strip()
        # One thread per process: the tier runs one worker per core, and each process's own thread
        # pools (XLA's, torch's OpenMP) sized to every core would oversubscribe them.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    _OWN_COMPILE_CACHE.append(tempfile.mkdtemp(prefix="wake2vec-tests-xla-"))
    os.environ.update({_COMPILE_CACHE: _OWN_COMPILE_CACHE[0], "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.1",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", "JAX_COMPILATION_CACHE_MAX_SIZE": str(8 << 30)})


# The files whose tests take longest (pytest --durations), run first: the fast tier hands whole
# files to its two workers in collection order, and these come late in the alphabet, so one
# worker would end the session alone on one of them. The order changes no result.
_LONGEST_FIRST = ("test_train_p1.py", "test_lora.py", "test_precision.py", "test_phases.py", "test_robustness.py",
                  "test_checkpoint.py", "test_generate.py", "test_model_parity.py", "test_train_step.py", "test_quant.py",
                  "test_loss_scale.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_unconfigure(config):
    for directory in _OWN_COMPILE_CACHE:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def full_float32_matmuls():
    """The parity tests compare float32 programs with torch's: on a GPU, XLA's default would be
    TF32 (wake2vec.training.precision). A no-op on CPU, where XLA's default is already full float32."""
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    yield


@pytest.fixture
def shared_data() -> pathlib.Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixtures not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def mount_tmpfs(tmp_path):
    """mount_tmpfs("5m") -> a fresh tmpfs of that size, where this process may mount one
    (root with CAP_SYS_ADMIN); skips otherwise. A real small file system is the only honest
    way to see what a full disk does to a run, short of faking every call that writes."""
    mounted: list[pathlib.Path] = []

    def mount(size: str) -> pathlib.Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
