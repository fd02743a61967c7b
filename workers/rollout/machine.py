"""The rollout state machine: pure transitions from (state, analysis, time, policy) to
(new state, actions).

Nothing here touches Redis, Celery or the registry. The rollout worker loads a
:class:`RolloutState`, calls :func:`workers.rollout.analysis.analyze_phase` (or :func:`analyze`)
and :func:`step`, stores the new state only if the stored ``revision`` is still the one it read
(compare-and-set), and then carries out the returned actions (:class:`SetTraffic`,
:class:`Emit`, :class:`Promote`, :class:`Rollback`). Every transition, automatic or manual,
returns a state whose ``revision`` is one higher, so a second worker holding an older copy is
refused by the compare-and-set and a tick can never advance a phase twice.

Phases come from ``cfg.phases`` (default shadow -> canary 5 % -> 25 % -> 50 % -> 100 %) as they
were when the rollout began: :func:`start` keeps a copy in the state (``phases``), so editing the
policy's phases mid-rollout affects the next rollout, never the running one (its position and
phase names would no longer match). Advancing past the last phase completes the rollout. A
phase that lacks evidence holds; once it has waited ``phase.max_wait`` (or ``cfg.max_wait``)
beyond its minimum duration it pauses or aborts as ``cfg.on_insufficient_evidence`` says. A
paused rollout keeps its traffic and still rolls back on a ``rollback`` verdict (pausing stops
progress, not protection).

Events use the lifecycle types of the design (``rollout.started|advanced|paused|completed|
rolled_back``, ``alert.raised``); an abort is a ``rollout.rolled_back`` with ``"aborted": true``
and a resume a ``rollout.started`` with ``"resumed": true``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Literal

from config.policy import Phase, RolloutSection
from workers.rollout.analysis import Analysis, ArmStats, PairStats, analyze_phase

Status = Literal["shadow", "canary", "progressive", "paused", "completed", "rolled_back", "aborted"]
TERMINAL: frozenset[str] = frozenset({"completed", "rolled_back", "aborted"})

EVENT_STARTED = "rollout.started"
EVENT_ADVANCED = "rollout.advanced"
EVENT_PAUSED = "rollout.paused"
EVENT_COMPLETED = "rollout.completed"
EVENT_ROLLED_BACK = "rollout.rolled_back"
EVENT_ABORTED = "rollout.aborted"
EVENT_RESUMED = "rollout.resumed"
EVENT_ALERT = "alert.raised"

HISTORY_LIMIT = 500
"""Most history records kept; repeated identical analysis verdicts are coalesced into one."""
SYSTEM = "system"
_DEFAULT_ROLLOUT = RolloutSection()


class TransitionError(ValueError):
    """A manual operation that the rollout's current status does not allow (one-line message)."""


class StaleRevision(RuntimeError):
    """The stored state moved on since it was read: reload and retry (never apply twice)."""


def check_revision(state: RolloutState, expected: int) -> None:
    """Raise :class:`StaleRevision` unless ``state.revision == expected``."""
    if state.revision != expected:
        raise StaleRevision(f"rollout of {state.model} is at revision {state.revision}, expected {expected}")


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class TrafficTable:
    """What the router serves: ``candidate_percent`` of live traffic to ``candidate`` (sticky by
    request id), the rest to ``production``; requests mirrored to ``shadow`` off the request path."""

    production: str
    candidate: str | None = None
    candidate_percent: float = 0.0
    shadow: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Action:
    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.kind, **asdict(self)}


@dataclass(frozen=True)
class SetTraffic(Action):
    """Route ``candidate_percent`` to the candidate; ``shadow``: mirror every request to it.

    ``production`` / ``candidate`` name the versions (after completion the candidate *is*
    production and ``candidate`` is None).
    """

    kind: ClassVar[str] = "set_traffic"
    candidate_percent: float
    shadow: bool
    production: str | None = None
    candidate: str | None = None

    @property
    def table(self) -> TrafficTable:
        return TrafficTable(
            production=self.production or "",
            candidate=self.candidate,
            candidate_percent=self.candidate_percent,
            shadow=self.candidate if self.shadow else None,
        )


