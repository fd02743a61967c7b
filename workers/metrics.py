"""Prometheus metrics of the retraining system: one set of names for the workers and ingest.

Every name starts with ``retrain_``. The router serves its own ``/metrics`` from its own registry
(requests, errors and latency by model and version, shadow, request log, traffic table): those
series are listed, and tested against its real endpoint, in :mod:`workers.router.server`, and
are not defined here. Two kinds:

*Instrumented* (counted where the work happens, per process):

=====================================================  ==================================================
``retrain_events_ingested_total{type}``                events recorded into a model's log (decision worker,
                                                       once per event id): :func:`observe_events`
``retrain_events_dead_lettered_total{group}``          entries a stream consumer moved to the dead-letter
                                                       stream (:func:`track_consumer`)
``retrain_events_duplicates_total{group}``             redelivered entries skipped by id (same collector)
``retrain_events_reclaimed_total{group}``              entries reclaimed from dead consumers (same)
``retrain_events_trimmed_total{group}``                entries trimmed away before they were handled (same;
                                                       each also has a dead-letter entry)
``retrain_decisions_total{action,trigger}``            decisions (action ``start``/``suppress``), one per
                                                       fired trigger (``none`` when no trigger fired)
``retrain_pipeline_step_seconds{step}``                histogram of pipeline step durations
``retrain_pipeline_failures_total{step}``              pipelines that failed, by the failing step
``retrain_gate_outcomes_total{result}``                quality-gate verdicts (``passed``/``failed``)
``retrain_gate_checks_total{check,result}``            gate checks by name and result (``pass``/``fail``)
``retrain_rollout_transitions_total{model,transition}`` started, advanced, paused, resumed, completed,
                                                       rolled_back, aborted
``retrain_rollbacks_total{model,kind}``                rollbacks: ``automatic``, ``manual``, ``aborted``
``retrain_alerts_total{severity}``                     alerts raised
``retrain_ingest_events_total{source,outcome}``        events offered to HTTP ingest / adapters / emit
                                                       (``accepted``/``rejected``)
``retrain_ingest_requests_total{route,code}``          HTTP ingest requests by status code, refusals
                                                       before any event was read (401, 413, 415) included
=====================================================  ==================================================

*State* gauges, refreshed from Redis by :func:`collect_from_redis` (the metrics server calls it
before answering a scrape, so every process serving ``/metrics`` reports the same shared state):

=====================================================  ==================================================
``retrain_stream_length{shard}``                       entries in the event stream shard
``retrain_stream_lag{shard}``                          entries not yet delivered to the ``decision`` group
``retrain_stream_lag_seconds{shard}``                  age of the oldest undelivered entry
``retrain_stream_pending{shard}``                      delivered to the group but not acknowledged
``retrain_dead_letters``                               entries waiting in the dead-letter stream
``retrain_queue_length{queue}``                        Celery messages waiting per queue
``retrain_rollout_phase{model}``                       index of the current rollout phase (-1: none active)
``retrain_rollout_state{model,status}``                1 for the rollout's status (``none`` if never rolled)
``retrain_rollout_candidate_percent{model}``           live traffic share of the candidate
``retrain_rollout_waiting_seconds{model}``             how long the phase has waited for evidence
``retrain_model_version{model,alias}``                 version behind production / candidate / previous
                                                       (0: unset)
``retrain_pipeline_in_flight{model}``                  1 while a training pipeline holds the model's slot
``retrain_metrics_refresh_seconds``                    time the last refresh from Redis took
=====================================================  ==================================================

Processes with a prefork pool (training, gate) count in their children: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the worker starts and
:func:`start_metrics_server` aggregates every child (prometheus_client's multiprocess mode).
This module imports neither Celery nor the decision code; Redis is only touched by
:func:`collect_from_redis`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily

log = structlog.get_logger(__name__)

PREFIX = "retrain"
CONSUMER_GROUP = "decision"
"""The consumer group whose lag ``retrain_stream_lag`` reports."""
METRICS_PORT_ENV = "RETRAIN_METRICS_PORT"
METRICS_ADDR_ENV = "RETRAIN_METRICS_ADDR"
DEFAULT_ADDR = "0.0.0.0"
MIN_REFRESH_S = 1.0
"""Scrapes closer together than this reuse the last refresh from Redis."""
LAG_COUNT_CAP = 2_000
"""Without Redis 7's ``lag``, undelivered entries are counted server-side up to this many; beyond,
the count is extrapolated from the entry-id timestamps."""
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
"""kombu's Redis transport keeps one list per queue and priority step (named by :meth:`Keys.celery_queue`)."""
ROLLOUT_STATUSES = ("none", "shadow", "canary", "progressive", "paused", "completed", "rolled_back", "aborted")
ALIASES = ("production", "candidate", "previous")

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_GAUGE_MODE = "livemostrecent"
"""Multiprocess mode of the state gauges: only the process that refreshes them writes them."""


