"""Offline replay of a retraining policy over historical data: would it have kept the model good?

:func:`run_backtest` walks a labeled, time-stamped data set forward in batches with the same
core functions the workers run, and no server:

1. **Warm-up.** The first ``warmup`` batches train the initial model, as the pipeline would:
   the policy's window (``[data] window``) ending at the last warm-up batch, a time holdout
   (:func:`~workers.training.data.time_holdout`), :func:`~workers.training.fit.train_candidate`
   on the older part. Its *baseline* is the primary metric on the holdout (what the registry
   records as the model's metric) and its drift reference is
   :func:`~events.monitors.drift.build_profile` of the training rows.
2. **Each later batch**, in time order:

   * *live score* -- the serving model predicts the batch; its primary metric on the batch's
     labels (accuracy for classifiers, R² for regression, or ``[gate] primary_metric``) is the
     batch's live accuracy. This is measured *before* any retraining on the batch.
   * *monitoring snapshot*, the way the monitors build it: data drift of the batch against the
     serving model's reference profile (:func:`~events.monitors.drift.check_drift` with the
     policy's ``[drift]`` settings; the drift history for k-of-n persistence restarts with each
     new production model, as the decision worker does), performance = live accuracy on
     ``n_labeled`` labels against the model's baseline, volume = rows newer than the serving
     model's training data, age from the batch times, ``schedule.tick`` for an interval
     ``[triggers] schedule`` and, when asked for (``concept_drift=True``; no built-in monitor
     publishes it), prediction-score drift via :func:`~events.monitors.drift.prediction_drift`
     against the model's scores on its holdout.
   * *decision* -- :func:`~workers.decision.policy.evaluate` then
     :func:`~workers.decision.policy.apply_guards` at ``now`` = the batch's end. The debounce is
     taken as satisfied (one decision per batch); nothing is ever in flight (the replay trains
     synchronously); cooldown and budget see the start times of every training, including the
     initial one.
   * *pipeline* on ``start`` -- the window of rows seen so far, validated against the serving
     model's training schema (:func:`~workers.training.validate.validate_for_policy`), split by
     time, trained (search seeded with production's hyperparameters) and gated against the
     serving model on the holdout (:func:`~workers.gate.checks.run_gate`). A passing candidate
     serves from the next batch on; the rollout phases are not replayed (there is no live
     traffic to split). A ``start`` on the final batch is reported but not run: no later batch
     would show its effect.

Three baselines replay the same batches with the same training code but no decision, no
validation and no gate: ``never`` keeps the initial model, ``periodic`` retrains when the
model is ``max_model_age_days`` old (or every ``k`` batches, or any duration -- see
:func:`run_backtest`'s ``periodic``), ``every_batch`` retrains after every batch but the last.

Nothing is fitted twice: fits are cached by their training rows and seed hyperparameters, so
the initial model is shared by all strategies and a baseline retraining on the same window as
the policy reuses the policy's fit; predictions are cached per (model, batch).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from config.durations import format_duration, parse_duration
from config.policy import Policy
from events.monitors.drift import ReferenceProfile, build_profile, check_drift, prediction_drift
from workers.decision.policy import GuardState, apply_guards, evaluate
from workers.decision.triggers import ModelSignals
from workers.gate.checks import GateReport, metric, model_columns, primary_metric_name, run_gate
from workers.training.data import DataError, time_holdout
from workers.training.fit import FitResult, TrainingError, train_candidate
from workers.training.validate import validate_for_policy

DEFAULT_BATCH = timedelta(days=1)
"""Batch length when neither a duration nor a number of batches is given."""
DEFAULT_WARMUP = 1
"""Batches that train the initial model."""
DRIFT_HISTORY_LEN = 50
"""Drift scores kept for k-of-n persistence (the decision worker keeps as many)."""
GUARD_MEMORY = timedelta(days=2)
"""Training start times older than this no longer matter to the budget (a rolling day)."""
STRATEGIES = ("never", "periodic", "every_batch")
"""The baselines, in report order."""
MIN_SCORED_REGRESSION = 2
"""R² needs at least two labeled rows in a batch."""
DEFAULT_THREADS = 1
"""Native (BLAS/OpenMP) threads during the replay: many small sequential fits run fastest on
one thread; idle threads spinning between them cost up to 10x on a busy two-core machine."""


class BacktestError(ValueError):
    """Data or settings the replay cannot use; ``str()`` is one line naming the problem."""


# ------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """One step of the replay: rows ``[lo, hi)`` of the time-sorted frame, times ``[start, end)``."""

    index: int
    start: pd.Timestamp
    end: pd.Timestamp
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        return self.hi - self.lo


def prepare_frame(frame: pd.DataFrame, policy: Policy) -> pd.DataFrame:
    """The frame sorted by the policy's time column (as UTC), rows without a time dropped.

    Raises
    ------
    BacktestError
        No time column, no target column, an unparseable time column, or no labeled rows.
    """
    time_col, target = policy.data.time_column, policy.model.target
    if time_col not in frame.columns:
        raise BacktestError(f"data has no time column '{time_col}' (from [data] time_column)")
    if target not in frame.columns:
        raise BacktestError(f"data has no target column '{target}' (from [model] target)")
    times = frame[time_col]
    textual = times.dtype == object or pd.api.types.is_string_dtype(times)
    try:
        times = pd.to_datetime(times, utc=True, format="mixed" if textual else None)
    except (ValueError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BacktestError(f"time column '{time_col}' is not a timestamp ({reason})") from None
    out = frame.assign(**{time_col: times})
    out = out.loc[out[time_col].notna()]
    if not out[target].notna().any():
        raise BacktestError(f"target column '{target}' has no labeled rows")
    return out.sort_values(time_col, kind="stable").reset_index(drop=True)


def split_batches(
    times: pd.Series, *, batch: timedelta | None = None, batches: int | None = None
) -> list[Batch]:
    """Cut sorted UTC times into batches: fixed-length ones or ``batches`` equal time spans.

    Fixed-length batches are aligned to multiples of ``batch`` since the Unix epoch (so
    ``"1d"`` batches are calendar days in UTC); equal spans divide ``[first, last]`` time.
    Empty batches (gaps in the data) are left out; ``index`` counts the non-empty ones.

    Examples
    --------
    >>> t = pd.Series(pd.to_datetime(["2024-01-01 05:00", "2024-01-01 20:00", "2024-01-03 01:00"], utc=True))
    >>> [(b.start.day, b.rows) for b in split_batches(t, batch=timedelta(days=1))]
    [(1, 2), (3, 1)]
    """
    if len(times) == 0:
        raise BacktestError("no rows with a time")
    first, last = times.iloc[0], times.iloc[-1]
    if batches is not None:
        if batches < 1:
            raise BacktestError("--batches must be at least 1")
        span = last - first
        if span <= pd.Timedelta(0):
            raise BacktestError("every row has the same time: cannot cut it into batches")
        length = span / batches
        origin = first
        idx = np.minimum(((times - origin) / length).to_numpy(dtype=float).astype(np.int64), batches - 1)
    else:
        length = pd.Timedelta(DEFAULT_BATCH if batch is None else batch)
        if length <= pd.Timedelta(0):
            raise BacktestError("batch length must be positive")
        epoch = pd.Timestamp(0, tz="UTC")
        origin = epoch + ((first - epoch) // length) * length
        idx = ((times - origin) // length).to_numpy(dtype=np.int64)
    keys, starts = np.unique(idx, return_index=True)
    bounds = list(starts) + [len(times)]
    out = []
    for i, key in enumerate(keys):
        start = origin + int(key) * length
        end = start + length
        if batches is not None and int(key) == batches - 1:
            end = max(end, last + pd.Timedelta(microseconds=1))  # the last row lies inside
        out.append(Batch(i, start, end, int(bounds[i]), int(bounds[i + 1])))
    return out


# -------------------------------------------------------------------------------------- models
@dataclass
class TrainedFit:
    """One fit on one window (shared by every strategy that trains on the same rows)."""

    key: tuple[Any, ...]
    fit: FitResult
    train: pd.DataFrame
    holdout: pd.DataFrame
    trained_at: pd.Timestamp
    data_hi: int
    """Rows ``[0, data_hi)`` of the sorted frame existed when it was trained."""
    baseline: float
    """Primary metric on its own holdout (the registry's metric of the version)."""
    columns: list[str]
    _profile: ReferenceProfile | None = None
    _reference_scores: np.ndarray | None = None

    @property
    def pipeline(self) -> Any:
        return self.fit.pipeline


@dataclass
class Attempt:
    """One pipeline run of the policy: its outcome and what it cost."""

    status: str
    """``promoted``, ``gate_failed``, ``validation_failed`` or ``training_failed``."""
    detail: str = ""
    fit: TrainedFit | None = None
    gate: GateReport | None = None
    seconds: float = 0.0


@dataclass
class StrategyResult:
    """What one strategy achieved over the evaluated batches."""

    name: str
    accuracy: float | None
    retrains: int
    trainings_attempted: int
    compute_seconds: float
    per_batch: list[float | None] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The DESIGN.md keys ``accuracy`` and ``retrains``, plus attempts and compute time."""
        return {
            "accuracy": self.accuracy,
            "retrains": self.retrains,
            "trainings_attempted": self.trainings_attempted,
            "compute_seconds": round(self.compute_seconds, 4),
        }


@dataclass
class BacktestResult:
    """The policy's replay, the three baselines and the per-batch timeline."""

    model: str
    metric: str
    policy: StrategyResult
    baselines: dict[str, StrategyResult]
    timeline: list[dict[str, Any]]
    gate_rejections: int
    validation_failures: int
    training_failures: int
    rows: int
    warmup: int
    batch: str | None
    periodic: str
    elapsed_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def accuracy(self) -> float | None:
        return self.policy.accuracy

    @property
    def retrains(self) -> int:
        return self.policy.retrains

    def to_dict(self) -> dict[str, Any]:
        """DESIGN.md's ``{"accuracy", "retrains", "baselines": {...}}`` plus the details."""
        return {
            "accuracy": self.policy.accuracy,
            "retrains": self.policy.retrains,
            "baselines": {name: s.to_dict() for name, s in self.baselines.items()},
            "model": self.model,
            "metric": self.metric,
            "trainings_attempted": self.policy.trainings_attempted,
            "gate_rejections": self.gate_rejections,
            "validation_failures": self.validation_failures,
            "training_failures": self.training_failures,
            "compute_seconds": round(self.policy.compute_seconds, 4),
            "batches": len(self.timeline),
            "warmup": self.warmup,
            "batch": self.batch,
            "periodic": self.periodic,
            "rows": self.rows,
            "elapsed_seconds": round(self.elapsed_seconds, 3),
            "notes": list(self.notes),
            "timeline": self.timeline,
        }


def _weighted_mean(values: list[float | None], weights: list[int]) -> float | None:
    pairs = [(v, w) for v, w in zip(values, weights) if v is not None and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


class _Replay:
    """The shared machinery: windows, cached fits, cached live scores."""

    def __init__(self, frame: pd.DataFrame, policy: Policy, batches: list[Batch], metric_name: str):
        self.frame = frame
        self.policy = policy
        self.batches = batches
        self.metric_name = metric_name
        self.times = frame[policy.data.time_column]
        self.target = policy.model.target
        self._fits: dict[tuple[Any, ...], TrainedFit] = {}
        self._failed: dict[tuple[Any, ...], str] = {}
        self._scores: dict[tuple[tuple[Any, ...], int], tuple[float | None, int]] = {}

    # --- windows and fits ---------------------------------------------------------------------
    def window(self, now: pd.Timestamp, hi: int) -> tuple[int, int]:
        """Rows of the training window: seen so far (``< hi``) and newer than ``now - window``."""
        start = now - pd.Timedelta(self.policy.data.window)
        return int(self.times.searchsorted(start, side="left")), hi

    def _seed(self, production: TrainedFit | None) -> dict[str, Any]:
        if production is None:
            return {}
        space = self.policy.training.search.space
        return {k: v for k, v in production.fit.best_params.items() if k in space}

    def fit(self, now: pd.Timestamp, hi: int, production: TrainedFit | None) -> TrainedFit:
        """Split the window at ``now`` by time and train on its older part (cached).

        Raises ``DataError`` or ``TrainingError`` when the window cannot be trained on.
        """
        lo, hi = self.window(now, hi)
        seed = self._seed(production)
        key = (lo, hi, tuple(sorted((k, repr(v)) for k, v in seed.items())))
        if key in self._fits:
            return self._fits[key]
        if key in self._failed:
            raise TrainingError(self._failed[key])
        try:
            split = time_holdout(self.frame.iloc[lo:hi], self.policy.data.time_column,
                                 self.policy.data.holdout_fraction)
            result = train_candidate(split.train, self.policy, production_hyperparams=seed or None)
        except (DataError, TrainingError, ValueError) as exc:
            self._failed[key] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TrainingError(self._failed[key]) from None
        columns = model_columns(result.pipeline, split.test, self.target, [self.policy.data.time_column])
        trained = TrainedFit(key, result, split.train, split.test, now, hi, float("nan"), columns)
        baseline = self._metric(trained, split.test)[0]
        trained.baseline = baseline if baseline is not None else float("nan")
        self._fits[key] = trained
        return trained

    # --- scoring ------------------------------------------------------------------------------
    def _metric(self, model: TrainedFit, rows: pd.DataFrame) -> tuple[float | None, int]:
        pred = np.asarray(model.pipeline.predict(rows[model.columns]))
        labeled = rows[self.target].notna().to_numpy()
        n = int(labeled.sum())
        if n == 0 or (self.policy.model.task == "regression" and n < MIN_SCORED_REGRESSION):
            return None, n
        y = rows[self.target].to_numpy()[labeled]
        proba = None
        labels = np.unique(np.concatenate([np.unique(y), np.asarray(getattr(model.pipeline, "classes_", []))]))
        if self.metric_name == "roc_auc":
            proba = np.asarray(model.pipeline.predict_proba(rows[model.columns]))[labeled]
            labels = np.asarray(model.pipeline.classes_)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = metric(self.metric_name, y, pred[labeled], proba, labels)
        except ValueError:
            value = float("nan")
        return _finite(value), n

    def live(self, model: TrainedFit, batch: Batch) -> tuple[float | None, int]:
        """Primary metric of ``model`` on ``batch``'s labels, and how many labels (cached)."""
        key = (model.key, batch.index)
        if key not in self._scores:
            self._scores[key] = self._metric(model, self.frame.iloc[batch.lo:batch.hi])
        return self._scores[key]

    def _prediction_scores(self, model: TrainedFit, rows: pd.DataFrame) -> np.ndarray:
        pipe = model.pipeline
        if self.policy.model.task == "binary" and hasattr(pipe, "predict_proba"):
            return np.asarray(pipe.predict_proba(rows[model.columns]))[:, -1]
        return np.asarray(pipe.predict(rows[model.columns]))

    def concept_drift(self, model: TrainedFit, batch: Batch) -> float | None:
        """Prediction-score shift of the batch against the model's holdout scores."""
        if model._reference_scores is None:
            model._reference_scores = self._prediction_scores(model, model.holdout)
        rows = self.frame.iloc[batch.lo:batch.hi]
        value, _ = prediction_drift(model._reference_scores, self._prediction_scores(model, rows),
                                    self.policy.triggers.concept_drift_metric)
        return _finite(float(value))

    def profile(self, model: TrainedFit) -> ReferenceProfile:
        """The model's drift reference, built from its training rows like the pipeline does."""
        if model._profile is None:
            exclude = [self.target, self.policy.data.time_column]
            model._profile = build_profile(model.train, categorical=self.policy.data.categorical, exclude=exclude)
        return model._profile


# ------------------------------------------------------------------------------------ baselines
def _periodic_rule(periodic: timedelta | int) -> Any:
    if isinstance(periodic, int):
        return lambda i, now, model: (i + 1) % periodic == 0
    period = pd.Timedelta(periodic)
    return lambda i, now, model: now - model.trained_at >= period


def _run_baseline(replay: _Replay, name: str, initial: TrainedFit, evaluated: list[Batch], rule: Any) -> StrategyResult:
    model, retrains, attempted, seconds = initial, 0, 0, 0.0
    per_batch: list[float | None] = []
    for i, batch in enumerate(evaluated):
        value, _ = replay.live(model, batch)
        per_batch.append(value)
        if i == len(evaluated) - 1 or not rule(i, batch.end, model):
            continue
        attempted += 1
        try:
            new = replay.fit(batch.end, batch.hi, model)
        except TrainingError:
            continue
        seconds += new.fit.fit_seconds
        model, retrains = new, retrains + 1
    accuracy = _weighted_mean(per_batch, [b.rows for b in evaluated])
    return StrategyResult(name, accuracy, retrains, attempted, seconds, per_batch)


# ------------------------------------------------------------------------------------ the policy
def _attempt(replay: _Replay, production: TrainedFit, batch: Batch) -> Attempt:
    """One pipeline run like the workers': validate, split, train, gate."""
    policy = replay.policy
    started = time.perf_counter()
    lo, hi = replay.window(batch.end, batch.hi)
    window = replay.frame.iloc[lo:hi]
    validation = validate_for_policy(window, policy, production.fit.schema)
    if not validation.passed:
        return Attempt("validation_failed", validation.summary(), seconds=time.perf_counter() - started)
    validated = time.perf_counter()
    try:
        fit = replay.fit(batch.end, batch.hi, production)
    except TrainingError as exc:
        return Attempt("training_failed", str(exc), seconds=time.perf_counter() - started)
    gate_started = time.perf_counter()
    report = run_gate(fit.pipeline, production.pipeline, fit.holdout, policy, validation=validation)
    # The fit's own time counts even when another strategy's identical fit was reused.
    seconds = (validated - started) + fit.fit.fit_seconds + (time.perf_counter() - gate_started)
    if report.passed:
        return Attempt("promoted", "gate passed", fit, report, seconds)
    return Attempt("gate_failed", "gate failed: " + ", ".join(report.failed), fit, report, seconds)


def _schedule_interval(policy: Policy, notes: list[str]) -> pd.Timedelta | None:
    spec = policy.triggers.schedule
    if not spec:
        return None
    try:
        return pd.Timedelta(parse_duration(spec))
    except ValueError:
        notes.append(f"[triggers] schedule '{spec}' is a cron expression: its ticks are not replayed")
        return None


def _run_policy(replay: _Replay, initial: TrainedFit, evaluated: list[Batch], t0: pd.Timestamp,
                concept: bool, notes: list[str]) -> tuple[StrategyResult, list[dict[str, Any]], dict[str, int]]:
    policy = replay.policy
    interval = _schedule_interval(policy, notes)
    model, version = initial, 1
    history: list[float] = []
    trainings: list[pd.Timestamp] = [t0]
    retrains, seconds = 0, 0.0
    counts = {"attempted": 0, "gate_failed": 0, "validation_failed": 0, "training_failed": 0}
    per_batch: list[float | None] = []
    timeline: list[dict[str, Any]] = []
    previous_end = t0
    for i, batch in enumerate(evaluated):
        now = batch.end
        value, n_labeled = replay.live(model, batch)
        per_batch.append(value)
        rows = replay.frame.iloc[batch.lo:batch.hi]
        drift = check_drift(replay.profile(model), rows, policy.drift)
        history = (history + [float(drift.drift_score)])[-DRIFT_HISTORY_LEN:]
        concept_value = replay.concept_drift(model, batch) if concept else None
        due = None
        if interval is not None:
            due = (now - t0) // interval > (previous_end - t0) // interval
        previous_end = now
        signals = ModelSignals(
            last_training_date=model.trained_at.to_pydatetime(),
            drift_score=float(drift.drift_score),
            drifted_features=tuple(drift.drifted_features),
            drift_history=tuple(history),
            current_accuracy=value,
            baseline_accuracy=_finite(model.baseline),
            n_labeled=n_labeled,
            metric=replay.metric_name,
            new_samples_since_training=batch.hi - model.data_hi,
            concept_drift=concept_value,
            schedule_due=due,
            now=now.to_pydatetime(),
        )
        decision = evaluate(policy, signals, now.to_pydatetime())
        recent = tuple(t.to_pydatetime() for t in trainings if now - t < GUARD_MEMORY)
        guard = GuardState(last_training=trainings[-1].to_pydatetime(), recent_trainings=recent)
        guarded = apply_guards(decision, guard, policy, now.to_pydatetime())
        row: dict[str, Any] = {
            "batch": batch.index,
            "start": batch.start.isoformat(),
            "end": batch.end.isoformat(),
            "rows": batch.rows,
            "n_labeled": n_labeled,
            "accuracy": value,
            "model_version": version,
            "model_age_days": round((now - model.trained_at) / pd.Timedelta(days=1), 3),
            "drift_score": float(drift.drift_score),
            "drifted_features": list(drift.drifted_features),
            "concept_drift": concept_value,
            "new_samples": batch.hi - model.data_hi,
            "action": guarded.action,
            "urgency": decision.urgency,
            "triggers": [t.name for t in decision.fired],
            "reason": guarded.reason,
            "trained": False,
            "gate_passed": None,
            "gate_failed": [],
            "promoted": False,
        }
        if guarded.action == "start":
            if i == len(evaluated) - 1:
                row["reason"] += " (not run: no later batch to serve)"
            else:
                trainings.append(now)
                counts["attempted"] += 1
                attempt = _attempt(replay, model, batch)
                seconds += attempt.seconds
                row["trained"] = attempt.status in ("promoted", "gate_failed")
                row["outcome"] = attempt.status
                row["outcome_detail"] = attempt.detail
                if attempt.gate is not None:
                    row["gate_passed"] = attempt.gate.passed
                    row["gate_failed"] = attempt.gate.failed
                if attempt.status == "promoted":
                    assert attempt.fit is not None
                    model, version, retrains = attempt.fit, version + 1, retrains + 1
                    history = []  # signals measured against the old model no longer apply
                    row["promoted"] = True
                else:
                    counts[attempt.status] += 1
        timeline.append(row)
    accuracy = _weighted_mean(per_batch, [b.rows for b in evaluated])
    result = StrategyResult("policy", accuracy, retrains, counts["attempted"], seconds, per_batch)
    return result, timeline, counts


# ------------------------------------------------------------------------------------ entry point
def run_backtest(
    frame: pd.DataFrame,
    policy: Policy,
    *,
    batch: timedelta | str | None = None,
    batches: int | None = None,
    warmup: int = DEFAULT_WARMUP,
    periodic: timedelta | int | str | None = None,
    concept_drift: bool = False,
    threads: int | None = DEFAULT_THREADS,
) -> BacktestResult:
    """Replay ``policy`` over ``frame`` batch by batch, against three baseline strategies.

    Parameters
    ----------
    frame
        Historical rows with the policy's time column and target (labels may be missing on
        some rows: they are scored on the labeled ones only).
    policy
        The model's policy; ``[model]``, ``[data]``, ``[triggers]``, ``[drift]``,
        ``[training]`` and ``[gate]`` are read.
    batch, batches
        Batch length (a duration, default one day, batches aligned to the Unix epoch) or a
        number of equal time spans; give at most one.
    warmup
        Leading batches that train the initial model (not scored).
    periodic
        When the ``periodic`` baseline retrains: a duration (``"7d"``; the model's age), an
        int ``k`` (after every k-th evaluated batch); default ``max_model_age_days``.
    concept_drift
        Measure prediction-score drift per batch for the ``concept_drift`` trigger. Off by
        default, as in a deployment without an external concept-drift monitor; the reference
        is the model's scores on its own holdout, so a small holdout makes the PSI noisy.
    threads
        Native thread pools (BLAS, OpenMP) are limited to this many during the replay; None
        leaves the libraries' defaults (worth it for a few large fits on many cores).

    Returns
    -------
    BacktestResult
        ``to_dict()`` is DESIGN.md's ``{"accuracy", "retrains", "baselines": {"never",
        "periodic", "every_batch"}}`` with ``trainings_attempted``, ``gate_rejections``,
        compute seconds and the per-batch ``timeline``.

    Raises
    ------
    BacktestError
        Missing columns, too few batches, an initial window that cannot be trained on.
    workers.gate.checks.GateError, workers.training.fit.TrainingError
        A gate or estimator configuration that cannot work at all.

    Examples
    --------
    >>> result = run_backtest(frame, policy, batch="1d", warmup=3)      # doctest: +SKIP
    >>> result.accuracy > result.baselines["never"].accuracy             # doctest: +SKIP
    True
    """
    if threads is None:
        return _run(frame, policy, batch, batches, warmup, periodic, concept_drift)
    with threadpool_limits(limits=threads):
        return _run(frame, policy, batch, batches, warmup, periodic, concept_drift)


def _run(frame: pd.DataFrame, policy: Policy, batch: timedelta | str | None, batches: int | None, warmup: int,
         periodic: timedelta | int | str | None, concept_drift: bool) -> BacktestResult:
    started = time.perf_counter()
    if batch is not None and batches is not None:
        raise BacktestError("give a batch length or a number of batches, not both")
    if isinstance(batch, str):
        try:
            batch = parse_duration(batch)
        except ValueError as exc:
            raise BacktestError(f"batch: {exc}") from None
    if warmup < 1:
        raise BacktestError("warmup must be at least 1 batch")
    metric_name = primary_metric_name(policy.model.task, policy.gate)  # GateError if unusable
    periodic_rule, periodic_text = _periodic(periodic, policy)
    frame = prepare_frame(frame, policy)
    cut = split_batches(frame[policy.data.time_column], batch=batch, batches=batches)
    if len(cut) <= warmup:
        raise BacktestError(
            f"{len(cut)} non-empty batches: need more than the {warmup} warm-up batch(es) "
            "(use a shorter --batch, more --batches or a smaller --warmup)"
        )
    replay = _Replay(frame, policy, cut, metric_name)
    t0 = cut[warmup - 1].end
    try:
        initial = replay.fit(t0, cut[warmup - 1].hi, None)
    except TrainingError as exc:
        lo, hi = replay.window(t0, cut[warmup - 1].hi)
        raise BacktestError(f"cannot train the initial model on the warm-up window ({hi - lo} rows): {exc}") from None
    evaluated = cut[warmup:]
    notes: list[str] = []
    if policy.data.window_from_drift_onset:
        notes.append("[data] window_from_drift_onset: the drift onset is not known offline; the full window is used")
    result, timeline, counts = _run_policy(replay, initial, evaluated, t0, concept_drift, notes)
    baselines = {
        "never": _run_baseline(replay, "never", initial, evaluated, lambda i, now, model: False),
        "periodic": _run_baseline(replay, "periodic", initial, evaluated, periodic_rule),
        "every_batch": _run_baseline(replay, "every_batch", initial, evaluated, lambda i, now, model: True),
    }
    for row, *values in zip(timeline, *(b.per_batch for b in baselines.values())):
        row["baselines"] = dict(zip(baselines, values))
    return BacktestResult(
        model=policy.model.name,
        metric=metric_name,
        policy=result,
        baselines=baselines,
        timeline=timeline,
        gate_rejections=counts["gate_failed"],
        validation_failures=counts["validation_failed"],
        training_failures=counts["training_failed"],
        rows=int(len(frame)),
        warmup=warmup,
        batch=None if batches is not None else format_duration(
            pd.Timedelta(DEFAULT_BATCH if batch is None else batch).to_pytimedelta()),
        periodic=periodic_text,
        elapsed_seconds=time.perf_counter() - started,
        notes=notes,
    )


def _periodic(periodic: timedelta | int | str | None, policy: Policy) -> tuple[Any, str]:
    """The periodic baseline's rule and its description (``"30d"`` or ``"every 4 batches"``)."""
    if periodic is None:
        periodic = timedelta(days=policy.triggers.max_model_age_days)
    elif isinstance(periodic, str):
        text = periodic.strip()
        if text.isdigit():
            periodic = int(text)
        else:
            try:
                periodic = parse_duration(text)
            except ValueError as exc:
                raise BacktestError(f"periodic: {exc} or a whole number of batches") from None
    if isinstance(periodic, bool) or (isinstance(periodic, int) and periodic < 1):
        raise BacktestError("periodic: a number of batches must be at least 1")
    if isinstance(periodic, int):
        return _periodic_rule(periodic), f"every {periodic} batches"
    return _periodic_rule(periodic), format_duration(periodic)


__all__ = [
    "Batch",
    "BacktestError",
    "BacktestResult",
    "StrategyResult",
    "prepare_frame",
    "run_backtest",
    "split_batches",
]