@dataclass(frozen=True)
class Emit(Action):
    """Publish a lifecycle event (``type``) about the model with this ``data``."""

    kind: ClassVar[str] = "emit"
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Promote(Action):
    """Make ``version`` production in the registry (the old production becomes previous)."""

    kind: ClassVar[str] = "promote"
    version: str
    previous: str | None = None


@dataclass(frozen=True)
class Rollback(Action):
    """Traffic back to ``to_version`` at once; the candidate ``version`` becomes rolled_back
    (``aborted``: stopped without a verdict against it)."""

    kind: ClassVar[str] = "rollback"
    reason: str
    version: str = ""
    to_version: str = ""
    manual: bool = False
    aborted: bool = False


_ACTIONS: dict[str, type[Action]] = {cls.kind: cls for cls in (SetTraffic, Emit, Promote, Rollback)}


def action_from_dict(data: Mapping[str, Any]) -> Action:
    """Inverse of ``Action.to_dict`` (for an outbox of actions persisted with the state)."""
    data = dict(data)
    return _ACTIONS[data.pop("action")](**data)


# --------------------------------------------------------------------------- state


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


_DATETIME_FIELDS = ("started_at", "phase_started_at", "waiting_since", "updated_at")


@dataclass
class RolloutState:
    """One model's rollout, persisted as JSON (:meth:`to_dict` / :meth:`from_dict`).

    ``production`` is the version serving the rest of the traffic and the one a rollback
    returns to; ``previous`` is production's own predecessor (informational). ``carried`` holds
    both arms' totals (no samples) from the completed phases, so the accuracy test sees every
    label of the rollout. ``last_analysis`` is the latest look; ``history`` the analysis records
    (identical consecutive verdicts coalesced), transitions and manual operations.
    """

    model: str
    candidate: str
    production: str
    started_at: datetime
    phase_started_at: datetime
    previous: str | None = None
    phase_index: int = 0
    phase: str = ""
    status: Status = "shadow"
    waiting_since: datetime | None = None
    paused: bool = False
    paused_from: str | None = None
    revision: int = 0
    reason: str = ""
    updated_at: datetime | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    last_analysis: dict[str, Any] | None = None
    carried: dict[str, dict[str, Any]] = field(default_factory=dict)
    phases: list[dict[str, Any]] | None = None
    """The rollout's phases as the policy had them when it began (:func:`phase_record` each);
    None in states saved before this copy existed, which follow the policy's current phases."""

    @property
    def active(self) -> bool:
        return self.status not in TERMINAL

    @property
    def insufficient_evidence(self) -> bool:
        """The latest look held for lack of evidence (shown by ``retrain status``)."""
        return bool(self.last_analysis and self.last_analysis.get("insufficient_evidence")) and self.active

    def carried_arms(self) -> tuple[ArmStats, ArmStats] | None:
        """``(production, candidate)`` totals of the completed phases, for ``analyze_phase``."""
        if not self.carried:
            return None
        return ArmStats.from_dict(self.carried["production"]), ArmStats.from_dict(self.carried["candidate"])

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}
        for name in _DATETIME_FIELDS:
            out[name] = _iso(out[name])
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        data = copy.deepcopy(dict(data))
        for name in _DATETIME_FIELDS:
            data[name] = _dt(data.get(name))
        return cls(**data)


def phase_record(phase: Phase) -> dict[str, Any]:
    """``phase`` as JSON for the state's copy; durations in seconds (the policy's duration strings
    drop sub-second parts, and a phase can be as short as a few hundred milliseconds)."""
    record = phase.model_dump(mode="json")
    record["min_duration"] = phase.min_duration.total_seconds()
    record["max_wait"] = None if phase.max_wait is None else phase.max_wait.total_seconds()
    return record


def rollout_cfg(state: RolloutState, cfg: RolloutSection) -> RolloutSection:
    """``cfg`` with the rollout's own phases (those it began with), the policy's other settings kept.

    A state without its copy (saved before there was one) keeps the policy's current phases.
    """
    return with_phases(cfg, state.phases)