# --------------------------------------------------------------------------- instrumented metrics
EVENTS_INGESTED = Counter(f"{PREFIX}_events_ingested", "Events recorded into a model's event log, by type.",
                          ["type"])
DECISIONS = Counter(f"{PREFIX}_decisions", "Retraining decisions by action (start|suppress) and fired trigger.",
                    ["action", "trigger"])
PIPELINE_STEP_SECONDS = Histogram(f"{PREFIX}_pipeline_step_seconds", "Duration of training pipeline steps.",
                                  ["step"], buckets=STEP_BUCKETS)
PIPELINE_FAILURES = Counter(f"{PREFIX}_pipeline_failures", "Training pipelines that failed, by failing step.",
                            ["step"])
GATE_OUTCOMES = Counter(f"{PREFIX}_gate_outcomes", "Quality gate verdicts (passed|failed).", ["result"])
GATE_CHECKS = Counter(f"{PREFIX}_gate_checks", "Quality gate checks by name and result (pass|fail).",
                      ["check", "result"])
ROLLOUT_TRANSITIONS = Counter(f"{PREFIX}_rollout_transitions", "Rollout lifecycle transitions.",
                              ["model", "transition"])
ROLLBACKS = Counter(f"{PREFIX}_rollbacks", "Rollbacks by kind (automatic|manual|aborted).", ["model", "kind"])
ALERTS = Counter(f"{PREFIX}_alerts", "Alerts raised, by severity.", ["severity"])
INGEST_EVENTS = Counter(f"{PREFIX}_ingest_events", "Events offered to ingest (HTTP, adapters, emit).",
                        ["source", "outcome"])
INGEST_REQUESTS = Counter(f"{PREFIX}_ingest_requests", "HTTP ingest requests by route and status code "
                          "(refusals before any event was read included: 401, 413, 415).", ["route", "code"])

# --------------------------------------------------------------------------- state gauges
STREAM_LENGTH = Gauge(f"{PREFIX}_stream_length", "Entries in an event stream shard.", ["shard"],
                      multiprocess_mode=_GAUGE_MODE)
STREAM_LAG = Gauge(f"{PREFIX}_stream_lag", "Entries not yet delivered to the decision consumer group.", ["shard"],
                   multiprocess_mode=_GAUGE_MODE)
STREAM_LAG_SECONDS = Gauge(f"{PREFIX}_stream_lag_seconds", "Age of the oldest entry not yet delivered.", ["shard"],
                           multiprocess_mode=_GAUGE_MODE)
STREAM_PENDING = Gauge(f"{PREFIX}_stream_pending", "Entries delivered to the decision group but not acknowledged.",
                       ["shard"], multiprocess_mode=_GAUGE_MODE)
DEAD_LETTERS = Gauge(f"{PREFIX}_dead_letters", "Entries waiting in the dead-letter stream.",
                     multiprocess_mode=_GAUGE_MODE)
