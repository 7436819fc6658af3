"""Pure metrics of an embedding table: each takes arrays and returns numbers.

Every function here is deterministic and free of hidden state (the two that draw random
numbers take the generator as an argument), so each number in summary.json can be checked
against a closed-form answer on a constructed cloud (tests/test_analysis_metrics.py).
`report.py` decides which rows go in; nothing here knows about base or Wake tokens.

Numerics. A TinyLlama table is 76,500 x 2048 float32 (627 MB); a float64 copy would double
that. So functions walk the rows in chunks, cast each chunk to float64 for norms, dot
products and sums, and keep float32 only inside the large matrix products (scatter
matrices, projections, Gram blocks), where BLAS is about twice as fast and the rounding
(about 1e-6 relative) is far below anything the summary resolves. Eigendecompositions are
float64.

The significance tests (log-space p-values) live in wake2vec.analysis.significance and
are re-exported here.
"""

from __future__ import annotations

import math

import numpy as np
from threadpoolctl import threadpool_limits

from wake2vec.analysis.significance import (  # noqa: F401 (re-exported: metrics.welch_t_test, ...)
    as_sample, cohens_d, hedges_g, ks_log_sf_equal_n, ks_two_sample, mann_whitney_u, p_from_log10,
    student_t_log_sf, welch_t_test)

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

# Rows per chunk: 4096 x 2048 float64 is 64 MB, which bounds every temporary below.
_CHUNK_ROWS = 4096


def _row_chunks(n_rows: int, size: int = _CHUNK_ROWS):
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def _as_matrix(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dims), got shape {array.shape}")
    return array