def with_phases(cfg: RolloutSection, phases: list[dict[str, Any]] | None) -> RolloutSection:
    """``cfg`` with ``phases`` (a rollout's saved copy, as stored) instead of its own; ``cfg`` if none."""
    if not phases:
        return cfg
    return cfg.model_copy(update={"phases": [Phase.model_validate(p) for p in phases]})


def _phase_status(cfg: RolloutSection, index: int) -> Status:
    phase = cfg.phases[index]
    if phase.traffic == 0:
        return "shadow"
    first_live = next(i for i, p in enumerate(cfg.phases) if p.traffic > 0)
    return "canary" if index == first_live else "progressive"


def _phase(state: RolloutState, cfg: RolloutSection) -> Phase:
    return cfg.phases[min(state.phase_index, len(cfg.phases) - 1)]


def traffic_for(state: RolloutState, cfg: RolloutSection) -> TrafficTable:
    """The traffic table the router should serve for this rollout state.

    Shadow phase: all live traffic to production, every request mirrored to the candidate.
    Live phases (also while paused): the phase's percent to the candidate. Completed: the
    candidate is production. Rolled back / aborted: production only.
    """
    if state.status == "completed":
        return TrafficTable(production=state.candidate)
    if state.status in TERMINAL:
        return TrafficTable(production=state.production)
    percent = _phase(state, rollout_cfg(state, cfg)).traffic
    if percent == 0:
        return TrafficTable(production=state.production, candidate=state.candidate, shadow=state.candidate)
    return TrafficTable(production=state.production, candidate=state.candidate, candidate_percent=percent)


def _set_traffic(state: RolloutState, cfg: RolloutSection | None = None) -> SetTraffic:
    table = traffic_for(state, cfg or _DEFAULT_ROLLOUT)
    return SetTraffic(
        candidate_percent=table.candidate_percent,
        shadow=table.shadow is not None,
        production=table.production,
        candidate=table.candidate,
    )


def _event_data(state: RolloutState, **extra: Any) -> dict[str, Any]:
    return {
        "model": state.model,
        "candidate": state.candidate,
        "production": state.production,
        "phase": state.phase,
        "phase_index": state.phase_index,
        "status": state.status,
        **extra,
    }


def _alert(state: RolloutState, severity: str, summary: str, **extra: Any) -> Emit:
    return Emit(EVENT_ALERT, _event_data(state, severity=severity, summary=summary, **extra))


def _record(state: RolloutState, entry: dict[str, Any]) -> None:
    state.history.append(entry)
    if len(state.history) > HISTORY_LIMIT:
        # Drop the oldest analysis records first; transitions and manual operations stay.
        for i, old in enumerate(state.history):
            if old.get("kind") == "analysis":
                del state.history[i]
                break
        else:
            del state.history[0]


def _record_analysis(state: RolloutState, analysis: Analysis, now: datetime) -> None:
    entry = {
        "kind": "analysis",
        "at": now.isoformat(),
        "phase": analysis.phase,
        "verdict": analysis.verdict,
        "insufficient_evidence": analysis.insufficient_evidence,
        "reasons": list(analysis.reasons),
        "metrics": dict(analysis.metrics),
        "thresholds": dict(analysis.thresholds),
        "sample_sizes": dict(analysis.sample_sizes),
        "looks": 1,
        "first_at": now.isoformat(),
    }
    last = state.history[-1] if state.history else None
    same = (
        last is not None
        and last.get("kind") == "analysis"
        and (last["phase"], last["verdict"], last["insufficient_evidence"])
        == (entry["phase"], entry["verdict"], entry["insufficient_evidence"])
        and [r.split(":")[0] for r in last["reasons"]] == [r.split(":")[0] for r in entry["reasons"]]
    )
    if same:
        entry["looks"] = last["looks"] + 1
        entry["first_at"] = last["first_at"]
        state.history[-1] = entry
    else:
        _record(state, entry)


def _transition(state: RolloutState, now: datetime) -> RolloutState:
    """A copy of ``state`` one revision later (every transition goes through here).

    Nested records are shared with ``state``: they are replaced, never mutated in place.
    """
    new = copy.copy(state)
    new.history = list(state.history)
    new.carried = dict(state.carried)
    new.revision = state.revision + 1
    new.updated_at = now
    return new


