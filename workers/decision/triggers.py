"""A model's signals and one small callable per retraining trigger.

Every trigger has the same signature, ``(policy, signals, now) -> TriggerResult | None``, and is
listed in :data:`TRIGGERS` in the order decisions report them. ``None`` means "not applicable"
(only ``manual`` uses it, when nobody asked).

The result and signal classes are slotted dataclasses, treated as immutable but not declared
``frozen``: a frozen dataclass sets each field through ``object.__setattr__``, which made its
constructor four times slower, and the decision worker builds about ten of them per model per
evaluation. Derive changed copies with :func:`dataclasses.replace`.

Parity with the seed article's ``RetrainingDecisionEngine``: with persistence off (k = n = 1) and
our optional fields absent, ``scheduled``, ``data_drift``, ``performance_drop`` and
``data_volume`` compute exactly what the seed computes -- the same comparisons (``>=`` for age
and volume, ``>`` for drift and drop), age in whole days (``timedelta.days``, which floors), the
same float arithmetic (``baseline - current``, no rounding) and the seed's defaults for absent
fields (drift score 0, accuracies 1.0, new samples 0).

Readings chosen where the seed is ambiguous or silent:

- A trigger's ``urgency`` is the urgency it has *or would have* if it fired, as the seed
  computes it regardless of ``triggered``; a decision's urgency only counts fired triggers.
- Times are UTC; a naive ISO time in a snapshot is read as UTC (the seed uses ``utcnow()``).
- ``drift_history`` holds the recent drift scores *including the current one* as its newest
  entry; ``drift_score`` defaults to that entry, and a snapshot where both are given and differ
  is rejected. ``data_drift`` fires when the current score exceeds the threshold *and* at least
  k of the last n observations did (with k = n = 1 that is the seed's rule).
- The ``data_drift`` urgency boundary 0.3 is the seed's constant: below it medium, at or above
  it high (the seed's ``"medium" if score < 0.3 else "high"``).
- ``min_labeled_samples`` only suppresses a drop when ``n_labeled`` is known; absent means the
  seed's behaviour. The confidence interval is ``accuracy_ci`` if given, else
  ``current +- z * accuracy_stderr``, else (when ``n_labeled`` is known and the metric is
  accuracy) the Wilson score interval of ``current`` over ``n_labeled`` labels. A drop is
  "within the interval" when the baseline lies inside it; the baseline is taken as exact.
- ``upstream_change`` compares versions/fingerprints only when both the trained and the current
  value are known. A removed or retyped column is breaking when the policy lists no features, or
  when it is one of ``[data] features``, the target or the time column; ``upstream_breaking``
  from the producer is breaking regardless.
"""

from __future__ import annotations

from functools import lru_cache

import math

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from config.policy import Policy

Urgency = Literal["none", "low", "medium", "high", "critical"]
URGENCIES: tuple[str, ...] = ("none", "low", "medium", "high", "critical")

HIGH_DRIFT_SCORE = 0.3
"""The seed's data-drift urgency boundary: below it medium, at or above it high."""
CONFIDENCE_LEVEL = 0.95
"""Level of the accuracy confidence interval built from a standard error or label count."""
CI_METRICS = frozenset({"accuracy"})
"""Metrics that are proportions of labels, for which a Wilson interval can be derived."""

# Suppression kinds (why a trigger that would fire does not).
NOT_PERSISTENT = "not_persistent"
INSUFFICIENT_LABELS = "insufficient_labels"
WITHIN_CONFIDENCE_INTERVAL = "within_confidence_interval"
BREAKING_UPSTREAM_CHANGE = "breaking_upstream_change"
BLOCKED_BY_UPSTREAM_CHANGE = "blocked_by_upstream_change"


def urgency_rank(urgency: str) -> int:
    """Position of ``urgency`` in ``none < low < medium < high < critical``."""
    try:
        return URGENCIES.index(urgency)
    except ValueError:
        raise ValueError(f"unknown urgency {urgency!r}; use one of {', '.join(URGENCIES)}") from None


def max_urgency(urgencies: Any) -> str:
    """Highest of ``urgencies`` (an iterable of names); ``"none"`` when it is empty."""
    return max(urgencies, key=urgency_rank, default="none")


