"""Error bars for comparisons over seeds: percentile bootstrap intervals of a mean and of a paired
difference. Plain numpy; `relift_jax.toy.compare` and `relift_jax.toy.studies` use it.

A run's final accuracy is one draw of a noisy process (RL amplifies every rounding difference), so a
method is summarised by the mean over seeds with a 95% interval, and two methods are compared on the
SAME seeds (same base model, same question order): the paired difference cancels what the seeds
share. With 5 seeds a percentile bootstrap interval is narrower than it should be (it knows only the
5 values it has: the bootstrap variance of the mean is the plug-in variance / n, (n-1)/n of the
usual s^2/n); read it as "how much these seeds disagree", not as a guarantee.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over seeds with a percentile bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int

    def fmt(self, scale: float = 100.0, digits: int = 1) -> str:
        """'41.2 [38.0, 44.1]' (percent by default)."""
        if self.n == 0:
            return "-"
        f = f"{{:.{digits}f}}"
        return (f"{f.format(scale * self.mean)} [{f.format(scale * self.lo)}, "
                f"{f.format(scale * self.hi)}]")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def bootstrap_means(x: Sequence[float], n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """Means of `n_resamples` resamples of x drawn with replacement (each of size len(x))."""
    x_n = np.asarray(x, np.float64)
    if x_n.ndim != 1 or x_n.size == 0:
        raise ValueError(f"bootstrap needs a non-empty 1-d sample, got shape {x_n.shape}")
    idx_rn = np.random.default_rng(seed).integers(0, x_n.size, size=(n_resamples, x_n.size))
    return x_n[idx_rn].mean(axis=1)


def bootstrap_ci(x: Sequence[float], confidence: float = 0.95, n_resamples: int = 10_000,
                 seed: int = 0) -> Interval:
    """The mean of x and its percentile bootstrap interval (the (1-c)/2 and (1+c)/2 quantiles of
    the resampled means, as `scipy.stats.bootstrap(..., method='percentile')`)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x_n = np.asarray(x, np.float64)
    means_r = bootstrap_means(x_n, n_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means_r, [alpha, 1.0 - alpha])
    return Interval(float(x_n.mean()), float(lo), float(hi), int(x_n.size))


def paired_difference(a: Sequence[float], b: Sequence[float], **kw) -> Interval:
    """a - b seed by seed (the same seeds, in the same order), with its bootstrap interval."""
    a_n, b_n = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a_n.shape != b_n.shape:
        raise ValueError(f"paired samples need the same seeds: {a_n.shape} vs {b_n.shape}")
    return bootstrap_ci(a_n - b_n, **kw)
