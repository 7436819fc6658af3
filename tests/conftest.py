"""Shared pytest fixtures.

The real fixtures (../shared/data beside the repository) are not ours and are never copied
in; tests that need them take the `shared_data` fixture, which skips cleanly when the
folder is absent (for example on a user's clone).
"""

from __future__ import annotations

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
