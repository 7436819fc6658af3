"""Two-sample significance tests and effect sizes whose p-values survive underflow.

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

_LN10 = math.log(10.0)
_LN2 = math.log(2.0)
_Z975 = float(stats.norm.ppf(0.975))


def as_sample(x, name: str, min_size: int = 2) -> np.ndarray:
    sample = np.asarray(x, dtype=np.float64).ravel()
    if sample.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} values, got {sample.size}")
    return sample


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
    x, y = as_sample(x, "x"), as_sample(y, "y")
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
    x, y = as_sample(x, "x", 1), as_sample(y, "y", 1)
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
    x, y = as_sample(x, "x"), as_sample(y, "y")
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
    x, y = as_sample(x, "x"), as_sample(y, "y")
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
    x, y = as_sample(x, "x", 1), as_sample(y, "y", 1)
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
