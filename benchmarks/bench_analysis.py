"""Times the embedding analysis on a TinyLlama-sized table and reports peak memory.

    python -m benchmarks.bench_analysis [--rows=76500 --dims=2048 --base_vocab_size=32000]

Builds a random float32 table shaped like the reference run's (76,500 x 2048, 32,000 base
rows) with a structure loosely like a trained one (a common mean offset, per-dimension
scales, Wake rows drawn round the base mean), a perturbed copy as the pre-training
snapshot, then times `analyze` (the numbers) and `run_analysis` (numbers, JSON and
figure). The issue's budget is 60 s and 4 GB peak on the 2-core development machine.
Peak RSS is the process's high-water mark (getrusage), tables included.
"""

from __future__ import annotations

import resource
import tempfile
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from wake2vec.analysis import report

_ROWS = flags.DEFINE_integer("rows", 76_500, "Rows of the table (base + new).")
_DIMS = flags.DEFINE_integer("dims", 2048, "Columns of the table.")
_BASE = flags.DEFINE_integer("base_vocab_size", 32_000, "Rows [:N] are base tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic table and of the analysis.")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def synthetic_tables(rows: int, dims: int, base: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(E_post, E_pre), float32, built in place to keep the benchmark's own memory at two tables."""
    rng = np.random.default_rng(seed)
    scales = (0.01 + 0.03 * rng.random(dims)).astype(np.float32)
    offset = (0.005 * rng.standard_normal(dims)).astype(np.float32)
    E_pre = rng.standard_normal((rows, dims), dtype=np.float32)
    E_pre *= scales
    E_pre += offset
    E_pre[base:] *= 0.1  # new rows: base mean + 0.1 x base std x noise, the reference init
    E_pre[base:] += offset * 0.9
    E_post = rng.standard_normal((rows, dims), dtype=np.float32)
    E_post *= 0.005
    E_post += E_pre
    return E_post, E_pre


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    E_post, E_pre = synthetic_tables(_ROWS.value, _DIMS.value, _BASE.value, _SEED.value)
    print(f"table {E_post.shape} {E_post.dtype}, {2 * E_post.nbytes / 2**30:.2f} GiB for post + pre; "
          f"peak RSS after building: {_peak_rss_gib():.2f} GiB")
    tokens = [f"tok{i}" for i in range(_ROWS.value)]

    start = time.perf_counter()
    report.analyze(E_post, _BASE.value, E_pre=E_pre, tokens=tokens, seed=_SEED.value)
    analyze_s = time.perf_counter() - start
    print(f"analyze:      {analyze_s:6.1f} s   peak RSS {_peak_rss_gib():.2f} GiB")

    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        report.run_analysis(E_post, _BASE.value, out_dir, E_pre=E_pre, tokens=tokens, seed=_SEED.value)
        run_s = time.perf_counter() - start
    print(f"run_analysis: {run_s:6.1f} s   peak RSS {_peak_rss_gib():.2f} GiB  (analysis + summary.json + PNG)")


if __name__ == "__main__":
    app.run(main)
