"""A model's history as one picture: live metric, drift, decisions, trainings, gate, rollout, rollbacks.

:func:`load_events` reads the model's recorded event log (``keys.history(model)``) in a time
window; :func:`render_timeline` draws it (matplotlib, Agg backend, no display needed) to a PNG,
or to a self-contained HTML page that embeds the PNG and lists the events. The result says
what was drawn, read back from the figure's own artists (markers by kind and time, shaded
rollout phases), so tests and the demo can check the picture shows the recorded events.

The upper panel plots ``performance.measured`` values per metric and model version (dotted: the
baseline) and
the ``drift.data`` score on a second axis, with vertical lines at decisions, gate failures,
promotions and rollbacks; the lower panel has one lane per part of the loop (signals,
decisions, training, gate, rollout, alerts). Rollout phases are shaded spans from
``rollout.started``/``advanced`` to ``completed``/``rolled_back``/``aborted``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from config.durations import parse_duration

HISTORY_FIELD = "e"
READ_CHUNK = 2000
CLOCK_SLACK = timedelta(minutes=5)
"""Entries are recorded after their event time; the stream is read from ``since`` minus this."""
FIGSIZE = (13.0, 7.5)
DPI = 110
MAX_TABLE_ROWS = 2000
MAX_SERIES_IN_LEGEND = 8
SERIES_COLORS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f")
"""Live-metric lines (red is kept for drift, failures and rollbacks)."""


class TimelineError(ValueError):
    """Nothing to draw, or an unusable request (one-line message)."""


@dataclass(frozen=True)
class MarkerStyle:
    label: str
    lane: str
    color: str
    symbol: str
    vline: bool = False
    """Also draw a vertical line across the metric panel."""


MARKER_STYLES: dict[str, MarkerStyle] = {
    "drift": MarkerStyle("drift detected", "signals", "#d62728", "v"),
    "upstream": MarkerStyle("upstream change", "signals", "#8c564b", "s"),
    "request": MarkerStyle("manual request", "signals", "#7f7f7f", "P"),
    "decision": MarkerStyle("retrain decided", "decisions", "#1f77b4", "D", vline=True),
    "suppressed": MarkerStyle("retrain suppressed", "decisions", "#aec7e8", "x"),
    "training_started": MarkerStyle("training started", "training", "#9467bd", ">"),
    "training_succeeded": MarkerStyle("training succeeded", "training", "#2ca02c", "o"),
    "training_failed": MarkerStyle("training failed", "training", "#d62728", "X"),
    "gate_passed": MarkerStyle("gate passed", "gate", "#2ca02c", "^"),
    "gate_failed": MarkerStyle("gate failed", "gate", "#d62728", "X", vline=True),
    "staged": MarkerStyle("model staged", "gate", "#17becf", "s"),
    "rollout_started": MarkerStyle("rollout started", "rollout", "#ff7f0e", ">"),
    "rollout_advanced": MarkerStyle("phase advanced", "rollout", "#fd8d3c", "d"),
    "rollout_paused": MarkerStyle("rollout paused", "rollout", "#bcbd22", "p"),
    "rollout_resumed": MarkerStyle("rollout resumed", "rollout", "#dbdb8d", ">"),
    "promoted": MarkerStyle("promoted", "rollout", "#2ca02c", "*", vline=True),
    "rollback": MarkerStyle("rolled back", "rollout", "#d62728", "*", vline=True),
    "aborted": MarkerStyle("aborted", "rollout", "#e377c2", "X", vline=True),
    "alert": MarkerStyle("alert", "alerts", "#d62728", "$!$"),
}
LANES = ("signals", "decisions", "training", "gate", "rollout", "alerts")
TYPE_KINDS = {
    "drift.concept": "drift",
    "upstream.changed": "upstream",
    "retrain.requested": "request",
    "retrain.decided": "decision",
    "retrain.suppressed": "suppressed",
    "training.started": "training_started",
    "training.succeeded": "training_succeeded",
    "training.failed": "training_failed",
    "gate.passed": "gate_passed",
    "gate.failed": "gate_failed",
    "model.staged": "staged",
    "rollout.started": "rollout_started",
    "rollout.advanced": "rollout_advanced",
    "rollout.paused": "rollout_paused",
    "rollout.resumed": "rollout_resumed",
    "rollout.completed": "promoted",
    "rollout.rolled_back": "rollback",
    "rollout.aborted": "aborted",
    "alert.raised": "alert",
}
"""Event type -> marker kind. ``drift.data`` is marked when drift was detected (see :func:`marker_kind`);
``performance.measured`` and the drift score are drawn as lines; volume and schedule ticks are not marked."""
SPAN_END = {"rollout.completed": "completed", "rollout.rolled_back": "rolled_back", "rollout.aborted": "aborted"}
PHASE_COLORS = ("#fdd0a2", "#fdae6b", "#fd8d3c", "#f16913", "#d94801", "#a63603")


@dataclass(frozen=True)
class Marker:
    """One event drawn as a marker."""

    kind: str
    time: datetime
    type: str
    event_id: str
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "time": self.time.isoformat(), "type": self.type, "event_id": self.event_id,
                "label": self.label}


@dataclass(frozen=True)
class Span:
    """A shaded rollout phase."""

    phase: str
    start: datetime
    end: datetime
    outcome: str
    """How the span ended: ``advanced``, ``paused``, ``resumed``, ``completed``, ``rolled_back``,
    ``aborted``, or ``ongoing``."""
    version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "start": self.start.isoformat(), "end": self.end.isoformat(),
                "outcome": self.outcome, "version": self.version}


@dataclass
class TimelineResult:
    """What :func:`render_timeline` wrote and drew (read back from the figure)."""

    path: Path
    model: str
    start: datetime
    end: datetime
    events: int
    markers: list[Marker] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    metric_points: int = 0
    drift_points: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "model": self.model, "start": self.start.isoformat(),
                "end": self.end.isoformat(), "events": self.events, "metric_points": self.metric_points,
                "drift_points": self.drift_points, "markers": [m.to_dict() for m in self.markers],
                "spans": [s.to_dict() for s in self.spans]}


# --------------------------------------------------------------------------- reading the log
def parse_time_bound(text: str | None, now: datetime | None = None) -> datetime | None:
    """``"2h"`` (that long ago), an ISO time (naive = UTC), or None.

    >>> parse_time_bound("2024-05-01T12:00:00Z").isoformat()
    '2024-05-01T12:00:00+00:00'
    """
    if text is None or not str(text).strip():
        return None
    from events.envelope import EARLIEST_TIME, LATEST_TIME

    text = str(text).strip()
    now = now or datetime.now(timezone.utc)
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:  # longer ago than any event can be: all of them
        return now - ago if ago < now - EARLIEST_TIME else EARLIEST_TIME
    try:
        d = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ValueError(f"bad time {text!r}: use a duration ago like '2h' or an ISO time "
                         "like 2024-05-01T12:00:00Z") from None
    d = d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    try:  # no event lies outside [EARLIEST_TIME, LATEST_TIME): a bound beyond them is the same as at them
        return min(max(d.astimezone(timezone.utc), EARLIEST_TIME), LATEST_TIME)
    except OverflowError:
        return EARLIEST_TIME if d.year < 2000 else LATEST_TIME


def event_time(event: Mapping[str, Any]) -> datetime:
    d = datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def load_events(client, keys, model: str, since: datetime | None = None,
                until: datetime | None = None) -> list[dict[str, Any]]:
    """The model's recorded events with ``since <= time <= until``, oldest first (envelope dicts).

    The stream is read from ``since`` (minus :data:`CLOCK_SLACK`) on, in chunks; an entry is
    always recorded after its event time, so nothing in the window is skipped.
    """
    stream = keys.history(model)
    start = "-" if since is None else f"{max(0, int((since - CLOCK_SLACK).timestamp() * 1000))}-0"
    out: list[dict[str, Any]] = []
    while True:
        chunk = client.xrange(stream, min=start, max="+", count=READ_CHUNK)
        for entry_id, fields in chunk:
            raw = fields.get(HISTORY_FIELD.encode()) or fields.get(HISTORY_FIELD)
            if raw is None:
                continue
            try:
                event = json.loads(raw)
                t = event_time(event)
            except (ValueError, KeyError, TypeError):
                continue
            if (since is None or t >= since) and (until is None or t <= until):
                out.append(event)
        if len(chunk) < READ_CHUNK:
            break
        last = chunk[-1][0].decode() if isinstance(chunk[-1][0], bytes) else chunk[-1][0]
        start = f"({last}"
    out.sort(key=event_time)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def describe_event(event: Mapping[str, Any]) -> str:
    """One line saying what an event means (for ``retrain history`` and the HTML table)."""
    t, d = event.get("type", ""), event.get("data") or {}
    if t == "drift.data":
        feats = ", ".join(d.get("drifted_features") or []) or "none"
        return f"drift score {_fmt(d.get('drift_score'))}, drifted: {feats}"
    if t == "drift.concept":
        return f"prediction {str(d.get('metric', 'psi')).upper()} {_fmt(d.get('value'))}"
    if t == "performance.measured":
        base = f" (baseline {_fmt(d['baseline'])})" if d.get("baseline") is not None else ""
        ver = f" v{d['version']}" if d.get("version") else ""
        return f"{d.get('metric')} {_fmt(d.get('value'))}{base} on {d.get('n_labeled')} labels{ver}"
    if t == "volume.accumulated":
        return f"{d.get('new_samples')} new samples"
    if t == "schedule.tick":
        return f"schedule {d.get('schedule') or 'tick'}"
    if t == "upstream.changed":
        parts = [f"{k}: {', '.join(d[k])}" for k in ("added", "removed", "retyped") if d.get(k)]
        head = "breaking " if d.get("breaking") else ""
        return f"{head}upstream change {d.get('feature_version') or ''} {'; '.join(parts)}".strip()
    if t == "retrain.requested":
        return f"requested by {d.get('requested_by', 'operator')}: {d.get('reason')}"
    if t == "retrain.decided":
        triggers = ", ".join(d.get("triggers") or []) or "-"
        return f"{d.get('decision_id')} urgency {d.get('urgency')} triggers {triggers} -> {d.get('pipeline_id')}"
    if t == "retrain.suppressed":
        return f"{d.get('decision_id')} suppressed: {d.get('reason')}"
    if t.startswith("training."):
        tail = f": {d['error']}" if d.get("error") else ""
        return f"{d.get('pipeline_id')} step {d.get('step') or '-'}{tail}"
    if t.startswith("gate."):
        failed = ", ".join(d.get("failed_checks") or [])
        ver = f"v{d['version']} " if d.get("version") else ""
        return f"{ver}{'passed' if d.get('passed') else 'failed'}" + (f" (failed: {failed})" if failed else "")
    if t == "model.staged":
        return f"v{d.get('version')} staged by {d.get('pipeline_id')}"
    if t.startswith("rollout."):
        ver = d.get("candidate") or d.get("version")
        phase = d.get("to_phase") or d.get("phase")
        traffic = f" {_fmt(d['traffic'])}%" if d.get("traffic") is not None else ""
        reason = f": {d['reason']}" if d.get("reason") else ""
        return f"v{ver} {phase or ''}{traffic}{reason}".replace("  ", " ")
    if t == "alert.raised":
        return f"[{d.get('severity', 'warning')}] {d.get('title')}" + (f" - {d['message']}" if d.get("message") else "")
    return json.dumps(d, default=str)[:200]


# --------------------------------------------------------------------------- what to draw
def marker_kind(event: Mapping[str, Any]) -> str | None:
    """The marker kind an event is drawn as, or None (drawn as a line, or not drawn).

    ``drift.data`` is a marker only when drift was detected: ``dataset_drift`` true, or (when the
    monitor did not say) at least one drifted feature.
    """
    etype = event.get("type")
    if etype == "drift.data":
        d = event.get("data") or {}
        detected = d.get("dataset_drift")
        if detected is None:
            detected = bool(d.get("drifted_features"))
        return "drift" if detected else None
    return TYPE_KINDS.get(etype)


def rollout_spans(events: Iterable[Mapping[str, Any]], end: datetime) -> list[Span]:
    """Rollout phases as spans, from the rollout lifecycle events (sorted by time)."""
    spans: list[Span] = []
    open_: tuple[str, datetime, str | None] | None = None

    def close(at: datetime, outcome: str) -> None:
        nonlocal open_
        if open_ is not None:
            spans.append(Span(open_[0], open_[1], max(at, open_[1]), outcome, open_[2]))
            open_ = None

    for e in events:
        t, d = e.get("type"), e.get("data") or {}
        if not str(t).startswith("rollout."):
            continue
        at = event_time(e)
        version = str(d.get("candidate") or d.get("version") or "") or None
        if t == "rollout.started":
            close(at, "restarted")
            open_ = (str(d.get("phase") or "rollout"), at, version)
        elif t == "rollout.advanced":
            close(at, "advanced")
            open_ = (str(d.get("to_phase") or d.get("phase") or "next"), at, version)
        elif t == "rollout.paused":
            close(at, "paused")
            open_ = ("paused", at, version)
        elif t == "rollout.resumed":
            close(at, "resumed")
            open_ = (str(d.get("phase") or "resumed"), at, version)
        elif t in SPAN_END:
            close(at, SPAN_END[t])
    close(end, "ongoing")
    return spans


def _series(events: list[Mapping[str, Any]]):
    """Live metric points per (metric, version), baseline points per metric, drift scores."""
    metrics: dict[tuple[str, str], list[tuple[datetime, float]]] = {}
    baselines: dict[str, list[tuple[datetime, float]]] = {}
    drift_t, drift_v = [], []
    for e in events:
        d = e.get("data") or {}
        if e.get("type") == "performance.measured" and d.get("value") is not None:
            name, t = str(d.get("metric") or "metric"), event_time(e)
            metrics.setdefault((name, str(d.get("version") or "")), []).append((t, float(d["value"])))
            if d.get("baseline") is not None:
                baselines.setdefault(name, []).append((t, float(d["baseline"])))
        elif e.get("type") == "drift.data" and d.get("drift_score") is not None:
            drift_t.append(event_time(e))
            drift_v.append(float(d["drift_score"]))
    return metrics, baselines, drift_t, drift_v


# --------------------------------------------------------------------------- drawing
def _draw(model: str, events: list[dict[str, Any]], start: datetime, end: datetime):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 2), hspace=0.08)
    top = fig.add_subplot(grid[0])
    lanes = fig.add_subplot(grid[1], sharex=top)
    pad = max((end - start) * 0.02, timedelta(seconds=1))
    lo, hi = start - pad, end + pad

    metrics, baselines, drift_t, drift_v = _series(events)
    handles: list[Any] = []
    names = sorted({name for name, _ in metrics})
    for i, ((name, version), points) in enumerate(sorted(metrics.items(), key=lambda kv: kv[1][0][0])):
        label = f"live {name}" + (f" v{version}" if version else "")
        (line,) = top.plot([p[0] for p in points], [p[1] for p in points], "-o", ms=3, lw=1.6,
                           color=SERIES_COLORS[i % len(SERIES_COLORS)], label=label, gid=f"metric:{name}:{version}")
        if i < MAX_SERIES_IN_LEGEND:
            handles.append(line)
    for name in names:
        base = baselines.get(name)
        if base:
            (bl,) = top.plot([b[0] for b in base], [b[1] for b in base], ":", lw=1.2, color="#555555",
                             drawstyle="steps-post", label=f"{name} baseline", gid=f"baseline:{name}")
            handles.append(bl)
    if metrics:
        top.set_ylabel("live metric")
    else:
        top.text(0.5, 0.55, "no performance.measured events in this window", transform=top.transAxes,
                 ha="center", va="center", color="#777777")
        top.set_yticks([])
    if drift_t:
        twin = top.twinx()
        (dl,) = twin.plot(drift_t, drift_v, "--", marker=".", lw=1.2, color="#d62728", alpha=0.8,
                          label="drift score", gid="drift_score")
        twin.set_ylabel("drift score", color="#d62728")
        twin.set_ylim(0, max(1.0, max(drift_v) * 1.1))
        handles.append(dl)

    # Shaded rollout phases on both panels.
    spans = rollout_spans(events, end)
    phase_names: list[str] = []
    for s in spans:
        if s.phase not in phase_names:
            phase_names.append(s.phase)
    span_handles = {}
    for s in spans:
        color = "#dddddd" if s.phase == "paused" else PHASE_COLORS[phase_names.index(s.phase) % len(PHASE_COLORS)]
        gid = f"span:{s.phase}:{s.outcome}:{s.version or ''}"
        top.axvspan(s.start, s.end, color=color, alpha=0.35, lw=0, gid=gid)
        lanes.axvspan(s.start, s.end, color=color, alpha=0.25, lw=0, gid="shade:" + gid)
        span_handles.setdefault(s.phase, Patch(color=color, alpha=0.5, label=f"rollout: {s.phase}"))

    # Markers, one collection per kind, in their lane.
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        kind = marker_kind(e)
        if kind is not None:
            by_kind.setdefault(kind, []).append(e)
    lane_y = {lane: len(LANES) - 1 - i for i, lane in enumerate(LANES)}
    marker_handles = []
    for kind, style in MARKER_STYLES.items():
        evs = by_kind.get(kind)
        if not evs:
            continue
        times = [event_time(e) for e in evs]
        sc = lanes.scatter(times, [lane_y[style.lane]] * len(times), marker=style.symbol, s=70, color=style.color,
                           edgecolors="black" if style.symbol not in ("x", "$!$") else None, linewidths=0.5,
                           zorder=3, label=style.label, gid=f"marker:{kind}")
        marker_handles.append(sc)
        if style.vline:
            for t in times:
                top.axvline(t, color=style.color, lw=1.0, alpha=0.7, ls="-", gid=f"vline:{kind}")
    lanes.set_yticks([lane_y[lane] for lane in LANES], list(LANES))
    lanes.set_ylim(-0.7, len(LANES) - 0.3)
    lanes.grid(axis="x", alpha=0.3)
    top.grid(alpha=0.3)
    top.set_xlim(lo, hi)
    locator = mdates.AutoDateLocator()
    lanes.xaxis.set_major_locator(locator)
    lanes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=timezone.utc))
    top.tick_params(labelbottom=False)
    lanes.set_xlabel("time (UTC)")

    if handles or span_handles:
        top.legend(handles=handles + list(span_handles.values()), loc="upper left", bbox_to_anchor=(1.06, 1.0),
                   fontsize=8, frameon=False)
    if marker_handles:
        lanes.legend(handles=marker_handles, loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8,
                     frameon=False, ncol=1)
    title = (f"{model}: {start:%Y-%m-%d %H:%M:%S} – {end:%Y-%m-%d %H:%M:%S} UTC "
             f"({len(events)} events)")
    fig.suptitle(title, fontsize=12)
    fig.subplots_adjust(left=0.08, right=0.78, top=0.93, bottom=0.08)
    return fig, title, top, lanes, by_kind, sum(len(p) for p in metrics.values()), len(drift_t)


def _drawn_markers(lanes, by_kind: dict[str, list[dict[str, Any]]]) -> list[Marker]:
    """Read the markers back from the lane panel's scatter collections."""
    import matplotlib.dates as mdates

    out: list[Marker] = []
    for coll in lanes.collections:
        gid = coll.get_gid() or ""
        if not gid.startswith("marker:"):
            continue
        kind = gid.split(":", 1)[1]
        evs = by_kind.get(kind, [])
        for (x, _), e in zip(coll.get_offsets(), evs):
            t = mdates.num2date(float(x), tz=timezone.utc)
            out.append(Marker(kind, t, str(e.get("type")), str(e.get("id")), describe_event(e)))
    out.sort(key=lambda m: (m.time, m.kind))
    return out


