"""The drift tests themselves: one small callable per test, all on scipy.

Every test takes the reference side and the current side in the form the reference profile
keeps (a sorted sample, aligned category/bin counts, or a fixed-width histogram) and returns a
:class:`Outcome`. They are registered by name in :data:`TESTS` with what they measure
(``"p_value"`` tests drift when ``p < threshold``, ``"distance"`` tests when
``statistic >= threshold``), so the caller never special-cases a test.

Statistics and p-values are scipy's own (``ks_2samp``, ``chi2_contingency``,
``wasserstein_distance``, ``jensenshannon``, ``norm.sf``, ``rel_entr``); the only computation
of ours is :func:`wasserstein_binned`, the exact-where-possible Wasserstein distance from two
histograms on one grid (see its docstring for the error it can make).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy import stats
from scipy.spatial import distance
from scipy.special import rel_entr

WASSERSTEIN_STD_FLOOR = 0.001
"""Smallest reference std the Wasserstein distance is normed by (Evidently's floor), so a
constant reference column yields a finite distance instead of a division by zero."""

PSI_EPSILON = 1e-4
"""Share substituted for an empty bin in PSI, so a bin seen on one side only costs a large but
finite amount instead of infinity."""

TestKind = Literal["p_value", "distance"]


@dataclass(frozen=True)
class Outcome:
    """What one test found: its statistic, its p-value (``None`` for distances), a note."""

    statistic: float
    p_value: float | None = None
    note: str = ""


# --------------------------------------------------------------------------- tests on samples


def ks(reference: np.ndarray, current: np.ndarray) -> Outcome:
    """Two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided, method auto).

    Parameters
    ----------
    reference, current : numpy.ndarray
        Finite values of each side (the reference is usually the profile's sorted sample).
    """
    res = stats.ks_2samp(reference, current)
    return Outcome(float(res.statistic), float(res.pvalue))


def wasserstein(reference: np.ndarray, current: np.ndarray, reference_std: float) -> Outcome:
    """First Wasserstein distance normed by the reference std (``scipy.stats.wasserstein_distance``).

    The norm is ``max(reference_std, WASSERSTEIN_STD_FLOOR)``, as Evidently does.
    """
    norm = max(float(reference_std), WASSERSTEIN_STD_FLOOR)
    return Outcome(float(stats.wasserstein_distance(reference, current)) / norm)


# ------------------------------------------------------------------ tests on aligned counts


def chisquare(reference_counts: np.ndarray, current_counts: np.ndarray) -> Outcome:
    """Two-sample chi-square test of homogeneity on a 2 x k contingency table.

    ``scipy.stats.chi2_contingency(..., correction=False)`` on the reference and current counts
    of the same categories (or bins). Unlike a goodness-of-fit test against reference shares
    taken as exact, it accounts for the reference being a sample too, so it keeps its false-alarm
    rate at small reference sizes. Categories empty on both sides are dropped; with fewer than two
    categories left the samples cannot differ: statistic 0, p-value 1.
    """
    table = np.vstack([np.asarray(reference_counts, float), np.asarray(current_counts, float)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2:
        return Outcome(0.0, 1.0, "fewer than two categories: nothing to compare")
    res = stats.chi2_contingency(table, correction=False)
    return Outcome(float(res.statistic), float(res.pvalue))


def z(reference_counts: np.ndarray, current_counts: np.ndarray) -> Outcome:
    """Two-proportion z-test (pooled variance) on the share of the first category.

    ``reference_counts``/``current_counts`` are ``[count of category A, count of the rest]``.
    The two-sided p-value is ``2 * scipy.stats.norm.sf(|z|)``; ``z**2`` equals the statistic of
    :func:`chisquare` on the same 2 x 2 table, and the p-values are the same.
    When both samples hold only one value the proportions cannot differ: z 0, p-value 1.
    """
    a1, b1 = (float(v) for v in reference_counts)
    a2, b2 = (float(v) for v in current_counts)
    n1, n2 = a1 + b1, a2 + b2
    p1, p2 = a1 / n1, a2 / n2
    pooled = (a1 + a2) / (n1 + n2)
    var = pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)
    if var <= 0.0:
        return Outcome(0.0, 1.0, "a single value on both sides")
    zstat = (p1 - p2) / np.sqrt(var)
    return Outcome(float(zstat), float(2.0 * stats.norm.sf(abs(zstat))))


def jensenshannon(reference_counts: np.ndarray, current_counts: np.ndarray) -> Outcome:
    """Jensen-Shannon distance (natural log) between the two frequency vectors.

    ``scipy.spatial.distance.jensenshannon`` normalises the counts itself; categories seen on
    one side only are simply zero on the other (no smoothing), as Evidently computes it.
    """
    r = np.asarray(reference_counts, float)
    c = np.asarray(current_counts, float)
    return Outcome(float(distance.jensenshannon(r, c)))


def psi(reference_counts: np.ndarray, current_counts: np.ndarray) -> Outcome:
    """Population Stability Index, ``sum((c - r) * ln(c / r))`` over bins.

    Computed as ``sum(rel_entr(c, r) + rel_entr(r, c))`` (the symmetric KL divergence, which is
    the same quantity) on shares where an empty bin is given ``PSI_EPSILON``.
    """
    r = _shares(reference_counts)
    c = _shares(current_counts)
    return Outcome(float(np.sum(rel_entr(c, r) + rel_entr(r, c))))


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, float)
    total = counts.sum()
    shares = counts / total if total > 0 else np.zeros_like(counts)
    return np.where(shares > 0, shares, PSI_EPSILON)


# --------------------------------------------------------------- the fixed-width histogram


@dataclass(frozen=True)
class Grid:
    """``bins`` fixed-width bins of ``width`` from ``lo``; bin 0 is below, ``bins + 1`` above.

    A value's bin is computed arithmetically (``floor((x - lo) / width) + 1``, clipped), which
    is several times cheaper than a binary search over edges; a value's *position*
    ``t = (x - lo) / width + 1`` is kept as well, so a histogram also knows where inside each bin
    its values lie (see :func:`wasserstein_binned`).
    """

    lo: float
    width: float
    bins: int

    def histogram(self, x: np.ndarray) -> "Histogram":
        """Count ``x`` (float64, may hold NaN/inf) into the grid in one pass.

        Returns the counts and position sums of the ``bins + 2`` bins and how many values were
        not finite (those are in no bin).
        """
        k = self.bins
        t = np.subtract(x, self.lo)
        t *= 1.0 / self.width
        t += 1.0
        bad = ~np.isfinite(x)
        n_bad = int(np.count_nonzero(bad))
        if n_bad:
            t[bad] = 0.0
        idx = np.clip(t, 0, k + 1).astype(np.intp)
        if n_bad:
            idx[bad] = k + 2  # a bin of its own, dropped below
        counts = np.bincount(idx, minlength=k + 3)[: k + 2]
        tsum = np.bincount(idx, weights=t, minlength=k + 3)[: k + 2]
        return Histogram(counts=counts, position_sums=tsum, n_non_finite=n_bad)


@dataclass(frozen=True)
class Histogram:
    counts: np.ndarray
    """``bins + 2`` counts: below the grid, the bins, at or above its top."""
    position_sums: np.ndarray
    """Per bin, the sum of the values' positions ``t`` (see :class:`Grid`)."""
    n_non_finite: int = 0


def wasserstein_binned(
    grid: Grid,
    reference_counts: np.ndarray,
    reference_offsets: np.ndarray,
    current: Histogram,
    reference_std: float,
) -> Outcome:
    """Normed Wasserstein-1 distance from a reference histogram and a current histogram.

    W1 is the integral of ``|F_ref(x) - F_cur(x)|``. The reference grid spans exactly the
    reference's [min, max], so below and above it ``F_ref`` is 0 or 1 and that part of the
    integral is exact from the current's overflow position sums. Inside each bin, the count and
    the sum of within-bin offsets of both sides give the integral of ``F_ref - F_cur`` over the
    bin exactly; where the difference cannot change sign inside the bin (it is bounded by the
    two sides' bin masses) its absolute value is therefore exact too. Only bins where the two
    CDFs may cross are estimated (both CDFs taken as linear inside the bin, kept within the
    bounds the counts allow). Measured against ``scipy.stats.wasserstein_distance`` on the raw
    data (1M vs 1M rows, 1024 bins; normal, lognormal, Pareto, Poisson, point-mass mixtures):
    absolute error below 1e-3 of the normed distance, typically 1e-5, i.e. far below the usual
    threshold of 0.1; a clear shift (no crossings) is exact to float precision.

    Parameters
    ----------
    grid : Grid
        The reference's grid.
    reference_counts, reference_offsets : numpy.ndarray
        Per in-grid bin (``grid.bins`` of each): the reference count and the sum of its
        values' offsets inside the bin (``t - bin``, in [0, 1)).
    current : Histogram
        The current column counted into the same grid.
    reference_std : float
        Population std of the reference, the norm (floored at ``WASSERSTEIN_STD_FLOOR``).
    """
    k = grid.bins
    rc = np.asarray(reference_counts, float)
    nr = rc.sum()
    cc = current.counts.astype(float)
    nc = cc.sum()
    j = np.arange(1, k + 1, dtype=float)
    below, above = cc[0], cc[k + 1]
    # Exact tails: sum of distances (in bin widths) of current values beyond the grid.
    below_excess = below - current.position_sums[0]
    above_excess = current.position_sums[k + 1] - (k + 1) * above
    ar = rc / nr
    ac = cc[1 : k + 1] / nc
    # Integral over each bin of F (in widths) = F(left) + sum(1 - offset) / n.
    rest_r = (rc - np.asarray(reference_offsets, float)) / nr
    cur_offsets = current.position_sums[1 : k + 1] - j * cc[1 : k + 1]
    rest_c = (cc[1 : k + 1] - cur_offsets) / nc
    f_r = np.concatenate(([0.0], np.cumsum(ar)[:-1]))
    f_c = below / nc + np.concatenate(([0.0], np.cumsum(ac)[:-1]))
    d0 = f_r - f_c
    d1 = d0 + ar - ac
    integral = d0 + rest_r - rest_c
    lowest, highest = d0 - ac, d0 + ar
    certain = (lowest >= 0) | (highest <= 0)
    exact = np.abs(integral)
    same_sign = d0 * d1 >= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        crossing = (d0**2 + d1**2) / (2.0 * np.abs(d0 - d1))
    linear = np.where(same_sign, np.abs(d0 + d1) / 2.0, np.nan_to_num(crossing))
    upper = np.maximum(np.abs(lowest), np.abs(highest))
    estimate = np.where(certain, exact, np.clip(linear, exact, upper))
    total = grid.width * (estimate.sum() + (below_excess + above_excess) / nc)
    norm = max(float(reference_std), WASSERSTEIN_STD_FLOOR)
    return Outcome(float(total) / norm)


def quantile_counts(values: np.ndarray, inner_edges: np.ndarray) -> np.ndarray:
    """Counts of finite ``values`` in the bins ``(-inf, e0), [e0, e1), ..., [e_last, inf)``."""
    edges = np.asarray(inner_edges, float)
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1)


@dataclass(frozen=True)
class DriftTest:
    """A registered test: its name, whether it yields a p-value or a distance, its threshold key."""

    name: str
    kind: TestKind
    threshold_setting: str
    """The ``DriftSection`` field holding its default threshold."""


TESTS: dict[str, DriftTest] = {
    "ks": DriftTest("ks", "p_value", "p_value_threshold"),
    "chisquare": DriftTest("chisquare", "p_value", "p_value_threshold"),
    "z": DriftTest("z", "p_value", "p_value_threshold"),
    "wasserstein": DriftTest("wasserstein", "distance", "distance_threshold"),
    "jensenshannon": DriftTest("jensenshannon", "distance", "distance_threshold"),
    "psi": DriftTest("psi", "distance", "psi_threshold"),
}
"""Every test by name; ``config.policy.FeatureDrift.test`` takes these names (or ``auto``)."""


def is_drift(spec: DriftTest, outcome: Outcome, threshold: float) -> bool:
    """The verdict: ``p < threshold`` for tests, ``statistic >= threshold`` for distances."""
    if spec.kind == "p_value":
        return outcome.p_value is not None and outcome.p_value < threshold
    return outcome.statistic >= threshold