def as_utc(value: datetime | None) -> datetime | None:
    """``value`` in UTC (a naive one is read as UTC); ``None`` stays ``None``."""
    if value is None:
        return None
    tz = value.tzinfo
    if tz is timezone.utc:
        return value
    if tz is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _number(value: float) -> float | int:
    """Show integral policy numbers as ints (``30`` rather than ``30.0``)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# --- results ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Suppression:
    """A trigger that would fire but is ignored, and why."""

    trigger: str
    kind: str
    """One of ``not_persistent``, ``insufficient_labels``, ``within_confidence_interval``,
    ``breaking_upstream_change``, ``blocked_by_upstream_change``."""
    reason: str


@dataclass(slots=True)
class Alert:
    """Something an operator must look at (it does not start training)."""

    name: str
    severity: Literal["info", "warning", "critical"]
    message: str
    trigger: str = ""


@dataclass(slots=True)
class TriggerResult:
    """One trigger's verdict: whether it fired, how urgently, why, on what value and threshold."""

    name: str
    triggered: bool
    urgency: str
    reason: str
    value: Any = None
    threshold: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    suppression: Suppression | None = None
    alert: Alert | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``name, triggered, urgency, reason, value, threshold`` + extras)."""
        out: dict[str, Any] = {
            "name": self.name,
            "triggered": self.triggered,
            "urgency": self.urgency,
            "reason": self.reason,
            "value": self.value,
            "threshold": self.threshold,
            "metadata": dict(self.metadata),
        }
        if self.suppression is not None:
            out["suppressed"] = {"kind": self.suppression.kind, "reason": self.suppression.reason}
        return out


# --- signals ----------------------------------------------------------------------------------
@dataclass(slots=True)
class UpstreamChanges:
    """Columns an upstream change added, removed or retyped."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    retyped: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("added", "removed", "retyped"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.retyped)