QUEUE_LENGTH = Gauge(f"{PREFIX}_queue_length", "Celery messages waiting in a queue.", ["queue"],
                     multiprocess_mode=_GAUGE_MODE)
ROLLOUT_PHASE = Gauge(f"{PREFIX}_rollout_phase", "Index of the current rollout phase (-1: no active rollout).",
                      ["model"], multiprocess_mode=_GAUGE_MODE)
ROLLOUT_STATE = Gauge(f"{PREFIX}_rollout_state", "1 for the model's current rollout status.", ["model", "status"],
                      multiprocess_mode=_GAUGE_MODE)
ROLLOUT_CANDIDATE_PERCENT = Gauge(f"{PREFIX}_rollout_candidate_percent", "Live traffic share of the candidate.",
                                  ["model"], multiprocess_mode=_GAUGE_MODE)
ROLLOUT_WAITING_SECONDS = Gauge(f"{PREFIX}_rollout_waiting_seconds",
                                "How long the current phase has waited for enough evidence (0: not waiting).",
                                ["model"], multiprocess_mode=_GAUGE_MODE)
MODEL_VERSION = Gauge(f"{PREFIX}_model_version", "Version behind an alias (0: unset).", ["model", "alias"],
                      multiprocess_mode=_GAUGE_MODE)
PIPELINE_IN_FLIGHT = Gauge(f"{PREFIX}_pipeline_in_flight", "1 while a training pipeline holds the model's slot.",
                           ["model"], multiprocess_mode=_GAUGE_MODE)
REFRESH_SECONDS = Gauge(f"{PREFIX}_metrics_refresh_seconds", "Time the last refresh of the state gauges took.",
                        multiprocess_mode=_GAUGE_MODE)


# --------------------------------------------------------------------------- counting helpers
def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


LIFECYCLE_COUNTED = frozenset({"retrain.decided", "retrain.suppressed", "training.failed", "gate.passed",
                               "gate.failed", "alert.raised"})
"""Types that move counters besides ``retrain_events_ingested_total`` (plus every ``rollout.*``)."""


def observe_events(events: Iterable[Any]) -> None:
    """Count a batch of events recorded into the model logs, and what their lifecycle types say.

    Called where events are recorded exactly once per id: after each committed batch of the
    decision worker's stream consumer (``StreamConsumer(on_committed=observe_events)``).
    Accepts :class:`events.envelope.CloudEvent` objects or their JSON dicts. Besides ``retrain_events_ingested_total{type}`` it derives the decision, gate,
    pipeline-failure, rollout, rollback and alert counters from the lifecycle events, so those
    are counted in one place whichever process did the work. Signals are tallied per batch
    (one counter update per type), so the hot path pays well under a microsecond per event.

    Parameters
    ----------
    events : iterable of CloudEvent or dict

    Examples
    --------
    >>> observe_events([new_event("retrain.decided", "churn", {...})])  # doctest: +SKIP
    """
    tally: dict[str, int] = {}
    lifecycle = []
    for event in events:
        etype = event.get("type") if type(event) is dict else getattr(event, "type", None)
        if not etype:
            continue
        tally[etype] = tally.get(etype, 0) + 1
        if etype in LIFECYCLE_COUNTED or etype.startswith("rollout."):
            lifecycle.append((etype, event))
    for etype, n in tally.items():
        EVENTS_INGESTED.labels(type=etype).inc(n)
    for etype, event in lifecycle:
        _observe_lifecycle(etype, event)


