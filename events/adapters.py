"""Map the payloads of monitors we did not write to our events (pure functions, no I/O).

**Prometheus Alertmanager** (webhook payload version 4): every *firing* alert becomes one
event. Its ``model`` label is the event subject; its ``signal`` label picks the type
(:data:`SIGNALS`); values come from the alert's annotations, then its labels (``value``,
``baseline``, ``n_labeled``, ``metric``, ``drifted_features``, ...). Resolved alerts are counted
and ignored (a resolved condition is no reason to retrain). Alerts that cannot be mapped come
back as rejected with the reason. The event id hashes the alert's fingerprint and
``startsAt``: Alertmanager re-sends a firing alert on every ``repeat_interval`` and retries
failed deliveries with the same values, so those re-sends carry the same id and the
consumer's de-duplication gives them no second effect; a new firing (new ``startsAt``) is a
new event.

**Evidently** data drift reports (``DataDriftPreset``), both the legacy format of 0.4-0.6
(``Report.as_dict()``/``json()``: ``metrics[].result`` with ``share_of_drifted_columns``,
``number_of_drifted_columns`` and ``drift_by_columns``) and the 0.7 snapshot format
(``metrics[].config``/``value``: ``DriftedColumnsCount`` and one ``ValueDrift`` per column),
become one ``drift.data`` event: ``drift_score`` = share of drifted columns, the drifted
features, and per-feature statistics in the shape ``retrain drift --json`` prints. Evidently's
``drift_share`` is the *threshold* share for dataset drift, not the measured share; it is
kept as ``dataset_drift_share``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from events.envelope import MODEL_NAME_PATTERN, CloudEvent, EventError, check_size, new_event

ALERTMANAGER_SOURCE = "urn:retrain:adapter:alertmanager"
EVIDENTLY_SOURCE = "urn:retrain:adapter:evidently"
SIGNALS: dict[str, str] = {
    "drift": "drift.data",
    "concept_drift": "drift.concept",
    "performance": "performance.measured",
    "volume": "volume.accumulated",
    "upstream": "upstream.changed",
    "retrain": "retrain.requested",
}
"""Alertmanager ``signal`` label -> event type."""
_MODEL = re.compile(MODEL_NAME_PATTERN)
_FRACTION = re.compile(r"(\.\d{6})\d+")


class AdapterError(ValueError):
    """A payload that cannot be mapped at all; ``str()`` is the one-line reason."""


@dataclass
class AdapterResult:
    events: list[CloudEvent] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """One ``{"index", "alertname", "fingerprint", "reason"}`` per alert that could not be mapped."""
    ignored_resolved: int = 0


# ============================================================================ Alertmanager
class _Alert(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: str = "firing"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    startsAt: str = ""
    endsAt: str = ""
    generatorURL: str = ""
    fingerprint: str = ""


class _Webhook(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: str = "4"
    status: str = ""
    receiver: str = ""
    groupKey: str = ""
    externalURL: str = ""
    alerts: list[_Alert]


class _Unmappable(Exception):
    pass


def _parse_time(text: str) -> datetime | None:
    """RFC 3339 as Alertmanager writes it (nanoseconds and ``Z``), as an aware datetime."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(_FRACTION.sub(r"\1", text.strip()).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.year <= 1:  # Go's zero time
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _Fields:
    """Values of one alert: annotations first, then labels."""

    def __init__(self, alert: _Alert, signal: str):
        self.values = {**alert.labels, **alert.annotations}
        self.signal = signal

    def text(self, *names: str, default: str | None = None) -> str | None:
        for name in names:
            value = self.values.get(name)
            if value not in (None, ""):
                return value
        return default

    def number(self, *names: str, required: bool = False, integer: bool = False) -> float | int | None:
        raw = self.text(*names)
        if raw is None:
            if required:
                wanted = " or ".join(repr(n) for n in names)
                raise _Unmappable(f"signal {self.signal!r} needs a {wanted} label or annotation")
            return None
        try:
            value = float(raw)
        except ValueError:
            raise _Unmappable(f"{names[0]!r} is not a number: {raw!r}") from None
        if integer:
            if not value.is_integer():
                raise _Unmappable(f"{names[0]!r} is not a whole number: {raw!r}")
            return int(value)
        return value

    def names(self, name: str) -> list[str]:
        raw = self.text(name) or ""
        return [part.strip() for part in raw.split(",") if part.strip()]

    def flag(self, name: str) -> bool | None:
        raw = self.text(name)
        return None if raw is None else raw.strip().lower() in ("1", "true", "yes", "on")