@dataclass(slots=True)
class ModelSignals:
    """The state of one model as the monitors last reported it.

    The first six fields are the seed article's monitoring fields; every other field is ours and
    optional. ``None`` means "not reported" and gives the seed's behaviour.

    Parameters
    ----------
    last_training_date
        When the production model was trained (``None``: unknown, the age rule cannot fire).
    drift_score, drifted_features
        Latest data-drift score and the features that drifted.
    current_accuracy, baseline_accuracy
        Live metric on recent labels and the metric at training time.
    new_samples_since_training
        Rows accumulated since the last training.
    drift_history
        Recent drift scores, oldest first, newest last (= ``drift_score``), for k-of-n persistence.
    n_labeled, accuracy_ci, accuracy_stderr, metric
        Labels behind ``current_accuracy`` and its uncertainty (interval or standard error);
        ``metric`` names it (a Wilson interval is derived only for accuracy).
    baseline_unknown
        The measurement of ``current_accuracy`` came with no baseline and none is known for the
        model: the drop cannot be judged (without it the seed's default baseline, 1.0, applies).
    concept_drift, concept_drift_metric
        PSI or JS distance of the prediction scores against the reference, and which of the two
        the monitor measured (``None``: the policy's).
    trained_feature_version, current_feature_version, trained_schema_fingerprint,
    current_schema_fingerprint, upstream_breaking, upstream_changes
        Upstream feature-store / schema state at training time and now.
    schedule_due
        A ``schedule.tick`` arrived since the last decision.
    manual_reason
        An operator asked for a retrain (``retrain trigger MODEL --reason ...``).
    drift_onset
        When the drift started, if the monitor knows (training may use data since then).
    now
        The time the snapshot describes (the offline ``decide`` uses it as the decision time).
    """

    last_training_date: datetime | None = None
    drift_score: float | None = None
    drifted_features: tuple[str, ...] = ()
    current_accuracy: float | None = None
    baseline_accuracy: float | None = None
    new_samples_since_training: int | None = None
    drift_history: tuple[float, ...] | None = None
    n_labeled: int | None = None
    accuracy_ci: tuple[float, float] | None = None
    accuracy_stderr: float | None = None
    metric: str | None = None
    concept_drift: float | None = None
    trained_feature_version: str | None = None
    current_feature_version: str | None = None
    trained_schema_fingerprint: str | None = None
    current_schema_fingerprint: str | None = None
    upstream_breaking: bool | None = None
    upstream_changes: UpstreamChanges | None = None
    schedule_due: bool | None = None
    manual_reason: str | None = None
    drift_onset: datetime | None = None
    now: datetime | None = None
    baseline_unknown: bool = False
    concept_drift_metric: str | None = None

    def __post_init__(self) -> None:
        for name in ("last_training_date", "drift_onset", "now"):
            object.__setattr__(self, name, as_utc(getattr(self, name)))
        object.__setattr__(self, "drifted_features", tuple(self.drifted_features))
        if self.drift_history is not None:
            history = tuple(float(s) for s in self.drift_history)
            object.__setattr__(self, "drift_history", history)
            if history and self.drift_score is not None and history[-1] != self.drift_score:
                raise ValueError(
                    f"drift_history's newest entry ({history[-1]}) must be the current "
                    f"drift_score ({self.drift_score}); list scores oldest first, current last"
                )
        if self.accuracy_ci is not None:
            low, high = self.accuracy_ci
            if low > high:
                raise ValueError(f"accuracy_ci: low {low} is above high {high}")
            object.__setattr__(self, "accuracy_ci", (float(low), float(high)))

    # Effective values, with the seed's defaults for absent fields.
    @property
    def effective_drift_score(self) -> float:
        """``drift_score``, else the newest of ``drift_history``, else the seed's 0."""
        if self.drift_score is not None:
            return self.drift_score
        if self.drift_history:
            return self.drift_history[-1]
        return 0

    def drift_observations(self) -> tuple[float, ...]:
        """Drift scores to test for persistence, newest last (just the current one if no history)."""
        return self.drift_history if self.drift_history else (self.effective_drift_score,)

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> ModelSignals:
        """Parse a snapshot (DESIGN.md's ``retrain decide --snapshot`` JSON object).

        Times are ISO 8601 (naive ones are UTC); unknown keys are errors, so a typo never
        silently falls back to a default. ``null`` means the same as an absent field.

        Raises
        ------
        ValueError
            One line naming every bad field, e.g. ``"drift_score: must be >= 0"``.

        Examples
        --------
        >>> s = ModelSignals.from_snapshot({"last_training_date": "2024-01-01T00:00:00Z",
        ...                                 "drift_score": 0.2, "now": "2024-02-01T00:00:00Z"})
        >>> s.drift_score, s.now.isoformat()
        (0.2, '2024-02-01T00:00:00+00:00')
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"snapshot must be a JSON object, not {type(data).__name__}")
        try:
            parsed = _Snapshot.model_validate(dict(data))
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None
        fields = parsed.model_dump(exclude={"model", "upstream_changes"})
        if parsed.upstream_changes is not None:
            fields["upstream_changes"] = UpstreamChanges(**parsed.upstream_changes.model_dump())
        fields["drifted_features"] = tuple(fields["drifted_features"] or ())
        for key in ("drift_history", "accuracy_ci"):
            if fields[key] is not None:
                fields[key] = tuple(fields[key])
        return cls(**fields)

    def to_snapshot(self) -> dict[str, Any]:
        """The inverse of :meth:`from_snapshot`: a JSON-ready dict of the reported fields."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if value is None or (key in ("drifted_features", "baseline_unknown") and not value):
                continue
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, dict):  # upstream_changes
                value = {k: list(v) for k, v in value.items()}
            out[key] = value
        return out


class _UpstreamChangesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    added: list[str] = []
    removed: list[str] = []
    retyped: list[str] = []


