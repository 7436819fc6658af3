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

p-values. Tests on tens of thousands of rows produce p-values far below the smallest
float64 (about 1e-308); the original study printed those as 0.0. Here
every test computes log p directly in log space (from the log survival function of its
reference distribution) and reports `log10_p` exactly; `p` is the float value when float64
represents it (>= 2.2e-308) and None (JSON null) otherwise, never a bare 0.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special, stats
from threadpoolctl import threadpool_limits

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)

# Rows per chunk: 4096 x 2048 float64 is 64 MB, which bounds every temporary below.
_CHUNK_ROWS = 4096
_LN10 = math.log(10.0)
_LN2 = math.log(2.0)
_Z975 = float(stats.norm.ppf(0.975))


def _row_chunks(n_rows: int, size: int = _CHUNK_ROWS):
    for start in range(0, n_rows, size):
        yield slice(start, min(start + size, n_rows))


def _as_matrix(x, name: str) -> np.ndarray:
    array = np.asarray(x)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (rows x dims), got shape {array.shape}")
    return array


def _as_sample(x, name: str, min_size: int = 2) -> np.ndarray:
    sample = np.asarray(x, dtype=np.float64).ravel()
    if sample.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} values, got {sample.size}")
    return sample


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
    sample = _as_sample(values, "values", min_size=1)
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
# p-values in log space


def p_from_log10(log10_p: float) -> float | None:
    """p as a float where float64 holds it at full precision; None (JSON null) below that.

    None rather than 0.0 because a p-value is never 0: the magnitude lives in log10_p.
    """
    p = 10.0**log10_p
    return float(p) if p >= np.finfo(np.float64).tiny else None


def _log_betainc_continued_fraction(a: float, b: float, log_x: float, log_1mx: float) -> float:
    """log I_x(a, b), the regularized incomplete beta, for x < (a + 1) / (a + b + 2).

    I_x(a, b) = x^a (1-x)^b / (a B(a, b)) / (1 + d1 / (1 + d2 / (1 + ...))) with
    d_{2m+1} = -(a+m)(a+b+m) x / ((a+2m)(a+2m+1)) and d_{2m} = m(b-m) x / ((a+2m-1)(a+2m)).
    The prefactor carries all of the underflow, so it is taken in logs; the continued
    fraction itself is of order 1 and is evaluated with the modified Lentz recurrence.
    scipy has betainc but no log of it, which is what an underflowing tail needs.
    """
    x = math.exp(log_x)
    if not x < (a + 1.0) / (a + b + 2.0):
        raise ValueError("the continued fraction converges only for x < (a + 1) / (a + b + 2)")
    floor = 1e-300  # Lentz's guard against a zero denominator
    fraction, c_term, d_term = 1.0, 1.0, 0.0
    for i in range(1, 100_000):
        m = i // 2
        if i % 2:
            coeff = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        else:
            coeff = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        d_term = 1.0 + coeff * d_term
        d_term = 1.0 / (d_term if d_term != 0.0 else floor)
        c_term = 1.0 + coeff / c_term
        c_term = c_term if c_term != 0.0 else floor
        step = c_term * d_term
        fraction *= step
        if abs(step - 1.0) < 1e-15:
            break
    else:
        raise RuntimeError(f"incomplete-beta continued fraction did not converge (a={a}, b={b}, x={x})")
    log_prefactor = a * log_x + b * log_1mx - math.log(a) - special.betaln(a, b)
    return log_prefactor - math.log(fraction)


