"""The summary, its files and the launcher, on a small table built to have known answers.

The table (8 dims, 300 base rows, 200 new rows):
* base rows have norms uniform in [1, 1.1], new rows in [5, 5.1], so the norm tests see
  complete separation (Welch p far below float64, Mann-Whitney U = n1 n2);
* new row n_base + j points exactly along base row j, so each Wake token's nearest base
  token is known (cosine 1);
* the pre-training snapshot equals the trained table except for 25 base rows and all new
  rows, each rotated by a known angle in a plane, so drift cosines are cos(angle) and
  l2 distances 2 |v| sin(angle / 2).
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
import subprocess

import numpy as np
import pytest

from experiments import analyze as analyze_launcher
from wake2vec import analysis
from wake2vec.analysis import report
from tests.launchers import run_here

N_BASE, N_NEW, DIM = 300, 200, 8
DRIFTED_BASE = np.arange(100, 125)  # rows rotated between pre and post
BASE_ANGLES = np.linspace(0.1, 1.3, DRIFTED_BASE.size)  # increasing: the last 20 are the top 20
NEW_ANGLES = np.linspace(0.05, 2.5, N_NEW)


def _rotate_rows(rows: np.ndarray, angles: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each row turned by its angle in the plane of itself and a random orthogonal direction."""
    rotated = np.empty_like(rows)
    for i, (row, angle) in enumerate(zip(rows, angles)):
        other = rng.standard_normal(row.size)
        other -= other @ row / (row @ row) * row
        other *= np.linalg.norm(row) / np.linalg.norm(other)
        rotated[i] = math.cos(angle) * row + math.sin(angle) * other
    return rotated


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((N_BASE, DIM))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    base_norms, new_norms = rng.uniform(1.0, 1.1, N_BASE), rng.uniform(5.0, 5.1, N_NEW)
    post = np.vstack([directions * base_norms[:, None], directions[:N_NEW] * new_norms[:, None]])
    pre = post.copy()
    pre[DRIFTED_BASE] = _rotate_rows(post[DRIFTED_BASE], BASE_ANGLES, rng)
    pre[N_BASE:] = _rotate_rows(post[N_BASE:], NEW_ANGLES, rng)
    tokens = [f"tok{i}" for i in range(N_BASE + N_NEW)]
    return post, pre, tokens, np.concatenate([base_norms, new_norms])


@pytest.fixture(scope="module")
def summary(tables):
    post, pre, tokens, _ = tables
    return analysis.analyze(post, N_BASE, E_pre=pre, tokens=tokens, seed=0)


def test_summary_is_strict_json_with_every_section(summary):
    text = json.dumps(summary, allow_nan=False)
    assert json.loads(text) == summary
    assert set(summary) == {"meta", "norms", "isotropy", "drift", "neighbors", "pca", "pairwise_cosine", "source_rank"}
    for group in ("all", "base", "new"):
        assert set(summary["isotropy"][group]) >= {"partition_ratio", "mu", "isoscore", "avg_cosine", "n"}


def test_norms_section(summary, tables):
    _, _, _, norms = tables
    # Stored as float64 here, so the describe() of the known norms matches to float64 rounding.
    assert summary["norms"]["base"]["mean"] == pytest.approx(norms[:N_BASE].mean(), rel=1e-12)
    assert summary["norms"]["new"]["max"] == pytest.approx(norms[N_BASE:].max(), rel=1e-12)
    # Every new norm exceeds every base norm: U1 = n1 n2, P(new > base) = 1; Welch's p underflows.
    assert summary["norms"]["mann_whitney"]["U"] == N_BASE * N_NEW
    assert summary["norms"]["mann_whitney"]["rank_biserial"] == 1.0
    assert summary["norms"]["welch"]["p"] is None and summary["norms"]["welch"]["log10_p"] < -308
    assert summary["norms"]["cohens_d"]["d"] > 0


def test_drift_top20_is_known(summary):
    drift = summary["drift"]["base"]
    assert drift["n_unchanged"] == N_BASE - DRIFTED_BASE.size
    top = drift["top20"]
    # Largest angle first; cos(angle) and chord length 2 |v| sin(angle / 2), |v| = the row's norm.
    np.testing.assert_array_equal([row["id"] for row in top], DRIFTED_BASE[::-1][:20])
    np.testing.assert_allclose([row["cosine"] for row in top], np.cos(BASE_ANGLES[::-1][:20]), atol=1e-12)
    assert [row["token"] for row in top] == [f"tok{i}" for i in DRIFTED_BASE[::-1][:20]]
    new_drift = summary["drift"]["new"]
    assert new_drift["n_unchanged"] == 0
    assert new_drift["top20"][0]["id"] == N_BASE + N_NEW - 1
    assert new_drift["cosine"]["min"] == pytest.approx(math.cos(NEW_ANGLES[-1]), abs=1e-12)