def _mark(state: RolloutState, now: datetime, action: str, who: str, why: str, **extra: Any) -> None:
    kind = "transition" if who == SYSTEM else "manual"
    _record(
        state,
        {"kind": kind, "action": action, "at": now.isoformat(), "who": who, "why": why, "phase": state.phase,
         "status": state.status, **extra},
    )


# --------------------------------------------------------------------------- transitions


def start(
    model: str,
    candidate: str,
    production: str,
    cfg: RolloutSection,
    now: datetime,
    previous: str | None = None,
    who: str = SYSTEM,
    why: str = "",
) -> tuple[RolloutState, list[Action]]:
    """Begin a rollout in the policy's first phase.

    Returns
    -------
    (RolloutState, actions)
        Revision 1, with the first phase's traffic and a ``rollout.started`` event.
    """
    if str(candidate) == str(production):
        raise TransitionError(f"candidate {candidate} is already production")
    state = RolloutState(
        model=model,
        candidate=str(candidate),
        production=str(production),
        previous=None if previous is None else str(previous),
        started_at=now,
        phase_started_at=now,
        phase=cfg.phases[0].name,
        status=_phase_status(cfg, 0),
        revision=1,
        updated_at=now,
        reason=why or "rollout started",
        phases=[phase_record(p) for p in cfg.phases],
    )
    _mark(state, now, "start", who, why)
    traffic = _set_traffic(state, cfg)
    data = _event_data(state, traffic=traffic.candidate_percent, who=who, why=why)
    return state, [traffic, Emit(EVENT_STARTED, data)]


def analyze(
    state: RolloutState,
    cfg: RolloutSection,
    production: ArmStats,
    candidate: ArmStats,
    pairs: PairStats | None,
    now: datetime,
    accuracy_test: str = "sequential",
) -> Analysis:
    """:func:`analyze_phase` for the state's current phase (of the rollout's own phases), elapsed
    time and carried labels."""
    cfg = rollout_cfg(state, cfg)
    return analyze_phase(
        _phase(state, cfg),
        cfg,
        production,
        candidate,
        pairs,
        max(now - state.phase_started_at, timedelta(0)),
        carried=state.carried_arms(),
        accuracy_test=accuracy_test,
    )


def _carry(state: RolloutState, analysis: Analysis) -> None:
    for arm in ("production", "candidate"):
        window = analysis.window.get(arm)
        if not window:
            continue
        if arm in state.carried:
            state.carried[arm] = ArmStats.from_dict(state.carried[arm]).merge(ArmStats.from_dict(window)).to_dict()
        else:
            state.carried[arm] = dict(window)


def _rolled_back(
    state: RolloutState,
    now: datetime,
    cfg: RolloutSection,
    reason: str,
    who: str,
    why: str,
    aborted: bool = False,
    analysis: Analysis | None = None,
) -> tuple[RolloutState, list[Action]]:
    before = state.status
    state.status = "aborted" if aborted else "rolled_back"
    state.paused, state.paused_from, state.waiting_since = False, None, None
    state.reason = reason
    _mark(state, now, "abort" if aborted else "rollback", who, why, reason=reason, from_status=before)
    manual = who != SYSTEM
    # After a completed rollout the candidate was production: go back to the old production.
    back = Rollback(reason, version=state.candidate, to_version=state.production, manual=manual, aborted=aborted)
    data = _event_data(state, reason=reason, who=who, why=why, manual=manual, aborted=aborted, from_status=before)
    if analysis is not None:
        data.update(metrics=dict(analysis.metrics), thresholds=dict(analysis.thresholds),
                    sample_sizes=dict(analysis.sample_sizes))
    actions: list[Action] = [_set_traffic(state, cfg), back, Emit(EVENT_ABORTED if aborted else EVENT_ROLLED_BACK, data)]
    if not aborted or not manual:
        severity = "warning" if aborted else "critical"
        actions.append(_alert(state, severity, f"{state.model} v{state.candidate} {state.status}: {reason}"))
    return state, actions