def student_t_log_sf(t: float, df: float) -> float:
    """Natural log of P(T > t) for Student's t with df degrees of freedom, exact in the tail.

    scipy.stats.t.logsf returns -inf once the tail underflows (df = 70,000, t = 50 already
    does); a Welch test on 76,500 norms lands there. For t > 2 this uses
    P(T > t) = I_x(df/2, 1/2) / 2 with x = df / (df + t^2), whose continued fraction
    converges for every t > sqrt(3); x and 1 - x are formed in logs so t up to 1e300 works.
    """
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    if t <= 2.0:  # P(T > 2) > 0.02 for every df >= 1: nothing to underflow
        return float(stats.t.logsf(t, df))
    # x = r / (1 + r) with r = df / t^2, kept in logs: t^2 overflows past t = 1e154 and r
    # underflows past t = 1e160.
    log_ratio = math.log(df) - 2.0 * math.log(t)
    log_1mx = -math.log1p(math.exp(log_ratio))
    log_x = log_ratio + log_1mx
    return -_LN2 + _log_betainc_continued_fraction(df / 2.0, 0.5, log_x, log_1mx)


# ---------------------------------------------------------------------------------------
# Two-sample statistics. Direction: x is the first sample, y the second; a positive t, d,
# g or rank-biserial correlation means x tends to be larger.


def welch_t_test(x, y) -> dict:
    """Welch's unequal-variance t test, two-sided: {t, df, p, log10_p}.

    Same statistic, Welch-Satterthwaite df and p as scipy.stats.ttest_ind(equal_var=False);
    log10_p from student_t_log_sf, so it stays exact where p underflows.
    """
    x, y = _as_sample(x, "x"), _as_sample(y, "y")
    var_mean_x, var_mean_y = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se2 = var_mean_x + var_mean_y
    if se2 == 0.0:  # two constant samples: t is undefined
        return {"t": None, "df": None, "p": None, "log10_p": None}
    t = (x.mean() - y.mean()) / math.sqrt(se2)
    df = se2**2 / (var_mean_x**2 / (x.size - 1) + var_mean_y**2 / (y.size - 1))
    log_p = min(0.0, _LN2 + student_t_log_sf(abs(t), df))
    log10_p = log_p / _LN10
    return {"t": float(t), "df": float(df), "p": p_from_log10(log10_p), "log10_p": log10_p}


def mann_whitney_u(x, y) -> dict:
    """Mann-Whitney U, two-sided: {U, p, log10_p, prob_superiority, rank_biserial}.

    U is U1, the statistic of x (as scipy reports it). p is the normal approximation with
    tie and continuity corrections, as scipy.stats.mannwhitneyu(method="asymptotic"); the
    exact null distribution is out of reach at 32,000 x 44,500. log10_p comes from
    log_ndtr, so it is the approximation's exact value in the far tail too.
    prob_superiority = U1 / (n1 n2) = P(x > y) + P(x = y) / 2 (the common-language effect
    size); rank_biserial = 2 prob_superiority - 1, in [-1, 1].
    """
    x, y = _as_sample(x, "x", 1), _as_sample(y, "y", 1)
    n1, n2 = x.size, y.size
    n = n1 + n2
    pooled = np.concatenate([x, y])
    ranks = stats.rankdata(pooled)
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    _, tie_counts = np.unique(pooled, return_counts=True)
    tie_counts = tie_counts.astype(np.float64)
    tie_term = float(np.sum(tie_counts**3 - tie_counts))
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1))))
    u_larger = max(u1, n1 * n2 - u1)
    if sigma == 0.0:  # every value tied: no evidence of a difference
        log_p = 0.0
    else:
        z = (u_larger - n1 * n2 / 2.0 - 0.5) / sigma
        log_p = min(0.0, _LN2 + float(special.log_ndtr(-z)))
    log10_p = log_p / _LN10
    superiority = u1 / (n1 * n2)
    return {
        "U": u1,
        "p": p_from_log10(log10_p),
        "log10_p": log10_p,
        "prob_superiority": superiority,
        "rank_biserial": 2.0 * superiority - 1.0,
    }