class _Snapshot(BaseModel):
    """Validation schema of a snapshot file (converted to :class:`ModelSignals`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, coerce_numbers_to_str=True)

    now: datetime | None = None
    model: str | None = None
    last_training_date: datetime
    drift_score: float | None = Field(None, ge=0)
    drifted_features: list[str] | None = None
    current_accuracy: float | None = None
    baseline_accuracy: float | None = None
    new_samples_since_training: int | None = Field(None, ge=0)
    drift_history: list[float] | None = None
    n_labeled: int | None = Field(None, ge=0)
    accuracy_ci: tuple[float, float] | None = None
    accuracy_stderr: float | None = Field(None, ge=0)
    metric: str | None = None
    concept_drift: float | None = Field(None, ge=0)
    trained_feature_version: str | None = None
    current_feature_version: str | None = None
    trained_schema_fingerprint: str | None = None
    current_schema_fingerprint: str | None = None
    upstream_breaking: bool | None = None
    upstream_changes: _UpstreamChangesIn | None = None
    schedule_due: bool | None = None
    manual_reason: str | None = None
    drift_onset: datetime | None = None
    baseline_unknown: bool = False
    concept_drift_metric: Literal["psi", "js"] | None = None

    @field_validator("now", "last_training_date", "drift_onset")
    @classmethod
    def _in_utc(cls, v: datetime | None) -> datetime | None:
        try:
            return as_utc(v)
        except OverflowError:  # 0001-01-01T00:00:00+05:00 is before year 1 in UTC
            raise ValueError("out of range once converted to UTC") from None

    @model_validator(mode="after")
    def _consistent(self) -> _Snapshot:
        if self.drift_history is not None and any(s < 0 for s in self.drift_history):
            raise ValueError("drift_history: drift scores must be >= 0")
        return self


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "snapshot"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif err["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if not msg.startswith(f"{loc}:") else msg)
    return "; ".join(parts)


# --- the triggers -------------------------------------------------------------------------------
TriggerFn = Callable[[Policy, ModelSignals, datetime], "TriggerResult | None"]


def scheduled(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult:
    """Model age in whole days ``>= max_model_age_days``, or a ``schedule.tick`` arrived -- low."""
    limit = _number(policy.triggers.max_model_age_days)
    due = bool(signals.schedule_due)
    if signals.last_training_date is None:
        age_days, by_age = None, False
        age_text = "training date unknown"
    else:
        age_days = (now - signals.last_training_date).days
        by_age = age_days >= limit
        age_text = f"model is {age_days} days old (limit: {limit})"
    if by_age:
        reason = age_text + (" and a schedule tick arrived" if due else "")
    elif due:
        reason = f"schedule tick arrived ({policy.triggers.schedule or 'external schedule'}); {age_text}"
    else:
        reason = age_text
    return TriggerResult(
        name="scheduled",
        triggered=by_age or due,
        urgency="low",
        reason=reason,
        value=age_days,
        threshold=limit,
        metadata={"age_days": age_days, "limit": limit, "schedule_due": due},
    )


def data_drift(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult:
    """Drift score ``> drift_threshold`` held in k of the last n observations -- medium/high."""
    rules = policy.triggers
    threshold = _number(rules.drift_threshold)
    score = signals.effective_drift_score
    k, n = rules.drift_persistence_k, rules.drift_persistence_n
    recent = signals.drift_observations()[-n:]
    held = sum(1 for s in recent if s > threshold)
    exceeds = score > threshold
    persistent = held >= k
    urgency = "medium" if score < HIGH_DRIFT_SCORE else "high"
    suppression = None
    if exceeds and persistent:
        reason = f"drift score {score:.3f} exceeds threshold {threshold}"
        if n > 1:
            reason += f" in {held} of the last {len(recent)} observations (need {k} of {n})"
    elif exceeds:
        reason = (
            f"drift score {score:.3f} exceeds threshold {threshold} but held in only {held} of "
            f"the last {len(recent)} observations (need {k} of {n})"
        )
        suppression = Suppression("data_drift", NOT_PERSISTENT, reason)
    else:
        reason = f"drift score {score:.3f} within threshold {threshold}"
    metadata: dict[str, Any] = {
        "drift_score": score,
        "drifted_features": list(signals.drifted_features),
        "persistence": {"k": k, "n": n, "held": held, "observed": len(recent)},
    }
    if signals.drift_onset is not None:
        metadata["drift_onset"] = signals.drift_onset.isoformat()
    return TriggerResult(
        name="data_drift",
        triggered=exceeds and persistent,
        urgency=urgency,
        reason=reason,
        value=score,
        threshold=threshold,
        metadata=metadata,
        suppression=suppression,
    )


@lru_cache(maxsize=8)
def _z(level: float) -> float:
    """Two-sided normal quantile for a confidence level (computed once per level)."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(correct: int, n: int, level: float = CONFIDENCE_LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion; equals ``scipy.stats.binomtest(...).proportion_ci(
    method="wilson")`` (tested), in closed form because the decision worker runs it per model
    per batch and scipy's object API costs ~0.7 ms a call.
    """
    z = _z(level)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def accuracy_interval(signals: ModelSignals) -> tuple[float, float] | None:
    """Confidence interval of ``current_accuracy`` at :data:`CONFIDENCE_LEVEL`, if derivable.

    ``accuracy_ci`` as given; else ``current +- z * accuracy_stderr``; else, for accuracy
    measured on ``n_labeled`` labels, the Wilson score interval (:func:`wilson_interval`).
    """
    if signals.accuracy_ci is not None:
        return signals.accuracy_ci
    current = signals.current_accuracy
    if current is None:
        return None
    if signals.accuracy_stderr is not None:
        z = _z(CONFIDENCE_LEVEL)
        return (current - z * signals.accuracy_stderr, current + z * signals.accuracy_stderr)
    metric = (signals.metric or "accuracy").lower()
    if signals.n_labeled and metric in CI_METRICS and 0.0 <= current <= 1.0:
        correct = round(current * signals.n_labeled)
        return wilson_interval(correct, signals.n_labeled)
    return None


def performance_drop(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult:
    """``baseline - current > performance_drop_threshold`` -- high above twice it, else medium.

    Suppressed (and said so) when fewer than ``min_labeled_samples`` labels stand behind
    ``current``, or when the baseline lies inside the current metric's confidence interval.
    """
    rules = policy.triggers
    threshold = _number(rules.performance_drop_threshold)
    if signals.baseline_unknown and signals.current_accuracy is not None:
        metric = signals.metric or "accuracy"
        return TriggerResult(
            name="performance_drop", triggered=False, urgency="medium",
            reason=(f"{metric} {signals.current_accuracy:.3f} measured with no baseline (none in the measurement, "
                    f"none among the production model's metrics): the drop cannot be judged"),
            value=None, threshold=threshold, metadata={"current": signals.current_accuracy, "baseline": None},
        )
    current = signals.current_accuracy if signals.current_accuracy is not None else 1.0
    baseline = signals.baseline_accuracy if signals.baseline_accuracy is not None else 1.0
    drop = baseline - current
    exceeds = drop > threshold
    urgency = "high" if drop > threshold * 2 else "medium"
    metadata: dict[str, Any] = {"drop": drop, "current": current, "baseline": baseline}
    if signals.n_labeled is not None:
        metadata["n_labeled"] = signals.n_labeled
    text = f"accuracy {baseline:.3f} -> {current:.3f} (drop {drop:.3f}, threshold {threshold})"
    suppression = None
    if exceeds:
        ci = accuracy_interval(signals) if rules.use_confidence_interval else None
        if ci is not None:
            metadata["confidence_interval"] = [ci[0], ci[1]]
        if signals.n_labeled is not None and signals.n_labeled < rules.min_labeled_samples:
            suppression = Suppression(
                "performance_drop",
                INSUFFICIENT_LABELS,
                f"{text} ignored: measured on {signals.n_labeled} labeled samples, "
                f"fewer than the minimum {rules.min_labeled_samples}",
            )
        elif ci is not None and ci[0] <= baseline <= ci[1]:
            suppression = Suppression(
                "performance_drop",
                WITHIN_CONFIDENCE_INTERVAL,
                f"{text} ignored: baseline {baseline:.3f} lies within the "
                f"{CONFIDENCE_LEVEL:.0%} confidence interval [{ci[0]:.3f}, {ci[1]:.3f}]",
            )
    reason = suppression.reason if suppression else (
        f"{text}: {'exceeds' if exceeds else 'within'} threshold"
    )
    return TriggerResult(
        name="performance_drop",
        triggered=exceeds and suppression is None,
        urgency=urgency,
        reason=reason,
        value=drop,
        threshold=threshold,
        metadata=metadata,
        suppression=suppression,
    )


def data_volume(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult:
    """New samples since training ``>= new_data_threshold`` -- low."""
    threshold = policy.triggers.new_data_threshold
    new = signals.new_samples_since_training if signals.new_samples_since_training is not None else 0
    return TriggerResult(
        name="data_volume",
        triggered=new >= threshold,
        urgency="low",
        reason=f"{new:,} new samples available (threshold: {threshold:,})",
        value=new,
        threshold=threshold,
        metadata={"new_samples": new},
    )


def concept_drift(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult:
    """Prediction-score shift (PSI or JS) ``> concept_drift_threshold`` -- high."""
    rules = policy.triggers
    threshold = _number(rules.concept_drift_threshold)
    metric = rules.concept_drift_metric
    value = signals.concept_drift
    measured = (signals.concept_drift_metric or metric).lower()
    if value is None:
        triggered, reason = False, "no concept-drift measurement"
    elif measured != metric:
        triggered = False
        reason = (f"prediction {measured.upper()} {value:.3f} not judged: the threshold {threshold} is for "
                  f"{metric.upper()} (concept_drift_metric)")
    else:
        triggered = value > threshold
        verb = "exceeds" if triggered else "within"
        reason = f"prediction {metric.upper()} {value:.3f} {verb} threshold {threshold}"
    return TriggerResult(
        name="concept_drift",
        triggered=triggered,
        urgency="high",
        reason=reason,
        value=value,
        threshold=threshold,
        metadata={"metric": metric},
    )


def _breaking_columns(policy: Policy, changes: UpstreamChanges) -> list[str]:
    """Removed/retyped columns the model depends on (all of them if the policy lists no features)."""
    used = set(policy.data.features)
    if used:
        used |= {policy.model.target, policy.data.time_column}
    return [
        f"{kind} {col}"
        for kind, cols in (("removed", changes.removed), ("retyped", changes.retyped))
        for col in cols
        if not used or col in used
    ]


UPSTREAM_UNCHANGED = "feature version and schema match the production model's training"


def upstream_change(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult:
    """Feature-store version or schema fingerprint differs from training -- medium.

    A breaking change (a used column removed or retyped, or ``upstream_breaking``) does not
    fire: it carries an :class:`Alert` and a suppression, and the policy blocks training.
    """
    if not policy.triggers.upstream_change:
        return TriggerResult("upstream_change", False, "medium", "disabled by policy ([triggers] upstream_change)")
    if (signals.current_feature_version is None and signals.current_schema_fingerprint is None
            and not signals.upstream_changes and not signals.upstream_breaking):
        # Nothing reported upstream (the common case): the answer of the general path below, built directly.
        return TriggerResult(
            name="upstream_change", triggered=False, urgency="medium", reason=UPSTREAM_UNCHANGED, value=[],
            metadata={"trained_feature_version": signals.trained_feature_version, "current_feature_version": None,
                      "trained_schema_fingerprint": signals.trained_schema_fingerprint,
                      "current_schema_fingerprint": None, "added": [], "removed": [], "retyped": [],
                      "breaking": False},
        )
    changed: list[str] = []
    pairs = (
        ("feature_version", signals.trained_feature_version, signals.current_feature_version),
        ("schema_fingerprint", signals.trained_schema_fingerprint, signals.current_schema_fingerprint),
    )
    for name, trained, current in pairs:
        if trained is not None and current is not None and trained != current:
            changed.append(name)
    changes = signals.upstream_changes or UpstreamChanges()
    if changes:
        changed.append("columns")
    breaking = _breaking_columns(policy, changes)
    if signals.upstream_breaking:
        breaking.append("reported breaking by the producer")
        if not changed:
            changed.append("breaking")
    metadata = {
        "trained_feature_version": signals.trained_feature_version,
        "current_feature_version": signals.current_feature_version,
        "trained_schema_fingerprint": signals.trained_schema_fingerprint,
        "current_schema_fingerprint": signals.current_schema_fingerprint,
        "added": list(changes.added),
        "removed": list(changes.removed),
        "retyped": list(changes.retyped),
        "breaking": bool(breaking),
    }
    details = []
    for name, trained, current in pairs:
        if name in changed:
            details.append(f"{name} {trained} -> {current}")
    if changes.added:
        details.append("added " + ", ".join(changes.added))
    summary = "; ".join(details) or "upstream change reported"
    suppression = alert = None
    if not changed:
        reason = UPSTREAM_UNCHANGED
    elif breaking:
        reason = (
            f"breaking upstream change ({'; '.join(breaking)}): training would not match the "
            "model's inputs, so it is not started; fix the features or the policy first"
        )
        suppression = Suppression("upstream_change", BREAKING_UPSTREAM_CHANGE, reason)
        alert = Alert("upstream_breaking_change", "critical", reason, "upstream_change")
    else:
        reason = f"compatible upstream change: {summary}"
    return TriggerResult(
        name="upstream_change",
        triggered=bool(changed) and not breaking,
        urgency="medium",
        reason=reason,
        value=changed,
        threshold=None,
        metadata=metadata,
        suppression=suppression,
        alert=alert,
    )


def manual(policy: Policy, signals: ModelSignals, now: datetime) -> TriggerResult | None:
    """An operator's ``retrain trigger MODEL --reason ...`` -- critical; ``None`` if not asked."""
    if not signals.manual_reason:
        return None
    return TriggerResult(
        name="manual",
        triggered=True,
        urgency="critical",
        reason=f"manual request: {signals.manual_reason}",
        value=signals.manual_reason,
        threshold=None,
    )


TRIGGERS: dict[str, TriggerFn] = {
    "scheduled": scheduled,
    "data_drift": data_drift,
    "performance_drop": performance_drop,
    "data_volume": data_volume,
    "concept_drift": concept_drift,
    "upstream_change": upstream_change,
    "manual": manual,
}
"""Every trigger, in report order. Each is ``(policy, signals, now) -> TriggerResult | None``."""
