"""Uncertainty of a comparison: spread over seeds, paired differences over seeds, a paired bootstrap over
dev examples. Pure functions of numbers; ``hlora.report`` reads the runs and calls them.

Notation: seeds s = 1..n; ``x_s`` a method's score with seed s and ``y_s`` the reference's (``hlora``) with
the same seed. The seeds share the split, the client ranks and the client sample, so ``d_s = x_s - y_s``
is the unit of a paired comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: t_{0.975, df} for df = 1..30 (two-sided 95%), used when scipy is not installed.
T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)


@dataclass(frozen=True)
class Spread:
    """Values over seeds: ``mean``, sample ``std``, ``low`` (min) and ``high`` (max) of ``n`` values."""

    mean: float
    std: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Difference:
    """A difference (method - reference) with its ``low``..``high`` interval at ``level``, from ``n`` seeds.

    ``std`` is the spread of the per-seed differences (paired over seeds) or the bootstrap standard error
    (bootstrap). NaN where it cannot be computed (one seed has no interval).
    """

    estimate: float
    std: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def resolved(self) -> bool:
        """The interval excludes 0: the sign of the difference is resolved at this level."""
        return self.low > 0 or self.high < 0


def spread(values: Sequence[float]) -> Spread:
    """Mean ``m = (1/n) sum_s v_s``, sample std ``sqrt(sum_s (v_s - m)^2 / (n - 1))`` (0 for one value), min
    and max of the values that are not NaN (all NaN for none)."""
    vals = [float(v) for v in values if not math.isnan(v)]
    if not vals:
        return Spread(math.nan, math.nan, math.nan, math.nan, 0)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return Spread(statistics.fmean(vals), std, min(vals), max(vals), len(vals))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom.

    scipy's ``t.ppf`` when scipy is installed; otherwise the table ``T975`` for q = 0.975 and df <= 30, and
    for df > 30 the Cornish-Fisher expansion around the normal quantile z (Abramowitz & Stegun 26.7.5):
    ``t = z + g1/df + g2/df^2 + g3/df^3 + g4/df^4`` (error below 1e-5 for df > 30).
    """
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}")
    try:
        from scipy.stats import t
    except ImportError:
        pass
    else:
        return float(t.ppf(q, df))
    if df <= len(T975):
        if q == 0.975:
            return T975[df - 1]
        raise ValueError("t quantiles other than 0.975 at df <= 30 need scipy (pip install scipy)")
    z = statistics.NormalDist().inv_cdf(q)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def paired_seeds(method: Sequence[float], reference: Sequence[float], level: float = 0.95) -> Difference:
    """The paired comparison over seeds: ``d_s = x_s - y_s``, mean ``d = (1/n) sum_s d_s``, sample std
    ``s_d = sqrt(sum_s (d_s - d)^2 / (n - 1))`` and the paired t-interval
    ``d -/+ t_{(1+level)/2, n-1} s_d / sqrt(n)``. ``method[s]`` and ``reference[s]`` belong to the same seed;
    with one seed the std and the interval are NaN."""
    if len(method) != len(reference):
        raise ValueError(f"paired_seeds: {len(method)} method values but {len(reference)} reference values")
    if not method:
        raise ValueError("paired_seeds: no seed")
    d = [float(x) - float(y) for x, y in zip(method, reference)]
    n = len(d)
    mean = statistics.fmean(d)
    if n == 1:
        return Difference(mean, math.nan, math.nan, math.nan, 1, level)
    std = statistics.stdev(d)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Difference(mean, std, mean - half, mean + half, n, level)


def paired_bootstrap(
    method: Sequence[Sequence[float]],
    reference: Sequence[Sequence[float]],
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Difference:
    """A paired bootstrap interval of a difference of mean per-example scores (accuracy: scores 0/1).

    ``method[s][i]`` and ``reference[s][i]`` are the scores of dev example i under seed s (the same example
    for both). With ``d_si = method[s][i] - reference[s][i]`` and n_s examples in seed s, the estimate is
    ``D = (1/S) sum_s (1/n_s) sum_i d_si``. Each of ``resamples`` replicates b draws n_s example indices
    I_bs with replacement within each seed (both methods at the same indices, hence paired) and averages over
    the seeds: ``D_b = (1/S) sum_s (1/n_s) sum_{i in I_bs} d_si``. The interval is the percentile interval
    ``[q_{(1-level)/2}, q_{(1+level)/2}]`` of the D_b (numpy's linear quantile); ``std`` is their standard
    deviation. Seeded by ``seed``: the same inputs give the same interval.
    """
    if len(method) != len(reference) or not method:
        raise ValueError(f"paired_bootstrap: {len(method)} method seeds but {len(reference)} reference seeds")
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    estimate = 0.0
    for a, b in zip(method, reference):
        if len(a) != len(b) or len(a) == 0:
            raise ValueError(f"paired_bootstrap: a seed has {len(a)} method and {len(b)} reference examples")
        d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        estimate += float(d.mean())
        for start in range(0, resamples, 100):  # 100 replicates at a time: memory stays small
            k = min(100, resamples - start)
            total[start : start + k] += d[rng.integers(0, d.size, size=(k, d.size))].mean(axis=1)
    total /= len(method)
    low, high = np.quantile(total, [(1 - level) / 2, (1 + level) / 2])
    return Difference(estimate / len(method), float(total.std()), float(low), float(high), len(method), level)