def _drawn_spans(top) -> list[Span]:
    """Read the shaded rollout spans back from the metric panel's patches."""
    import matplotlib.dates as mdates

    out: list[Span] = []
    for patch in top.patches:
        gid = patch.get_gid() or ""
        if not gid.startswith("span:"):
            continue
        _, phase, outcome, version = gid.split(":", 3)
        if hasattr(patch, "get_x") and hasattr(patch, "get_width"):
            x0, x1 = patch.get_x(), patch.get_x() + patch.get_width()
        else:  # older matplotlib draws axvspan as a Polygon
            xs = [v[0] for v in patch.get_xy()]
            x0, x1 = min(xs), max(xs)
        out.append(Span(phase, mdates.num2date(x0, tz=timezone.utc), mdates.num2date(x1, tz=timezone.utc), outcome,
                        version or None))
    out.sort(key=lambda s: s.start)
    return out


def _html(model: str, title: str, png: bytes, events: list[dict[str, Any]], result: TimelineResult) -> str:
    rows = []
    for e in events[-MAX_TABLE_ROWS:]:
        kind = marker_kind(e) or ""
        rows.append(
            f"<tr class='{html.escape(kind)}'><td>{html.escape(event_time(e).isoformat())}</td>"
            f"<td>{html.escape(str(e.get('type')))}</td><td>{html.escape(describe_event(e))}</td>"
            f"<td><code>{html.escape(str(e.get('id')))}</code></td></tr>")
    skipped = len(events) - min(len(events), MAX_TABLE_ROWS)
    note = f"<p>{skipped} older events not listed.</p>" if skipped else ""
    b64 = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85rem; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }}
