"""Live model performance from delayed labels: join, measure, publish ``performance.measured``.

The router logs every answer to ``keys.requests(model)`` and ground truth arrives later on
``keys.feedback(model)``, both keyed by request id. :func:`read_request_log` reads the two
streams into DataFrames, :func:`measure_performance` joins them and computes the task's
metrics with a confidence interval and the number of labels behind it, and
:func:`performance_event` turns the result into the event the decision worker consumes.

Intervals (at :data:`CONFIDENCE_LEVEL`):

- accuracy: the Wilson score interval of the binomial proportion
  (``scipy.stats.binomtest(...).proportion_ci(method="wilson")``);
- RMSE: a normal (CLT) interval of the mean squared error, mapped through the square root
  (monotone, so coverage carries over); MAE: a normal interval of the mean absolute error.

Mirrored (shadow) answers and errored requests never count: only the answers users received
are judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from events.envelope import CloudEvent, new_event
from events.types import PerformanceMeasured

Task = Literal["binary", "multiclass", "regression"]

CONFIDENCE_LEVEL = 0.95
SOURCE = "urn:retrain:monitor:performance"
READ_CHUNK = 10_000
"""Entries per XRANGE call when reading the router's streams."""
MAX_LOG_ENTRIES = 2_000_000
"""Upper bound of entries read from one stream in one call (bounds memory)."""
PRIMARY_METRIC: dict[str, str] = {"binary": "accuracy", "multiclass": "accuracy", "regression": "rmse"}
LOWER_IS_BETTER = frozenset({"rmse", "mae"})

REQUEST_COLUMNS = ["request_id", "version", "latency_ms", "prediction", "score", "error", "shadow", "ts"]
FEEDBACK_COLUMNS = ["request_id", "label", "ts"]


@dataclass(frozen=True)
class Measurement:
    """One measurement of live performance.

    ``value`` and the interval are ``None`` when fewer than ``min_labeled`` labels matched a
    prediction; ``n_labeled`` is always reported.
    """

    metric: str
    value: float | None
    ci_low: float | None
    ci_high: float | None
    n_labeled: int
    n_predictions: int = 0
    """Answers considered (after dropping shadow and errored rows), labeled or not."""
    extra: dict[str, float] = field(default_factory=dict)
    """Secondary metrics: ``f1``/``f1_macro`` and ``auc`` (classification), ``mae`` (regression)."""
    confidence: float = CONFIDENCE_LEVEL
    task: Task = "binary"

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOWER_IS_BETTER

    @property
    def sufficient(self) -> bool:
        return self.value is not None


# ============================================================================ reading
def _text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _read_stream(client, key: str, since_ms: int, limit: int) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    start = f"{int(since_ms)}-0"
    while len(rows) < limit:
        batch = client.xrange(key, min=start, max="+", count=min(READ_CHUNK, limit - len(rows)))
        if not batch:
            break
        for entry_id, fields in batch:
            row = {_text(k): _text(v) for k, v in fields.items()}
            row.setdefault("ts", str(int(_text(entry_id).split("-")[0]) / 1000))
            rows.append(row)
        last = _text(batch[-1][0])
        start = "(" + last  # exclusive start after the last entry read
        if len(batch) < READ_CHUNK:
            break
    return rows


def _maybe_numeric(series: pd.Series) -> pd.Series:
    """Numbers when every present value is one, otherwise the strings as they were."""
    present = series.replace("", np.nan).dropna()
    numeric = pd.to_numeric(present, errors="coerce")
    if len(present) and numeric.notna().all():
        return pd.to_numeric(series.replace("", np.nan), errors="coerce")
    return series


