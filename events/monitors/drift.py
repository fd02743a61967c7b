"""Data drift and concept drift: a reference profile built once, checked against current data.

The profile (:func:`build_profile`) is computed from the training data and stored with the model
version as JSON (:meth:`ReferenceProfile.to_dict`), so a check never re-reads the training set.
Per numeric column it keeps a fixed-width histogram over the reference's range (counts and the
sum of within-bin offsets), quantile-bin counts, mean/std/min/max, a bounded sorted sample and,
for columns with at most ``LOW_CARDINALITY`` distinct values, their counts; per categorical
column the category counts. :func:`check_drift` is then one histogram pass per column.

Test choice follows the widely used default rule (Evidently's): with a reference of at most
``small_sample_size`` rows, two-sample KS for numeric columns, a two-sample chi-square for
categorical ones and a two-proportion z-test for binary ones; with a larger reference, the
Wasserstein distance normed by the reference std for numeric columns and the Jensen-Shannon
distance for categorical ones. Numeric columns with at most ``LOW_CARDINALITY`` distinct values
(reference and current together) are tested as categorical. PSI is available by name. The tests
are in :mod:`events.monitors.drift_tests`.

No messy input raises: missing values are dropped from the tests and their rate change is
reported as a signal of its own; unseen categories, constant and empty columns, a column missing
from the current data (an upstream problem, not drift) and extra columns each get a clear result.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import pandas as pd

from config.policy import DriftSection, FeatureDrift
from events.monitors import drift_tests as dt

PROFILE_FORMAT = 1
DEFAULT_BINS = 1024
"""Fixed-width histogram bins per numeric column (see ``drift_tests.wasserstein_binned``)."""
DEFAULT_QUANTILE_BINS = 10
"""Quantile bins per numeric column, used by PSI (and by chi-square/JS when asked for by name)."""
DEFAULT_SAMPLE_SIZE = 5000
"""Largest sorted sample kept per numeric column for KS; smaller columns are kept whole."""
LOW_CARDINALITY = 5
"""Numeric columns with at most this many distinct values are tested as categorical."""
MAX_CATEGORIES = 10_000
"""Categories kept per categorical column; the rarest beyond this share one 'other' bucket."""
IDENTIFIER_MIN_ROWS = 1000
IDENTIFIER_UNIQUE_SHARE = 0.9
"""A text column with at least IDENTIFIER_MIN_ROWS values, nearly all distinct, is an
identifier, not a feature: it is skipped (every new id would look like an unseen category)."""
OTHER = "__other__"

Kind = Literal["numeric", "categorical"]
Status = Literal["ok", "missing_column", "empty_current", "empty_reference", "no_current_rows"]
_COUNTED = ("ok", "empty_current", "empty_reference")
"""Statuses that count towards the dataset drift score (the column was there to judge)."""


# =============================================================================== profiles


@dataclass
class NumericProfile:
    """Reference summary of one numeric column (arrays are numpy inside, lists in JSON)."""

    name: str
    n: int
    """Finite values."""
    n_missing: int
    """NaN, None and infinite values."""
    mean: float | None = None
    std: float | None = None
    """Population std (ddof 0), the Wasserstein norm."""
    min: float | None = None
    max: float | None = None
    grid_lo: float | None = None
    grid_width: float | None = None
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Per fixed-width bin (``len == bins``)."""
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Per fixed-width bin, the sum of its values' offsets inside the bin, in bin widths."""
    quantile_edges: np.ndarray = field(default_factory=lambda: np.zeros(0))
    quantile_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sample: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """Sorted; every finite value when ``sample_complete``."""
    sample_complete: bool = True
    values: np.ndarray | None = None
    """The distinct values, when there are at most ``LOW_CARDINALITY``."""
    value_counts: np.ndarray | None = None
    kind: Kind = "numeric"

    @property
    def grid(self) -> dt.Grid | None:
        if self.grid_lo is None or self.grid_width is None:
            return None
        return dt.Grid(self.grid_lo, self.grid_width, int(self.counts.size))


