"""The router library: serve ``predict`` for one model from the traffic table in Redis.

Request path (no Redis round trip, nothing that waits)::

    snapshot -> bucket = crc32(model + request_id) % 10000 -> candidate if bucket < percent*100
             -> features to the model's input (cached column order) -> predict_proba/predict
             -> append a record to an in-memory buffer -> buffer a mirror for the shadow process

Everything else happens off the request path:

* the **watcher** holds the traffic table. It listens on the traffic pub/sub channel and, as a
  fallback for a missed message (a reconnect, a write without PUBLISH), compares the table's
  ``revision`` every ``check_interval`` seconds. On a change it loads (hash-verified, through the
  registry) every version the table names -- production, candidate, shadow and the previous
  production -- *before* swapping in a new immutable snapshot with one assignment. A rollback
  therefore never loads anything, and a version that fails to load (tampered, missing, untrusted)
  is refused: the router keeps serving what it served, logs the refusal and retries later.
* the **shadow process** (:mod:`workers.router.shadow`) answers mirrored requests at idle CPU
  priority, at most ``shadow_queue_size`` in flight (a mirror beyond that is dropped and counted).
  A slow or failing shadow only delays or fails its own log record (``shadow=1``).
* the **log flusher** (:mod:`workers.router.requestlog`) writes the buffered per-request records
  to ``keys.requests(model)`` every ``flush_interval`` seconds or ``flush_batch`` records.

Features become each version's input in :mod:`workers.router.inputs`; a loaded version is a
:class:`~workers.router.models.LoadedModel`. The record format of the request and feedback
streams, and :func:`decode_request` / :func:`decode_feedback` (re-exported here), are in
:mod:`workers.router.requestlog`.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import pandas as pd
import redis
import structlog

from config.keys import Keys
from workers.router.inputs import FeatureError, RouterError
from workers.router.models import LOAD_RETRY_S, LoadedModel
from workers.router.requestlog import (FLUSH_BATCH, FLUSH_INTERVAL_S, STOP_TIMEOUT_S, RequestLog, append_records,
                                       decode_feedback, decode_request, one_line)
from workers.router.shadow import SHADOW_QUEUE_SIZE, ShadowProcess, connection_spec
from workers.router.traffic import TrafficError, TrafficTable, read_revision, read_traffic

log = structlog.get_logger(__name__)

BUCKETS = 10_000
"""Request ids hash into this many buckets; a percent maps to ``percent * 100`` of them."""
CHECK_INTERVAL_S = 1.0
"""How often the watcher compares the stored revision (the fallback for a missed message)."""
WATCH_TICK_S = 0.1
"""The watcher's longest sleep (it also sends mirrors a quiet request path left buffered)."""
MAX_LABEL_CHARS = 1000
"""Longest feedback label (a class name, a value as text) the feedback stream takes."""


# --------------------------------------------------------------------------- errors, results


class NoProductionVersion(RouterError, LookupError):
    """The model has no production version loaded (unknown model, nothing promoted yet)."""


class PredictionError(RouterError):
    """The model raised while answering; the error is logged for its version."""

    def __init__(self, message: str, version: str, request_id: str):
        super().__init__(message)
        self.version = version
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Prediction:
    """One answer: which version gave it, what it said, how long it took.

    ``prediction`` and ``score`` are scalars for a single row (a dict) and lists for a batch.
    """

    version: str
    prediction: Any
    score: Any
    latency_ms: float
    served_by: str
    """``"production"`` or ``"candidate"``."""
    request_id: str = ""


@dataclass
class RouterStats:
    """Counters of the background work (read by ``/metrics`` and ``/healthz``)."""

    records_written: int = 0
    records_dropped: int = 0
    log_failures: int = 0
    loads: int = 0
    load_failures: int = 0
    refreshes: int = 0


@dataclass(frozen=True)
class _Snapshot:
    """What the request path reads: one consistent view of the table and its loaded versions."""

    table: TrafficTable
    production: LoadedModel | None = None
    candidate: LoadedModel | None = None
    threshold: int = 0
    shadow: LoadedModel | None = None


# --------------------------------------------------------------------------- the router