def _alert_data(signal: str, f: _Fields, alert: _Alert) -> dict[str, Any]:
    if signal == "drift":
        data: dict[str, Any] = {
            "drift_score": f.number("drift_score", "value", required=True),
            "drifted_features": f.names("drifted_features"),
        }
        if f.flag("dataset_drift") is not None:
            data["dataset_drift"] = f.flag("dataset_drift")
    elif signal == "concept_drift":
        data = {"value": f.number("value", required=True), "metric": f.text("metric", default="psi")}
    elif signal == "performance":
        data = {
            "metric": f.text("metric", default="accuracy"),
            "value": f.number("value", required=True),
            "n_labeled": f.number("n_labeled", required=True, integer=True),
        }
        for name in ("baseline", "ci_low", "ci_high"):
            if f.number(name) is not None:
                data[name] = f.number(name)
        if f.text("version"):
            data["version"] = f.text("version")
    elif signal == "volume":
        data = {"new_samples": f.number("new_samples", "value", required=True, integer=True)}
    elif signal == "upstream":
        data = {
            "added": f.names("added"),
            "removed": f.names("removed"),
            "retyped": f.names("retyped"),
            "breaking": bool(f.flag("breaking")),
        }
        for name in ("feature_version", "schema_fingerprint"):
            if f.text(name):
                data[name] = f.text(name)
    else:  # retrain
        reason = f.text("reason", "summary", "description") or f"alert {alert.labels.get('alertname', '?')} fired"
        data = {"reason": reason, "requested_by": "alertmanager"}
    return data


def _alert_fingerprint(alert: _Alert) -> str:
    if alert.fingerprint:
        return alert.fingerprint
    return hashlib.sha256(json.dumps(sorted(alert.labels.items())).encode()).hexdigest()[:16]


def alertmanager_event_id(alert_fingerprint: str, starts_at: str, model: str, signal: str,
                          data: Mapping[str, Any] | None = None) -> str:
    """The deterministic id of the event of one firing alert with the values it carries.

    Alertmanager re-sends a firing alert on every group and repeat interval: the same values
    give the same id (the bus applies them once), while a firing alert whose values changed
    (a drift score that rose, a drop that now has enough labels) is a new event.
    """
    values = json.dumps(data or {}, sort_keys=True, separators=(",", ":"), default=str)
    key = f"{alert_fingerprint}|{starts_at}|{model}|{signal}|{values}"
    return "am-" + hashlib.sha256(key.encode()).hexdigest()[:40]


def alertmanager_events(payload: Any, *, source: str = ALERTMANAGER_SOURCE,
                        max_event_bytes: int | None = None) -> AdapterResult:
    """Map an Alertmanager webhook payload (version 4) to events.

    Parameters
    ----------
    payload
        The decoded JSON body Alertmanager posts.
    source
        CloudEvents ``source`` of the events.
    max_event_bytes
        Refuse (as rejected) an alert whose event would be larger.

    Returns
    -------
    AdapterResult
        Events of the firing alerts, the alerts rejected with their reasons, and the number
        of resolved alerts ignored.

    Raises
    ------
    AdapterError
        When the payload is not an Alertmanager webhook at all.
    """
    if not isinstance(payload, Mapping):
        raise AdapterError("an Alertmanager webhook payload must be a JSON object")
    try:
        hook = _Webhook.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise AdapterError(f"not an Alertmanager webhook payload: {loc}: {err['msg']}") from None
    if hook.version != "4":
        raise AdapterError(f"unsupported Alertmanager webhook version {hook.version!r} (expected '4')")
    result = AdapterResult()
    for index, alert in enumerate(hook.alerts):
        name = alert.labels.get("alertname", "")
        fingerprint = _alert_fingerprint(alert)
        if alert.status == "resolved":
            result.ignored_resolved += 1
            continue
        try:
            model = alert.labels.get("model") or alert.annotations.get("model")
            if not model:
                raise _Unmappable("alert has no 'model' label (the model name is the event subject)")
            if not _MODEL.match(model):
                raise _Unmappable(f"'model' label {model!r} is not a valid model name")
            signal = (alert.labels.get("signal") or alert.annotations.get("signal") or "").strip()
            if signal not in SIGNALS:
                raise _Unmappable(f"'signal' label is {signal or 'missing'!r}; use one of {', '.join(SIGNALS)}")
            fields = _Fields(alert, signal)
            data = _alert_data(signal, fields, alert)
            event_id = alertmanager_event_id(fingerprint, alert.startsAt, model, signal, data)  # before the metadata
            data["alert"] = {
                k: v for k, v in {
                    "alertname": name, "fingerprint": fingerprint, "starts_at": alert.startsAt,
                    "severity": alert.labels.get("severity", ""), "generator_url": alert.generatorURL,
                    "receiver": hook.receiver, "external_url": hook.externalURL,
                }.items() if v
            }
            event = new_event(
                SIGNALS[signal], model, data, source=source,
                id=event_id,
                time=_parse_time(alert.startsAt),
            )
            if max_event_bytes is not None:
                check_size(event.to_json(), max_event_bytes)
        except (_Unmappable, EventError) as exc:
            result.rejected.append({"index": index, "alertname": name, "fingerprint": fingerprint, "reason": str(exc)})
            continue
        result.events.append(event)
    return result