@dataclass
class CategoricalProfile:
    """Reference summary of one categorical column: category counts, most frequent first."""

    name: str
    n: int
    n_missing: int
    categories: list[Any] = field(default_factory=list)
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    other: int = 0
    """Values of categories beyond ``MAX_CATEGORIES`` (then unseen values join this bucket)."""
    n_distinct: int = 0
    kind: Kind = "categorical"


ColumnProfile = NumericProfile | CategoricalProfile

_ARRAYS = {
    "counts": np.int64,
    "offsets": np.float64,
    "quantile_edges": np.float64,
    "quantile_counts": np.int64,
    "sample": np.float64,
    "values": np.float64,
    "value_counts": np.int64,
}


def _column_to_dict(col: ColumnProfile) -> dict[str, Any]:
    out = asdict(col)
    for key, value in out.items():
        if isinstance(value, np.ndarray):
            out[key] = value.tolist()
    if isinstance(col, CategoricalProfile):
        out["categories"] = [_json_scalar(v) for v in col.categories]
    return out


def _column_from_dict(data: Mapping[str, Any]) -> ColumnProfile:
    data = dict(data)
    kind = data.get("kind")
    if kind == "numeric":
        for key, dtype in _ARRAYS.items():
            if data.get(key) is not None:
                data[key] = np.asarray(data[key], dtype=dtype)
        return NumericProfile(**data)
    if kind == "categorical":
        data["counts"] = np.asarray(data.get("counts", []), dtype=np.int64)
        return CategoricalProfile(**data)
    raise ValueError(f"unknown column kind {kind!r}")


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@dataclass
class ReferenceProfile:
    """Everything a drift check needs from the training data, JSON-serialisable.

    Build it with :func:`build_profile`; store ``to_dict()`` (or :meth:`save`) with the model
    version and get it back with :meth:`from_dict` (or :meth:`load`).
    """

    n_rows: int
    columns: dict[str, ColumnProfile]
    skipped: dict[str, str] = field(default_factory=dict)
    """Columns not profiled, with the reason (unsupported type, identifier)."""
    excluded: list[str] = field(default_factory=list)
    """Columns excluded on purpose; not reported as extra when the current data has them."""
    format: int = PROFILE_FORMAT

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no NaN, no numpy types)."""
        return {
            "format": self.format,
            "n_rows": self.n_rows,
            "columns": [_column_to_dict(c) for c in self.columns.values()],
            "skipped": dict(self.skipped),
            "excluded": list(self.excluded),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ReferenceProfile":
        """Rebuild a profile from :meth:`to_dict` output; raise ``ValueError`` if it is not one."""
        try:
            if data.get("format") != PROFILE_FORMAT:
                raise ValueError(f"unsupported profile format {data.get('format')!r}")
            columns = [_column_from_dict(c) for c in data["columns"]]
            return cls(
                n_rows=int(data["n_rows"]),
                columns={c.name: c for c in columns},
                skipped=dict(data.get("skipped", {})),
                excluded=list(data.get("excluded", [])),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a reference profile ({type(exc).__name__}: {exc})") from None

    def save(self, path: str | Path) -> None:
        """Write the profile as one JSON file."""
        Path(path).write_text(json.dumps(self.to_dict(), allow_nan=False))

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceProfile":
        """Read a profile written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_profile(
    df: pd.DataFrame,
    *,
    categorical: Iterable[str] = (),
    exclude: Iterable[str] = (),
    bins: int = DEFAULT_BINS,
    quantile_bins: int = DEFAULT_QUANTILE_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
) -> ReferenceProfile:
    """Summarise the reference (training) data once, for every later drift check.

    Parameters
    ----------
    df : pandas.DataFrame
        The reference data; column names are used as strings.
    categorical : iterable of str
        Columns to treat as categorical even when numeric. Text, boolean and pandas categorical
        columns are categorical anyway; other numeric columns are numeric.
    exclude : iterable of str
        Columns to leave out (target, time column, ids).
    bins, quantile_bins, sample_size : int
        Fixed-width histogram bins, quantile bins and sorted-sample size per numeric column.
    seed : int
        Seed of the sample drawn when a column has more than ``sample_size`` values.

    Returns
    -------
    ReferenceProfile

    Examples
    --------
    >>> profile = build_profile(train_df, exclude=["target"])
    >>> report = check_drift(ReferenceProfile.from_dict(profile.to_dict()), live_df, DriftSection())
    """
    categorical = {str(c) for c in categorical}
    excluded = [str(c) for c in exclude]
    rng = np.random.default_rng(seed)
    df = _unique_str_columns(df)
    columns: dict[str, ColumnProfile] = {}
    skipped: dict[str, str] = {}
    for name in df.columns:
        if name in excluded:
            continue
        series = df[name]
        kind = _infer_kind(series, force_categorical=name in categorical)
        if kind is None:
            skipped[name] = f"unsupported type {series.dtype}"
        elif kind == "numeric":
            x = _to_float(series)[0]
            columns[name] = profile_numeric(
                name, x, bins=bins, quantile_bins=quantile_bins, sample_size=sample_size, rng=rng
            )
        else:
            col = profile_categorical(name, series)
            if _looks_like_identifier(col):
                skipped[name] = f"identifier-like: {col.n} values, nearly all distinct"
            else:
                columns[name] = col
    return ReferenceProfile(n_rows=len(df), columns=columns, skipped=skipped, excluded=excluded)