def _observe_lifecycle(etype: str, event: Any) -> None:
    data = _get(event, "data") or {}
    model = _get(event, "subject") or "unknown"
    if etype in ("retrain.decided", "retrain.suppressed"):
        action = "start" if etype == "retrain.decided" else "suppress"
        for trigger in (data.get("triggers") or ["none"]):
            DECISIONS.labels(action=action, trigger=str(trigger)).inc()
    elif etype == "training.failed":
        PIPELINE_FAILURES.labels(step=str(data.get("step") or "unknown")).inc()
    elif etype in ("gate.passed", "gate.failed"):
        observe_gate(data, passed=etype == "gate.passed", count_failure=True)
    elif etype.startswith("rollout."):
        transition = etype.split(".", 1)[1]
        ROLLOUT_TRANSITIONS.labels(model=model, transition=transition).inc()
        if transition in ("rolled_back", "aborted"):
            kind = "aborted" if transition == "aborted" or data.get("aborted") else (
                "manual" if data.get("manual") else "automatic")
            ROLLBACKS.labels(model=model, kind=kind).inc()
    elif etype == "alert.raised":
        ALERTS.labels(severity=str(data.get("severity") or "warning")).inc()


def observe_gate(data: Mapping[str, Any], *, passed: bool | None = None, count_failure: bool = True) -> None:
    """Count one gate verdict and its checks.

    ``data`` is a ``gate.*`` event's data or a gate report (``retrain gate --json``): a
    ``checks`` list of ``{"name", "passed", "skipped"?}`` counts every check; without it the
    ``failed_checks`` names count as failures (the passing ones are then unknown).
    ``pipeline_failures`` is incremented for a failed gate when ``count_failure`` is set
    (the pipeline stops at the gate, which emits no ``training.failed``).
    """
    verdict = bool(data.get("passed")) if passed is None else passed
    GATE_OUTCOMES.labels(result="passed" if verdict else "failed").inc()
    checks = data.get("checks")
    if isinstance(checks, list) and checks:
        for c in checks:
            if isinstance(c, Mapping) and c.get("name") and not c.get("skipped"):
                GATE_CHECKS.labels(check=str(c["name"]), result="pass" if c.get("passed") else "fail").inc()
    else:
        for name in data.get("failed_checks") or []:
            GATE_CHECKS.labels(check=str(name), result="fail").inc()
    if not verdict and count_failure:
        PIPELINE_FAILURES.labels(step="gate").inc()


def observe_ingest_request(route: str, code: int) -> None:
    """Count one HTTP ingest request by route (a known path, else ``other``) and status code."""
    INGEST_REQUESTS.labels(route=route, code=str(code)).inc()


def observe_ingest(source: str, accepted: int = 0, rejected: int = 0) -> None:
    """Count events offered to an ingest path (``http``, ``alertmanager``, ``evidently``, ``cli``...)."""
    if accepted:
        INGEST_EVENTS.labels(source=source, outcome="accepted").inc(accepted)
    if rejected:
        INGEST_EVENTS.labels(source=source, outcome="rejected").inc(rejected)


# --------------------------------------------------------------------------- stream consumers
class _ConsumerCollector:
    """Exports the stats of tracked ``events.bus.StreamConsumer`` objects as counters (per group)."""

    FIELDS = (("dead_lettered", "events_dead_lettered", "Entries moved to the dead-letter stream."),
              ("duplicates", "events_duplicates", "Redelivered entries skipped by event id."),
              ("reclaimed", "events_reclaimed", "Entries reclaimed from consumers that stopped."),
              ("trimmed", "events_trimmed", "Entries trimmed from the stream before they were handled "
                                            "(each also has a dead-letter entry)."))

    def __init__(self) -> None:
        self.consumers: weakref.WeakSet = weakref.WeakSet()

    def collect(self):
        totals: dict[str, dict[str, int]] = {}
        for consumer in list(self.consumers):
            group = str(getattr(consumer, "group", "unknown"))
            stats = getattr(consumer, "stats", None)
            per = totals.setdefault(group, {})
            for attr, _, _ in self.FIELDS:
                per[attr] = per.get(attr, 0) + int(getattr(stats, attr, 0) or 0)
        for attr, name, doc in self.FIELDS:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["group"])
            for group, per in sorted(totals.items()):
                family.add_metric([group], per.get(attr, 0))
            yield family