class Router:
    """Serve ``predict`` for one model from the traffic table in Redis.

    Parameters
    ----------
    model : str
        Model name.
    client : redis.Redis, optional
        Defaults to :func:`workers.connections.get_redis`.
    keys : Keys, optional
        Defaults to the key schema from settings.
    registry : Registry, optional
        Where versions are looked up and loaded (hash-verified); defaults to ``Registry(client, keys)``.
    check_interval, flush_interval, flush_batch, shadow_queue_size, maxlen
        Background cadences and bounds (module constants by default; ``maxlen`` is
        ``settings.stream_maxlen``).
    start : bool
        Start the background threads (the first table is always loaded before returning).

    Examples
    --------
    >>> with Router("churn") as router:                                   # doctest: +SKIP
    ...     p = router.predict({"age": 41, "plan": "pro"}, request_id="r-1")
    ...     router.feedback("r-1", 1)
    """

    def __init__(self, model: str, client: redis.Redis | None = None, keys: Keys | None = None, registry: Any = None,
                 *, check_interval: float = CHECK_INTERVAL_S, flush_interval: float = FLUSH_INTERVAL_S,
                 flush_batch: int = FLUSH_BATCH, shadow_queue_size: int = SHADOW_QUEUE_SIZE,
                 maxlen: int | None = None, start: bool = True):
        from config.settings import get_settings

        settings = get_settings()
        if client is None:
            from workers.connections import get_redis

            client = get_redis()
        if keys is None:
            from config.keys import keys_from_settings

            keys = keys_from_settings(settings)
        if registry is None:
            from workers.registry.store import Registry

            registry = Registry(client, keys)
        self.model = model
        self.redis = client
        self.keys = keys
        self.registry = registry
        self.maxlen = int(maxlen or settings.stream_maxlen)
        self.check_interval = check_interval
        self.stats = RouterStats()
        self.load_errors: dict[str, str] = {}
        self._seed = zlib.crc32(model.encode())
        self._models: dict[str, LoadedModel] = {}
        self._failed_at: dict[str, float] = {}
        self._last_production: str | None = None
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._started = False
        self._closed = False
        self._snap = _Snapshot(TrafficTable())
        self._log = RequestLog(client, keys.requests(model), maxlen=self.maxlen, interval=flush_interval,
                               batch=flush_batch, stats=self.stats, name=f"router-log-{model}")
        self._shadow = ShadowProcess({
            "model": model, "connection": connection_spec(client), "prefix": keys.prefix, "shards": keys.shards,
            "maxlen": self.maxlen, "flush_interval": flush_interval, "flush_batch": flush_batch,
            "trusted_prefixes": tuple(settings.trusted_prefixes), "log_level": settings.log_level,
        }, size=shadow_queue_size)
        self._watcher = threading.Thread(target=self._watch, name=f"router-watch-{model}", daemon=True)
        self._subscribed = threading.Event()
        self.refresh()
        if start:
            self.start()

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watcher and log threads, and the shadow process when a shadow is set (idempotent)."""
        if self._started:
            return
        self._started = True
        self._log.start()
        self._watcher.start()
        self._sync_shadow(self._snap)
        self._subscribed.wait(2.0)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Finish the mirrors in progress (up to ``timeout``), flush the log, stop threads and process."""
        if self._closed:
            return
        self._closed = True
        self.flush(timeout)
        self._stop.set()
        self._shadow.stop(timeout)
        self._log.stop(timeout)
        if self._watcher.is_alive():
            self._watcher.join(timeout)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until queued mirrors are answered and logged, then write every buffered record.

        Returns False when something was still pending at the deadline (or Redis refused).
        """
        deadline = time.monotonic() + timeout
        shadow = self._shadow
        while (shadow.pending() or shadow.unwritten()) and shadow.alive() and time.monotonic() < deadline:
            shadow.send_pending()
            time.sleep(0.005)
        return self._log.flush() and not shadow.pending() and not shadow.unwritten()

    # --- the request path --------------------------------------------------------------------
    def predict(self, features: Any, request_id: str | None = None) -> Prediction:
        """Answer one request (a dict), or a batch (a list of dicts or a DataFrame).

        Parameters
        ----------
        features : dict, list of dict, DataFrame or 2-D array
            Feature values by name (extra names are ignored).
        request_id : str, optional
            Routes the request (sticky: the same id always reaches the same version while the
            table stands) and keys the feedback. A random id is used when absent.

        Returns
        -------
        Prediction

        Raises
        ------
        NoProductionVersion
            Nothing to serve.
        FeatureError
            The features do not fit the routed version (logged as that version's error).
        PredictionError
            The model raised (logged as that version's error).
        """
        snap = self._snap
        rid = request_id if type(request_id) is str else (uuid.uuid4().hex if request_id is None else str(request_id))
        if snap.threshold and zlib.crc32(rid.encode(), self._seed) % BUCKETS < snap.threshold:
            model, served_by = snap.candidate, "candidate"
        else:
            model, served_by = snap.production, "production"
        if model is None:
            raise NoProductionVersion(f"model {self.model!r} has no production version")
        ts = time.time()
        t0 = time.perf_counter()
        try:
            X, n_rows = model.inputs(features)
            preds, scores = model.run(X)
        except Exception as exc:
            latency = (time.perf_counter() - t0) * 1000.0
            error = one_line(exc)
            self._log.append((rid, model.version, latency, None, None, error, False, ts, None))
            if isinstance(exc, FeatureError):
                exc.version = model.version
                raise
            if isinstance(exc, (ValueError, TypeError, OverflowError)):
                # scikit-learn's input validation ("could not convert string to float", "unknown
                # categories", ...): the request's features, not the model, are at fault.
                bad = FeatureError(f"version {model.version} cannot use these features: {exc}")
                bad.version = model.version
                raise bad from exc
            raise PredictionError(f"version {model.version} failed: {error}", model.version, rid) from exc
        latency = (time.perf_counter() - t0) * 1000.0
        shadow = snap.shadow
        if shadow is not None and shadow is not model:
            self._shadow.submit(("m", shadow.version, rid, features, n_rows, ts))
        if n_rows == 1 and type(features) is not list and not isinstance(features, pd.DataFrame):
            pred, score = preds[0], scores[0]
            self._log.append((rid, model.version, latency, pred, score, None, False, ts, None))
            return Prediction(model.version, pred, score, latency, served_by, rid)
        append_records(self._log.append, model.version, rid, n_rows, preds, scores, latency, None, ts, False)
        return Prediction(model.version, preds, scores, latency, served_by, rid)

    def feedback(self, request_id: str, label: Any) -> str:
        """Record the delayed ground truth for a request; returns the stream entry id.

        ``label`` is a JSON scalar (class label or value); it is stored JSON-encoded so its type
        survives (``1`` and ``"1"`` stay different).
        """
        if not isinstance(request_id, str) or not request_id:
            raise FeatureError("request_id must be a non-empty string")
        if hasattr(label, "item"):
            label = label.item()
        if label is None or not isinstance(label, (str, int, float, bool)):
            raise FeatureError("label must be a string, number or boolean")
        if isinstance(label, float) and not math.isfinite(label):
            raise FeatureError("label must be finite")
        if isinstance(label, str) and len(label) > MAX_LABEL_CHARS:
            raise FeatureError(f"label of {len(label)} characters is over the limit of {MAX_LABEL_CHARS}")
        production = self._models.get(self._snap.table.production or "")
        if production is not None and production.task == "regression" and (
                isinstance(label, bool) or not isinstance(label, (int, float))):
            raise FeatureError(f"label must be a number for the regression model {self.model!r}, got {label!r:.60}")
        entry = self.redis.xadd(self.keys.feedback(self.model),
                                {"request_id": request_id, "label": json.dumps(label), "ts": f"{time.time():.6f}"},
                                maxlen=self.maxlen, approximate=True)
        return entry.decode() if isinstance(entry, bytes) else entry

    # --- the traffic table -------------------------------------------------------------------
    @property
    def table(self) -> TrafficTable:
        """The traffic table currently served (production resolved from the registry when unset)."""
        return self._snap.table

    def loaded_versions(self) -> list[str]:
        return sorted(self._models, key=lambda v: (len(v), v))

    def status(self) -> dict[str, Any]:
        snap = self._snap
        return {
            "model": self.model,
            "table": snap.table.to_dict(),
            "serving": {"production": snap.production.version if snap.production else None,
                        "candidate": snap.candidate.version if snap.candidate else None,
                        "candidate_buckets": snap.threshold,
                        "shadow": snap.shadow.version if snap.shadow else None},
            "loaded": self.loaded_versions(),
            "load_errors": dict(self.load_errors),
            "stats": {**self.stats.__dict__, **self._shadow.stats()},
            "pending_records": self._log.pending(),
            "pending_mirrors": self._shadow.pending(),
        }

    def refresh(self) -> TrafficTable:
        """Read the table, load what it names, and swap in the new snapshot (background thread)."""
        with self._refresh_lock:
            try:
                table = read_traffic(self.redis, self.keys, self.model)
            except TrafficError as exc:  # a hand-edited, unservable table: keep serving the last good one
                log.error("router.bad_table", model=self.model, error=str(exc))
                return self._snap.table
            if table.production is None:
                table = TrafficTable(production=self._registry_production(), previous=table.previous,
                                     candidate=table.candidate, candidate_percent=table.candidate_percent,
                                     shadow=table.shadow, revision=table.revision)
            old = self._snap
            wanted = table.versions()
            if self._last_production:
                wanted.add(self._last_production)
            for version in sorted(wanted):
                self._ensure_loaded(version)
            production = self._models.get(table.production) if table.production else None
            if production is None and table.production:
                production = old.production  # refused or unavailable: keep serving what we served
                if production is not None:
                    log.warning("router.keeping_version", model=self.model, version=production.version,
                                wanted=table.production, reason=self.load_errors.get(table.production, ""))
            candidate = self._models.get(table.candidate) if table.candidate else None
            shadow = self._models.get(table.shadow) if table.shadow else None
            threshold = table.candidate_buckets if candidate is not None else 0
            new = _Snapshot(table, production, candidate, threshold, shadow)
            self._snap = new
            self.stats.refreshes += 1
            if self._started and (shadow is not old.shadow or not self._shadow.alive()):
                self._sync_shadow(new)
            if production is not None:
                self._last_production = production.version
            keep = wanted | {m.version for m in (production, candidate, shadow) if m is not None}
            for version in list(self._models):
                if version not in keep:
                    del self._models[version]
            if old.table.revision != table.revision or old.production is not production:
                log.info("router.table", model=self.model, revision=table.revision,
                         production=production.version if production else None,
                         candidate=candidate.version if candidate else None,
                         candidate_percent=table.candidate_percent if candidate else 0.0,
                         shadow=shadow.version if shadow else None)
            return table

    def _sync_shadow(self, snap: _Snapshot) -> None:
        """Run the shadow process while the table names a shadow, and tell it which version."""
        if snap.shadow is None:
            return
        self._shadow.ensure_running()
        self._shadow.preload((snap.shadow.version,))

    def _registry_production(self) -> str | None:
        """Production before any table was written: the registry alias, else the newest version
        whose status is ``production``."""
        try:
            version = self.registry.alias(self.model, "production")
            if version is not None:
                return str(version)
            prod = [mv.version for mv in self.registry.versions(self.model) if mv.status == "production"]
            return str(max(prod)) if prod else None
        except AttributeError:  # a registry without aliases
            return None

    def _ensure_loaded(self, version: str) -> LoadedModel | None:
        if version in self._models:
            return self._models[version]
        failed = self._failed_at.get(version)
        if failed is not None and time.monotonic() - failed < LOAD_RETRY_S:
            return None
        try:
            mv = self.registry.get(self.model, version)
            estimator = self.registry.load(self.model, int(version))
            loaded = LoadedModel(version, estimator, schema=getattr(mv, "training_schema", None))
        except Exception as exc:  # tampered, untrusted, missing, unknown version: refuse, keep serving
            self.stats.load_failures += 1
            self._failed_at[version] = time.monotonic()
            self.load_errors[version] = one_line(exc)
            log.error("router.load_refused", model=self.model, version=version, error=one_line(exc))
            return None
        self.stats.loads += 1
        self._failed_at.pop(version, None)
        self.load_errors.pop(version, None)
        self._models[version] = loaded
        log.info("router.loaded", model=self.model, version=version, task=loaded.task, mode=loaded.mode)
        return loaded

    def _retry_due(self) -> bool:
        now = time.monotonic()
        table = self._snap.table
        return any(v not in self._models and now - self._failed_at.get(v, 0.0) >= LOAD_RETRY_S
                   for v in table.versions())

    def _watch(self) -> None:
        channel = self.keys.traffic_channel()
        name = self.model.encode()
        pubsub = None
        next_check = time.monotonic() + self.check_interval
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(channel)
                    self._subscribed.set()
                    if backoff > 0.1:  # reconnected: catch up on anything missed meanwhile
                        self.refresh()
                    backoff = 0.1
                wait = max(0.0, min(next_check - time.monotonic(), WATCH_TICK_S))
                message = pubsub.get_message(timeout=wait)
                self._shadow.send_pending()  # mirrors left in the buffer by a quiet request path
                if message is not None and message.get("type") == "message" and message.get("data") == name:
                    self.refresh()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + self.check_interval
                    snap = self._snap
                    if (read_revision(self.redis, self.keys, self.model) != snap.table.revision
                            or snap.production is None or self._retry_due()):
                        self.refresh()
                    elif snap.shadow is not None and not self._shadow.alive():
                        self._sync_shadow(snap)
            except redis.RedisError as exc:
                log.warning("router.watch_failed", model=self.model, error=one_line(exc))
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:
                        pass
                    pubsub = None
                self._subscribed.set()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # never let the watcher die
                log.error("router.watch_error", model=self.model, error=one_line(exc))
                self._stop.wait(1.0)
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass


__all__ = [
    "BUCKETS",
    "FeatureError",
    "LoadedModel",
    "NoProductionVersion",
    "Prediction",
    "PredictionError",
    "Router",
    "RouterError",
    "RouterStats",
    "decode_feedback",
    "decode_request",
]
