"""CPU cost of the source-rank analysis at TinyLlama scale, with the real vocabulary.

    python -m benchmarks.bench_source_rank [--tokenizer=../shared/data/tinyllama_tokenizer \
        --lexicon=../shared/data/wake_lexicon.txt --repeats=3]

The token names are real (TinyLlama's tokenizer with the Wake lexicon injected: 76,500
tokens, 32,000 base), so the rule finds the pairs it finds on a real run; the tables are
random (float32, 2,048 dims), which changes the ranks but not the work. Times, as CPU-seconds of this process (medians over --repeats), the three steps
`report` runs: the vocabulary maps, the edit-distance rule, and the ranks of the built-in
plus (at most source_rank.MAX_RULE_PAIRS) rule pairs against the base rows, once per table
(trained and pre-training).
"""

from __future__ import annotations

import pathlib
import statistics
import time
from typing import Sequence

import numpy as np
from absl import app, flags

from wake2vec.tokens import vocab
from wake2vec.analysis import metrics, source_pairs, source_rank

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
_TOKENIZER = flags.DEFINE_string("tokenizer", str(_SHARED / "tinyllama_tokenizer"), "Base tokenizer directory.")
_LEXICON = flags.DEFINE_string("lexicon", str(_SHARED / "wake_lexicon.txt"), "Lexicon, one word per line.")
_DIMS = flags.DEFINE_integer("dims", 2048, "Columns of the table.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions of each step; the median is reported.")


def _cpu_seconds(step):
    """(result, CPU-seconds of each of --repeats runs)."""
    times = []
    for _ in range(_REPEATS.value):
        start = time.process_time()
        result = step()
        times.append(time.process_time() - start)
    return result, times


def _show(name: str, times: Sequence[float]) -> None:
    print(f"{name:<34} median {statistics.median(times):6.2f} CPU-s  (runs: {', '.join(f'{t:.2f}' for t in times)})")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    tokenizer = vocab.load_base_tokenizer(_TOKENIZER.value)
    stats = vocab.augment_tokenizer(tokenizer, vocab.load_lexicon(_LEXICON.value))
    tokens = tokenizer.convert_ids_to_tokens(list(range(stats.total)))
    rng = np.random.default_rng(0)
    E_pre = rng.standard_normal((stats.total, _DIMS.value), dtype=np.float32)
    E_post = E_pre + 0.1 * rng.standard_normal(E_pre.shape, dtype=np.float32)
    print(f"vocabulary {stats.total:,} tokens ({stats.base_size:,} base), table {E_post.shape} {E_post.dtype}")

    maps, times = _cpu_seconds(lambda: source_pairs.vocabulary_maps(tokens.__getitem__, stats.base_size, stats.total))
    _show("vocabulary maps", times)
    wake_ids, english_ids, _ = maps
    found, times = _cpu_seconds(lambda: source_pairs.edit_distance_pairs(wake_ids, english_ids))
    _show(f"edit-distance rule ({len(found):,} pairs)", times)
    pairs = source_pairs.builtin_pairs() + [pair for pair, _ in found[: source_rank.MAX_RULE_PAIRS]]
    resolved = source_pairs.resolve_pairs(pairs, wake_ids, english_ids)
    for name, table in (("post", E_post), ("pre", E_pre)):
        _, times = _cpu_seconds(lambda: metrics.source_ranks(table[resolved.wake_ids], table[: stats.base_size],
                                                             resolved.english_ids))
        _show(f"ranks, {len(resolved.pairs):,} pairs, {name}", times)


if __name__ == "__main__":
    app.run(main)
