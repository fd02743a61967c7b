"""Validate training data before any fit: every problem is reported, not just the first.

Two halves:

* :func:`profile_frame` records a :class:`TrainingSchema` of the data a model was trained on
  (per column: kind, dtype, null rate, numeric range, category domain; the label distribution).
  It is stored with the model version so the *next* training can be checked against it.
* :func:`validate_frame` checks new data against that schema (when there is one) and against
  the policy's absolute limits, and returns a :class:`ValidationResult` listing every problem.
  A result with problems stops the pipeline; warnings are recorded but do not.

Rules (module constants, so they are tuned in one place):

=====================  ==========================================================================
``min_rows``           fewer rows than ``[data] min_rows``
``columns``            a schema (or ``[data] features``) column, or the target, is missing
``dtypes``             a column's kind changed (numeric / categorical / boolean / datetime)
``null_rate``          a column's null rate is above ``max_null_rate`` or rose more than
                       ``max_null_rate_increase`` over the schema's; an all-null column
``value_range``        more than :data:`MAX_OUT_OF_RANGE_SHARE` of a numeric column lies outside
                       the schema's range widened by :data:`RANGE_TOLERANCE` of its span
``category_domain``    more than :data:`MAX_UNSEEN_CATEGORY_SHARE` of a categorical column holds
                       values never seen in training
``label``              null labels above ``max_null_rate``; fewer than two classes; more than two
                       for a binary task; classes appearing/vanishing vs the schema; a label
                       distribution shift (total variation) above :data:`MAX_LABEL_SHIFT`;
                       a non-numeric or constant regression target
``time``               null or unparseable values in the time column
=====================  ==========================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd

Kind = Literal["numeric", "categorical", "boolean", "datetime"]

MAX_CATEGORIES = 1000
"""Category domains larger than this are not recorded (high-cardinality ids)."""
RANGE_TOLERANCE = 0.1
"""Numeric ranges are widened by this share of the training span before judging."""
MAX_OUT_OF_RANGE_SHARE = 0.01
MAX_UNSEEN_CATEGORY_SHARE = 0.05
MAX_LABEL_SHIFT = 0.25
"""Largest total-variation distance between the training and new label distributions."""


@dataclass(frozen=True)
class ColumnProfile:
    """What one column looked like in the training data."""

    name: str
    kind: Kind
    dtype: str
    null_rate: float
    min: float | None = None
    max: float | None = None
    categories: list[str] | None = None


@dataclass(frozen=True)
class TrainingSchema:
    """Schema and profile of a model's training data (JSON-friendly via ``to_dict``)."""

    target: str
    task: str
    n_rows: int
    columns: dict[str, ColumnProfile]
    label_distribution: dict[str, float] = field(default_factory=dict)
    """Class share for classifiers (keys are ``str(label)``); empty for regression."""
    target_min: float | None = None
    target_max: float | None = None

    @property
    def features(self) -> list[str]:
        return list(self.columns)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["columns"] = [asdict(c) for c in self.columns.values()]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainingSchema":
        cols = data.get("columns", [])
        if isinstance(cols, dict):
            cols = list(cols.values())
        return cls(
            target=data["target"],
            task=data["task"],
            n_rows=int(data.get("n_rows", 0)),
            columns={c["name"]: ColumnProfile(**c) for c in cols},
            label_distribution=dict(data.get("label_distribution", {})),
            target_min=data.get("target_min"),
            target_max=data.get("target_max"),
        )


