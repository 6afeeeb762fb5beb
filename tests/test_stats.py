"""relift_jax.stats against closed forms and scipy.stats.bootstrap."""
import itertools

import numpy as np
import pytest

from relift_jax import stats


def test_bootstrap_variance_matches_the_closed_form():
    # The bootstrap distribution of the mean has variance = plug-in variance / n exactly; with
    # 200,000 resamples its estimate is within a few percent (relative sd ~ sqrt(2 / R) = 0.3%).
    x = np.array([0.41, 0.36, 0.47, 0.44, 0.39])
    means = stats.bootstrap_means(x, n_resamples=200_000, seed=1)
    assert means.var() == pytest.approx(x.var(ddof=0) / x.size, rel=0.02)
    assert means.mean() == pytest.approx(x.mean(), abs=1e-3)


def test_percentile_interval_matches_exhaustive_enumeration():
    # n = 4: all 4^4 = 256 equally likely resamples give the exact bootstrap distribution.
    x = np.array([0.1, 0.5, 0.2, 0.9])
    exact = np.sort([x[list(i)].mean() for i in itertools.product(range(4), repeat=4)])
    iv = stats.bootstrap_ci(x, n_resamples=200_000, seed=2)
    lo, hi = np.quantile(exact, [0.025, 0.975])
    spacing = 0.8 / 4 / 4  # the smallest step between two resampled means
    assert abs(iv.lo - lo) <= spacing and abs(iv.hi - hi) <= spacing
    assert iv.mean == pytest.approx(x.mean())


def test_agrees_with_scipy_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.normal(0.4, 0.05, size=7)
    ours = stats.bootstrap_ci(x, n_resamples=100_000, seed=4)
    ref = scipy_stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=100_000,
                                method="percentile", random_state=5).confidence_interval
    # Two Monte Carlo estimates of the same quantiles: equal to a small fraction of the spread.
    tol = 0.05 * x.std()
    assert ours.lo == pytest.approx(ref.low, abs=tol)
    assert ours.hi == pytest.approx(ref.high, abs=tol)


def test_paired_difference_cancels_what_the_seeds_share():
    base = np.array([0.30, 0.45, 0.38, 0.50, 0.41])  # seed effects
    a, b = base + 0.02, base  # a is b plus exactly 2 points on every seed
    d = stats.paired_difference(a, b)
    assert d.mean == pytest.approx(0.02) and d.lo == pytest.approx(0.02)
    assert d.hi == pytest.approx(0.02)
    unpaired_width = stats.bootstrap_ci(a).hi - stats.bootstrap_ci(a).lo
    assert unpaired_width > 0.05  # the seeds' spread, which the pairing removed


def test_errors_and_format():
    with pytest.raises(ValueError, match="same seeds"):
        stats.paired_difference([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_ci([])
    assert stats.Interval(0.4123, 0.38, 0.441, 5).fmt() == "41.2 [38.0, 44.1]"
    assert stats.Interval(0.0, 0.0, 0.0, 0).fmt() == "-"