def profile_numeric(
    name: str,
    x: np.ndarray,
    *,
    bins: int = DEFAULT_BINS,
    quantile_bins: int = DEFAULT_QUANTILE_BINS,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    rng: np.random.Generator | None = None,
) -> NumericProfile:
    """Profile one numeric column given as a float64 array (NaN/inf count as missing)."""
    finite = np.isfinite(x)
    values = x if finite.all() else x[finite]
    n = int(values.size)
    if n == 0:
        return NumericProfile(name=name, n=0, n_missing=int(x.size))
    lo, hi = float(values.min()), float(values.max())
    span = hi - lo
    # The grid covers [min, max] with a hair of room so the maximum falls inside it.
    top = hi + (span * 1e-9 if span > 0 else max(abs(hi) * 1e-9, 1e-9))
    grid = dt.Grid(lo, (top - lo) / bins, bins)
    hist = grid.histogram(values)
    counts = hist.counts[1 : bins + 1].astype(np.int64)
    offsets = hist.position_sums[1 : bins + 1] - np.arange(1, bins + 1) * counts
    edges = np.unique(np.quantile(values, np.linspace(0, 1, quantile_bins + 1)[1:-1]))
    if edges.size < 2:  # a (nearly) constant reference: its quantiles make one bin for everything at or above
        # them, and PSI saw no shift; bounded by its range instead, below, at and above its values get bins
        edges = np.unique(np.concatenate([[lo], edges, [np.nextafter(hi, np.inf)]]))
    if n <= sample_size:
        sample, complete = np.sort(values), True
    else:
        rng = rng or np.random.default_rng(0)
        sample, complete = np.sort(values[rng.choice(n, sample_size, replace=False)]), False
    distinct = distinct_counts = None
    if np.unique(sample).size <= LOW_CARDINALITY:
        distinct, distinct_counts = np.unique(values, return_counts=True)
        if distinct.size > LOW_CARDINALITY:
            distinct = distinct_counts = None
    return NumericProfile(
        name=name,
        n=n,
        n_missing=int(x.size - n),
        mean=float(values.mean()),
        std=float(values.std()),
        min=lo,
        max=hi,
        grid_lo=grid.lo,
        grid_width=grid.width,
        counts=counts,
        offsets=offsets,
        quantile_edges=edges,
        quantile_counts=dt.quantile_counts(values, edges).astype(np.int64),
        sample=sample,
        sample_complete=complete,
        values=distinct,
        value_counts=None if distinct_counts is None else distinct_counts.astype(np.int64),
    )


def profile_categorical(name: str, series: pd.Series) -> CategoricalProfile:
    """Profile one categorical column: counts per category, most frequent first."""
    n_missing = int(series.isna().sum())
    vc = series.value_counts(dropna=True)
    vc = vc[vc > 0]
    n_distinct = len(vc)
    other = int(vc.iloc[MAX_CATEGORIES:].sum()) if len(vc) > MAX_CATEGORIES else 0
    vc = vc.iloc[:MAX_CATEGORIES]
    return CategoricalProfile(
        name=name,
        n=int(vc.sum()) + other,
        n_missing=n_missing,
        categories=[_json_scalar(v) for v in vc.index],
        counts=vc.to_numpy(dtype=np.int64),
        other=other,
        n_distinct=n_distinct,
    )


