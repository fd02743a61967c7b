"""Evaluate a model's signals against its policy, then apply the guards around retraining.

:func:`evaluate` runs every trigger in :data:`~workers.decision.triggers.TRIGGERS` and returns a
:class:`Decision`: retrain or not, the urgency (the highest of the fired triggers), every
trigger's verdict, the triggers that would fire but are suppressed (and why), and alerts.

The guards are pure functions over a small :class:`GuardState` that the decision worker
persists per model: :func:`debounce`, :func:`single_flight`, :func:`budget` and
:func:`cooldown`. :func:`apply_guards` runs them in that order and says whether to ``start`` a
pipeline (on :func:`queue_for` its urgency), ``defer`` the decision (re-decide at ``until``, or
after the in-flight pipeline ends), ``suppress`` it (no training; write a suppressed record) or
do nothing (``none``: no trigger fired, nothing to record).

A breaking upstream change blocks *every* automatic trigger, not only ``upstream_change``: a
removed or retyped input also shows up as drift, and retraining on it would build a model on the
broken schema. Only an operator's ``manual`` request still goes through (the pipeline's data
validation is the next line of defence).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from config.durations import format_duration
from config.policy import Policy
from workers.decision.triggers import (
    BLOCKED_BY_UPSTREAM_CHANGE,
    BREAKING_UPSTREAM_CHANGE,
    TRIGGERS,
    Alert,
    ModelSignals,
    Suppression,
    TriggerResult,
    as_utc,
    max_urgency,
    urgency_rank,
)

QUEUE_HIGH = "training.high"
QUEUE_LOW = "training.low"
BUDGET_WINDOW = timedelta(days=1)
"""The rolling window of ``[triggers] max_trainings_per_day``."""
DEBOUNCE_BYPASS_URGENCY = "critical"
"""Decisions at least this urgent (a manual request) skip the debounce quiet period."""
COOLDOWN_OVERRIDE_URGENCY = "high"
"""Decisions at least this urgent are not held back by the cooldown."""
MANUAL_TRIGGERS = frozenset({"manual"})
"""Triggers a breaking upstream change does not block (an operator asked explicitly)."""

Action = Literal["start", "defer", "suppress", "none"]



def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


# --- the decision -------------------------------------------------------------------------------
@dataclass(slots=True)
class Decision:
    """The policy's answer for one model at one time."""

    model: str
    now: datetime
    retrain: bool
    urgency: str
    triggers: tuple[TriggerResult, ...]
    suppressed: tuple[Suppression, ...] = ()
    alerts: tuple[Alert, ...] = ()
    drift_onset: datetime | None = None

    @property
    def fired(self) -> tuple[TriggerResult, ...]:
        """The triggers that fired (after suppression)."""
        return tuple(t for t in self.triggers if t.triggered)

    @property
    def reason(self) -> str:
        """One line saying why: the fired triggers, else what was suppressed, else nothing fired."""
        if self.fired:
            return "; ".join(f"{t.name} ({t.urgency}): {t.reason}" for t in self.fired)
        if self.suppressed:
            return "suppressed: " + "; ".join(f"{s.trigger}: {s.reason}" for s in self.suppressed)
        return "no trigger fired"

    def trigger(self, name: str) -> TriggerResult:
        """The verdict of trigger ``name`` (``KeyError`` if it was not evaluated)."""
        for t in self.triggers:
            if t.name == name:
                return t
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: DESIGN.md's ``{"retrain", "urgency", "triggers": [...]}`` plus extras."""
        return {
            "model": self.model,
            "now": self.now.isoformat(),
            "retrain": self.retrain,
            "urgency": self.urgency,
            "reason": self.reason,
            "triggers": [t.to_dict() for t in self.triggers],
            "suppressed": [
                {"trigger": s.trigger, "kind": s.kind, "reason": s.reason} for s in self.suppressed
            ],
            "alerts": [
                {"name": a.name, "severity": a.severity, "message": a.message, "trigger": a.trigger}
                for a in self.alerts
            ],
            "drift_onset": _iso(self.drift_onset),
        }