def _advance(state: RolloutState, analysis: Analysis, now: datetime, cfg: RolloutSection, who: str = SYSTEM,
             why: str = "") -> tuple[RolloutState, list[Action]]:
    if state.phase_index >= len(cfg.phases) - 1:
        return _complete(state, now, cfg, who, why, reason="; ".join(analysis.reasons))
    _carry(state, analysis)
    old = state.phase
    state.phase_index += 1
    state.phase = cfg.phases[state.phase_index].name
    state.status = _phase_status(cfg, state.phase_index)
    state.phase_started_at, state.waiting_since = now, None
    state.reason = f"advanced from {old} to {state.phase}"
    _mark(state, now, "advance", who, why, from_phase=old, to_phase=state.phase)
    traffic = _set_traffic(state, cfg)
    data = _event_data(state, from_phase=old, to_phase=state.phase, traffic=traffic.candidate_percent,
                       metrics=dict(analysis.metrics), sample_sizes=dict(analysis.sample_sizes))
    return state, [traffic, Emit(EVENT_ADVANCED, data)]


def _complete(state: RolloutState, now: datetime, cfg: RolloutSection, who: str, why: str,
              reason: str) -> tuple[RolloutState, list[Action]]:
    before = state.status
    state.status = "completed"
    state.paused, state.paused_from, state.waiting_since = False, None, None
    state.reason = reason
    _mark(state, now, "promote" if who != SYSTEM else "complete", who, why, from_status=before)
    data = _event_data(state, who=who, why=why, manual=who != SYSTEM, reason=reason, previous=state.production)
    return state, [_set_traffic(state, cfg), Promote(state.candidate, previous=state.production),
                   Emit(EVENT_COMPLETED, data)]


def _pause(state: RolloutState, now: datetime, reason: str, who: str, why: str) -> tuple[RolloutState, list[Action]]:
    state.paused_from = state.status
    state.status, state.paused = "paused", True
    state.reason = reason
    _mark(state, now, "pause", who, why, reason=reason)
    actions: list[Action] = [Emit(EVENT_PAUSED, _event_data(state, reason=reason, who=who, why=why,
                                                            manual=who != SYSTEM))]
    if who == SYSTEM:
        actions.append(_alert(state, "warning", f"{state.model} v{state.candidate} rollout paused: {reason}"))
    return state, actions


def step(
    state: RolloutState, analysis: Analysis, now: datetime, cfg: RolloutSection
) -> tuple[RolloutState, list[Action]]:
    """Apply one look's analysis to the rollout.

    Parameters
    ----------
    state : RolloutState
        As read from storage (not modified).
    analysis : Analysis
        From :func:`analyze` / ``analyze_phase`` for ``state``'s current phase. An analysis of
        another phase (computed before a concurrent transition) is ignored, unless its verdict
        is ``rollback``: evidence against the candidate is acted on whatever phase it came from.
    now : datetime
    cfg : RolloutSection
        The model's policy; the phases used are the rollout's own (:func:`rollout_cfg`).

    Returns
    -------
    (RolloutState, list of Action)
        The next state (``revision + 1``) and what to do; a terminal state, or a stale
        analysis, comes back unchanged (same revision) with no actions.

    Notes
    -----
    rollback verdict -> ``rolled_back`` (also while paused); advance -> next phase or
    ``completed`` (not while paused); hold for insufficient evidence -> wait, and once the
    phase has waited ``max_wait`` past its minimum duration, pause or abort per
    ``cfg.on_insufficient_evidence``.
    """
    if not state.active or (analysis.phase != state.phase and analysis.verdict != "rollback"):
        return state, []
    cfg = rollout_cfg(state, cfg)
    new = _transition(state, now)
    new.last_analysis = analysis.to_dict()
    _record_analysis(new, analysis, now)
    if analysis.verdict == "rollback":
        return _rolled_back(new, now, cfg, "; ".join(analysis.reasons), SYSTEM, "automatic analysis",
                            analysis=analysis)
    if new.paused:
        return new, []
    if analysis.verdict == "advance":
        return _advance(new, analysis, now, cfg)
    phase = _phase(new, cfg)
    if not analysis.insufficient_evidence:
        new.waiting_since = None
        return new, []
    if now - new.phase_started_at < phase.min_duration:
        return new, []
    if new.waiting_since is None:
        new.waiting_since = now
    limit = phase.max_wait if phase.max_wait is not None else cfg.max_wait
    if now - new.waiting_since < limit:
        return new, []
    reason = f"insufficient evidence after waiting {limit}: " + "; ".join(analysis.reasons)
    if cfg.on_insufficient_evidence == "abort":
        return _rolled_back(new, now, cfg, reason, SYSTEM, "policy: on_insufficient_evidence = abort", aborted=True,
                            analysis=analysis)
    return _pause(new, now, reason, SYSTEM, "policy: on_insufficient_evidence = pause")