def _unit_rows_float64(chunk: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows stay zero (their cosine with anything is 0)."""
    rows = chunk.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    return rows / np.where(norms > 0, norms, 1.0)[:, None]


def unit_rows(V) -> np.ndarray:
    """float32 copy of V with each row scaled to unit length (zero rows stay zero)."""
    V = _as_matrix(V, "V")
    out = np.empty(V.shape, dtype=np.float32)
    for rows in _row_chunks(V.shape[0]):
        out[rows] = _unit_rows_float64(V[rows])
    return out


# ---------------------------------------------------------------------------------------
# Descriptive statistics and per-row quantities


def describe(values) -> dict:
    """n, mean, sample std (ddof=1), min, max and the QUANTILES (linear interpolation)."""
    sample = as_sample(values, "values", min_size=1)
    quantiles = np.quantile(sample, QUANTILES)
    return {
        "n": int(sample.size),
        "mean": float(sample.mean()),
        "std": float(sample.std(ddof=1)) if sample.size > 1 else None,
        "min": float(sample.min()),
        "max": float(sample.max()),
        "quantiles": {f"{q:g}": float(v) for q, v in zip(QUANTILES, quantiles)},
    }


def row_norms(V) -> np.ndarray:
    """L2 norm of every row, float64."""
    V = _as_matrix(V, "V")
    norms = np.empty(V.shape[0], dtype=np.float64)
    for rows in _row_chunks(V.shape[0]):
        chunk = V[rows].astype(np.float64)
        norms[rows] = np.sqrt(np.einsum("ij,ij->i", chunk, chunk))
    return norms


def _per_row_pair(A, B, what: str, per_chunk) -> np.ndarray:
    """per_chunk(A[rows], B[rows]) over row chunks, so memory stays bounded; float64 out."""
    A, B = _as_matrix(A, "A"), _as_matrix(B, "B")
    if A.shape != B.shape:
        raise ValueError(f"{what} needs equal shapes, got {A.shape} and {B.shape}")
    out = np.empty(A.shape[0], dtype=np.float64)
    for rows in _row_chunks(A.shape[0]):
        out[rows] = per_chunk(A[rows], B[rows])
    return out


def row_cosines(A, B) -> np.ndarray:
    """cos(A[i], B[i]) for every row i, float64; 0 where either row is zero."""

    def cosines(a, b):
        return np.clip(np.einsum("ij,ij->i", _unit_rows_float64(a), _unit_rows_float64(b)), -1.0, 1.0)

    return _per_row_pair(A, B, "row_cosines", cosines)


def row_distances(A, B) -> np.ndarray:
    """||A[i] - B[i]|| for every row i, float64."""

    def distances(a, b):
        diff = a.astype(np.float64) - b.astype(np.float64)
        return np.sqrt(np.einsum("ij,ij->i", diff, diff))

    return _per_row_pair(A, B, "row_distances", distances)


# ---------------------------------------------------------------------------------------
# Isotropy


def avg_cosine(V) -> float:
    """Exact mean of cos(v_i, v_j) over all ordered pairs i != j, in O(n D).

    With unit rows u_i: sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2, so no pair
    is ever formed and nothing is sampled. (Zero rows count as cosine 0 with everything.)
    """
    V = _as_matrix(V, "V")
    n = V.shape[0]
    if n < 2:
        raise ValueError("avg_cosine needs at least 2 rows")
    total = np.zeros(V.shape[1], dtype=np.float64)
    squared_lengths = 0.0
    for rows in _row_chunks(n):
        units = _unit_rows_float64(V[rows])
        total += units.sum(axis=0)
        squared_lengths += float(np.einsum("ij,ij->", units, units))
    return float((total @ total - squared_lengths) / (n * (n - 1)))


def partition_ratio(V) -> float:
    """The original study's isotropy statistic over the rows of V: min_i Z_i / max_i Z_i.

    Z_i = sum_{j != i} exp(cos(v_i, v_j)), on raw (uncentred) vectors, as the study words
    it. This is not Mu & Viswanath's measure (see log_isotropy_mu): it is scale-free and
    rates any cloud whose points all see the same cosine profile at exactly 1, however
    anisotropic (a cross-polytope riding on a large common offset, for one). O(n^2 D), so
    the caller passes a sample (5,000 rows in the report).
    """
    units = unit_rows(V)
    n = units.shape[0]
    if n < 2:
        raise ValueError("partition_ratio needs at least 2 rows")
    partition = np.empty(n, dtype=np.float64)
    for rows in _row_chunks(n, 1024):
        exp_cos = np.exp(units[rows] @ units.T)  # float32: exp of values in [-1, 1], 1e-7 relative
        own = np.arange(rows.start, rows.stop)
        # Subtract the self term as the product computed it, so the diagonal cancels exactly.
        partition[rows] = np.add.reduce(exp_cos, axis=1, dtype=np.float64) - exp_cos[own - rows.start, own]
    return float(partition.min() / partition.max())


def second_moments(V) -> tuple[np.ndarray, np.ndarray]:
    """(mean, centred scatter) of the rows of V: mean (D,) and sum_i (v_i - m)(v_i - m)^T, float64.

    Centring before the product avoids the cancellation of V^T V - n m m^T when the common
    mean is large against the spread (embedding tables have exactly that offset). The mean
    subtracted is its float32 rounding a; the exact identity
    sum (v-a)(v-a)^T = scatter + n (m-a)(m-a)^T removes that rounding afterwards.
    V^T V itself is scatter + n m m^T.
    """
    V = _as_matrix(V, "V")
    n, dim = V.shape
    mean = np.zeros(dim, dtype=np.float64)
    for rows in _row_chunks(n):
        mean += np.add.reduce(V[rows], axis=0, dtype=np.float64)
    mean /= n
    centre = mean.astype(np.float32)
    scatter = np.zeros((dim, dim), dtype=np.float64)
    for rows in _row_chunks(n, 8192):
        centred = np.subtract(V[rows], centre, dtype=np.float32)
        scatter += centred.T @ centred  # numpy runs X^T X as a symmetric rank-k update
    offset = mean - centre.astype(np.float64)
    scatter -= n * np.outer(offset, offset)
    return mean, scatter


# _EIGEN_THREADS_NOTE: the D x D eigensolvers run on one BLAS thread. Their tridiagonal
# reduction is level-2 BLAS that synchronises threads at every column; on 2 cores shared
# with another busy process, 2 threads made a 2048 x 2048 eigh take 3.7-7.6 s against 1.05 s
# on one thread (0.66 s with 2 threads on an idle machine), so one thread is the robust choice.


def covariance_eigenvalues(scatter, n_rows: int) -> np.ndarray:
    """Eigenvalues of the sample covariance scatter / (n - 1), descending, clipped at 0."""
    if n_rows < 2:
        raise ValueError("a covariance needs at least 2 rows")
    with threadpool_limits(1, user_api="blas"):  # see _EIGEN_THREADS_NOTE
        eigenvalues = np.linalg.eigvalsh(np.asarray(scatter, dtype=np.float64) / (n_rows - 1))
    return np.clip(eigenvalues[::-1], 0.0, None)


def second_moment_directions(mean, scatter, n_rows: int) -> np.ndarray:
    """Eigenvectors (columns, D x D) of V^T V = scatter + n m m^T: Mu & Viswanath's directions c."""
    mean = np.asarray(mean, dtype=np.float64)
    with threadpool_limits(1, user_api="blas"):  # see _EIGEN_THREADS_NOTE
        _, eigenvectors = np.linalg.eigh(np.asarray(scatter, dtype=np.float64) + n_rows * np.outer(mean, mean))
    return eigenvectors


def log_isotropy_mu(V, directions=None) -> float:
    """Natural log of Mu & Viswanath's (ICLR 2018) isotropy I = min_c Z(c) / max_c Z(c).

    Z(c) = sum_w exp(c . v_w) over the raw (uncentred) rows v_w, for c over the eigenvectors
    of V^T V and their negatives (2D directions). log Z is accumulated with logsumexp in
    float64 chunk by chunk, so large norms cannot overflow and memory stays bounded; the
    log is returned because I itself underflows for strongly offset clouds.
    `directions` (from second_moment_directions) may be passed to reuse a decomposition.
    """
    V = _as_matrix(V, "V")
    if directions is None:
        directions = second_moment_directions(*second_moments(V), V.shape[0])
    directions32 = np.asarray(directions, dtype=np.float32)
    log_z_plus = np.full(directions32.shape[1], -np.inf)
    log_z_minus = np.full(directions32.shape[1], -np.inf)
    for rows in _row_chunks(V.shape[0]):
        projections = np.asarray(V[rows], dtype=np.float32) @ directions32
        log_z_plus = np.logaddexp(log_z_plus, _column_logsumexp(projections))
        log_z_minus = np.logaddexp(log_z_minus, _column_logsumexp(-projections))
    log_z = np.concatenate([log_z_plus, log_z_minus])
    return float(log_z.min() - log_z.max())


def _column_logsumexp(values: np.ndarray) -> np.ndarray:
    """log sum_i exp(values[i, j]) per column, float64 result.

    Shifting by the column maximum makes every exponent <= 0, so exp runs in float32 (twice
    the throughput of float64, 1e-7 relative error per term) and the sum in float64.
    """
    peak = values.max(axis=0)
    exps = np.exp(values - peak)
    return np.log(np.add.reduce(exps, axis=0, dtype=np.float64)) + peak.astype(np.float64)


def isotropy_mu(V, directions=None) -> float:
    """Mu & Viswanath's isotropy I in [0, 1] (1 = isotropic); see log_isotropy_mu."""
    return math.exp(log_isotropy_mu(V, directions))


def isoscore_from_variances(variances) -> float:
    """IsoScore (Rudman et al. 2022) from the variance vector of the PCA-rotated cloud.

    With d dimensions and variance vector s: s_hat = sqrt(d) s / ||s||; isotropy defect
    delta = ||s_hat - 1|| / sqrt(2 (d - sqrt d)); fraction of dimensions used
    phi = (d - delta^2 (d - sqrt d))^2 / d^2; IsoScore = (d phi - 1) / (d - 1).
    It is 1 when all d variances are equal, 0 for a rank-1 cloud, and (k - 1) / (d - 1)
    when k dimensions carry equal variance and the rest none: there s_hat is sqrt(d/k) on
    k entries, ||s_hat - 1||^2 = 2d - 2 sqrt(dk), so delta^2 (d - sqrt d) = d - sqrt(dk)
    and phi = k / d.
    """
    variances = np.asarray(variances, dtype=np.float64).ravel()
    dim = variances.size
    if dim < 2:
        raise ValueError("IsoScore needs at least 2 dimensions")
    length = np.linalg.norm(variances)
    if length == 0.0:
        raise ValueError("IsoScore is undefined for a cloud with no variance")
    normalised = math.sqrt(dim) * variances / length
    defect_sq = float(np.sum((normalised - 1.0) ** 2)) / (2.0 * (dim - math.sqrt(dim)))
    dims_used = (dim - defect_sq * (dim - math.sqrt(dim))) ** 2 / dim**2
    return float((dim * dims_used - 1.0) / (dim - 1.0))


def isoscore(V) -> float:
    """IsoScore of the rows of V. PCA rotation makes the covariance diagonal, so the
    variance vector is exactly the covariance eigenvalues (centring is implied)."""
    V = _as_matrix(V, "V")
    _, scatter = second_moments(V)
    return isoscore_from_variances(covariance_eigenvalues(scatter, V.shape[0]))


# ---------------------------------------------------------------------------------------
# Spectrum


def cumulative_variance_ratio(eigenvalues) -> np.ndarray:
    """Cumulative fraction of variance of the descending eigenvalues."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    total = eigenvalues.sum()
    if total <= 0.0:
        raise ValueError("no variance: the eigenvalues sum to zero")
    return np.cumsum(eigenvalues) / total


def components_for_variance(eigenvalues, fraction: float) -> int:
    """Fewest leading components whose variance reaches `fraction` of the total.

    Uses the full spectrum (the original capped PCA at 100 components and so reported
    "101" for every group). A 1e-12 slack keeps exact ties, such as 9 of 10 equal
    eigenvalues reaching 90%, from failing to float rounding.
    """
    cumulative = cumulative_variance_ratio(eigenvalues)
    return int(np.argmax(cumulative >= fraction - 1e-12)) + 1


def pca_summary(eigenvalues, n_top: int = 20) -> dict:
    """{k90, k95, top1_ratio, total_variance, top_eigenvalues} of a descending spectrum."""
    eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
    total = float(eigenvalues.sum())
    return {
        "k90": components_for_variance(eigenvalues, 0.90),
        "k95": components_for_variance(eigenvalues, 0.95),
        "top1_ratio": float(eigenvalues[0] / total),
        "total_variance": total,
        "top_eigenvalues": [float(v) for v in eigenvalues[:n_top]],
    }


# ---------------------------------------------------------------------------------------
# Neighbours and pairs


def cosine_scores(queries, candidates) -> np.ndarray:
    """(q, n_candidates) float64 cosines of every query with every candidate row.

    Holds the whole score matrix: meant for a few hundred queries at a time.
    """
    queries, candidates = _as_matrix(queries, "queries"), _as_matrix(candidates, "candidates")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dims, candidates {candidates.shape[1]}")
    query_units = _unit_rows_float64(queries)
    scores = np.empty((queries.shape[0], candidates.shape[0]), dtype=np.float64)
    for rows in _row_chunks(candidates.shape[0]):
        scores[:, rows] = query_units @ _unit_rows_float64(candidates[rows]).T
    return scores


def nearest_by_cosine(queries, candidates, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k candidate rows of highest cosine to each query: (indices (q, k), cosines (q, k)).

    float64 throughout; ties go to the lower candidate index, so the result is deterministic.
    """
    scores = cosine_scores(queries, candidates)
    k = min(k, scores.shape[1])
    candidate_ids = np.arange(scores.shape[1])
    indices = np.stack([np.lexsort((candidate_ids, -row))[:k] for row in scores])
    return indices, np.take_along_axis(scores, indices, axis=1)


def source_ranks(queries, candidates, targets, block: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Rank of candidates[targets[i]] among all candidates by cosine to queries[i], and that cosine.

    Rank 1 is the nearest. The rank is the target's position in nearest_by_cosine's order:
    1 + the candidates of higher cosine + those of equal cosine and lower index, so a tie
    never flatters the target more than the neighbour lists do. Scores are float64, and the
    target's own score is read from the same matrix it is compared with, so it never counts
    itself. Queries go `block` at a time, which bounds the score matrix (512 x 32,000 float64
    is 131 MB).
    """
    queries = _as_matrix(queries, "queries")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.shape != (queries.shape[0],):
        raise ValueError(f"one target per query: {queries.shape[0]} queries, targets of shape {targets.shape}")
    n_candidates = _as_matrix(candidates, "candidates").shape[0]
    if targets.size and (targets.min() < 0 or targets.max() >= n_candidates):
        raise ValueError(f"targets must index the {n_candidates} candidates")
    ranks = np.empty(targets.size, dtype=np.int64)
    target_cosines = np.empty(targets.size, dtype=np.float64)
    candidate_ids = np.arange(n_candidates)
    for part in _row_chunks(targets.size, block):
        scores = cosine_scores(queries[part], candidates)
        own = scores[np.arange(scores.shape[0]), targets[part]]
        higher = (scores > own[:, None]).sum(axis=1)
        tied_before = ((scores == own[:, None]) & (candidate_ids < targets[part][:, None])).sum(axis=1)
        ranks[part] = 1 + higher + tied_before
        target_cosines[part] = own
    return ranks, target_cosines


def rank_summary(ranks, cosines, top: tuple[int, ...] = (5, 50)) -> dict | None:
    """n, median rank, the share of ranks <= each of `top`, and the mean target cosine; None if empty."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        return None
    summary = {"n": int(ranks.size), "median_rank": float(np.median(ranks))}
    summary.update({f"share_top{k}": float(np.mean(ranks <= k)) for k in top})
    summary["mean_cosine"] = float(np.mean(cosines))
    return summary


def disjoint_pairs(n_items: int, n_pairs: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n_pairs pairs of distinct items in which no item appears twice.

    A random permutation cut into consecutive pairs: pairs that share an item are dependent,
    and a test that treats them as independent (the original's KS test did) overstates its
    evidence.
    """
    if 2 * n_pairs > n_items:
        raise ValueError(f"{n_pairs} disjoint pairs need {2 * n_pairs} items, got {n_items}")
    order = rng.permutation(n_items)[: 2 * n_pairs]
    return order[0::2], order[1::2]


def paired_cosines(A, rows_a, B, rows_b) -> np.ndarray:
    """cos(A[rows_a[i]], B[rows_b[i]]) for each i, float64, gathering in chunks."""
    A, B = _as_matrix(A, "A"), _as_matrix(B, "B")
    rows_a, rows_b = np.asarray(rows_a), np.asarray(rows_b)
    if rows_a.shape != rows_b.shape:
        raise ValueError("rows_a and rows_b must have the same length")
    cosines = np.empty(rows_a.size, dtype=np.float64)
    for part in _row_chunks(rows_a.size):
        units_a = _unit_rows_float64(A[rows_a[part]])
        units_b = _unit_rows_float64(B[rows_b[part]])
        cosines[part] = np.clip(np.einsum("ij,ij->i", units_a, units_b), -1.0, 1.0)
    return cosines