def evaluate(policy: Policy, signals: ModelSignals, now: datetime | None = None) -> Decision:
    """Run every trigger of ``policy`` on ``signals`` at time ``now``.

    Parameters
    ----------
    policy
        The model's validated policy (only ``[model]``, ``[triggers]`` and ``[data] features``
        matter here).
    signals
        The model's current signals.
    now
        Decision time; defaults to ``signals.now``, else the current UTC time. Naive is UTC.

    Returns
    -------
    Decision
        ``retrain`` is true when any trigger fired; ``urgency`` is the highest fired urgency
        (``"none"`` otherwise).

    Examples
    --------
    >>> from config.policy import policy_from_dict
    >>> p = policy_from_dict({"model": {"name": "churn"}})
    >>> s = ModelSignals(last_training_date=datetime(2024, 1, 1), drift_score=0.35)
    >>> d = evaluate(p, s, datetime(2024, 1, 10))
    >>> d.retrain, d.urgency, [t.name for t in d.fired]
    (True, 'high', ['data_drift'])
    """
    when = as_utc(now or signals.now or datetime.now(timezone.utc))
    results = [r for fn in _TRIGGER_FNS if (r := fn(policy, signals, when)) is not None]
    if any(r.suppression is not None and r.suppression.kind == BREAKING_UPSTREAM_CHANGE for r in results):
        results = [_blocked(r) if r.triggered and r.name not in MANUAL_TRIGGERS else r for r in results]
    fired = [r.urgency for r in results if r.triggered]
    return Decision(
        model=policy.model.name,
        now=when,
        retrain=bool(fired),
        urgency=max_urgency(fired),
        triggers=tuple(results),
        suppressed=tuple(r.suppression for r in results if r.suppression is not None),
        alerts=tuple(r.alert for r in results if r.alert is not None),
        drift_onset=signals.drift_onset,
    )


_TRIGGER_FNS = tuple(TRIGGERS.values())


def _blocked(result: TriggerResult) -> TriggerResult:
    reason = f"{result.reason} -- not started: blocked by a breaking upstream change"
    return replace(
        result,
        triggered=False,
        reason=reason,
        suppression=Suppression(result.name, BLOCKED_BY_UPSTREAM_CHANGE, reason),
    )


# --- the guards ---------------------------------------------------------------------------------
@dataclass(slots=True)
class GuardState:
    """What the guards need to know about one model (persisted by the decision worker).

    Parameters
    ----------
    last_training
        When the last pipeline for this model started (defaults to the newest of
        ``recent_trainings``).
    recent_trainings
        Start times of the pipelines of (at least) the last 24 hours, for the budget.
    in_flight
        Id of the pipeline currently running for this model, if any.
    first_pending, last_pending
        Times of the first and the latest signal not yet decided on (for the debounce).
    """

    last_training: datetime | None = None
    recent_trainings: tuple[datetime, ...] = ()
    in_flight: str | None = None
    first_pending: datetime | None = None
    last_pending: datetime | None = None

    def __post_init__(self) -> None:
        trainings = tuple(as_utc(t) for t in self.recent_trainings)
        object.__setattr__(self, "recent_trainings", trainings)
        for name in ("last_training", "first_pending", "last_pending"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, as_utc(value))
        if self.last_training is None and trainings:
            object.__setattr__(self, "last_training", max(trainings))


@dataclass(slots=True)
class GuardResult:
    """One guard's verdict: ``passed`` (go on) or not, why, and until when it holds."""

    guard: str
    passed: bool
    reason: str
    until: datetime | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"guard": self.guard, "passed": self.passed, "reason": self.reason, "until": _iso(self.until)}


def debounce(state: GuardState, policy: Policy, now: datetime, urgency: str = "none") -> GuardResult:
    """Collapse a burst of signals into one decision: quiet period plus maximum wait.

    Decide once no signal arrived for ``debounce_quiet``, or once the first undecided signal is
    ``debounce_max_wait`` old, whichever comes first (boundaries inclusive); until then, wait
    until the earlier of the two times. A critical decision (manual) does not wait.
    """
    now = as_utc(now)
    rules = policy.triggers
    if state.first_pending is None and state.last_pending is None:
        return GuardResult("debounce", True, "no pending signals to wait for")
    if urgency_rank(urgency) >= urgency_rank(DEBOUNCE_BYPASS_URGENCY):
        return GuardResult("debounce", True, f"{urgency} urgency does not wait for the quiet period")
    first = state.first_pending or state.last_pending
    last = state.last_pending or state.first_pending
    quiet_at = last + rules.debounce_quiet
    deadline = first + rules.debounce_max_wait
    if now >= quiet_at:
        return GuardResult("debounce", True, f"signals quiet for {format_duration(now - last)}")
    if now >= deadline:
        return GuardResult(
            "debounce", True,
            f"first pending signal waited the maximum {format_duration(rules.debounce_max_wait)}",
        )
    until = min(quiet_at, deadline)
    return GuardResult(
        "debounce", False,
        f"waiting for {format_duration(rules.debounce_quiet)} of quiet "
        f"(at most {format_duration(rules.debounce_max_wait)} after the first signal)",
        until,
    )