def read_request_log(client, keys, model: str, since_ms: int = 0, *,
                     limit: int = MAX_LOG_ENTRIES) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the router's request log and the feedback labels of ``model`` since ``since_ms``.

    Parameters
    ----------
    client
        A redis-py client.
    keys
        The :class:`config.keys.Keys` of the deployment.
    model
        Model name.
    since_ms
        Unix time in milliseconds; entries older than this (by stream id) are skipped.
    limit
        Most entries read per stream.

    Returns
    -------
    (predictions, labels)
        ``predictions`` has columns request_id, version, latency_ms, prediction, score,
        error, shadow (bool), ts; ``labels`` has request_id, label, ts. Shadow rows are kept
        (flagged) so the rollout analysis can use the same reader; :func:`measure_performance`
        drops them.

    Examples
    --------
    >>> preds, labels = read_request_log(redis_client, keys, "churn", since_ms=0)  # doctest: +SKIP
    """
    requests = pd.DataFrame(_read_stream(client, keys.requests(model), since_ms, limit))
    for column in REQUEST_COLUMNS:
        if column not in requests:
            requests[column] = ""
    requests = requests.fillna("")
    requests["shadow"] = requests["shadow"].astype(str).str.lower().isin(["1", "true", "yes"])
    if "shadow_of" in requests:  # the rollout analysis's convention for mirrored answers
        requests["shadow"] |= requests["shadow_of"].astype(str).ne("")
    for column in ("latency_ms", "score", "ts"):
        requests[column] = pd.to_numeric(requests[column].replace("", np.nan), errors="coerce")
    requests["prediction"] = _maybe_numeric(requests["prediction"])

    feedback = pd.DataFrame(_read_stream(client, keys.feedback(model), since_ms, limit))
    for column in FEEDBACK_COLUMNS:
        if column not in feedback:
            feedback[column] = ""
    feedback = feedback.fillna("")
    feedback["ts"] = pd.to_numeric(feedback["ts"].replace("", np.nan), errors="coerce")
    feedback["label"] = _maybe_numeric(feedback["label"])
    return requests, feedback


# ============================================================================ measuring
def _as_label(value: Any) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _align(y_true: pd.Series, y_pred: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Compare like with like: numbers when both sides are numbers, else their text."""
    if pd.api.types.is_numeric_dtype(y_true) and pd.api.types.is_numeric_dtype(y_pred):
        return y_true, y_pred
    return y_true.map(_as_label), y_pred.map(_as_label)


def _join(predictions: pd.DataFrame, labels: pd.DataFrame, version: str | None) -> tuple[pd.DataFrame, int]:
    missing = [c for c in ("request_id", "prediction") if c not in predictions]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    if "request_id" not in labels or "label" not in labels:
        raise ValueError("labels need the columns request_id and label")
    preds = predictions
    if "shadow" in preds:
        preds = preds[~preds["shadow"].astype(bool)]
    if "error" in preds:
        preds = preds[preds["error"].fillna("").astype(str).eq("")]
    if version is not None and "version" in preds:
        preds = preds[preds["version"].astype(str) == str(version)]
    preds = preds[preds["prediction"].notna() & preds["prediction"].astype(str).ne("")]
    preds = preds.drop_duplicates("request_id", keep="last")
    labs = labels[labels["label"].notna() & labels["label"].astype(str).ne("")]
    labs = labs.drop_duplicates("request_id", keep="last")[["request_id", "label"]]
    keep = ["request_id", "prediction"] + (["score"] if "score" in preds else [])
    joined = preds[keep].merge(labs, on="request_id", how="inner")
    return joined, len(preds)


def _wilson(successes: int, n: int, confidence: float) -> tuple[float, float]:
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _normal_mean_ci(values: np.ndarray, confidence: float) -> tuple[float, float]:
    mean = float(values.mean())
    if len(values) < 2:
        return (float("-inf"), float("inf"))
    se = float(values.std(ddof=1)) / math.sqrt(len(values))
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return mean - z * se, mean + z * se


def _classification(joined: pd.DataFrame, task: Task, confidence: float) -> tuple[float, tuple[float, float], dict]:
    from sklearn.metrics import f1_score, roc_auc_score

    y_true, y_pred = _align(joined["label"], joined["prediction"])
    correct = int((y_true.to_numpy() == y_pred.to_numpy()).sum())
    n = len(joined)
    accuracy = correct / n
    extra: dict[str, float] = {}
    classes = sorted(set(y_true) | set(y_pred), key=str)
    if task == "binary" and len(classes) <= 2:
        positive = 1 if 1 in classes else classes[-1]
        extra["f1"] = float(f1_score(y_true, y_pred, pos_label=positive, average="binary", zero_division=0))
        if "score" in joined:
            scored = joined["score"].notna().to_numpy()
            if scored.any() and len(set(y_true[scored])) == 2:
                extra["auc"] = float(roc_auc_score(y_true[scored], joined["score"][scored].astype(float)))
    else:
        extra["f1_macro"] = float(f1_score(y_true, y_pred, average="macro", zero_division=0))
    return accuracy, _wilson(correct, n, confidence), extra