tr.rollback td, tr.gate_failed td, tr.training_failed td, tr.alert td {{ background: #fdecea; }}
tr.promoted td, tr.gate_passed td {{ background: #eaf7ea; }}
img {{ max-width: 100%; height: auto; border: 1px solid #eee; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{result.events} events, {len(result.markers)} marked, {len(result.spans)} rollout phases,
{result.metric_points} metric points, {result.drift_points} drift scores.</p>
<img alt="timeline of {html.escape(model)}" src="data:image/png;base64,{b64}">
<h2>Events</h2>{note}
<table><thead><tr><th>time (UTC)</th><th>type</th><th>what</th><th>id</th></tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def render_timeline(events: list[dict[str, Any]], model: str, out: str | Path, *,
                    start: datetime | None = None, end: datetime | None = None) -> TimelineResult:
    """Draw a model's events to ``out`` (``.png``, or ``.html`` embedding the PNG and an event table).

    Pure apart from writing ``out``: no Redis, so it also works on an exported log.

    Parameters
    ----------
    events : list of dict
        CloudEvent envelopes (as JSON dicts) of one model, any order.
    model : str
    out : path
        Output file; the suffix picks the format.
    start, end : datetime, optional
        Widen the window shown beyond the first and last event (e.g. ``end=now`` so an
        ongoing rollout phase reaches the present).

    Returns
    -------
    TimelineResult
        The path, and the markers and spans read back from the drawn figure.

    Raises
    ------
    TimelineError
        No events, or an unsupported output suffix.

    Examples
    --------
    >>> result = render_timeline(load_events(r, keys, "churn"), "churn", "churn.png")  # doctest: +SKIP
    >>> [(m.kind, m.time) for m in result.markers][:2]  # doctest: +SKIP
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise TimelineError(f"--out must end in .png or .html, got {out.name!r}")
    if not events:
        raise TimelineError(f"no events recorded for model {model!r} in this window")
    events = sorted(events, key=event_time)
    first, last = event_time(events[0]), event_time(events[-1])
    start = min(start, first) if start is not None else first
    end = max(end, last) if end is not None else last
    if end - start < timedelta(seconds=1):
        start, end = start - timedelta(seconds=30), end + timedelta(seconds=30)
    fig, title, top, lanes, by_kind, metric_points, drift_points = _draw(model, events, start, end)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    png = buf.getvalue()
    result = TimelineResult(path=out, model=model, start=start, end=end, events=len(events),
                            markers=_drawn_markers(lanes, by_kind), spans=_drawn_spans(top),
                            metric_points=metric_points, drift_points=drift_points)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        out.write_bytes(png)
    else:
        out.write_text(_html(model, title, png, events, result), encoding="utf-8")
    return result


def timeline_for_model(client, keys, model: str, out: str | Path, *, since: datetime | None = None,
                       until: datetime | None = None) -> TimelineResult:
    """Load a model's recorded events from Redis and draw them (what ``retrain timeline`` runs)."""
    events = load_events(client, keys, model, since, until)
    return render_timeline(events, model, out)


__all__ = ["MARKER_STYLES", "Marker", "Span", "TimelineError", "TimelineResult", "describe_event", "event_time",
           "load_events", "marker_kind", "parse_time_bound", "render_timeline", "rollout_spans",
           "timeline_for_model"]
