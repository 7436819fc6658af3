"""The float32 matmul precision policy: one setting, applied once, recorded with the run.

XLA's default precision for float32 matmuls depends on the chip. On CPU it is full float32;
on Ampere and later NVIDIA GPUs it is TF32 (about 1e-3 relative), and on TPUs bf16 passes.
torch does not use TF32 for matmuls by default, so the same fp32 run would give other
numbers on a GPU than on a CPU or in transformers, and the HF-parity checks would fail
there. The policy fixes it for every jitted function of the process (training, evaluation,
generation, analysis) through `jax_default_matmul_precision`:

* `auto` (the default): `highest` when the compute dtype is float32 (parity with torch and
  with the CPU), XLA's default otherwise (bf16 / fp16 compute is unaffected: its operands
  are already low precision);
* `default`, `high` (bf16_3x / TF32-class), `highest`: that, whatever the dtype.

The environment variable WAKE2VEC_MATMUL_PRECISION overrides the flag (so a notebook or a
job script can set it once for every launcher), and the effective choice is what the run's
config.json records under flags.matmul_precision.
"""

from __future__ import annotations

import os

import jax

from wake2vec.config import FlagError

ENV = "WAKE2VEC_MATMUL_PRECISION"
CHOICES = ("auto", "default", "high", "highest")


def effective(requested: str, compute_dtype: str) -> str:
    """The precision a run with these settings uses: the env override, else the flag; `auto` resolved."""
    choice = os.environ.get(ENV) or requested
    if choice not in CHOICES:
        source = f"${ENV}" if os.environ.get(ENV) else "--matmul_precision"
        raise FlagError(f"{source}={choice!r}; choose one of {', '.join(CHOICES)}")
    if choice == "auto":
        return "highest" if compute_dtype == "float32" else "default"
    return choice


def apply(precision: str) -> None:
    """Sets it for every function jitted (or re-traced) from now on in this process."""
    jax.config.update("jax_default_matmul_precision", None if precision == "default" else precision)