def test_drift_l2_matches_chord_length(summary, tables):
    post = tables[0]
    for row in summary["drift"]["base"]["top20"]:
        angle = BASE_ANGLES[list(DRIFTED_BASE).index(row["id"])]
        assert row["l2"] == pytest.approx(2 * np.linalg.norm(post[row["id"]]) * math.sin(angle / 2), rel=1e-12)


def test_neighbors_find_the_aligned_base_row(summary):
    assert set(summary["neighbors"]) == {"beginning", "middle", "end"}
    for segment, (lo, hi) in zip(("beginning", "middle", "end"), ((0, 66), (66, 133), (133, 200))):
        queries = summary["neighbors"][segment]
        assert len(queries) == report.NEIGHBOR_QUERIES_PER_SEGMENT
        for query in queries:
            assert lo <= query["id"] - N_BASE < hi
            best = query["nearest_base"][0]
            assert best["id"] == query["id"] - N_BASE and best["cosine"] == pytest.approx(1.0, abs=1e-12)
            assert len(query["nearest_base"]) == report.NEIGHBOR_K


def test_rows_no_training_block_holds_are_reported_apart(tables, summary):
    post, pre, tokens, norms = tables
    # Every third new row never occurs in a training block; the others 1..3 times.
    counts = np.where(np.arange(N_NEW) % 3 == 0, 0, 1 + np.arange(N_NEW) % 3).astype(np.int32)
    unseen = np.flatnonzero(counts == 0)
    split = analysis.analyze(post, N_BASE, E_pre=pre, tokens=tokens, seed=0, train_counts=counts)
    assert split["norms"]["new_unseen"]["n"] == unseen.size and split["norms"]["new_seen"]["n"] == N_NEW - unseen.size
    assert split["norms"]["new_unseen"]["mean"] == pytest.approx(norms[N_BASE + unseen].mean(), rel=1e-12)
    drift = split["drift"]["new_unseen"]
    assert drift["cosine"]["n"] == unseen.size
    # The most drifted unseen row is the unseen row of the largest angle, by its own id.
    assert drift["top20"][0]["id"] == N_BASE + unseen[-1]
    assert drift["cosine"]["min"] == pytest.approx(math.cos(NEW_ANGLES[unseen[-1]]), abs=1e-12)
    assert {row["id"] - N_BASE for row in split["drift"]["new_seen"]["top20"]}.isdisjoint(unseen)
    for queries in split["neighbors"].values():
        for query in queries:
            assert query["training_count"] == counts[query["id"] - N_BASE]
    # A full-vocabulary count array is cut to its new rows; the rest of the summary is unchanged.
    full = analysis.analyze(post, N_BASE, E_pre=pre, tokens=tokens, seed=0,
                            train_counts=np.concatenate([np.ones(N_BASE, np.int32), counts]))
    assert full == split
    assert split["meta"]["train_counts_given"] and not summary["meta"]["train_counts_given"]
    for section in ("norms", "drift"):
        assert {k: v for k, v in split[section].items() if k not in ("new_seen", "new_unseen")} == summary[section]
    # Every row seen: the unseen group is empty, None rather than a describe() of nothing.
    all_seen = analysis.analyze(post, N_BASE, E_pre=pre, seed=0, train_counts=np.ones(N_NEW, np.int32))
    assert all_seen["norms"]["new_unseen"] is None and all_seen["drift"]["new_unseen"] is None
    assert json.loads(json.dumps(all_seen, allow_nan=False)) == all_seen
    with pytest.raises(ValueError, match="one per new row"):
        analysis.analyze(post, N_BASE, train_counts=counts[:-1])

def test_equal_n_sampling_is_recorded(summary):
    sampling = summary["meta"]["sampling"]
    # Isotropy at n = min(300, 200); pairs at n = min(300 // 2, 200 // 2).
    assert sampling["isotropy"]["n_per_group"] == 200
    assert {summary["isotropy"][g]["n"] for g in ("all", "base", "new")} == {200}
    assert sampling["pairwise_cosine"]["n_pairs"] == 100
    assert summary["pairwise_cosine"]["ks"]["n"] == 100
    assert summary["pairwise_cosine"]["base_base"]["n"] == 100


def test_isotropy_of_the_new_rows_matches_the_metrics(summary, tables):
    # With n_per_group = 200 = N_NEW, the "new" group is the whole of the new rows.
    new_rows = tables[0][N_BASE:]
    assert summary["isotropy"]["new"]["avg_cosine"] == pytest.approx(analysis.metrics.avg_cosine(new_rows), rel=1e-12)
    assert summary["isotropy"]["new"]["isoscore"] == pytest.approx(analysis.metrics.isoscore(new_rows), rel=1e-12)
    assert summary["isotropy"]["new"]["mu"] == pytest.approx(analysis.metrics.isotropy_mu(new_rows), rel=1e-12)


