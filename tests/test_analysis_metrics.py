"""Every metric against a closed-form answer on a constructed cloud; statistics against scipy.

Tolerances: 1e-12 where the computation is float64 end to end; about 1e-6 relative where a
metric runs a large product in float32 by design (unit_rows, second_moments, the Mu
projections), since float32 carries about 7 significant digits.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from wake2vec.analysis import metrics


def random_rotation(dim: int, seed: int) -> np.ndarray:
    """A Haar-random orthogonal matrix, so no test passes only because the cloud is axis-aligned."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def cross_polytope(radii) -> np.ndarray:
    """Rows +r_i e_i and -r_i e_i: mean 0, covariance diag(2 r_i^2) / (2D - 1)."""
    radii = np.asarray(radii, dtype=np.float64)
    axes = np.diag(radii)
    return np.vstack([axes, -axes])


def two_direction_cloud(k: int, m: int, rho: float, dim: int, seed: int) -> np.ndarray:
    """k positive multiples of a unit u and m of a unit w with cos(u, w) = rho."""
    rng = np.random.default_rng(seed)
    u = np.zeros(dim)
    u[0] = 1.0
    w = np.zeros(dim)
    w[0], w[1] = rho, math.sqrt(1 - rho**2)
    scales = rng.uniform(0.5, 3.0, size=k + m)[:, None]
    return np.vstack([np.tile(u, (k, 1)), np.tile(w, (m, 1))]) * scales @ random_rotation(dim, seed)


def offset_cross_polytope(a: float, radii, seed: int) -> np.ndarray:
    """Rows a e_1 +- r_i e_{i+1}: a cross-polytope riding on a common offset a e_1."""
    radii = np.asarray(radii, dtype=np.float64)
    dim = radii.size + 1
    rows = []
    for i, r in enumerate(radii):
        for sign in (1.0, -1.0):
            row = np.zeros(dim)
            row[0], row[i + 1] = a, sign * r
            rows.append(row)
    return np.array(rows) @ random_rotation(dim, seed)


# ---------------------------------------------------------------------------------------
# Descriptive statistics and per-row quantities


def test_describe_arithmetic_sequence():
    # 1..101: mean 51, sample variance N(N+1)/12, and linear-interpolated quantile q is 1 + 100q.
    summary = metrics.describe(np.arange(1, 102))
    assert summary["n"] == 101
    assert summary["mean"] == pytest.approx(51.0, rel=1e-12)
    assert summary["std"] == pytest.approx(math.sqrt(101 * 102 / 12), rel=1e-12)
    assert (summary["min"], summary["max"]) == (1.0, 101.0)
    for q, value in zip(metrics.QUANTILES, summary["quantiles"].values()):
        assert value == pytest.approx(1 + 100 * q, rel=1e-12)


def test_row_norms_cosines_distances_closed_form():
    # A[i] = r_i e1, B[i] = s_i (cos t_i e1 + sin t_i e2), then both rotated: norms r_i,
    # cosines cos t_i, distances sqrt(r^2 + s^2 - 2 r s cos t). Row 0 of B is zero: cosine 0.
    rng = np.random.default_rng(0)
    n, dim = 50, 6
    r, s, t = rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, n), rng.uniform(0, math.pi, n)
    s[0] = 0.0
    A, B = np.zeros((n, dim)), np.zeros((n, dim))
    A[:, 0] = r
    B[:, 0], B[:, 1] = s * np.cos(t), s * np.sin(t)
    rotation = random_rotation(dim, 1)
    A, B = A @ rotation, B @ rotation
    np.testing.assert_allclose(metrics.row_norms(A), r, rtol=1e-12)
    expected_cos = np.cos(t)
    expected_cos[0] = 0.0
    np.testing.assert_allclose(metrics.row_cosines(A, B), expected_cos, atol=1e-12)
    np.testing.assert_allclose(metrics.row_distances(A, B), np.sqrt(r**2 + s**2 - 2 * r * s * np.cos(t)), rtol=1e-12)