def cohens_d(x, y) -> dict:
    """Cohen's d = (mean x - mean y) / pooled sd: {d, pooled_std, ci95}.

    pooled_std weights the two sample variances (ddof=1) by n - 1:
    sqrt(((n1-1) s1^2 + (n2-1) s2^2) / (n1 + n2 - 2)). ci95 is the normal interval with the
    Hedges & Olkin (1985) standard error sqrt((n1+n2)/(n1 n2) + d^2 / (2 (n1+n2))).
    """
    x, y = _as_sample(x, "x"), _as_sample(y, "y")
    n1, n2 = x.size, y.size
    pooled_var = ((n1 - 1) * x.var(ddof=1) + (n2 - 1) * y.var(ddof=1)) / (n1 + n2 - 2)
    pooled_std = math.sqrt(pooled_var)
    if pooled_std == 0.0:
        return {"d": None, "pooled_std": 0.0, "ci95": None}
    d = (x.mean() - y.mean()) / pooled_std
    se = math.sqrt((n1 + n2) / (n1 * n2) + d * d / (2.0 * (n1 + n2)))
    return {"d": float(d), "pooled_std": pooled_std, "ci95": [d - _Z975 * se, d + _Z975 * se]}


def hedges_g(x, y) -> dict:
    """Hedges' g, Cohen's d times the exact small-sample correction: {g, correction, ci95}.

    correction J = Gamma(m/2) / (sqrt(m/2) Gamma((m-1)/2)) with m = n1 + n2 - 2 (the exact
    form, not the 1 - 3/(4m - 1) approximation); ci95 is d's interval scaled by J.
    """
    x, y = _as_sample(x, "x"), _as_sample(y, "y")
    dof = x.size + y.size - 2
    correction = math.exp(special.gammaln(dof / 2.0) - 0.5 * math.log(dof / 2.0) - special.gammaln((dof - 1) / 2.0))
    effect = cohens_d(x, y)
    if effect["d"] is None:
        return {"g": None, "correction": correction, "ci95": None}
    low, high = effect["ci95"]
    return {"g": correction * effect["d"], "correction": correction, "ci95": [correction * low, correction * high]}


def ks_log_sf_equal_n(n: int, k: int) -> float:
    """Natural log of P(D >= k/n) for the two-sided two-sample KS statistic, both samples n.

    Gnedenko & Korolyuk (1951), exact under the null (continuous data):
    P(D >= k/n) = 2 sum_{j>=1} (-1)^(j+1) C(2n, n - jk) / C(2n, n). The binomial
    coefficients are taken through gammaln and the alternating sum through a signed
    logsumexp, so the value stays exact where P is far below float64's range
    (complete separation, D = 1, gives 2 / C(2n, n)).
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in [0, n], got k={k}, n={n}")
    if k == 0:
        return 0.0
    j = np.arange(1, n // k + 1, dtype=np.float64)
    log_terms = special.gammaln(n + 1.0) * 2 - special.gammaln(n - j * k + 1.0) - special.gammaln(n + j * k + 1.0)
    signs = np.where(j % 2 == 1, 1.0, -1.0)
    log_sum = special.logsumexp(log_terms, b=signs)
    return min(0.0, _LN2 + float(log_sum))


def ks_two_sample(x, y) -> dict:
    """Two-sided two-sample Kolmogorov-Smirnov test on equal-size samples: {D, p, log10_p, n}.

    Equal sizes are required because they admit the exact null distribution in closed form
    (ks_log_sf_equal_n) at any n, where scipy switches to an asymptotic formula above
    10,000 and reports 0.0 past underflow. D is computed as scipy.stats.ks_2samp does.
    """
    x, y = _as_sample(x, "x", 1), _as_sample(y, "y", 1)
    if x.size != y.size:
        raise ValueError(f"ks_two_sample needs equal sample sizes, got {x.size} and {y.size}")
    n = x.size
    x_sorted, y_sorted = np.sort(x), np.sort(y)
    points = np.concatenate([x_sorted, y_sorted])
    # Integer ECDF differences: D = k / n with k exact, which the closed form needs.
    gaps = np.searchsorted(x_sorted, points, side="right") - np.searchsorted(y_sorted, points, side="right")
    k = int(np.abs(gaps).max())
    log10_p = ks_log_sf_equal_n(n, k) / _LN10
    return {"D": k / n, "p": p_from_log10(log10_p), "log10_p": log10_p, "n": int(n)}


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