_CONSUMERS = _ConsumerCollector()
REGISTRY.register(_CONSUMERS)


def track_consumer(consumer: Any) -> None:
    """Export a stream consumer's dead-letter / duplicate / reclaim counts (held weakly).

    Call once after creating the consumer, e.g. in the decision bootstep:
    ``track_consumer(self.service.consumer)``.
    """
    _CONSUMERS.consumers.add(consumer)


# --------------------------------------------------------------------------- state from Redis
@dataclass
class StreamState:
    shard: int
    length: int = 0
    lag: int = 0
    lag_seconds: float = 0.0
    pending: int = 0
    lag_exact: bool = True


@dataclass
class ModelState:
    model: str
    rollout_status: str = "none"
    phase_index: int = -1
    candidate_percent: float = 0.0
    waiting_seconds: float = 0.0
    versions: dict[str, int] = field(default_factory=dict)
    in_flight: bool = False


@dataclass
class RedisState:
    """A snapshot of the shared state the gauges show (also handy for health checks)."""

    streams: list[StreamState] = field(default_factory=list)
    dead_letters: int = 0
    queues: dict[str, int] = field(default_factory=dict)
    models: list[ModelState] = field(default_factory=list)


_COUNT_AFTER = """
-- KEYS[1] stream ; ARGV[1] exclusive start id, ARGV[2] cap -> entries after the id (at most cap)
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', tonumber(ARGV[2]))
"""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def count_undelivered(client, stream: str, last_delivered: str, *, cap: int = LAG_COUNT_CAP) -> tuple[int, bool]:
    """Entries after ``last_delivered`` (Redis 6.2 fallback for XINFO GROUPS ``lag``).

    Counted by a server-side script (no payloads cross the wire) up to ``cap``; beyond that the
    count is extrapolated from the entry-id timestamps. Returns (count, exact).
    """
    n = int(client.eval(_COUNT_AFTER, 1, stream, last_delivered or "0-0", cap))
    if n < cap:
        return n, True
    info = client.xinfo_stream(stream)
    length = int(info.get("length", 0))
    first, last = info.get("first-entry"), info.get("last-entry")
    if not first or not last:
        return n, False
    t0, t1, td = _id_ms(first[0]), _id_ms(last[0]), _id_ms(last_delivered or "0-0")
    if t1 <= t0:
        return max(n, length), False
    share = min(1.0, max(0.0, (t1 - max(td, t0)) / (t1 - t0)))
    return max(n, round(length * share)), False


def _stream_state(client, stream: str, shard: int, group: str, now_ms: int) -> StreamState:
    out = StreamState(shard=shard)
    if not client.exists(stream):
        return out
    out.length = int(client.xlen(stream))
    groups = {_text(g["name"]): g for g in client.xinfo_groups(stream)}
    g = groups.get(group)
    if g is None:  # no consumer group yet: nothing has been delivered
        out.lag = out.length
        last_delivered = "0-0"
    else:
        out.pending = int(g.get("pending") or 0)
        last_delivered = _text(g.get("last-delivered-id") or "0-0")
        lag = g.get("lag")
        if lag is not None:
            out.lag = int(lag)
        else:  # Redis 6.2, or a lag Redis 7 cannot compute (deletions inside the range)
            out.lag, out.lag_exact = count_undelivered(client, stream, last_delivered)
    if out.lag > 0:
        nxt = client.xrange(stream, min=f"({last_delivered}", count=1) if last_delivered != "0-0" else \
            client.xrange(stream, count=1)
        if nxt:
            out.lag_seconds = max(0.0, (now_ms - _id_ms(nxt[0][0])) / 1000.0)
    return out


def _queue_names() -> list[str]:
    from config.celery_config import ROLE_QUEUES

    return list(ROLE_QUEUES["all"])