# ============================================================================ Evidently
_ARGS = re.compile(r"(\w+)=([^,()]*)")


def _metric_kind(metric: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(metric class name, its parameters) of a 0.7 snapshot or legacy metric entry."""
    config = metric.get("config") if isinstance(metric.get("config"), Mapping) else {}
    kind = str(config.get("type", "")).rsplit(":", 1)[-1]
    label = str(metric.get("metric_name") or metric.get("metric_id") or metric.get("metric") or "")
    if not kind:
        kind = label.split("(", 1)[0]
    params = dict(_ARGS.findall(label))
    params.update({k: v for k, v in config.items() if k != "type"})
    return kind, params


def _is_p_value(test: str) -> bool:
    return "p_value" in test.lower().replace("-", "_").replace(" ", "_")


_CATEGORICAL_TESTS = ("chi-square", "chisquare", "z-test", "fisher", "tvd", "g-test", "cramer")


def _kind_name(column_type: Any, test: str) -> str:
    """``numeric``/``categorical`` from Evidently's column type, else guessed from the test."""
    known = {"num": "numeric", "numerical": "numeric", "cat": "categorical", "categorical": "categorical"}
    if column_type is not None:
        return known.get(str(column_type).lower(), str(column_type).lower())
    return "categorical" if any(t in test.lower() for t in _CATEGORICAL_TESTS) else "numeric"


def _feature(name: str, test: str, score: Any, threshold: Any, drifted: Any, column_type: Any = None) -> dict[str, Any]:
    score = None if score is None else float(score)
    threshold = None if threshold is None else float(threshold)
    if drifted is None and score is not None and threshold is not None:
        drifted = score < threshold if _is_p_value(test) else score >= threshold
    return {
        "name": str(name),
        "kind": _kind_name(column_type, test),
        "test": test,
        "statistic": score,
        "p_value": score if _is_p_value(test) else None,
        "threshold": threshold,
        "drifted": bool(drifted),
    }


@dataclass
class _DriftSummary:
    share: float | None = None
    drifted: int | None = None
    columns: int | None = None
    dataset_drift: bool | None = None
    drift_share_threshold: float | None = None
    features: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_legacy(result: Mapping[str, Any], summary: _DriftSummary) -> None:
    if "share_of_drifted_columns" in result:
        summary.share = float(result["share_of_drifted_columns"])
    if "number_of_drifted_columns" in result:
        summary.drifted = int(result["number_of_drifted_columns"])
    if "number_of_columns" in result:
        summary.columns = int(result["number_of_columns"])
    if "dataset_drift" in result:
        summary.dataset_drift = bool(result["dataset_drift"])
    if "drift_share" in result:
        summary.drift_share_threshold = float(result["drift_share"])
    columns = result.get("drift_by_columns")
    if isinstance(columns, Mapping):
        for name, col in columns.items():
            if isinstance(col, Mapping):
                summary.features[str(name)] = _feature(
                    col.get("column_name", name), str(col.get("stattest_name", "")), col.get("drift_score"),
                    col.get("stattest_threshold"), col.get("drift_detected"), col.get("column_type"))
    elif "column_name" in result and "drift_score" in result:  # ColumnDriftMetric
        summary.features[str(result["column_name"])] = _feature(
            result["column_name"], str(result.get("stattest_name", "")), result.get("drift_score"),
            result.get("stattest_threshold"), result.get("drift_detected"), result.get("column_type"))


def _read_snapshot(kind: str, params: Mapping[str, Any], value: Any, summary: _DriftSummary) -> None:
    if kind == "DriftedColumnsCount" and isinstance(value, Mapping):
        if "share" in value:
            summary.share = float(value["share"])
        if "count" in value:
            summary.drifted = int(float(value["count"]))
        if "drift_share" in params:
            summary.drift_share_threshold = float(params["drift_share"])
    elif kind == "ValueDrift" and params.get("column") is not None and value is not None:
        score = value.get("value") if isinstance(value, Mapping) else value
        summary.features[str(params["column"])] = _feature(
            params["column"], str(params.get("method", "")), score, params.get("threshold"), None)


def summarize_evidently(report: Any) -> _DriftSummary:
    """Read the drift numbers out of an Evidently report (legacy or 0.7 snapshot JSON)."""
    if not isinstance(report, Mapping) or not isinstance(report.get("metrics"), list):
        raise AdapterError("not an Evidently report: expected a JSON object with a 'metrics' list")
    summary = _DriftSummary()
    for metric in report["metrics"]:
        if not isinstance(metric, Mapping):
            continue
        try:
            if isinstance(metric.get("result"), Mapping):
                _read_legacy(metric["result"], summary)
            elif "value" in metric:
                kind, params = _metric_kind(metric)
                _read_snapshot(kind, params, metric["value"], summary)
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: int() of an infinity
            raise AdapterError(f"unreadable Evidently metric {_metric_kind(metric)[0] or '?'}: {exc}") from None
    if summary.share is None:
        if summary.drifted is not None and summary.columns:
            summary.share = summary.drifted / summary.columns
        elif summary.features:
            summary.share = sum(f["drifted"] for f in summary.features.values()) / len(summary.features)
        else:
            raise AdapterError("no data drift metric in the Evidently report (expected DataDriftPreset output)")
    if not 0.0 <= summary.share <= 1.0:
        raise AdapterError(f"share of drifted columns {summary.share} is outside [0, 1]")
    if summary.dataset_drift is None and summary.drift_share_threshold is not None:
        summary.dataset_drift = summary.share >= summary.drift_share_threshold
    return summary


def _report_time(report: Mapping[str, Any]) -> datetime | None:
    raw = report.get("timestamp")
    if not isinstance(raw, str):
        return None
    return _parse_time(raw.replace(" ", "T", 1))


def evidently_event(report: Any, model: str, *, source: str = EVIDENTLY_SOURCE,
                    max_event_bytes: int | None = None) -> CloudEvent:
    """Map an Evidently ``DataDriftPreset`` report to one ``drift.data`` event.

    Parameters
    ----------
    report
        The decoded report JSON (legacy ``Report.as_dict()`` or 0.7 ``Snapshot.dict()``).
    model
        The model the report is about (the event subject).
    max_event_bytes
        When the full per-feature list would make the event larger, only the drifted
        features are listed (``features_truncated: true``).

    Returns
    -------
    CloudEvent
        Its id hashes the model and the report, so posting the same report twice has one effect.

    Raises
    ------
    AdapterError
        When the report holds no data drift result.
    """
    if not isinstance(model, str) or not _MODEL.match(model):
        raise AdapterError(f"model {model!r} is not a valid model name")
    summary = summarize_evidently(report)
    features = list(summary.features.values())
    data: dict[str, Any] = {
        "drift_score": summary.share,
        "drifted_features": [f["name"] for f in features if f["drifted"]],
        "features": features,
        "detector": "evidently",
    }
    if summary.dataset_drift is not None:
        data["dataset_drift"] = summary.dataset_drift
    if summary.drift_share_threshold is not None:
        data["dataset_drift_share"] = summary.drift_share_threshold
    if summary.drifted is not None:
        data["n_drifted"] = summary.drifted
    if summary.columns is not None:
        data["n_columns"] = summary.columns
    digest = hashlib.sha256(json.dumps([model, report], sort_keys=True, default=str).encode()).hexdigest()
    event_id = "evidently-" + digest[:40]
    when = _report_time(report)
    event = new_event("drift.data", model, data, source=source, id=event_id, time=when)
    if max_event_bytes is not None and len(event.to_json()) > max_event_bytes:
        data["features"] = [f for f in features if f["drifted"]]
        data["features_truncated"] = True
        event = new_event("drift.data", model, data, source=source, id=event_id, time=when)
    return event