def _looks_like_identifier(col: CategoricalProfile) -> bool:
    return (
        col.n >= IDENTIFIER_MIN_ROWS
        and col.n_distinct >= IDENTIFIER_UNIQUE_SHARE * col.n
        and all(isinstance(c, str) for c in col.categories[:100])
    )


def _infer_kind(series: pd.Series, *, force_categorical: bool = False) -> Kind | None:
    dtype = series.dtype
    if force_categorical or pd.api.types.is_bool_dtype(dtype):
        return "categorical"
    if isinstance(dtype, pd.CategoricalDtype):
        return "categorical"
    if pd.api.types.is_complex_dtype(dtype):
        return None
    if pd.api.types.is_numeric_dtype(dtype):
        return "numeric"
    if pd.api.types.is_string_dtype(dtype) or dtype == object:
        return "categorical"
    return None


def _to_float(series: pd.Series) -> tuple[np.ndarray, int]:
    """The column as float64 (NaN for missing) and how many values were not numbers at all."""
    dtype = series.dtype
    if pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype):
        if not isinstance(dtype, pd.CategoricalDtype):
            return series.to_numpy(dtype=np.float64, na_value=np.nan), 0
    coerced = pd.to_numeric(series.astype(object), errors="coerce")
    n_bad = int(coerced.isna().sum() - series.isna().sum())
    return coerced.to_numpy(dtype=np.float64, na_value=np.nan), n_bad


def _unique_str_columns(df: pd.DataFrame) -> pd.DataFrame:
    if not all(isinstance(c, str) for c in df.columns):
        df = df.set_axis([str(c) for c in df.columns], axis=1)
    if df.columns.duplicated().any():
        df = df.loc[:, ~df.columns.duplicated()]
    return df


# ================================================================================ reports


@dataclass
class FeatureResult:
    """The drift verdict for one feature (see ``to_dict`` for the JSON keys)."""

    name: str
    kind: Kind
    test: str | None
    statistic: float | None
    p_value: float | None
    threshold: float | None
    drifted: bool
    """Distribution drift or a missing-rate change above ``missing_rate_threshold``."""
    status: Status = "ok"
    distribution_drifted: bool = False
    missing_rate_reference: float | None = None
    missing_rate_current: float | None = None
    missing_rate_change: float | None = None
    missing_rate_drifted: bool = False
    importance: float = 1.0
    n_reference: int = 0
    n_current: int = 0
    unseen_categories: int | None = None
    unseen_share: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {k: _finite_or_none(v) for k, v in asdict(self).items()}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class DriftReport:
    """The outcome of :func:`check_drift`: per-feature results and the dataset verdict."""

    features: list[FeatureResult]
    dataset_drift: bool
    drift_score: float
    """Share of drifted features (importance-weighted when the policy says so)."""
    drift_share: float
    """The policy's share at or above which the dataset counts as drifted."""
    n_reference: int
    n_current: int
    extra_columns: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.drifted]

    @property
    def missing_columns(self) -> list[str]:
        return [f.name for f in self.features if f.status == "missing_column"]

    @property
    def missing_rate_drifted_features(self) -> list[str]:
        return [f.name for f in self.features if f.missing_rate_drifted]

    def to_dict(self, *, full: bool = False) -> dict[str, Any]:
        """DESIGN.md's ``retrain drift --json`` object.

        ``{"dataset_drift", "drift_score", "features": [{"name", "kind", "test", "statistic",
        "p_value", "threshold", "drifted", ...}]}``; with ``full=True`` also the drifted,
        missing and extra columns, skipped columns and row counts (for ``drift.data`` events).
        """
        out: dict[str, Any] = {
            "dataset_drift": bool(self.dataset_drift),
            "drift_score": float(self.drift_score),
            "features": [f.to_dict() for f in self.features],
        }
        if full:
            out.update(
                drifted_features=self.drifted_features,
                missing_columns=self.missing_columns,
                missing_rate_drifted_features=self.missing_rate_drifted_features,
                extra_columns=list(self.extra_columns),
                skipped=dict(self.skipped),
                drift_share=self.drift_share,
                n_reference=self.n_reference,
                n_current=self.n_current,
            )
        return out