@dataclass(frozen=True)
class _RolloutFields:
    status: str
    phase_index: int
    waiting_since: datetime | None
    """Start of the current insufficient-evidence wait (None: not waiting)."""


_ROLLOUT_CACHE: dict[tuple, tuple[tuple, _RolloutFields]] = {}
"""Parsed rollout states by (server, key) and (revision, length): the state JSON (with its analysis
history, tens of KB) is only fetched and parsed again when the rollout changed."""


def _rollout_fields(raw_state: bytes | str | None) -> _RolloutFields:
    """Status, phase index (-1 unless active) and evidence wait from the stored rollout JSON."""
    if not raw_state:
        return _RolloutFields("none", -1, None)
    state = json.loads(raw_state)
    status = str(state.get("status") or "none")
    active = status not in ("completed", "rolled_back", "aborted")
    since = None
    if active and (state.get("last_analysis") or {}).get("insufficient_evidence"):
        raw = state.get("waiting_since") or state.get("phase_started_at")
        if raw:
            since = datetime.fromisoformat(raw)
            since = since if since.tzinfo else since.replace(tzinfo=timezone.utc)
    return _RolloutFields(status, int(state.get("phase_index", 0)) if active else -1, since)


def _server_id(client) -> tuple:
    kw = getattr(getattr(client, "connection_pool", None), "connection_kwargs", {}) or {}
    return (kw.get("host"), kw.get("port"), kw.get("db"), kw.get("path"))


def _rollouts(client, keys, models: list[str]) -> dict[str, _RolloutFields]:
    pipe = client.pipeline(transaction=False)
    for m in models:
        pipe.hget(keys.rollout(m), "revision")
        pipe.hstrlen(keys.rollout(m), "state")
    replies = pipe.execute()
    server = _server_id(client)
    out: dict[str, _RolloutFields] = {}
    stale: list[tuple[str, tuple, tuple]] = []
    for i, m in enumerate(models):
        stamp = (replies[2 * i], replies[2 * i + 1])
        ck = (server, keys.rollout(m))
        cached = _ROLLOUT_CACHE.get(ck)
        if not stamp[1]:
            out[m] = _RolloutFields("none", -1, None)
        elif cached is not None and cached[0] == stamp:
            out[m] = cached[1]
        else:
            stale.append((m, ck, stamp))
    if stale:
        pipe = client.pipeline(transaction=False)
        for m, _, _ in stale:
            pipe.hget(keys.rollout(m), "state")
        for (m, ck, stamp), raw in zip(stale, pipe.execute()):
            fields = _rollout_fields(raw)
            _ROLLOUT_CACHE[ck] = (stamp, fields)
            out[m] = fields
    return out


def read_redis_state(client, keys, *, group: str = CONSUMER_GROUP) -> RedisState:
    """Read what the state gauges show: streams, dead letters, Celery queues, per-model rollout/aliases.

    Parameters
    ----------
    client : redis.Redis
    keys : config.keys.Keys
    group : str
        The consumer group whose lag is reported.
    """
    now = datetime.now(timezone.utc)
    now_ms = int(now.timestamp() * 1000)
    state = RedisState()
    for shard, stream in enumerate(keys.all_event_streams()):
        state.streams.append(_stream_state(client, stream, shard, group, now_ms))
    pipe = client.pipeline(transaction=False)
    pipe.xlen(keys.dead_letters())
    pipe.smembers(keys.models())
    queues = _queue_names()
    for q in queues:
        for step in KOMBU_PRIORITY_STEPS:
            pipe.llen(keys.celery_queue(q, step))
    replies = pipe.execute()
    state.dead_letters = int(replies[0] or 0)
    models = sorted(_text(m) for m in replies[1])
    lens = replies[2:]
    n = len(KOMBU_PRIORITY_STEPS)
    state.queues = {q: int(sum(lens[i * n:(i + 1) * n])) for i, q in enumerate(queues)}
    if models:
        rollouts = _rollouts(client, keys, models)
        pipe = client.pipeline(transaction=False)
        for m in models:
            pipe.hgetall(keys.traffic(m))
            pipe.hgetall(keys.aliases(m))
            pipe.hget(keys.guard(m), "in_flight")
        replies = pipe.execute()
        for i, m in enumerate(models):
            traffic, aliases, in_flight = replies[i * 3:(i + 1) * 3]
            r = rollouts[m]
            waiting = max(0.0, (now - r.waiting_since).total_seconds()) if r.waiting_since else 0.0
            t = {_text(k): _text(v) for k, v in traffic.items()}
            percent = float(t.get("candidate_percent") or 0.0) if t.get("candidate") else 0.0
            versions = {}
            for k, v in aliases.items():
                try:
                    versions[_text(k)] = int(_text(v))
                except ValueError:
                    continue
            state.models.append(ModelState(m, r.status, r.phase_index, percent, waiting, versions, bool(in_flight)))
    return state


