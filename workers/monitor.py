"""Run a model's monitors once against its data source and the router's logs; publish findings.

For the production version of a model: data drift of the rows that arrived since its training
window (against the reference profile stored with the version), new-data volume (partition
pruned), upstream schema changes (against the schema recorded at training), live performance
(router predictions joined with delayed labels) and concept drift (the production version's
live scores against its holdout scores). Used by ``retrain monitor MODEL`` and by the periodic
``retrain.monitor_all`` task, which runs each model on its policy's ``monitor_interval``.
Event ids are derived from the model, the run's time slot, the production version and the
measurement itself: a re-delivered task (same slot, same data) has no second effect, while a
run that measures something new (more rows, a new production version, a manual
``retrain monitor``) is news even inside the slot.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import structlog

from events.envelope import new_event

log = structlog.get_logger(__name__)

SOURCE = "urn:retrain:monitor"
MAX_FEATURES_IN_EVENT = 50
RECENT_SCORES = 5000
NO_UPPER_BOUND_DAYS = 3650


def _measurement_id(event, slot: int, version) -> str:
    """The event's id: the same measurement in the same slot of the same production version is one event."""
    data = json.dumps(event.data, sort_keys=True, default=str)
    key = f"{event.subject}:{event.type}:{slot}:{version}:{data}"
    return "mon-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _dt(value: str | None) -> datetime | None:
    if not value:
        return None
    d = datetime.fromisoformat(value)
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def run_monitors(client, keys, model: str, policy, *, now: float | None = None, publish: bool = True,
                 bus=None) -> dict[str, Any]:
    """Measure every signal the model's data and logs allow; return a summary (and publish)."""
    from workers.registry.store import Registry

    now = now or time.time()
    slot = int(now // max(policy.drift.monitor_interval.total_seconds(), 1))
    registry = Registry(client, keys)
    production = registry.alias(model, "production")
    summary: dict[str, Any] = {"model": model, "production": production, "published": [], "notes": []}
    if production is None:
        summary["notes"].append("no production version: nothing to monitor against")
        return summary
    record = registry.get(model, production)
    trained_until = _dt((record.data_window or {}).get("end"))
    events = []
    if policy.data.source and trained_until is not None:
        events += _data_monitors(model, policy, record, trained_until, summary)
    events += _live_monitors(client, keys, model, policy, record, summary)
    events = [e.model_copy(update={"id": _measurement_id(e, slot, production)}) for e in events]
    if publish and events:
        if bus is None:
            from config.settings import get_settings
            from events.bus import EventBus

            bus = EventBus.from_settings(client, get_settings())
        result = bus.publish_many(events)
        summary["published"] = [e.type for e in events]
        summary["rejected"] = [r for _, r in result.rejected]
    return summary


def _data_monitors(model, policy, record, trained_until, summary) -> list:
    from events.monitors.drift import ReferenceProfile, check_drift
    from events.producers.upstream import compare_schemas, schema_fingerprint, schema_of_source, upstream_event
    from events.producers.volume import scan_new_rows, volume_event
    from workers.registry.artifacts import sha256_hex
    from workers.training.data import DataError, load_window

    events = []
    source, time_column = policy.data.source, policy.data.time_column
    try:
        scan = scan_new_rows(source, time_column, trained_until)
        summary["volume"] = scan.rows if hasattr(scan, "rows") else int(scan)
        events.append(volume_event(model, summary["volume"], trained_until, source=SOURCE))
    except Exception as exc:  # noqa: BLE001 - a monitor failing must not hide the others
        summary["notes"].append(f"volume: {exc}")
    try:
        current_schema = schema_of_source(source)
        if record.source_schema:
            diff = compare_schemas(record.source_schema, current_schema, policy.data.features or None)
            summary["upstream"] = diff.verdict
            if diff.verdict != "unchanged":
                events.append(upstream_event(model, diff, fingerprint=schema_fingerprint(current_schema),
                                             previous_fingerprint=record.schema_fingerprint, source=SOURCE))
    except Exception as exc:  # noqa: BLE001
        summary["notes"].append(f"upstream: {exc}")
    if not record.reference_profile_uri:
        summary["notes"].append("drift: the production version has no reference profile")
        return events
    try:
        raw = open(record.reference_profile_uri, "rb").read()
        if record.reference_profile_sha256 and sha256_hex(raw) != record.reference_profile_sha256:
            summary["notes"].append("drift: reference profile does not match its sha256; not used")
            return events
        profile = ReferenceProfile.from_dict(json.loads(raw))
        # Every row newer than the training window, however recent (no upper bound).
        window = load_window(source, time_column, None, since=trained_until,
                             now=datetime.now(timezone.utc) + timedelta(days=NO_UPPER_BOUND_DAYS))
        frame = window.frame.drop(columns=[policy.model.target, time_column], errors="ignore")
        if len(frame) == 0:
            summary["notes"].append("drift: no rows newer than the training window")
            return events
        report = check_drift(profile, frame, policy.drift)
        full = report.to_dict(full=True)
        summary["drift_score"] = report.drift_score
        events.append(new_event("drift.data", model, {
            "drift_score": report.drift_score, "drifted_features": report.drifted_features,
            "dataset_drift": report.dataset_drift, "features": full["features"][:MAX_FEATURES_IN_EVENT],
            "reference_version": str(record.version), "rows": len(frame)}, source=SOURCE))
    except (DataError, OSError, ValueError) as exc:
        summary["notes"].append(f"drift: {exc}")
    return events


def _live_monitors(client, keys, model, policy, record, summary) -> list:
    from events.monitors.drift import prediction_drift
    from events.producers.performance import measure_performance, performance_event, read_request_log

    events = []
    since_ms = int((_dt(record.created_at) or datetime.now(timezone.utc)).timestamp() * 1000)
    predictions, labels = read_request_log(client, keys, model, since_ms)
    if len(predictions) == 0:
        summary["notes"].append("live: no logged requests yet")
        return events
    version = str(record.version)
    m = measure_performance(predictions, labels, policy.model.task, version=version,
                            min_labeled=max(1, policy.triggers.min_labeled_samples))
    if m.value is not None and not math.isfinite(m.value):
        summary["notes"].append(f"performance: {m.metric} is not a finite number on the labeled requests")
    elif m.value is not None:
        baseline = (record.metrics or {}).get("primary")
        if baseline is not None and not math.isfinite(float(baseline)):
            baseline = None  # a registry record without a usable baseline: the event falls back to none
        summary["performance"] = {"metric": m.metric, "value": m.value, "n_labeled": m.n_labeled}
        events.append(performance_event(model, m, baseline=baseline, version=version, source=SOURCE))
    if record.reference_scores and "score" in predictions:
        mine = predictions[(predictions.get("version") == version) & (~predictions.get("shadow", False).astype(bool))]
        scores = mine["score"].dropna().tail(RECENT_SCORES)
        if len(scores) >= 50:
            value, _ = prediction_drift(record.reference_scores, scores.to_numpy(dtype=float),
                                        policy.triggers.concept_drift_metric)
            if value == value:  # not NaN
                summary["concept_drift"] = value
                events.append(new_event("drift.concept", model, {
                    "value": float(value), "metric": policy.triggers.concept_drift_metric,
                    "reference_version": version}, source=SOURCE))
    return events


def monitor_due_models(client, keys, policies, now: float | None = None) -> dict[str, Any]:
    """Run the monitors of every model whose ``monitor_interval`` elapsed (periodic task body)."""
    now = now or time.time()
    ran = {}
    for model, policy in policies.all().items():
        last = client.hget(keys.monitor_runs(), model)
        if last is not None and now - float(last) < policy.drift.monitor_interval.total_seconds():
            continue
        if not client.set(keys.lock(model, "monitor"), "1", nx=True, px=120_000):
            continue
        try:
            ran[model] = run_monitors(client, keys, model, policy, now=now)
            client.hset(keys.monitor_runs(), model, f"{now:.3f}")
        except Exception as exc:  # noqa: BLE001
            log.exception("monitor.failed", model=model)
            ran[model] = {"error": str(exc)}
        finally:
            client.delete(keys.lock(model, "monitor"))
    return ran