def test_unit_rows_keeps_zero_rows_zero():
    units = metrics.unit_rows(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(units, [[0.6, 0.8], [0.0, 0.0]], rtol=1e-7)  # float32 output


# ---------------------------------------------------------------------------------------
# p-values and two-sample statistics


@pytest.mark.parametrize("df", [1, 3, 30, 1000, 70000])
@pytest.mark.parametrize("t", [0.5, 1.9, 2.5, 5.0, 10.0, 30.0])
def test_student_t_log_sf_matches_scipy_where_representable(t, df):
    # scipy's logsf is accurate until the tail underflows; it agrees with mpmath to ~1e-11.
    expected = stats.t.logsf(t, df)
    assert math.isfinite(expected)
    assert metrics.student_t_log_sf(t, df) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("t", [1e3, 1e20, 1e150, 1e250])
def test_student_t_log_sf_far_tail_df2_closed_form(t):
    # df = 2: P(T > t) = 1 / ((sqrt(2 + t^2) + t) sqrt(2 + t^2)), written in logs so t^2 never forms.
    expected = -(math.log(t) + math.log(1 + math.sqrt(1 + 2 / t / t))) - (math.log(t) + 0.5 * math.log1p(2 / t / t))
    assert metrics.student_t_log_sf(t, 2.0) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("t, df", [(60.0, 70000.0), (300.0, 60000.0), (1e4, 200.0)])
def test_student_t_log_sf_far_tail_against_mpmath(t, df):
    # Where scipy returns -inf: 50-digit incomplete beta as the reference.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    x = mpmath.mpf(df) / (df + mpmath.mpf(t) ** 2)
    expected = float(mpmath.log(mpmath.betainc(df / 2, 0.5, 0, x, regularized=True) / 2))
    assert metrics.student_t_log_sf(t, df) == pytest.approx(expected, rel=1e-10)


def test_p_from_log10_never_returns_zero():
    assert metrics.p_from_log10(0.0) == 1.0
    assert metrics.p_from_log10(-3.0) == pytest.approx(1e-3, rel=1e-12)
    assert metrics.p_from_log10(-400.0) is None  # below float64's range: null, with log10_p kept


def test_welch_matches_scipy():
    rng = np.random.default_rng(2)
    x, y = rng.normal(0.2, 1.0, 300), rng.normal(0.0, 2.0, 500)
    result = metrics.welch_t_test(x, y)
    expected = stats.ttest_ind(x, y, equal_var=False)
    assert result["t"] == pytest.approx(expected.statistic, rel=1e-12)
    assert result["df"] == pytest.approx(expected.df, rel=1e-12)
    assert result["p"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert result["log10_p"] == pytest.approx(math.log10(expected.pvalue), rel=1e-9)


def test_welch_underflow_keeps_log10_p():
    # Two tight, well separated samples: scipy reports p = 0.0; log10_p must carry the size.
    rng = np.random.default_rng(3)
    x, y = 1.0 + 0.01 * rng.standard_normal(2000), 0.01 * rng.standard_normal(2000)
    assert stats.ttest_ind(x, y, equal_var=False).pvalue == 0.0
    result = metrics.welch_t_test(x, y)
    assert result["p"] is None
    expected = (math.log(2) + metrics.student_t_log_sf(result["t"], result["df"])) / math.log(10)
    assert result["log10_p"] == pytest.approx(expected, rel=1e-12) and result["log10_p"] < -1000


def test_welch_of_constant_samples_is_undefined():
    assert metrics.welch_t_test([1.0, 1.0, 1.0], [2.0, 2.0])["t"] is None


def test_mann_whitney_matches_scipy_with_ties():
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 20, 200).astype(float), rng.integers(2, 22, 300).astype(float)
    result = metrics.mann_whitney_u(x, y)
    expected = stats.mannwhitneyu(x, y, alternative="two-sided", method="asymptotic")
    assert result["U"] == expected.statistic
    assert result["p"] == pytest.approx(expected.pvalue, rel=1e-10)
    # The common-language effect size by its definition: P(x > y) + P(x = y) / 2 over all pairs.
    superiority = np.mean((x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :]))
    assert result["prob_superiority"] == pytest.approx(superiority, rel=1e-12)
    assert result["rank_biserial"] == pytest.approx(2 * superiority - 1, rel=1e-12)