# --------------------------------------------------------------------------- manual operations


def _who(who: str) -> str:
    if not who or not who.strip():
        raise TransitionError("a manual operation needs who (the operator)")
    return who.strip()


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(UTC)


def _operator(state: RolloutState, who: str, now: datetime | None, *, active: bool = True) -> tuple[str, datetime]:
    """Validate an operator action's who and time; refuse it on a finished rollout when ``active``."""
    who, now = _who(who), _now(now)
    if active and not state.active:
        raise TransitionError(f"rollout of {state.model} is already {state.status}")
    return who, now


def _by(verb: str, who: str, why: str) -> str:
    return f"{verb} by {who}" + (f": {why}" if why else "")


def promote(
    state: RolloutState, who: str, why: str = "", now: datetime | None = None
) -> tuple[RolloutState, list[Action]]:
    """Operator: make the candidate production now, skipping the remaining phases."""
    who, now = _operator(state, who, now)
    new = _transition(state, now)
    return _complete(new, now, _DEFAULT_ROLLOUT, who, why, reason=_by("promoted", who, why))


def rollback(
    state: RolloutState, who: str, why: str = "", now: datetime | None = None
) -> tuple[RolloutState, list[Action]]:
    """Operator, emergency: traffic back to production at once, skipping analysis.

    Also allowed after completion (the candidate became production): traffic returns to the
    version that was production before this rollout.
    """
    who, now = _operator(state, who, now, active=False)
    if state.status in ("rolled_back", "aborted"):
        raise TransitionError(f"rollout of {state.model} is already {state.status}")
    new = _transition(state, now)
    return _rolled_back(new, now, _DEFAULT_ROLLOUT, _by("manual rollback", who, why), who, why)


def abort(
    state: RolloutState, who: str, why: str = "", now: datetime | None = None
) -> tuple[RolloutState, list[Action]]:
    """Operator: stop the rollout and return traffic to production, without judging the candidate."""
    who, now = _operator(state, who, now)
    new = _transition(state, now)
    return _rolled_back(new, now, _DEFAULT_ROLLOUT, _by("aborted", who, why), who, why, aborted=True)


def pause(
    state: RolloutState, who: str, why: str = "", now: datetime | None = None
) -> tuple[RolloutState, list[Action]]:
    """Operator: stop advancing (traffic stays; a rollback verdict still rolls back)."""
    who, now = _operator(state, who, now)
    if state.paused:
        raise TransitionError(f"rollout of {state.model} is already paused")
    new = _transition(state, now)
    return _pause(new, now, _by("paused", who, why), who, why)


def resume(
    state: RolloutState, who: str, why: str = "", now: datetime | None = None
) -> tuple[RolloutState, list[Action]]:
    """Operator: continue a paused rollout; the phase's evidence wait starts afresh."""
    who, now = _operator(state, who, now, active=False)
    if not state.paused or not state.active:
        raise TransitionError(f"rollout of {state.model} is not paused (status {state.status})")
    new = _transition(state, now)
    new.status = new.paused_from or "progressive"  # type: ignore[assignment]
    new.paused, new.paused_from, new.waiting_since = False, None, None
    new.reason = _by("resumed", who, why)
    _mark(new, now, "resume", who, why)
    return new, [Emit(EVENT_RESUMED, _event_data(new, resumed=True, who=who, why=why, manual=True))]