# ================================================================================= checks


def check_drift(
    profile: ReferenceProfile | pd.DataFrame,
    current: pd.DataFrame,
    settings: DriftSection | None = None,
) -> DriftReport:
    """Compare current data with the reference profile, feature by feature.

    Parameters
    ----------
    profile : ReferenceProfile or pandas.DataFrame
        The stored reference profile (a DataFrame is profiled on the spot, with defaults).
    current : pandas.DataFrame
        The current data; columns the profile does not know are reported as extra.
    settings : config.policy.DriftSection, optional
        Thresholds, test choice and per-feature overrides; the defaults when omitted.

    Returns
    -------
    DriftReport
        Never raises for messy data: each problem is a feature status or note.

    Examples
    --------
    >>> report = check_drift(profile, live_df, policy.drift)
    >>> report.dataset_drift, report.drifted_features
    """
    settings = settings or DriftSection()
    if isinstance(profile, pd.DataFrame):
        profile = build_profile(profile)
    current = _unique_str_columns(current)
    n_current = len(current)
    results = []
    for name, col in profile.columns.items():
        override = settings.features.get(name)
        if name not in current.columns:
            result = FeatureResult(
                name=name, kind=col.kind, test=None, statistic=None, p_value=None, threshold=None,
                drifted=False, status="missing_column", n_reference=col.n,
                note="column missing from current data (an upstream problem, not drift)",
            )
        else:
            result = _check_column(col, current[name], profile.n_rows, settings, override)
        result.importance = override.importance if override else 1.0
        results.append(result)
    known = set(profile.columns) | set(profile.skipped) | set(profile.excluded)
    extra = [c for c in current.columns if c not in known]
    counted = [r for r in results if r.status in _COUNTED]
    if settings.weight_by_importance:
        total = sum(r.importance for r in counted)
        score = sum(r.importance for r in counted if r.drifted) / total if total > 0 else 0.0
    else:
        score = sum(r.drifted for r in counted) / len(counted) if counted else 0.0
    return DriftReport(
        features=results,
        dataset_drift=bool(counted) and score >= settings.dataset_drift_share,
        drift_score=float(score),
        drift_share=settings.dataset_drift_share,
        n_reference=profile.n_rows,
        n_current=n_current,
        extra_columns=extra,
        skipped=dict(profile.skipped),
    )


def _requested_test(kind: Kind, settings: DriftSection, override: FeatureDrift | None) -> str:
    if override is not None and override.test != "auto":
        return override.test
    if settings.method == "psi" or (kind == "numeric" and settings.method != "auto"):
        return settings.method
    return "auto"


def _threshold(test: str, settings: DriftSection, override: FeatureDrift | None) -> float:
    """The override's threshold only for the test it was set for: after a fallback (``z`` on a non-binary column,
    ``ks`` on a categorical one) a p-value cut-off would be read as a distance."""
    if override is not None and override.threshold is not None and override.test in (test, "auto"):
        return float(override.threshold)
    return float(getattr(settings, dt.TESTS[test].threshold_setting))