_refresh_lock = threading.Lock()


def collect_from_redis(client, keys, *, group: str = CONSUMER_GROUP) -> RedisState:
    """Refresh the state gauges from Redis and return the snapshot they now show.

    Call it right before exposing metrics (``/metrics`` handlers; :func:`start_metrics_server`
    does it on every scrape). Label sets are never removed, only overwritten, so it is safe in
    prometheus_client's multiprocess mode.
    """
    started = time.perf_counter()
    snap = read_redis_state(client, keys, group=group)
    with _refresh_lock:
        for s in snap.streams:
            shard = str(s.shard)
            STREAM_LENGTH.labels(shard=shard).set(s.length)
            STREAM_LAG.labels(shard=shard).set(s.lag)
            STREAM_LAG_SECONDS.labels(shard=shard).set(s.lag_seconds)
            STREAM_PENDING.labels(shard=shard).set(s.pending)
        DEAD_LETTERS.set(snap.dead_letters)
        for q, n in snap.queues.items():
            QUEUE_LENGTH.labels(queue=q).set(n)
        for m in snap.models:
            ROLLOUT_PHASE.labels(model=m.model).set(m.phase_index)
            for status in ROLLOUT_STATUSES:
                ROLLOUT_STATE.labels(model=m.model, status=status).set(1 if status == m.rollout_status else 0)
            ROLLOUT_CANDIDATE_PERCENT.labels(model=m.model).set(m.candidate_percent)
            ROLLOUT_WAITING_SECONDS.labels(model=m.model).set(m.waiting_seconds)
            for alias in ALIASES:
                MODEL_VERSION.labels(model=m.model, alias=alias).set(m.versions.get(alias, 0))
            PIPELINE_IN_FLIGHT.labels(model=m.model).set(1 if m.in_flight else 0)
        REFRESH_SECONDS.set(time.perf_counter() - started)
    return snap


# --------------------------------------------------------------------------- exposition
def metric_names(registry: CollectorRegistry = REGISTRY, pattern: str = f"{PREFIX}_*") -> set[str]:
    """Names of the metric families a registry exposes (matching a glob)."""
    return {m.name for m in registry.collect() if fnmatch.fnmatch(m.name, pattern)}


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - scrapes are not worth a log line each
        pass


@dataclass
class MetricsServer:
    """A running metrics endpoint (``/metrics`` on ``addr:port``)."""

    addr: str
    port: int
    httpd: Any
    thread: threading.Thread

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.addr in ("0.0.0.0", "") else self.addr
        return f"http://{host}:{self.port}/metrics"

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _registry() -> CollectorRegistry:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(_CONSUMERS)
    return registry


def _redis_from_settings():
    try:
        from config.keys import keys_from_settings
        from config.settings import get_settings
        from workers.connections import get_redis

        s = get_settings()
        return get_redis(s), keys_from_settings(s)
    except Exception as exc:  # noqa: BLE001 - serve the process metrics even without Redis
        log.warning("metrics.no_redis", error=str(exc))
        return None, None