def test_same_seed_same_summary_other_seed_other_samples(tables):
    post, pre, _, _ = tables
    first = json.dumps(analysis.analyze(post, N_BASE, E_pre=pre, seed=3))
    assert json.dumps(analysis.analyze(post, N_BASE, E_pre=pre, seed=3)) == first
    other = analysis.analyze(post, N_BASE, E_pre=pre, seed=4)
    assert other["norms"] == json.loads(first)["norms"]  # uses every row: no seed involved
    assert other["isotropy"]["base"]["avg_cosine"] != json.loads(first)["isotropy"]["base"]["avg_cosine"]


def test_tokens_may_be_a_mapping_or_absent(tables):
    post = tables[0]
    named = analysis.analyze(post, N_BASE, tokens={i: f"w{i}" for i in range(N_BASE + N_NEW)})
    query = named["neighbors"]["end"][0]
    assert query["token"] == f"w{query['id']}"
    unnamed = analysis.analyze(post, N_BASE)
    assert unnamed["neighbors"]["end"][0]["token"] is None
    assert "drift" not in unnamed


@pytest.mark.parametrize(
    "change, error",
    [
        (lambda post, pre: (post, N_BASE + N_NEW - 1, pre), "base_vocab_size"),
        (lambda post, pre: (post, N_BASE, pre[:-1]), "same resized table"),
        (lambda post, pre: (np.where(np.arange(post.shape[0])[:, None] == 7, np.nan, post), N_BASE, pre), "NaN"),
        (lambda post, pre: (post[0], N_BASE, None), "2-D"),
    ],
)
def test_bad_inputs_raise_actionable_errors(tables, change, error):
    post, base, pre = change(tables[0], tables[1])
    with pytest.raises(ValueError, match=error):
        analysis.analyze(post, base, E_pre=pre)


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def _strict_load(path: pathlib.Path) -> dict:
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def test_run_analysis_writes_summary_and_figure(tables, tmp_path):
    post, pre, tokens, _ = tables
    returned = analysis.run_analysis(post.astype(np.float32), N_BASE, tmp_path, E_pre=pre.astype(np.float32),
                                     tokens=tokens, source={"step": 7})
    assert _strict_load(tmp_path / "summary.json") == returned
    assert returned["meta"]["source"] == {"step": 7}
    assert _png_size(tmp_path / "embedding_analysis.png") == (1800, 1000)


def test_figure_survives_constant_drift(tables, tmp_path):
    # Gradient masking leaves every base row unchanged: drift cosines are all exactly 1.
    post = tables[0]
    summary = analysis.run_analysis(post, N_BASE, tmp_path, E_pre=post.copy())
    assert summary["drift"]["base"]["n_unchanged"] == N_BASE
    assert _png_size(tmp_path / "embedding_analysis.png") == (1800, 1000)


@pytest.fixture
def npy_tables(tables, tmp_path):
    post, pre, _, _ = tables
    np.save(tmp_path / "post.npy", post.astype(np.float32))
    np.save(tmp_path / "pre.npy", pre.astype(np.float32))
    np.save(tmp_path / "short.npy", pre[:-3].astype(np.float32))
    return tmp_path


def _run_cli(capsys, *args: str) -> subprocess.CompletedProcess:
    return run_here(capsys, "analyze", *args)


def test_cli_from_npy_files(npy_tables, capsys):
    out = npy_tables / "out"
    result = _run_cli(capsys, f"--post={npy_tables / 'post.npy'}", f"--pre={npy_tables / 'pre.npy'}",
                      f"--base_vocab_size={N_BASE}", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    written = _strict_load(out / "summary.json")
    assert written["meta"]["source"]["post"].endswith("post.npy")
    assert written["drift"]["base"]["n_unchanged"] == N_BASE - DRIFTED_BASE.size
    assert _png_size(out / "embedding_analysis.png") == (1800, 1000)


def test_cli_refuses_mismatched_tables(npy_tables, capsys):
    result = _run_cli(capsys, f"--post={npy_tables / 'post.npy'}", f"--pre={npy_tables / 'short.npy'}",
                      f"--base_vocab_size={N_BASE}", f"--out_dir={npy_tables / 'out'}")
    assert result.returncode != 0
    assert "same table before and after training" in result.stderr
    assert not (npy_tables / "out" / "summary.json").exists()


def test_launcher_errors_name_the_problem(npy_tables):
    with pytest.raises(FileNotFoundError, match="no table at"):
        analyze_launcher.analyze_files(npy_tables / "missing.npy", N_BASE)
    with pytest.raises(ValueError, match="base_vocab_size"):
        analyze_launcher.analyze_files(npy_tables / "post.npy", N_BASE + N_NEW, npy_tables / "out")