def _as_text(value: Any) -> str:
    """A current value compared with text categories: 3.0 (an integer column made float by its NaNs) reads "3"."""
    value = _json_scalar(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_column(
    col: ColumnProfile,
    series: pd.Series,
    n_rows: int,
    settings: DriftSection,
    override: FeatureDrift | None,
) -> FeatureResult:
    notes: list[str] = []
    n_total = len(series)
    result = FeatureResult(
        name=col.name, kind=col.kind, test=None, statistic=None, p_value=None, threshold=None,
        drifted=False, n_reference=col.n,
    )
    if n_total == 0:
        result.status = "no_current_rows"
        result.note = "current data has no rows"
        return result
    if col.kind == "numeric":
        x, n_not_numbers = _to_float(series)
        if n_not_numbers:
            notes.append(f"{n_not_numbers} non-numeric values counted as missing")
        if np.isinf(x).any():
            notes.append(f"{int(np.isinf(x).sum())} infinite values counted as missing")
        outcome = _numeric(col, x, n_rows, settings, override, result, notes)
    else:
        outcome = _categorical(col, series, n_rows, settings, override, result, notes)
    ref_total = col.n + col.n_missing
    result.missing_rate_reference = col.n_missing / ref_total if ref_total else None
    result.missing_rate_current = (n_total - result.n_current) / n_total
    if result.missing_rate_reference is not None:
        change = result.missing_rate_current - result.missing_rate_reference
        result.missing_rate_change = change
        result.missing_rate_drifted = abs(change) > settings.missing_rate_threshold
        if result.missing_rate_drifted:
            notes.append(
                f"missing rate {result.missing_rate_reference:.1%} -> {result.missing_rate_current:.1%}"
            )
    if outcome is not None and result.test is not None:
        result.statistic = outcome.statistic
        result.p_value = outcome.p_value
        result.threshold = _threshold(result.test, settings, override)
        result.distribution_drifted = dt.is_drift(dt.TESTS[result.test], outcome, result.threshold)
        if outcome.note:
            notes.append(outcome.note)
    result.drifted = result.distribution_drifted or result.missing_rate_drifted
    result.note = "; ".join(notes)
    return result


def _numeric(
    col: NumericProfile,
    x: np.ndarray,
    n_rows: int,
    settings: DriftSection,
    override: FeatureDrift | None,
    result: FeatureResult,
    notes: list[str],
) -> dt.Outcome | None:
    requested = _requested_test("numeric", settings, override)
    small = n_rows <= settings.small_sample_size
    grid = col.grid
    hist = None
    if col.n == 0:
        result.n_current = int(np.isfinite(x).sum())
        result.status = "empty_reference"
        notes.append("reference column has no values: no distribution to compare")
        return None
    if requested == "wasserstein" or (requested == "auto" and not small and col.values is None):
        hist = grid.histogram(x)  # one pass: counts, positions and the missing count
        finite = None
        result.n_current = int(x.size - hist.n_non_finite)
    else:
        finite = x[np.isfinite(x)]
        result.n_current = int(finite.size)
    if result.n_current == 0:
        result.status = "empty_current"
        notes.append("current column has no values")
        return None

    # Few distinct values on both sides together: test as categorical (Evidently's rule).
    discrete = None
    if col.values is not None:
        if finite is None:
            finite = x[np.isfinite(x)]
        cur_values, cur_counts = np.unique(finite, return_counts=True)
        if np.union1d(col.values, cur_values).size <= LOW_CARDINALITY:
            discrete = _align(list(col.values), col.value_counts, list(cur_values), cur_counts)

    test = requested
    n_keys = len(discrete[2]) if discrete is not None else None
    if test == "z" and (n_keys is None or n_keys > 2):
        notes.append("z-test needs a binary column: chose the default test")
        test = "auto"
    if test == "auto":
        if discrete is not None:
            test = ("chisquare" if n_keys > 2 else "z") if small else "jensenshannon"
        else:
            test = "ks" if small else "wasserstein"
    result.test = test

    if discrete is not None and test in ("chisquare", "z", "jensenshannon", "psi"):
        ref_counts, cur_counts, _ = discrete
        notes.append(f"{n_keys} distinct values: tested as categorical")
        return _on_counts(test, ref_counts, cur_counts)
    if test == "ks":
        if finite is None:
            finite = x[np.isfinite(x)]
        if not col.sample_complete:
            notes.append(f"KS against a {col.sample.size}-value reference sample")
        return dt.ks(col.sample, finite)
    if test == "wasserstein":
        if col.sample_complete:
            if finite is None:
                finite = x[np.isfinite(x)]
            return dt.wasserstein(col.sample, finite, col.std)
        if hist is None:
            hist = grid.histogram(x)
        return dt.wasserstein_binned(grid, col.counts, col.offsets, hist, col.std)
    # psi / chisquare / jensenshannon on a continuous column: the reference's quantile bins.
    if finite is None:
        finite = x[np.isfinite(x)]
    cur_counts = dt.quantile_counts(finite, col.quantile_edges)
    return _on_counts(test, col.quantile_counts, cur_counts)


def _categorical(
    col: CategoricalProfile,
    series: pd.Series,
    n_rows: int,
    settings: DriftSection,
    override: FeatureDrift | None,
    result: FeatureResult,
    notes: list[str],
) -> dt.Outcome | None:
    vc = series.value_counts(dropna=True)
    vc = vc[vc > 0]
    result.n_current = int(vc.sum())
    if col.n == 0:
        result.status = "empty_reference"
        notes.append("reference column has no values: no distribution to compare")
        return None
    if result.n_current == 0:
        result.status = "empty_current"
        notes.append("current column has no values")
        return None
    cur_keys = list(vc.index)
    if col.categories and all(isinstance(c, str) for c in col.categories):
        if not all(isinstance(k, str) for k in cur_keys):
            cur_keys = [k if isinstance(k, str) else _as_text(k) for k in cur_keys]
            notes.append("current values are not text: compared as text")
    ref_keys = list(col.categories)
    ref_counts = col.counts
    cur_counts = vc.to_numpy(dtype=np.int64)
    if col.other:
        # Rare reference categories were pooled: pool every unlisted current value with them.
        known = set(ref_keys)
        in_other = np.array([k not in known for k in cur_keys], dtype=bool)
        cur_keys = [k for k, o in zip(cur_keys, in_other) if not o] + [OTHER]
        cur_counts = np.append(cur_counts[~in_other], cur_counts[in_other].sum())
        ref_keys = ref_keys + [OTHER]
        ref_counts = np.append(ref_counts, col.other)
        notes.append(f"categories beyond the {len(col.categories)} most frequent pooled as '{OTHER}'")
    r, c, keys = _align(ref_keys, ref_counts, cur_keys, cur_counts)
    n_ref_keys = len(ref_keys)
    unseen_rows = int(c[n_ref_keys:].sum())
    result.unseen_categories = len(keys) - n_ref_keys
    result.unseen_share = unseen_rows / result.n_current
    if result.unseen_categories:
        notes.append(
            f"{result.unseen_categories} categories unseen in reference ({result.unseen_share:.1%} of rows)"
        )
    small = n_rows <= settings.small_sample_size
    test = _requested_test("categorical", settings, override)
    if test in ("ks", "wasserstein"):
        notes.append(f"{test} does not apply to a categorical column: chose the default test")
        test = "auto"
    if test == "z" and len(keys) > 2:
        notes.append("z-test needs a binary column: chose chi-square")
        test = "chisquare"
    if test == "auto":
        test = ("chisquare" if len(keys) > 2 else "z") if small else "jensenshannon"
    result.test = test
    if test == "psi":
        # PSI bins: the reference categories plus one bucket for everything unseen.
        r = np.append(r[:n_ref_keys], 0)
        c = np.append(c[:n_ref_keys], unseen_rows)
    return _on_counts(test, r, c)


def _align(
    ref_keys: list[Any], ref_counts: np.ndarray, cur_keys: list[Any], cur_counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Counts of both sides over the union of keys: reference keys first, then unseen ones."""
    index = {k: i for i, k in enumerate(ref_keys)}
    keys = list(ref_keys)
    cur = np.zeros(len(ref_keys), dtype=np.int64)
    extra_counts = []
    for key, count in zip(cur_keys, cur_counts):
        i = index.get(key)
        if i is None:
            keys.append(key)
            extra_counts.append(int(count))
        else:
            cur[i] += int(count)
    ref = np.concatenate([np.asarray(ref_counts, np.int64), np.zeros(len(extra_counts), np.int64)])
    cur = np.concatenate([cur, np.asarray(extra_counts, np.int64)])
    return ref, cur, keys


def _on_counts(test: str, ref_counts: np.ndarray, cur_counts: np.ndarray) -> dt.Outcome:
    if test == "chisquare":
        return dt.chisquare(ref_counts, cur_counts)
    if test == "jensenshannon":
        return dt.jensenshannon(ref_counts, cur_counts)
    if test == "psi":
        return dt.psi(ref_counts, cur_counts)
    if test == "z":
        # Share of the first (the reference's most frequent) value against all the others.
        return dt.z(
            [ref_counts[0], ref_counts[1:].sum()], [cur_counts[0], cur_counts[1:].sum()]
        )
    raise ValueError(f"test {test!r} does not work on counts")


# ========================================================================== concept drift


def prediction_drift(
    reference_scores: Any,
    current_scores: Any,
    metric: Literal["psi", "js"] = "psi",
    *,
    bins: int = DEFAULT_QUANTILE_BINS,
) -> tuple[float, dict[str, Any]]:
    """Shift of the model's prediction distribution (concept drift), by PSI or JS distance.

    Scores with more than ``LOW_CARDINALITY`` distinct values are binned by the reference's
    quantiles (``bins`` bins); predicted classes (or few distinct scores) are compared by their
    frequencies, with classes unseen in the reference in one extra PSI bucket. Missing scores
    are dropped (and counted in the details).

    Parameters
    ----------
    reference_scores : array-like or NumericProfile or CategoricalProfile
        Predictions on the reference data, or their stored profile.
    current_scores : array-like
        Recent predictions.
    metric : {"psi", "js"}
        PSI (``triggers.concept_drift_metric`` default) or Jensen-Shannon distance.
    bins : int
        Quantile bins for continuous scores.

    Returns
    -------
    (float, dict)
        The value (NaN when either side has no scores) and the details: metric, kind, bin
        edges or classes, both sides' shares, counts and a note.
    """
    if metric not in ("psi", "js"):
        raise ValueError(f"metric must be 'psi' or 'js', not {metric!r}")
    test = "psi" if metric == "psi" else "jensenshannon"
    if isinstance(reference_scores, (NumericProfile, CategoricalProfile)):
        ref = reference_scores
    else:
        ref_series = _as_series(reference_scores)
        kind = _infer_kind(ref_series) or "categorical"
        if kind == "numeric":
            ref = profile_numeric("prediction", _to_float(ref_series)[0], quantile_bins=bins)
        else:
            ref = profile_categorical("prediction", ref_series)
    cur_series = _as_series(current_scores)
    details: dict[str, Any] = {"metric": metric, "n_reference": ref.n, "note": ""}
    if isinstance(ref, NumericProfile) and ref.values is None:
        x = _to_float(cur_series)[0]
        finite = x[np.isfinite(x)]
        details.update(kind="scores", bins=ref.quantile_edges.tolist())
        r, c = ref.quantile_counts, dt.quantile_counts(finite, ref.quantile_edges)
    else:
        if isinstance(ref, NumericProfile):
            keys, counts = [float(v) for v in ref.values], ref.value_counts
            x = _to_float(cur_series)[0]
            cur_vc = pd.Series(x[np.isfinite(x)]).value_counts()
        else:
            keys, counts = list(ref.categories), ref.counts
            cur_vc = cur_series.value_counts(dropna=True)
        r, c, all_keys = _align(keys, counts, [_json_scalar(k) for k in cur_vc.index], cur_vc.to_numpy())
        if metric == "psi":
            r = np.append(r[: len(keys)], 0)
            c = np.append(c[: len(keys)], c[len(keys) :].sum())
            all_keys = keys + ["<unseen>"]
        details.update(kind="classes", classes=[_json_scalar(k) for k in all_keys])
    n_cur = int(np.sum(c))
    details.update(n_current=n_cur, missing_current=int(len(cur_series) - n_cur))
    if ref.n == 0 or n_cur == 0:
        details["note"] = "no scores on one side: nothing to compare"
        return float("nan"), details
    details.update(
        reference_share=(np.asarray(r) / np.sum(r)).tolist(),
        current_share=(np.asarray(c) / n_cur).tolist(),
    )
    value = _on_counts(test, r, c).statistic
    details["value"] = value
    return value, details


def _as_series(values: Any) -> pd.Series:
    if isinstance(values, pd.Series):
        return values.reset_index(drop=True)
    arr = np.asarray(values)
    if arr.ndim == 2 and 1 in arr.shape:
        arr = arr.ravel()
    if arr.ndim != 1:
        raise ValueError("prediction scores must be one-dimensional (a column of scores or classes)")
    return pd.Series(arr)