def _regression(joined: pd.DataFrame, confidence: float) -> tuple[float, tuple[float, float], dict]:
    y_true = pd.to_numeric(joined["label"], errors="coerce").to_numpy(dtype=float)
    y_pred = pd.to_numeric(joined["prediction"], errors="coerce").to_numpy(dtype=float)
    ok = np.isfinite(y_true) & np.isfinite(y_pred)
    if not ok.all():
        raise ValueError(f"{int((~ok).sum())} labels or predictions are not numbers (regression task)")
    err = y_pred - y_true
    squared, absolute = err**2, np.abs(err)
    rmse = math.sqrt(float(squared.mean()))
    low, high = _normal_mean_ci(squared, confidence)
    ci = (math.sqrt(max(low, 0.0)), math.sqrt(high) if math.isfinite(high) else float("inf"))
    mae_low, mae_high = _normal_mean_ci(absolute, confidence)
    extra = {"mae": float(absolute.mean()), "mae_ci_low": max(mae_low, 0.0), "mae_ci_high": mae_high}
    return rmse, ci, extra


def measure_performance(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    task: Task = "binary",
    *,
    version: str | None = None,
    min_labeled: int = 1,
    confidence: float = CONFIDENCE_LEVEL,
) -> Measurement:
    """Join delayed labels with logged predictions by request id and measure the model.

    Parameters
    ----------
    predictions
        Columns ``request_id``, ``prediction``, optionally ``score`` (probability of the
        positive class, for AUC), ``shadow``, ``error`` and ``version``. Shadow and errored
        rows are dropped; a request id logged twice counts once (the last answer).
    labels
        Columns ``request_id`` and ``label``; the last label of a request id wins.
    task
        ``binary`` / ``multiclass`` (primary metric accuracy, Wilson interval; F1, and AUC
        when scores exist) or ``regression`` (RMSE with a normal interval; MAE).
    version
        Only judge answers of this model version (e.g. production during a canary).
    min_labeled
        Below this many matched labels no value is reported (``value is None``).
    confidence
        Confidence level of the interval.

    Returns
    -------
    Measurement

    Examples
    --------
    >>> p = pd.DataFrame({"request_id": ["a", "b"], "prediction": [1, 0]})
    >>> l = pd.DataFrame({"request_id": ["a", "b"], "label": [1, 1]})
    >>> measure_performance(p, l).value
    0.5
    """
    if task not in PRIMARY_METRIC:
        raise ValueError(f"unknown task {task!r}; use binary, multiclass or regression")
    joined, n_predictions = _join(predictions, labels, version)
    n = len(joined)
    metric = PRIMARY_METRIC[task]
    if n == 0 or n < min_labeled:
        return Measurement(metric, None, None, None, n, n_predictions, {}, confidence, task)
    if task == "regression":
        value, (low, high), extra = _regression(joined, confidence)
    else:
        value, (low, high), extra = _classification(joined, task, confidence)
    return Measurement(metric, float(value), float(low), float(high), n, n_predictions, extra, confidence, task)


def performance_event(
    model: str,
    measurement: Measurement,
    baseline: float | None = None,
    version: str | int | None = None,
    *,
    source: str = SOURCE,
    event_id: str | None = None,
) -> CloudEvent:
    """Build the ``performance.measured`` event of a measurement.

    Parameters
    ----------
    model
        Model name (the event subject).
    measurement
        The result of :func:`measure_performance`; it must carry a value.
    baseline
        The metric at training time (from the registry), if known.
    version
        The model version that was measured.

    Raises
    ------
    ValueError
        When the measurement has no value (no or too few labels): there is nothing to report.
    """
    if measurement.value is None:
        raise ValueError(f"no performance to report for {model}: {measurement.n_labeled} labeled answers")
    data = PerformanceMeasured(
        metric=measurement.metric,
        value=measurement.value,
        baseline=baseline,
        n_labeled=measurement.n_labeled,
        ci_low=measurement.ci_low if measurement.ci_low is not None and math.isfinite(measurement.ci_low) else None,
        ci_high=measurement.ci_high if measurement.ci_high is not None and math.isfinite(measurement.ci_high) else None,
        version=None if version is None else str(version),
    ).model_dump(mode="json", exclude_none=True)
    data.update(
        task=measurement.task,
        higher_is_better=measurement.higher_is_better,
        confidence=measurement.confidence,
        n_predictions=measurement.n_predictions,
        metrics={k: v for k, v in measurement.extra.items() if math.isfinite(v)},
    )
    return new_event("performance.measured", model, data, source=source, id=event_id)