def test_mann_whitney_complete_separation_far_tail():
    # x all above y: U1 = n^2, z = (n^2/2 - 1/2) / sqrt(n^2 (2n + 1) / 12). At n = 3000, z = 94.8 and
    # p = 2 Phi(-z) underflows; the asymptotic expansion log Phi(-z) = -z^2/2 - log(z sqrt(2 pi))
    # + log(1 - 1/z^2 + 3/z^4) is accurate to O(z^-6) there, an independent reference.
    n = 3000
    result = metrics.mann_whitney_u(np.arange(n) + n, np.arange(n))
    z = (n * n / 2 - 0.5) / math.sqrt(n * n * (2 * n + 1) / 12)
    log_phi = -z * z / 2 - math.log(z * math.sqrt(2 * math.pi)) + math.log(1 - 1 / z**2 + 3 / z**4)
    assert result["U"] == n * n
    assert (result["prob_superiority"], result["rank_biserial"]) == (1.0, 1.0)
    assert result["p"] is None
    assert result["log10_p"] == pytest.approx((math.log(2) + log_phi) / math.log(10), rel=1e-12)


def test_cohens_d_and_hedges_g_closed_form():
    # x = (2, 4, 6): mean 4, s^2 = 4. y = (1, 3): mean 2, s^2 = 2. Pooled variance
    # (2*4 + 1*2) / 3 = 10/3. Hedges: m = 3, J = Gamma(3/2) / (sqrt(3/2) Gamma(1)) = sqrt(pi)/2 / sqrt(1.5).
    x, y = [2.0, 4.0, 6.0], [1.0, 3.0]
    d = 2 / math.sqrt(10 / 3)
    se = math.sqrt(5 / 6 + d * d / 10)
    z = stats.norm.ppf(0.975)
    result = metrics.cohens_d(x, y)
    assert result["d"] == pytest.approx(d, rel=1e-12)
    assert result["pooled_std"] == pytest.approx(math.sqrt(10 / 3), rel=1e-12)
    np.testing.assert_allclose(result["ci95"], [d - z * se, d + z * se], rtol=1e-12)
    correction = (math.sqrt(math.pi) / 2) / math.sqrt(1.5)
    g = metrics.hedges_g(x, y)
    assert g["correction"] == pytest.approx(correction, rel=1e-12)
    assert g["g"] == pytest.approx(correction * d, rel=1e-12)
    # m = 2 (n1 + n2 = 4): J = Gamma(1) / (1 * Gamma(1/2)) = 1 / sqrt(pi).
    assert metrics.hedges_g([0.0, 2.0], [1.0, 4.0])["correction"] == pytest.approx(1 / math.sqrt(math.pi), rel=1e-12)


@pytest.mark.parametrize("n", [5, 50, 500, 3000])
@pytest.mark.parametrize("shift", [0.0, 0.3, 1.0, 3.0])
def test_ks_matches_scipy_exact(n, shift):
    # For equal sizes scipy's exact method is the same Gnedenko-Korolyuk distribution.
    rng = np.random.default_rng(n)
    x, y = rng.standard_normal(n), rng.standard_normal(n) + shift
    result = metrics.ks_two_sample(x, y)
    expected = stats.ks_2samp(x, y, method="exact")
    assert result["D"] == pytest.approx(expected.statistic, rel=1e-12)
    if expected.pvalue > 0:
        assert result["p"] == pytest.approx(expected.pvalue, rel=1e-9)


def test_ks_complete_separation_closed_form():
    # D = 1 happens for 2 of the C(2n, n) orderings: p = 2 / C(2n, n). n = 2: 1/3.
    # n = 5000: p = 10^-3008, far below float64; scipy says 0.0.
    assert metrics.ks_two_sample([0.0, 1.0], [2.0, 3.0])["p"] == pytest.approx(1 / 3, rel=1e-12)
    n = 5000
    result = metrics.ks_two_sample(np.arange(n), np.arange(n) + n)
    log10_binomial = (math.lgamma(2 * n + 1) - 2 * math.lgamma(n + 1)) / math.log(10)
    assert result["D"] == 1.0 and result["p"] is None
    assert result["log10_p"] == pytest.approx(math.log10(2) - log10_binomial, rel=1e-12)