def single_flight(state: GuardState) -> GuardResult:
    """At most one pipeline per model: while one runs, the decision becomes one follow-up.

    The worker keeps the pending signals and re-decides once when the in-flight pipeline ends;
    however many triggers arrive meanwhile, that is one follow-up decision.
    """
    if state.in_flight is None:
        return GuardResult("single_flight", True, "no pipeline in flight")
    return GuardResult(
        "single_flight", False,
        f"pipeline {state.in_flight} in flight; coalesced into one follow-up decision after it ends",
    )


def budget(state: GuardState, policy: Policy, now: datetime) -> GuardResult:
    """At most ``max_trainings_per_day`` pipelines per model in any rolling 24 hours.

    A training exactly 24 hours old no longer counts. ``until`` is when a slot frees up.
    """
    now = as_utc(now)
    limit = policy.triggers.max_trainings_per_day
    window = sorted(t for t in state.recent_trainings if now - t < BUDGET_WINDOW)
    if len(window) < limit:
        return GuardResult("budget", True, f"{len(window)} of {limit} trainings used in the last 24h")
    until = window[len(window) - limit] + BUDGET_WINDOW if limit > 0 else None
    return GuardResult(
        "budget", False,
        f"training budget exhausted: {len(window)} of {limit} trainings in the last 24h",
        until,
    )


def cooldown(state: GuardState, policy: Policy, now: datetime, urgency: str) -> GuardResult:
    """No new low/medium-urgency training within ``cooldown`` of the last one; high/critical pass."""
    now = as_utc(now)
    period = policy.triggers.cooldown
    if state.last_training is None:
        return GuardResult("cooldown", True, "no previous training")
    ends = state.last_training + period
    if now >= ends:
        return GuardResult("cooldown", True, f"last training {format_duration(now - state.last_training)} ago")
    if urgency_rank(urgency) >= urgency_rank(COOLDOWN_OVERRIDE_URGENCY):
        return GuardResult(
            "cooldown", True,
            f"{urgency} urgency overrides the cooldown (ends {ends.isoformat()})",
            ends,
        )
    return GuardResult(
        "cooldown", False,
        f"in cooldown: last training {format_duration(now - state.last_training)} ago, "
        f"cooldown {format_duration(period)}",
        ends,
    )


def queue_for(urgency: str) -> str:
    """Celery queue for a pipeline of this urgency: ``training.high`` for high/critical."""
    return QUEUE_HIGH if urgency_rank(urgency) >= urgency_rank("high") else QUEUE_LOW


@dataclass(slots=True)
class GuardedDecision:
    """What to do with a :class:`Decision` after the guards.

    ``action`` is ``start`` (enqueue on ``queue``), ``defer`` (keep the pending signals and
    re-decide at ``until``, or after the in-flight pipeline when ``follow_up``), ``suppress`` (no
    training; record why; ``until`` is when it could next pass) or ``none`` (nothing fired).
    """

    action: Action
    reason: str
    decision: Decision
    guard: str | None = None
    until: datetime | None = None
    queue: str | None = None
    follow_up: bool = False
    checks: tuple[GuardResult, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "reason": self.reason,
            "guard": self.guard,
            "until": _iso(self.until),
            "queue": self.queue,
            "follow_up": self.follow_up,
            "checks": [c.to_dict() for c in self.checks],
            "decision": self.decision.to_dict(),
        }


def apply_guards(decision: Decision, state: GuardState, policy: Policy, now: datetime) -> GuardedDecision:
    """Run debounce, single flight, budget and cooldown over ``decision``, in that order.

    The debounce holds every evaluation, so a burst of signals yields one decision record;
    the other guards only concern decisions that would retrain.
    """
    now = as_utc(now)
    checks: list[GuardResult] = []

    def held(result: GuardResult, action: Action, follow_up: bool = False) -> GuardedDecision:
        return GuardedDecision(
            action, result.reason, decision, result.guard, result.until, None, follow_up, tuple(checks)
        )

    gate = debounce(state, policy, now, decision.urgency)
    checks.append(gate)
    if not gate.passed:
        return held(gate, "defer")
    if not decision.retrain:
        action: Action = "suppress" if decision.suppressed or decision.alerts else "none"
        return GuardedDecision(action, decision.reason, decision, checks=tuple(checks))
    gate = single_flight(state)
    checks.append(gate)
    if not gate.passed:
        return held(gate, "defer", follow_up=True)
    for gate in (budget(state, policy, now), cooldown(state, policy, now, decision.urgency)):
        checks.append(gate)
        if not gate.passed:
            return held(gate, "suppress")
    return GuardedDecision(
        "start", decision.reason, decision, queue=queue_for(decision.urgency), checks=tuple(checks)
    )
