"""The typed ``data`` of every event type.

Signals come from monitors (``drift.data``, ``performance.measured``, ...); lifecycle events
are the system's own (``retrain.decided``, ``rollout.rolled_back``, ...). Extra fields are
kept (monitors may add context); missing or mistyped required fields are errors. Numbers
must be finite: a NaN or an infinity is refused at validation (it would reach the stream as
``null``, or pass a threshold check it should not).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class EventData(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)


# --- signals ------------------------------------------------------------------------------
class DataDrift(EventData):
    drift_score: float = Field(ge=0, le=1)
    drifted_features: list[str] = []
    dataset_drift: bool | None = None
    features: list[dict[str, Any]] = []
    """Per-feature statistics as ``retrain drift --json`` prints them."""
    onset: datetime | None = None
    reference_version: str | None = None


class ConceptDrift(EventData):
    value: float = Field(ge=0)
    metric: Literal["psi", "js"] = "psi"
    reference_version: str | None = None


class PerformanceMeasured(EventData):
    metric: str = Field(min_length=1)
    value: float
    baseline: float | None = None
    n_labeled: int = Field(ge=0)
    ci_low: float | None = None
    ci_high: float | None = None
    version: str | None = None


class VolumeAccumulated(EventData):
    new_samples: int = Field(ge=0)
    since: datetime | None = None


class ScheduleTick(EventData):
    schedule: str = ""


class UpstreamChanged(EventData):
    feature_version: str | None = None
    schema_fingerprint: str | None = None
    added: list[str] = []
    removed: list[str] = []
    retyped: list[str] = []
    breaking: bool = False


class RetrainRequested(EventData):
    reason: str = Field(min_length=1)
    requested_by: str = "operator"


# --- lifecycle ------------------------------------------------------------------------------
class RetrainDecided(EventData):
    decision_id: str
    urgency: str
    triggers: list[str] = []
    pipeline_id: str | None = None
    queue: str | None = None


class RetrainSuppressed(EventData):
    decision_id: str
    reason: str
    triggers: list[str] = []


class PipelineEvent(EventData):
    pipeline_id: str
    decision_id: str | None = None
    version: int | None = None
    step: str | None = None
    error: str | None = None


class GateEvent(EventData):
    pipeline_id: str
    version: int | None = None
    passed: bool
    failed_checks: list[str] = []


class ModelStaged(EventData):
    version: int = Field(ge=1)
    pipeline_id: str | None = None
    artifact_uri: str | None = None


class RolloutEvent(EventData):
    version: int | None = None
    phase: str | None = None
    traffic: float | None = None
    reason: str = ""


class AlertRaised(EventData):
    severity: Literal["info", "warning", "critical"] = "warning"
    title: str = Field(min_length=1)
    message: str = ""


SIGNAL_TYPES: dict[str, type[EventData]] = {
    "drift.data": DataDrift,
    "drift.concept": ConceptDrift,
    "performance.measured": PerformanceMeasured,
    "volume.accumulated": VolumeAccumulated,
    "schedule.tick": ScheduleTick,
    "upstream.changed": UpstreamChanged,
    "retrain.requested": RetrainRequested,
}

LIFECYCLE_TYPES: dict[str, type[EventData]] = {
    "retrain.decided": RetrainDecided,
    "retrain.suppressed": RetrainSuppressed,
    "training.started": PipelineEvent,
    "training.succeeded": PipelineEvent,
    "training.failed": PipelineEvent,
    "gate.passed": GateEvent,
    "gate.failed": GateEvent,
    "model.staged": ModelStaged,
    "rollout.started": RolloutEvent,
    "rollout.advanced": RolloutEvent,
    "rollout.paused": RolloutEvent,
    "rollout.resumed": RolloutEvent,
    "rollout.completed": RolloutEvent,
    "rollout.rolled_back": RolloutEvent,
    "rollout.aborted": RolloutEvent,
    "alert.raised": AlertRaised,
}

EVENT_TYPES: dict[str, type[EventData]] = {**SIGNAL_TYPES, **LIFECYCLE_TYPES}