def test_ks_needs_equal_sizes():
    with pytest.raises(ValueError, match="equal sample sizes"):
        metrics.ks_two_sample([1.0, 2.0], [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------
# Isotropy


def test_avg_cosine_scaled_cross_polytope():
    # Unit rows sum to 0: mean over ordered pairs = (0 - 2D) / (2D (2D - 1)) = -1 / (2D - 1).
    dim = 7
    cloud = cross_polytope(np.linspace(0.5, 3.0, dim)) @ random_rotation(dim, 5)
    assert metrics.avg_cosine(cloud) == pytest.approx(-1 / (2 * dim - 1), rel=1e-12)


def test_avg_cosine_two_directions_closed_form():
    k, m, rho = 30, 20, 0.3
    expected = (k * (k - 1) + m * (m - 1) + 2 * k * m * rho) / ((k + m) * (k + m - 1))
    assert metrics.avg_cosine(two_direction_cloud(k, m, rho, 6, 6)) == pytest.approx(expected, rel=1e-12)


def test_avg_cosine_equals_brute_force_mean():
    cloud = np.random.default_rng(7).standard_normal((60, 5)) + 0.5
    units = cloud / np.linalg.norm(cloud, axis=1, keepdims=True)
    cos = units @ units.T
    expected = (cos.sum() - np.trace(cos)) / (60 * 59)
    assert metrics.avg_cosine(cloud) == pytest.approx(expected, rel=1e-12)


def test_partition_ratio_two_directions_closed_form():
    # A u-row sees k-1 other u-rows (cos 1) and m w-rows (cos rho): Z_u = (k-1) e + m e^rho;
    # likewise Z_w = (m-1) e + k e^rho. float32 unit rows: 1e-6.
    k, m, rho = 30, 20, 0.3
    z_u, z_w = (k - 1) * math.e + m * math.exp(rho), (m - 1) * math.e + k * math.exp(rho)
    expected = min(z_u, z_w) / max(z_u, z_w)
    assert metrics.partition_ratio(two_direction_cloud(k, m, rho, 6, 8)) == pytest.approx(expected, rel=1e-6)


def test_partition_ratio_rates_an_offset_cloud_perfectly_isotropic():
    # The original's defect: on a cross-polytope riding on a large offset (a = 10, r = 1) every row
    # sees the same cosines (one antipode at (a^2 - r^2) / (a^2 + r^2), 2(D-2) rows at a^2 / (a^2 + r^2)),
    # so the study's ratio is exactly 1 while the mean direction dominates: Mu's I is about e^-20.
    a, r, dim = 10.0, 1.0, 6
    cloud = offset_cross_polytope(a, [r] * (dim - 1), 9)
    assert metrics.partition_ratio(cloud) == pytest.approx(1.0, rel=1e-6)
    expected_avg = ((a * a - r * r) + 2 * (dim - 2) * a * a) / ((2 * dim - 3) * (a * a + r * r))
    assert metrics.avg_cosine(cloud) == pytest.approx(expected_avg, rel=1e-12)
    assert metrics.isotropy_mu(cloud) < 1e-8


def test_isotropy_mu_rank1_closed_form():
    # v_w = s_w u: V^T V has eigenvector u (and its negative) plus a null space. For c in the null
    # space Z = n; for +-u, Z = sum exp(+-s_w). I = min / max of {n, S+, S-}.
    rng = np.random.default_rng(10)
    s = rng.uniform(-0.5, 1.5, 400)
    u = random_rotation(6, 11)[0]
    candidates = [s.size, np.exp(s).sum(), np.exp(-s).sum()]
    expected = min(candidates) / max(candidates)
    assert metrics.isotropy_mu(s[:, None] * u) == pytest.approx(expected, rel=1e-6)


def test_isotropy_mu_scaled_cross_polytope_distinct_radii():
    # Rows +-r_i e_i: V^T V = diag(2 r_i^2), distinct, so its eigenvectors are the axes (rotated):
    # Z(+-e_k) = 2 cosh(r_k) + 2 (D - 1), smallest at r_min and largest at r_max.
    radii = np.linspace(0.5, 2.0, 8)
    cloud = cross_polytope(radii) @ random_rotation(8, 12)
    expected = (2 * math.cosh(0.5) + 14) / (2 * math.cosh(2.0) + 14)
    assert metrics.isotropy_mu(cloud) == pytest.approx(expected, rel=1e-6)


def test_isotropy_mu_common_offset_closed_form():
    # Rows a e1 +- r_i e_{i+1}, distinct r_i: eigenvectors of V^T V are the axes.
    # Z(+e1) = 2(D-1) e^a, Z(-e1) = 2(D-1) e^-a, Z(+-e_k) = 2 cosh(r_k) + 2(D-2).
    a, radii = 1.5, np.array([0.3, 0.6, 0.9, 1.2, 1.5, 1.8])
    dim = radii.size + 1
    values = [2 * (dim - 1) * math.exp(a), 2 * (dim - 1) * math.exp(-a)]
    values += [2 * math.cosh(r) + 2 * (dim - 2) for r in radii]
    expected = min(values) / max(values)
    assert metrics.isotropy_mu(offset_cross_polytope(a, radii, 13)) == pytest.approx(expected, rel=1e-6)


def test_log_isotropy_mu_survives_underflow():
    # a = 400: I = Z(-e1) / Z(+e1) = e^-800, below float64 (I reads 0.0) but exact in logs.
    # Projections are float32 (relative 6e-8 of |v| = 400), hence the 1e-3 absolute tolerance.
    cloud = offset_cross_polytope(400.0, [0.3, 0.6, 0.9, 1.2], 14)
    assert metrics.log_isotropy_mu(cloud) == pytest.approx(-800.0, abs=1e-3)
    assert metrics.isotropy_mu(cloud) == 0.0


def test_isotropy_mu_isotropic_gaussian_near_one():
    # v ~ N(0, 0.25 I): E exp(c . v) = e^(1/8) for every unit c, so Z(c)/n agrees across the 16
    # directions up to sampling noise: sd(exp(c.v)) = 0.60, so Z/n has relative sd 0.0038 at
    # n = 20,000; min/max over 16 directions stays above 1 - 6 sd = 0.977.
    cloud = 0.5 * np.random.default_rng(15).standard_normal((20_000, 8))
    assert metrics.isotropy_mu(cloud) > 0.97


def test_isoscore_from_variances_closed_forms():
    dim = 10
    assert metrics.isoscore_from_variances(np.full(dim, 3.0)) == pytest.approx(1.0, abs=1e-12)
    assert metrics.isoscore_from_variances([5.0] + [0.0] * (dim - 1)) == pytest.approx(0.0, abs=1e-12)
    for k in (2, 5, 9):
        variances = [2.0] * k + [0.0] * (dim - k)
        assert metrics.isoscore_from_variances(variances) == pytest.approx((k - 1) / (dim - 1), abs=1e-12)


def test_isoscore_of_constructed_clouds():
    # Through second_moments (float32 products), so 1e-5 absolute.
    dim = 10
    antipodal = np.vstack([random_rotation(dim, 16), -random_rotation(dim, 16)]) * 3.0  # covariance exactly prop. to I
    assert metrics.isoscore(antipodal) == pytest.approx(1.0, abs=1e-5)
    rank1 = np.random.default_rng(17).standard_normal(300)[:, None] * random_rotation(dim, 18)[0]
    assert metrics.isoscore(rank1) == pytest.approx(0.0, abs=1e-5)
    for k in (2, 5, 9):
        k_dims = cross_polytope([1.7] * k + [0.0] * (dim - k)) @ random_rotation(dim, 19)
        assert metrics.isoscore(k_dims) == pytest.approx((k - 1) / (dim - 1), abs=1e-5)


def test_isoscore_invariant_to_rotation_translation_and_scale():
    cloud = np.random.default_rng(20).standard_normal((500, 6)) * np.array([3.0, 2.0, 1.0, 1.0, 0.5, 0.1])
    moved = 7.0 * cloud @ random_rotation(6, 21) + 100.0
    assert metrics.isoscore(moved) == pytest.approx(metrics.isoscore(cloud), abs=1e-5)


# ---------------------------------------------------------------------------------------
# Second moments and spectrum


def test_second_moments_exact_despite_large_offset():
    # A common offset of 1000 against unit spread: V^T V - n m m^T would cancel 6 digits away;
    # centring first keeps the scatter to float32's product accuracy (1e-5 relative).
    cloud = (1000.0 + np.random.default_rng(22).standard_normal((5000, 16))).astype(np.float32)
    reference = cloud.astype(np.float64)
    mean, scatter = metrics.second_moments(cloud)
    np.testing.assert_allclose(mean, reference.mean(axis=0), rtol=1e-12)
    centred = reference - reference.mean(axis=0)
    np.testing.assert_allclose(scatter, centred.T @ centred, rtol=1e-5, atol=1e-5 * np.abs(centred.T @ centred).max())
    expected_eigenvalues = np.linalg.eigvalsh(np.cov(reference.T))[::-1]
    np.testing.assert_allclose(metrics.covariance_eigenvalues(scatter, 5000), expected_eigenvalues, rtol=1e-5)


def test_covariance_spectrum_of_cross_polytope():
    # Rows +-r_i e_i: covariance diag(2 r_i^2 / (2D - 1)) exactly; top1 = r_max^2 / sum r^2.
    radii = np.array([3.0, 2.0, 1.5, 1.0, 0.5])
    _, scatter = metrics.second_moments(cross_polytope(radii) @ random_rotation(5, 23))
    eigenvalues = metrics.covariance_eigenvalues(scatter, 10)
    np.testing.assert_allclose(eigenvalues, 2 * radii**2 / 9, rtol=1e-6)
    summary = metrics.pca_summary(eigenvalues)
    assert summary["top1_ratio"] == pytest.approx(9.0 / np.sum(radii**2), rel=1e-6)
    # Cumulative fractions 9, 13, 15.25, 16.25 of 16.5 = 0.545, 0.788, 0.924, 0.985: k90 = 3, k95 = 4.
    assert (summary["k90"], summary["k95"]) == (3, 4)


@pytest.mark.parametrize("k", [1, 2, 9, 10, 19, 20, 40])
def test_components_for_k_equally_used_dimensions(k):
    # k equal eigenvalues: the cumulative ratio is j/k, so k90 = ceil(0.9 k) and k95 = ceil(0.95 k),
    # exactly, including the ties 0.9 * 10 = 9 and 0.95 * 20 = 19.
    eigenvalues = np.array([1.0] * k + [0.0] * 5)
    assert metrics.components_for_variance(eigenvalues, 0.90) == math.ceil(round(0.90 * k, 9))
    assert metrics.components_for_variance(eigenvalues, 0.95) == math.ceil(round(0.95 * k, 9))


def test_pca_uses_full_spectrum_beyond_the_original_cap():
    # Geometric spectrum 0.99^i over 300 dims: k90 solves 1 - 0.99^k >= 0.9 (1 - 0.99^300),
    # well above the original's cap of 100 components.
    eigenvalues = 0.99 ** np.arange(300)
    for fraction in (0.90, 0.95):
        expected = math.ceil(math.log(1 - fraction * (1 - 0.99**300)) / math.log(0.99))
        assert metrics.components_for_variance(eigenvalues, fraction) == expected > 100
    assert len(metrics.pca_summary(eigenvalues)["top_eigenvalues"]) == 20


# ---------------------------------------------------------------------------------------
# Neighbours and pairs


def test_nearest_by_cosine_closed_form():
    # Candidates are scaled axes; the query (3, 4, 0, ...) has cosine 0.8 with e2 and 0.6 with e1.
    dim = 6
    rotation = random_rotation(dim, 24)
    candidates = np.diag([5.0, 0.1, 2.0, 3.0, 1.0, 7.0]) @ rotation
    query = np.array([[3.0, 4.0, 0, 0, 0, 0]]) @ rotation
    indices, cosines = metrics.nearest_by_cosine(query, candidates, 2)
    np.testing.assert_array_equal(indices, [[1, 0]])
    np.testing.assert_allclose(cosines, [[0.8, 0.6]], rtol=1e-12)


def test_nearest_by_cosine_ties_go_to_lower_index():
    candidates = np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    indices, _ = metrics.nearest_by_cosine(np.array([[1.0, 0.0]]), candidates, 3)
    np.testing.assert_array_equal(indices, [[1, 2, 3]])


def test_disjoint_pairs_use_each_item_once_and_are_seeded():
    first, second = metrics.disjoint_pairs(101, 50, np.random.default_rng(25))
    assert len(set(first) | set(second)) == 100
    again = metrics.disjoint_pairs(101, 50, np.random.default_rng(25))
    np.testing.assert_array_equal(first, again[0])
    with pytest.raises(ValueError):
        metrics.disjoint_pairs(10, 6, np.random.default_rng(0))


def test_paired_cosines_closed_form():
    # Pair i joins row i of A with row n-1-i of B; rows at angles t_i in one plane: cos(t_i - t'_j).
    angles_a, angles_b = np.linspace(0, 3, 8), np.linspace(0.5, 2, 8)
    A = np.column_stack([np.cos(angles_a), np.sin(angles_a)]) * 2.0
    B = np.column_stack([np.cos(angles_b), np.sin(angles_b)]) * 0.5
    rows_a, rows_b = np.arange(8), np.arange(8)[::-1]
    expected = np.cos(angles_a[rows_a] - angles_b[rows_b])
    np.testing.assert_allclose(metrics.paired_cosines(A, rows_a, B, rows_b), expected, atol=1e-12)