@dataclass(frozen=True)
class Problem:
    """One validation finding: which rule, which column (if any), and a readable detail."""

    check: str
    detail: str
    column: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ValidationResult:
    """Every problem found (``passed`` only when there are none) plus non-blocking warnings."""

    n_rows: int
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.passed:
            return f"{self.n_rows} rows valid" + (f" ({len(self.warnings)} warnings)" if self.warnings else "")
        return f"{len(self.problems)} problems: " + "; ".join(
            (f"{p.column}: " if p.column else "") + p.detail for p in self.problems
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "n_rows": self.n_rows,
            "problems": [p.to_dict() for p in self.problems],
            "warnings": [p.to_dict() for p in self.warnings],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ValidationResult":
        return cls(
            n_rows=int(data.get("n_rows", 0)),
            problems=[Problem(**p) for p in data.get("problems", [])],
            warnings=[Problem(**p) for p in data.get("warnings", [])],
        )


def column_kind(series: pd.Series, categorical: Iterable[str] = ()) -> Kind:
    """Classify a column the way the feature pipeline will treat it."""
    if series.name in set(categorical):
        return "categorical"
    if pd.api.types.is_bool_dtype(series):
        return "boolean"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "datetime"
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    return "categorical"


def feature_columns(
    frame: pd.DataFrame, target: str, time_column: str | None = None, features: Iterable[str] | None = None
) -> list[str]:
    """The feature columns: ``features`` if given, else every column but the target and time."""
    features = list(features or [])
    if features:
        return features
    return [c for c in frame.columns if c not in (target, time_column)]


def _label_key(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    return str(value.item() if hasattr(value, "item") else value)


def _label_distribution(y: pd.Series) -> dict[str, float]:
    shares = y.dropna().map(_label_key).value_counts(normalize=True).sort_index()
    return {str(k): float(v) for k, v in shares.items()}


def _finite(values: pd.Series) -> pd.Series:
    """The finite values of a numeric column (or target), as floats."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    return numbers[np.isfinite(numbers)]


def _infinite_count(values: pd.Series) -> int:
    return int(np.isinf(pd.to_numeric(values, errors="coerce").astype(float)).sum())


def _nested_count(series: pd.Series) -> int:
    return int(series.map(lambda v: isinstance(v, (list, tuple, dict, set, np.ndarray))).sum())


def _profile_column(series: pd.Series, categorical: Iterable[str]) -> ColumnProfile:
    kind = column_kind(series, categorical)
    null_rate = float(series.isna().mean()) if len(series) else 0.0
    lo = hi = None
    cats = None
    values = series.dropna()
    if kind == "numeric" and len(values):
        finite = _finite(values)  # an infinite value (refused by validation) must not widen the range for good
        if len(finite):
            lo, hi = float(finite.min()), float(finite.max())
    elif kind in ("categorical", "boolean"):
        uniq = pd.unique(values.map(str)) if len(values) else []
        if len(uniq) <= MAX_CATEGORIES:
            cats = sorted(str(u) for u in uniq)
    return ColumnProfile(series.name, kind, str(series.dtype), null_rate, lo, hi, cats)


def profile_frame(
    frame: pd.DataFrame,
    target: str,
    task: str,
    *,
    features: Iterable[str] | None = None,
    categorical: Iterable[str] = (),
    time_column: str | None = None,
) -> TrainingSchema:
    """Record the schema and profile of training data, to validate the next training against.

    Parameters
    ----------
    frame
        Training rows including ``target``.
    target, task
        Label column and ``binary | multiclass | regression``.
    features, categorical, time_column
        As in the policy's ``[data]`` section.
    """
    cols = feature_columns(frame, target, time_column, features)
    categorical = list(categorical)
    columns = {c: _profile_column(frame[c], categorical) for c in cols if c in frame.columns}
    y = frame[target] if target in frame.columns else pd.Series([], dtype=float)
    if task == "regression":
        yv = _finite(y.dropna())
        return TrainingSchema(
            target, task, int(len(frame)), columns, {},
            float(yv.min()) if len(yv) else None, float(yv.max()) if len(yv) else None,
        )
    return TrainingSchema(target, task, int(len(frame)), columns, _label_distribution(y))


def _check_label(y: pd.Series, task: str, schema: TrainingSchema | None, max_null_rate: float, out: ValidationResult) -> None:
    name = str(y.name)
    null_rate = float(y.isna().mean()) if len(y) else 0.0
    if null_rate > max_null_rate:
        out.problems.append(Problem("label", f"{null_rate:.1%} of labels are null (max {max_null_rate:.1%})", name))
    elif null_rate > 0:
        out.warnings.append(Problem("label", f"{null_rate:.1%} of rows have no label and are dropped", name))
    values = y.dropna()
    if not len(values):
        out.problems.append(Problem("label", "no labeled rows", name))
        return
    if task == "regression":
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.isna().any():
            out.problems.append(Problem("label", "regression target has non-numeric values", name))
        elif n_inf := _infinite_count(numeric):
            out.problems.append(Problem("label", f"regression target has {n_inf} infinite values", name))
        elif numeric.nunique() < 2:
            out.problems.append(Problem("label", "regression target is constant", name))
        return
    dist = _label_distribution(values)
    if len(dist) < 2:
        out.problems.append(Problem("label", f"only one class present ({next(iter(dist))})", name))
    if task == "binary" and len(dist) > 2:
        out.problems.append(Problem("label", f"binary task but {len(dist)} classes: {sorted(dist)[:6]}", name))
    if schema is not None and schema.label_distribution:
        old = schema.label_distribution
        new_classes = sorted(set(dist) - set(old))
        gone = sorted(set(old) - set(dist))
        if new_classes:
            out.problems.append(Problem("label", f"classes not in the training schema: {new_classes[:6]}", name))
        if gone:
            out.problems.append(Problem("label", f"classes missing from the data: {gone[:6]}", name))
        tv = 0.5 * sum(abs(dist.get(k, 0.0) - old.get(k, 0.0)) for k in set(dist) | set(old))
        if tv > MAX_LABEL_SHIFT:
            out.problems.append(
                Problem("label", f"label distribution shifted by {tv:.2f} total variation (max {MAX_LABEL_SHIFT})", name)
            )


def _check_against_profile(series: pd.Series, kind: Kind, ref: ColumnProfile, max_null_increase: float, out: ValidationResult) -> None:
    name = ref.name
    if kind != ref.kind:
        out.problems.append(Problem("dtypes", f"kind changed from {ref.kind} ({ref.dtype}) to {kind} ({series.dtype})", name))
        return
    null_rate = float(series.isna().mean()) if len(series) else 0.0
    if null_rate - ref.null_rate > max_null_increase:
        out.problems.append(
            Problem("null_rate", f"null rate rose from {ref.null_rate:.1%} to {null_rate:.1%} (max increase {max_null_increase:.1%})", name)
        )
    values = series.dropna()
    if not len(values):
        return
    if kind == "numeric" and ref.min is not None and ref.max is not None:
        slack = RANGE_TOLERANCE * (ref.max - ref.min)
        lo, hi = ref.min - slack, ref.max + slack
        outside = float(((values < lo) | (values > hi)).mean())
        if outside > MAX_OUT_OF_RANGE_SHARE:
            out.problems.append(
                Problem(
                    "value_range",
                    f"{outside:.1%} of values outside the training range [{ref.min:g}, {ref.max:g}] "
                    f"(observed [{float(values.min()):g}, {float(values.max()):g}])",
                    name,
                )
            )
    elif kind in ("categorical", "boolean") and ref.categories is not None:
        seen = set(ref.categories)
        as_str = values.map(str)
        unseen_mask = ~as_str.isin(seen)
        share = float(unseen_mask.mean())
        if share > MAX_UNSEEN_CATEGORY_SHARE:
            examples = sorted(pd.unique(as_str[unseen_mask]))[:5]
            out.problems.append(
                Problem("category_domain", f"{share:.1%} of values are categories unseen in training, e.g. {examples}", name)
            )


def validate_frame(
    frame: pd.DataFrame,
    *,
    target: str,
    task: str,
    schema: TrainingSchema | dict[str, Any] | None = None,
    min_rows: int = 200,
    max_null_rate: float = 0.2,
    max_null_rate_increase: float = 0.1,
    features: Iterable[str] | None = None,
    categorical: Iterable[str] = (),
    time_column: str | None = None,
) -> ValidationResult:
    """Check data before training; return every problem found.

    Parameters
    ----------
    frame
        The rows to train on (features, target, optionally the time column).
    target, task
        Label column and ``binary | multiclass | regression``.
    schema
        The production model's :class:`TrainingSchema` (or its ``to_dict()``); None for the
        first model of a name, in which case only the absolute rules apply.
    min_rows, max_null_rate, max_null_rate_increase, features, categorical, time_column
        From the policy's ``[data]`` section.

    Returns
    -------
    ValidationResult
        ``passed`` is False when any problem was found; ``problems`` lists all of them.

    Examples
    --------
    >>> result = validate_frame(df, target="churned", task="binary", schema=prod_schema)  # doctest: +SKIP
    >>> [p.check for p in result.problems]                                                # doctest: +SKIP
    ['columns', 'null_rate', 'category_domain']
    """
    if isinstance(schema, dict):
        schema = TrainingSchema.from_dict(schema)
    out = ValidationResult(n_rows=int(len(frame)))
    categorical = list(categorical)
    if len(frame) < min_rows:
        out.problems.append(Problem("min_rows", f"{len(frame)} rows, need at least {min_rows}"))
    if target not in frame.columns:
        out.problems.append(Problem("columns", f"target column '{target}' is missing", target))
    else:
        _check_label(frame[target], task, schema, max_null_rate, out)
    if time_column and time_column in frame.columns:
        times = frame[time_column]
        if not pd.api.types.is_datetime64_any_dtype(times):
            times = pd.to_datetime(times, errors="coerce", utc=True, format="mixed")
        bad = int(times.isna().sum())
        if bad:
            out.problems.append(Problem("time", f"{bad} rows with a null or unparseable time", time_column))

    expected = list(features or []) or (schema.features if schema is not None else [])
    missing = [c for c in expected if c not in frame.columns]
    for col in missing:
        out.problems.append(Problem("columns", "column is missing" + (" (in the training schema)" if schema else ""), col))
    present = feature_columns(frame, target, time_column, [c for c in expected if c in frame.columns] or None)
    if schema is not None:
        extra = [c for c in frame.columns if c not in schema.columns and c not in (target, time_column)]
        for col in extra:
            out.warnings.append(Problem("columns", "column not in the training schema (ignored by the model)", col))
    for col in present:
        series = frame[col]
        null_rate = float(series.isna().mean()) if len(series) else 0.0
        if len(series) and null_rate == 1.0:
            out.problems.append(Problem("null_rate", "column is entirely null", col))
            continue
        if null_rate > max_null_rate:
            out.problems.append(Problem("null_rate", f"null rate {null_rate:.1%} above {max_null_rate:.1%}", col))
        kind = column_kind(series, categorical)
        if series.dtype == object and (nested := _nested_count(series)):
            out.problems.append(Problem("dtypes", f"{nested} values are lists, arrays or mappings, not a feature "
                                                  "the model can use", col))
            continue
        if kind == "numeric" and (n_inf := _infinite_count(series)):
            out.problems.append(Problem("non_finite", f"{n_inf} infinite values (a division by zero upstream?)", col))
        if schema is not None and col in schema.columns:
            _check_against_profile(series, kind, schema.columns[col], max_null_rate_increase, out)
    return out


def validate_for_policy(frame: pd.DataFrame, policy: Any, schema: TrainingSchema | dict[str, Any] | None = None) -> ValidationResult:
    """:func:`validate_frame` with every limit taken from a :class:`config.policy.Policy`."""
    d = policy.data
    return validate_frame(
        frame,
        target=policy.model.target,
        task=policy.model.task,
        schema=schema,
        min_rows=d.min_rows,
        max_null_rate=d.max_null_rate,
        max_null_rate_increase=d.max_null_rate_increase,
        features=d.features,
        categorical=d.categorical,
        time_column=d.time_column,
    )