def start_metrics_server(port: int, addr: str = DEFAULT_ADDR, *, client=None, keys=None,
                         redis_state: bool = True, min_refresh_s: float = MIN_REFRESH_S) -> MetricsServer:
    """Serve ``/metrics`` from a daemon thread; refresh the state gauges from Redis per scrape.

    Parameters
    ----------
    port : int
        TCP port (0 picks a free one; see ``MetricsServer.port``).
    addr : str
        Bind address.
    client, keys : optional
        Redis client and key schema for the state gauges (default: from the settings).
    redis_state : bool
        False serves only this process's metrics (no Redis reads).
    min_refresh_s : float
        Scrapes closer together reuse the previous refresh.

    Returns
    -------
    MetricsServer

    Examples
    --------
    >>> server = start_metrics_server(9102)  # doctest: +SKIP
    >>> server.url  # doctest: +SKIP
    'http://127.0.0.1:9102/metrics'
    """
    if redis_state and (client is None or keys is None):
        client, keys = _redis_from_settings()
    registry = _registry()
    inner = make_wsgi_app(registry)
    last = [0.0]
    gate = threading.Lock()

    def refresh() -> None:
        if client is None or keys is None:
            return
        with gate:
            if time.monotonic() - last[0] < min_refresh_s:
                return
            try:
                collect_from_redis(client, keys)
            except Exception as exc:  # noqa: BLE001 - a Redis hiccup must not break the scrape
                log.warning("metrics.refresh_failed", error=str(exc))
            last[0] = time.monotonic()

    def app(environ, start_response):
        refresh()
        return inner(environ, start_response)

    httpd = make_server(addr, port, app, _Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=httpd.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    server = MetricsServer(addr, httpd.server_port, httpd, thread)
    log.info("metrics.serving", url=server.url, multiprocess=registry is not REGISTRY)
    return server


def start_metrics_server_from_env(environ: Mapping[str, str] | None = None) -> MetricsServer | None:
    """Start the metrics server when ``RETRAIN_METRICS_PORT`` is set (else do nothing, return None).

    ``RETRAIN_METRICS_ADDR`` picks the bind address (default 0.0.0.0). A port already taken is
    logged, not raised: metrics must never keep a worker from starting.
    """
    env = os.environ if environ is None else environ
    raw = (env.get(METRICS_PORT_ENV) or "").strip()
    if not raw:
        return None
    try:
        return start_metrics_server(int(raw), env.get(METRICS_ADDR_ENV) or DEFAULT_ADDR)
    except (OSError, ValueError) as exc:
        log.error("metrics.not_started", port=raw, error=str(exc))
        return None


__all__ = [
    "ALERTS", "DEAD_LETTERS", "DECISIONS", "EVENTS_INGESTED", "GATE_CHECKS", "GATE_OUTCOMES", "INGEST_EVENTS",
    "INGEST_REQUESTS",
    "MODEL_VERSION", "PIPELINE_FAILURES", "PIPELINE_IN_FLIGHT", "PIPELINE_STEP_SECONDS", "QUEUE_LENGTH",
    "ROLLBACKS", "ROLLOUT_CANDIDATE_PERCENT", "ROLLOUT_PHASE", "ROLLOUT_STATE", "ROLLOUT_TRANSITIONS",
    "ROLLOUT_WAITING_SECONDS", "STREAM_LAG", "STREAM_LAG_SECONDS",
    "STREAM_LENGTH", "STREAM_PENDING", "MetricsServer", "RedisState", "collect_from_redis", "count_undelivered",
    "metric_names", "observe_events", "observe_gate", "observe_ingest", "observe_ingest_request", "read_redis_state",
    "start_metrics_server", "start_metrics_server_from_env", "track_consumer",
]
