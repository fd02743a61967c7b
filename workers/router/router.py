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
* the **shadow process** answers mirrored requests (at most ``shadow_queue_size`` in flight; a
  mirror beyond that is dropped and counted). It is a child process at idle CPU priority,
  not a thread: a thread shares the GIL, so a CPU-bound shadow mirroring every request takes
  half the interpreter and stalls answers behind it (measured here: p99 +5 ms at 2,000
  requests/s). A slow or failing shadow only delays or fails its own log record (``shadow=1``).
* the **log flusher** thread writes the buffered per-request records to ``keys.requests(model)``
  every ``flush_interval`` seconds or ``flush_batch`` records, as server-side script calls (one
  argument holding up to ``SCRIPT_RECORDS`` records; the script XADDs each with MAXLEN ~).

Records in the request stream (all strings): ``request_id``, ``version``, ``latency_ms``,
``prediction`` (JSON), ``score`` (positive-class probability for binary classifiers, the top
class probability for multiclass, the value for regression; empty when unknown), ``error`` (one
line; empty when none), ``shadow`` (``"1"``/``"0"``), ``ts`` (unix seconds), and for mirrored
calls ``shadow_of`` (the request id of the production answer). A batch (list of dicts or a
DataFrame) logs one record per row with ``request_id`` ``"<id>#<row>"``. Feedback goes to
``keys.feedback(model)`` as ``request_id``, ``label`` (JSON), ``ts``. :func:`decode_request` and
:func:`decode_feedback` turn stream entries back into typed dicts for the rollout analysis.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import weakref
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import redis
import structlog

from config.keys import Keys
from workers.router.traffic import TrafficError, TrafficTable, read_revision, read_traffic

log = structlog.get_logger(__name__)

BUCKETS = 10_000
"""Request ids hash into this many buckets; a percent maps to ``percent * 100`` of them."""
CHECK_INTERVAL_S = 1.0
"""How often the watcher compares the stored revision (the fallback for a missed message)."""
WATCH_TICK_S = 0.1
"""The watcher's longest sleep (it also sends mirrors a quiet request path left buffered)."""
FLUSH_INTERVAL_S = 0.25
FLUSH_BATCH = 1000
"""The request log is written every 250 ms, or as soon as 1,000 records wait. Each write makes
a background thread take the GIL for ~0.1 ms; at 20 writes a second (50 ms) about 1 % of
requests at 2,000/s landed on one and the router's p99 rose by ~0.25 ms, at 4 a second they
stay below the 99th percentile. Records reach the stream within ~0.25 s, ample for the
rollout analysis (minutes)."""
SCRIPT_RECORDS = 250
"""Records per script call (~1 ms of Redis time), several calls pipelined per write."""
MAX_BUFFERED_RECORDS = 100_000
"""Records kept in memory while Redis is unreachable; beyond this the oldest are dropped."""
SHADOW_QUEUE_SIZE = 1000
MIRROR_BATCH = 16
MIRROR_MAX_DELAY_S = 0.01
"""Mirrors go to the shadow process 16 at a time, or when the oldest waited 10 ms."""
PIPE_BYTES = 1 << 20
MAX_MIRROR_BYTES = 8 << 20
"""Pipe buffer asked for between the router and its shadow process, and the most bytes of
mirrors buffered on this side while the pipe is full."""
RESTART_BACKOFF_MAX_S = 60.0
SHADOW_NICE = 10
"""The shadow process runs at the lowest CPU priority (``SCHED_IDLE`` on Linux, else this nice
value): when cores are scarce the kernel runs the request path first and the shadow falls behind
(mirrors beyond the bound are dropped and counted) instead of the answers slowing down."""
LOAD_RETRY_S = 30.0
"""A version that failed to load is retried after this long (or on the next table change)."""
MAX_ERROR_CHARS = 500
STOP_TIMEOUT_S = 2.0

_XADD_MANY = """
-- KEYS[1] requests stream; ARGV[1] approximate max length; ARGV[2] the records, each ended by
-- \\30 (record separator), each holding 9 fields ended by \\31 (unit separator):
-- request_id, version, latency_ms, prediction, score, error, shadow, ts, shadow_of ('' = none)
local maxlen, data = ARGV[1], ARGV[2]
local find, sub, call = string.find, string.sub, redis.call
local pos, n, f = 1, 0, {}
local stream = KEYS[1]
while true do
  for k = 1, 9 do
    local e = find(data, '\\31', pos, true)
    if not e then return n end
    f[k] = sub(data, pos, e - 1)
    pos = e + 1
  end
  pos = pos + 1  -- the record separator
  if f[9] == '' then
    call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'request_id', f[1], 'version', f[2],
      'latency_ms', f[3], 'prediction', f[4], 'score', f[5], 'error', f[6], 'shadow', f[7], 'ts', f[8])
  else
    call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'request_id', f[1], 'version', f[2],
      'latency_ms', f[3], 'prediction', f[4], 'score', f[5], 'error', f[6], 'shadow', f[7], 'ts', f[8],
      'shadow_of', f[9])
  end
  n = n + 1
end
"""


# --------------------------------------------------------------------------- errors, results


class RouterError(Exception):
    """Base class of the router's errors (``str()`` is one line)."""


class NoProductionVersion(RouterError, LookupError):
    """The model has no production version loaded (unknown model, nothing promoted yet)."""


class FeatureError(RouterError, ValueError):
    """The request's features cannot be turned into the model's input (a client error).

    ``version`` is the version the request was routed to (set by :meth:`Router.predict`).
    """

    version: str | None = None


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


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\r", " ").replace("\n", " ")
    return text[:MAX_ERROR_CHARS]


# --------------------------------------------------------------------------- model inputs

_NUMERIC_TYPES = frozenset({float, int, np.float64, np.float32, np.int64, np.int32})
_FLOAT = np.float64
_HAS_FROM_ARRAYS = hasattr(pd.DataFrame, "_from_arrays")


def _column_specs(schema: Mapping[str, Any] | None) -> dict[str, tuple[str, str]]:
    """``name -> (kind, dtype)`` from a registry ``training_schema`` (empty when absent)."""
    if not schema:
        return {}
    cols = schema.get("columns") or []
    if isinstance(cols, Mapping):
        cols = list(cols.values())
    out = {}
    for c in cols:
        if isinstance(c, Mapping) and "name" in c:
            out[str(c["name"])] = (str(c.get("kind") or ""), str(c.get("dtype") or ""))
    return out


class ModelInput:
    """Turns request features into what one model version was fitted on, cheaply.

    A model fitted on a DataFrame (``feature_names_in_``) gets a DataFrame with those columns in
    that order; an all-numeric row is built from one 2-D float array (~15 us), a mixed row from
    per-column arrays through pandas' internal block constructor (~25 us; the public constructors
    take ~130 us for one row). A model fitted on a numpy array gets a 2-D float array in the
    column order of its registry ``training_schema``. Column order, dtypes and the index are
    computed once per loaded version.
    """

    def __init__(self, columns: list[str] | None, frame: bool, specs: Mapping[str, tuple[str, str]] | None = None):
        self.columns = tuple(columns) if columns is not None else None
        self.frame = frame
        self.signature = (self.columns, frame)
        specs = specs or {}
        self._index = pd.Index(self.columns) if self.columns is not None else None
        self._row_index = pd.RangeIndex(1)
        # Per column: "num" (float64), "obj" (as given), "str" (as text), "" (decide per value).
        self._kinds = tuple(self._kind_of(specs.get(c)) for c in (self.columns or ()))
        self._all_numeric = bool(self._kinds) and all(k == "num" for k in self._kinds)
        self._infer = all(k == "" for k in self._kinds)

    @staticmethod
    def _kind_of(spec: tuple[str, str] | None) -> str:
        if spec is None:
            return ""
        kind, dtype = spec
        if kind == "numeric":
            return "num"
        if kind == "categorical" and dtype in ("object", "str", "string", "category"):
            return "str"
        return "obj" if kind else ""

    # --- the public entry point ------------------------------------------------------------
    def __call__(self, features: Any) -> tuple[Any, int]:
        """Return ``(X, n_rows)`` for ``features`` (dict, list of dicts, DataFrame or 2-D array)."""
        if type(features) is dict or isinstance(features, Mapping):
            return self._from_dict(features), 1
        if isinstance(features, pd.DataFrame):
            return self._from_frame(features), len(features)
        if isinstance(features, list):
            if not features:
                raise FeatureError("no rows to predict")
            if all(isinstance(r, Mapping) for r in features):
                return self._from_records(features), len(features)
            raise FeatureError("features must be a dict, a list of dicts or a DataFrame")
        if isinstance(features, np.ndarray):
            return self._from_array(features)
        raise FeatureError(f"features must be a dict, a list of dicts or a DataFrame, not {type(features).__name__}")

    # --- shapes ------------------------------------------------------------------------------
    def _values(self, row: Mapping[str, Any]) -> list[Any]:
        cols = self.columns
        if cols is None:
            raise FeatureError("this model version records no feature names; send a DataFrame or a 2-D array")
        try:
            return [row[c] for c in cols]
        except KeyError:
            missing = [c for c in cols if c not in row]
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise FeatureError(f"missing feature(s): {shown}") from None
        except TypeError:
            raise FeatureError("feature names must be strings") from None

    def _from_dict(self, row: Mapping[str, Any]) -> Any:
        values = self._values(row)
        if not self.frame:
            return self._float_rows([values])
        if self._all_numeric or (self._infer and self._numeric_values(values)):
            try:
                data = np.array([values], dtype=_FLOAT)
            except (TypeError, ValueError):
                data = None
            if data is not None:
                return pd.DataFrame(data, columns=self._index, index=self._row_index, copy=False)
        arrays = [self._column_array((v,), kind, name) for v, kind, name in zip(values, self._kinds, self.columns)]
        return self._frame(arrays, self._row_index)

    @staticmethod
    def _numeric_values(values: list[Any]) -> bool:
        types = _NUMERIC_TYPES
        for v in values:
            if type(v) not in types:
                return False
        return True

    def _from_records(self, rows: list[Mapping[str, Any]]) -> Any:
        table = [self._values(r) for r in rows]
        if not self.frame:
            return self._float_rows(table)
        columns = list(zip(*table))
        arrays = [self._column_array(col, kind, name) for col, kind, name in zip(columns, self._kinds, self.columns)]
        return self._frame(arrays, pd.RangeIndex(len(rows)))

    def _from_frame(self, frame: pd.DataFrame) -> Any:
        if len(frame) == 0:
            raise FeatureError("no rows to predict")
        if self.columns is None:
            return frame if self.frame else frame.to_numpy()
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise FeatureError(f"missing feature(s): {', '.join(map(str, missing[:10]))}")
        sub = frame[list(self.columns)]
        if self.frame:
            return sub
        try:
            return sub.to_numpy(dtype=_FLOAT)
        except (TypeError, ValueError):
            raise FeatureError("every feature of this model must be numeric") from None

    def _from_array(self, array: np.ndarray) -> tuple[Any, int]:
        if array.ndim == 1:
            array = array.reshape(1, -1)
        if array.ndim != 2 or array.shape[0] == 0:
            raise FeatureError("an array of features must be 2-D with at least one row")
        if self.columns is not None and array.shape[1] != len(self.columns):
            raise FeatureError(f"expected {len(self.columns)} features per row, got {array.shape[1]}")
        if self.frame and self.columns is not None:
            return pd.DataFrame(array, columns=self._index, copy=False), array.shape[0]
        return array, array.shape[0]

    # --- building blocks ---------------------------------------------------------------------
    def _float_rows(self, table: list[list[Any]]) -> np.ndarray:
        try:
            return np.array(table, dtype=_FLOAT)
        except (TypeError, ValueError):
            for row in table:
                for name, v in zip(self.columns, row):
                    try:
                        float(v if v is not None else "nan")
                    except (TypeError, ValueError):
                        raise FeatureError(f"feature {name!r} must be a number, got {v!r}") from None
            raise FeatureError("features must be numbers") from None

    @staticmethod
    def _column_array(values: tuple[Any, ...], kind: str, name: str) -> np.ndarray:
        if kind == "num" or (kind == "" and all(v is None or type(v) in _NUMERIC_TYPES for v in values)):
            try:
                return np.array([np.nan if v is None else v for v in values], dtype=_FLOAT)
            except (TypeError, ValueError):
                raise FeatureError(f"feature {name!r} must be a number, got {values[0]!r}") from None
        out = np.empty(len(values), dtype=object)
        if kind == "str":
            out[:] = [v if v is None or isinstance(v, str) else str(v) for v in values]
        else:
            out[:] = list(values)
        return out

    def _frame(self, arrays: list[np.ndarray], index: pd.Index) -> pd.DataFrame:
        if _HAS_FROM_ARRAYS:
            try:
                return pd.DataFrame._from_arrays(arrays, columns=self._index, index=index, verify_integrity=False)
            except TypeError:  # a pandas whose private constructor changed: the public (slower) one
                pass
        return pd.DataFrame(dict(zip(self.columns, arrays)), index=index, copy=False)


# --------------------------------------------------------------------------- loaded versions


def _is_threshold_classifier(estimator: Any) -> bool:
    try:
        from sklearn.model_selection._classification_threshold import BaseThresholdClassifier
    except ImportError:  # pragma: no cover - older scikit-learn
        return False
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return isinstance(final, BaseThresholdClassifier)


class LoadedModel:
    """A version ready to answer: the estimator, its input builder and how to score it."""

    def __init__(self, version: str, estimator: Any, *, schema: Mapping[str, Any] | None = None):
        from sklearn.base import is_classifier

        self.version = str(version)
        self.estimator = estimator
        self.classifier = bool(is_classifier(estimator))
        self.classes = getattr(estimator, "classes_", None) if self.classifier else None
        self.binary = self.classes is not None and len(self.classes) == 2
        has_proba = self.classifier and self.classes is not None and hasattr(estimator, "predict_proba")
        # One predict_proba call gives both answer and score, unless the estimator's predict is
        # not the arg-max of its probabilities (a tuned decision threshold).
        if has_proba and not _is_threshold_classifier(estimator):
            self.mode = "proba"
        elif has_proba:
            self.mode = "predict+proba"
        else:
            self.mode = "predict"
        self.task = "regression" if not self.classifier else ("binary" if self.binary else "multiclass")
        specs = _column_specs(schema)
        names = getattr(estimator, "feature_names_in_", None)
        if names is not None:
            self.inputs = ModelInput([str(n) for n in names], True, specs)
        else:
            n = getattr(estimator, "n_features_in_", None)
            cols = list(specs) if specs and (n is None or n == len(specs)) else None
            self.inputs = ModelInput(cols, False, specs)

    def run(self, X: Any) -> tuple[list[Any], list[Any]]:
        """Predictions and scores (lists, one per row) for a prepared input."""
        est = self.estimator
        if self.mode == "proba":
            proba = est.predict_proba(X)
            preds = self.classes.take(proba.argmax(axis=1))
            scores = proba[:, 1] if self.binary else proba.max(axis=1)
            return preds.tolist(), scores.tolist()
        if self.mode == "predict+proba":
            preds = np.asarray(est.predict(X))
            proba = est.predict_proba(X)
            scores = proba[:, 1] if self.binary else proba.max(axis=1)
            return preds.tolist(), scores.tolist()
        preds = np.asarray(est.predict(X))
        values = preds.tolist()
        if self.classifier:
            return values, [None] * len(values)
        return values, [float(v) if isinstance(v, (int, float)) else None for v in values]


@dataclass(frozen=True)
class _Snapshot:
    """What the request path reads: one consistent view of the table and its loaded versions."""

    table: TrafficTable
    production: LoadedModel | None = None
    candidate: LoadedModel | None = None
    threshold: int = 0
    shadow: LoadedModel | None = None


# --------------------------------------------------------------------------- the request log


def _json_value(v: Any) -> str:
    t = type(v)
    if t is str:
        return json.dumps(v)
    if t is int:
        return str(v)
    if t is float:
        return repr(v) if math.isfinite(v) else json.dumps(v)
    if v is None:
        return ""
    if hasattr(v, "item"):
        v = v.item()
    return json.dumps(v, default=str)


_RS, _US = "\x1e", "\x1f"


def _clean(text: str) -> str:
    """Free text (request ids, errors) without the two separator characters of the log batch."""
    if _RS in text or _US in text:
        return text.replace(_RS, "\ufffd").replace(_US, "\ufffd")
    return text


def _encode(rec: tuple) -> str:
    """One record as one string: each of its 9 fields ended by the unit separator, then the record
    separator (JSON escapes both inside a prediction; ids and errors are cleaned)."""
    rid, version, latency, pred, score, error, shadow, ts, shadow_of = rec
    return _US.join((
        _clean(rid), version, f"{latency:.4f}", _json_value(pred),
        "" if score is None else (repr(score) if math.isfinite(score) else json.dumps(score)),
        _clean(error) if error else "", "1" if shadow else "0", f"{ts:.6f}", _clean(shadow_of) if shadow_of else "",
        _RS,
    ))


class RequestLog:
    """Per-request records buffered in memory and written to a stream by a background thread."""

    def __init__(self, client: redis.Redis, stream: str, *, maxlen: int, interval: float = FLUSH_INTERVAL_S,
                 batch: int = FLUSH_BATCH, max_buffer: int = MAX_BUFFERED_RECORDS, stats: RouterStats,
                 name: str = "router-log"):
        self.redis = client
        self.stream = stream
        self.maxlen = maxlen
        self.interval = interval
        self.batch = batch
        self.max_buffer = max_buffer
        self.stats = stats
        self._buf: deque[str] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._script = client.register_script(_XADD_MANY)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def append(self, record: tuple) -> None:
        """Queue one record (the request path: encode, a deque append and a length check).

        Records are encoded here, on the caller's thread (~2 us), so the flusher only joins
        strings and does socket I/O, and never holds the GIL long enough to stall a request.
        """
        buf = self._buf
        buf.append(_encode(record))
        n = len(buf)
        if n >= self.batch:
            if n > self.max_buffer:
                try:
                    buf.popleft()
                    self.stats.records_dropped += 1
                except IndexError:
                    pass
            self._wake.set()

    def pending(self) -> int:
        return len(self._buf)

    def _run(self) -> None:
        backoff = self.interval
        while not self._stop.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            backoff = self.interval if self.flush() else min(backoff * 2, 1.0)

    def flush(self) -> bool:
        """Write everything buffered; False when Redis refused (the records stay buffered)."""
        with self._lock:
            buf = self._buf
            while buf:
                batch = []
                pop = buf.popleft
                try:
                    for _ in range(self.batch):
                        batch.append(pop())
                except IndexError:
                    pass
                try:
                    # One argument per script call: redis-py's per-argument Python work would
                    # otherwise hold the GIL for ~0.4 ms per 100 records and stall a request.
                    # Calls carry SCRIPT_RECORDS records each so Redis is never blocked for long.
                    chunks = [batch[i:i + SCRIPT_RECORDS] for i in range(0, len(batch), SCRIPT_RECORDS)]
                    if len(chunks) == 1:
                        self._script(keys=[self.stream], args=[self.maxlen, "".join(batch)])
                    else:
                        pipe = self.redis.pipeline(transaction=False)
                        for chunk in chunks:
                            self._script(keys=[self.stream], args=[self.maxlen, "".join(chunk)], client=pipe)
                        pipe.execute()
                except (redis.ConnectionError, redis.TimeoutError) as exc:  # unreachable: keep, retry later
                    buf.extendleft(reversed(batch))
                    self.stats.log_failures += 1
                    if self.stats.log_failures == 1 or self.stats.log_failures % 100 == 0:
                        log.warning("router.request_log_failed", stream=self.stream, error=_one_line(exc),
                                    buffered=len(buf), failures=self.stats.log_failures)
                    return False
                except redis.RedisError as exc:  # refused by the server (OOM, ...): never retry forever
                    self.stats.log_failures += 1
                    self.stats.records_dropped += len(batch)
                    log.error("router.request_log_refused", stream=self.stream, error=_one_line(exc),
                              dropped=len(batch))
                    continue
                self.stats.records_written += len(batch)
            return True

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.flush()


# --------------------------------------------------------------------------- the shadow

SHADOW_COUNTERS = ("processed", "requests", "errors", "records_logged", "records_written", "records_dropped",
                   "log_failures", "load_failures")
"""Counters the shadow process shares with its router (written by the child, read by the parent)."""
_CHILD_BOOT = "from workers.router.router import _shadow_child; _shadow_child()"
_FRAME = struct.Struct("<I")
_PROCESSED = struct.Struct("<q")  # the first counter, read on every mirror


class _Counters:
    """Named 64-bit counters in a shared memory-mapped file; each is written by one thread only."""

    def __init__(self, buffer: Any):
        object.__setattr__(self, "_buf", buffer)

    def __getattr__(self, name: str) -> int:
        try:
            return struct.unpack_from("<q", self._buf, 8 * SHADOW_COUNTERS.index(name))[0]
        except ValueError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: int) -> None:
        struct.pack_into("<q", self._buf, 8 * SHADOW_COUNTERS.index(name), value)


def _records(append, version: str, rid: str, n_rows: int, preds, scores, latency: float, error: str | None,
             ts: float, shadow: bool) -> int:
    """Append the log records of one answer (one per row); returns how many."""
    if n_rows == 1:
        append((rid, version, latency, preds[0] if preds else None, scores[0] if scores else None, error, shadow,
                ts, rid if shadow else None))
        return 1
    per_row = latency / n_rows
    for i in range(n_rows):
        row_id = f"{rid}#{i}"
        append((row_id, version, per_row, preds[i] if preds else None, scores[i] if scores else None, error,
                shadow, ts, row_id if shadow else None))
    return n_rows


def _connection_spec(client: redis.Redis) -> tuple[type, dict[str, Any]]:
    """How the shadow process reconnects to the same server (only plain, picklable settings)."""
    pool = client.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items()
              if v is None or isinstance(v, (str, int, float, bool, bytes))}
    return pool.connection_class, kwargs


def _read_frame(stream: Any) -> Any:
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return _EOF
    (size,) = _FRAME.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return _EOF
    return pickle.loads(body)


_EOF = object()


def _lower_priority() -> None:
    """Make this (shadow) process yield the CPU to the request path: ``SCHED_IDLE`` where the OS
    has it (it runs only on otherwise idle CPU time), else ``SHADOW_NICE``."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    except (AttributeError, OSError):
        pass
    try:
        os.nice(SHADOW_NICE)
    except OSError:
        pass


def _shadow_child() -> None:
    """Entry point of the shadow process: frames of pickled mirrors on stdin, records to Redis.

    The first frame is the spec. Then ``("load", versions)`` to preload and ``("m", version,
    request_id, features, n_rows, ts)`` to answer. End of input (the router closed the pipe, or
    died) flushes the log and exits.
    """
    stdin = sys.stdin.buffer
    spec = _read_frame(stdin)
    if spec is _EOF:
        return
    _lower_priority()
    from config.logs import configure_logging
    from workers.registry.store import Registry

    configure_logging(spec["log_level"], "json")
    counters = _Counters(mmap.mmap(spec["counters_fd"], 8 * len(SHADOW_COUNTERS)))
    connection_class, kwargs = spec["connection"]
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=connection_class, **kwargs))
    keys = Keys(prefix=spec["prefix"], shards=spec["shards"])
    registry = Registry(client, keys)
    model_name = spec["model"]
    request_log = RequestLog(client, keys.requests(model_name), maxlen=spec["maxlen"], interval=spec["flush_interval"],
                             batch=spec["flush_batch"], stats=counters, name="shadow-log")
    request_log.start()
    models: dict[str, LoadedModel] = {}
    refused: dict[str, tuple[float, str]] = {}
    keep: set[str] = set()

    def load(version: str) -> LoadedModel | str:
        if version in models:
            return models[version]
        failed = refused.get(version)
        if failed and time.monotonic() - failed[0] < LOAD_RETRY_S:
            return failed[1]
        try:
            mv = registry.get(model_name, version)
            estimator = registry.load(model_name, int(version), spec["trusted_prefixes"])
            models[version] = LoadedModel(version, estimator, schema=getattr(mv, "training_schema", None))
        except Exception as exc:
            refused[version] = (time.monotonic(), f"cannot load version {version}: {_one_line(exc)}")
            counters.load_failures += 1
            log.error("router.shadow_load_refused", model=model_name, version=version, error=_one_line(exc))
            return refused[version][1]
        for old in [v for v in models if v != version and keep and v not in keep]:
            del models[old]
        return models[version]

    def logged(record: tuple) -> None:
        request_log.append(record)
        counters.records_logged += 1

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())  # stop after this call, flush, exit
    while not stopping.is_set():
        try:
            item = _read_frame(stdin)
        except Exception as exc:  # a frame that does not unpickle: skip it, never die
            log.error("router.shadow_bad_frame", model=model_name, error=_one_line(exc))
            continue
        if item is _EOF:
            break
        for message in item if isinstance(item, list) else [item]:
            if stopping.is_set():
                break
            if message[0] == "load":
                keep = set(message[1])
                for version in message[1]:
                    load(version)
                continue
            _, version, rid, features, n_rows, ts = message
            counters.requests += 1
            t0 = time.perf_counter()
            preds = scores = None
            error = None
            try:
                model = load(version)
                if isinstance(model, str):
                    raise RouterError(model)
                X, n_rows = model.inputs(features)
                preds, scores = model.run(X)
            except Exception as exc:
                error = _one_line(exc)
                counters.errors += 1
            latency = (time.perf_counter() - t0) * 1000.0
            _records(logged, version, rid, n_rows, preds, scores, latency, error, ts, True)
            counters.processed += 1
    request_log.stop()


class ShadowProcess:
    """Mirrors answered by a child process, at most ``size`` of them in flight.

    The child is a fresh interpreter (``python -c``, not ``multiprocessing``: nothing of the
    caller's ``__main__`` is re-imported) with its own GIL, at idle CPU priority, so a
    CPU-heavy, slow or failing shadow does not compete with the request path. A mirror is
    pickled on the request path into an output buffer that goes to the child's stdin with one
    non-blocking write per ``MIRROR_BATCH`` mirrors (or ``MIRROR_MAX_DELAY_S``; the router's
    watcher sends leftovers): no thread to wake per request, and one pipe wake-up of the child
    per batch instead of per request. Nothing here ever blocks: beyond ``size`` unanswered
    mirrors (buffered, in the pipe or in the child) a mirror is dropped and counted. The child
    loads the shadow version through the registry (hash-verified) and writes its own records
    (``shadow=1``, ``shadow_of``) to the request stream; its counters come back through a small
    shared memory map (of an already unlinked file). A child that dies is restarted by the
    router's watcher, with backoff; what it held is counted as dropped.
    """

    def __init__(self, spec: dict[str, Any], *, size: int = SHADOW_QUEUE_SIZE):
        self.spec = dict(spec)
        self.size = size
        self._mmap: Any = bytearray(8 * len(SHADOW_COUNTERS))  # a shared file once a child runs
        self._cleanup: Any = None
        self.counters = _Counters(self._mmap)
        self._lock = threading.Lock()  # counters and (re)starts
        self._wlock = threading.Lock()  # the output buffer and the pipe; never held across a wait
        self._out = bytearray()
        self._batched = 0
        self._batch_start = 0.0
        self._proc: subprocess.Popen | None = None
        self._fd = -1
        self._stopping = False
        self._accepted = 0  # mirrors taken (changed under _wlock)
        self._lost = 0
        self.dropped = 0
        self.unsendable = 0
        self.restarts = 0
        self._next_start = 0.0
        self._keep: tuple[str, ...] = ()

    # --- lifecycle -----------------------------------------------------------------------------
    def ensure_running(self) -> None:
        """Start the child, or restart it after a crash (the mirrors it held count as dropped)."""
        with self._lock:
            if self._stopping or (self._proc is not None and self._proc.poll() is None):
                return
            if time.monotonic() < self._next_start:
                return
            if self._proc is not None:
                self.restarts += 1
                self._next_start = time.monotonic() + min(2.0 ** (self.restarts - 1), RESTART_BACKOFF_MAX_S)
                self._close_pipe()
                lost = self._accepted - self._lost - self.counters.processed
                self._lost += max(0, lost)
                self.dropped += max(0, lost)
                log.error("router.shadow_process_died", model=self.spec["model"], exitcode=self._proc.returncode,
                          restarts=self.restarts)
            if self._cleanup is None:
                self._share_counters()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
            proc = subprocess.Popen([sys.executable, "-c", _CHILD_BOOT], stdin=subprocess.PIPE, bufsize=0,
                                    stdout=subprocess.DEVNULL, env=env, pass_fds=(self.spec["counters_fd"],))
            fd = proc.stdin.fileno()
            _grow_pipe(fd)
            os.set_blocking(fd, False)
            with self._wlock:
                self._proc, self._fd = proc, fd
                self._out += _frame(self.spec)
                if self._keep:
                    self._out += _frame(("load", self._keep))
                self._write_out()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _close_pipe(self) -> None:
        """Close the child's stdin and forget unsent bytes (a new child gets a new pipe)."""
        with self._wlock:
            self._fd = -1
            self._out.clear()
            self._batched = 0
            try:
                self._proc.stdin.close()
            except OSError:
                pass

    def _share_counters(self) -> None:
        """Move the counters into an unlinked memory-mapped file whose descriptor the child inherits."""
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="retrain-shadow-", dir=shm)
        os.unlink(path)  # nothing to clean up, whatever happens to either process
        os.write(fd, bytes(self._mmap))
        self._mmap = mmap.mmap(fd, len(self._mmap))
        self.counters = _Counters(self._mmap)
        self.spec["counters_fd"] = fd
        self._cleanup = weakref.finalize(self, os.close, fd)

    # --- sending -------------------------------------------------------------------------------
    def preload(self, versions: tuple[str, ...]) -> None:
        """Tell the child which versions to hold loaded (it also loads on demand)."""
        self._keep = tuple(versions)
        with self._wlock:
            if self._fd >= 0:
                self._out += _frame(("load", self._keep))
                self._write_out()

    def submit(self, item: tuple) -> bool:
        """Take a mirror without blocking; beyond the bound (or with no child) drop and count it."""
        # The bound covers every mirror not yet answered: buffered here, in the pipe, in the child.
        if (self._fd < 0 or
                self._accepted - self._lost - _PROCESSED.unpack_from(self._mmap, 0)[0] >= self.size):
            return self._drop()
        try:
            data = _frame(item)
        except Exception:  # something in the features that does not pickle
            with self._lock:
                self.unsendable += 1
            return False
        with self._wlock:  # (lock order: _lock before _wlock, so no _drop() in here)
            taken = self._fd >= 0 and len(self._out) <= MAX_MIRROR_BYTES
            if taken:
                self._out += data
                self._accepted += 1
                self._batched += 1
                if self._batched == 1:
                    self._batch_start = time.monotonic()
                elif self._batched >= MIRROR_BATCH or time.monotonic() - self._batch_start >= MIRROR_MAX_DELAY_S:
                    self._write_out()
        return taken or self._drop()

    def send_pending(self) -> None:
        """Write what the request path left in the buffer (the watcher calls this periodically)."""
        if self._out:
            with self._wlock:
                self._write_out()

    def _write_out(self) -> None:
        """One non-blocking write of the buffer (holding ``_wlock``); the rest waits for later."""
        self._batched = 0
        if not self._out or self._fd < 0:
            return
        try:
            written = os.write(self._fd, self._out)
        except BlockingIOError:  # the pipe is full: the child is behind; the bound will drop
            return
        except OSError:  # the child is gone; the watcher restarts it and counts the loss
            self._out.clear()
            return
        del self._out[:written]

    def _drop(self) -> bool:
        with self._lock:
            self.dropped += 1
        return False

    # --- state ---------------------------------------------------------------------------------
    def pending(self) -> int:
        """Mirrors taken and not yet answered."""
        return max(0, self._accepted - self._lost - self.counters.processed)

    def unwritten(self) -> int:
        c = self.counters
        return max(0, c.records_logged - c.records_written - c.records_dropped)

    def stats(self) -> dict[str, int]:
        c = self.counters
        return {"shadow_requests": c.requests, "shadow_errors": c.errors,
                "shadow_dropped": self.dropped + self.unsendable,
                "shadow_records_written": c.records_written, "shadow_restarts": self.restarts,
                "shadow_load_failures": c.load_failures, "shadow_alive": int(self.alive())}

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Close the child's input and signal it: it finishes the call in progress, flushes, exits.

        Mirrors it has not answered by then are counted as dropped.
        """
        with self._lock:
            self._stopping = True
        proc = self._proc
        if proc is not None:
            self.send_pending()
            self._close_pipe()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(1.0)
        with self._lock:
            unanswered = max(0, self._accepted - self._lost - self.counters.processed)
            self.dropped += unanswered
            self._lost += unanswered
        if self._cleanup is not None:
            self._cleanup()


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _FRAME.pack(len(body)) + body


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe (Linux ``F_SETPIPE_SZ``) so bursts of mirrors fit; fine if refused."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass



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
            "model": model, "connection": _connection_spec(client), "prefix": keys.prefix, "shards": keys.shards,
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
            error = _one_line(exc)
            self._log.append((rid, model.version, latency, None, None, error, False, ts, None))
            if isinstance(exc, FeatureError):
                exc.version = model.version
                raise
            if isinstance(exc, (ValueError, TypeError)):
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
        _records(self._log.append, model.version, rid, n_rows, preds, scores, latency, None, ts, False)
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
            self.load_errors[version] = _one_line(exc)
            log.error("router.load_refused", model=self.model, version=version, error=_one_line(exc))
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
                log.warning("router.watch_failed", model=self.model, error=_one_line(exc))
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
                log.error("router.watch_error", model=self.model, error=_one_line(exc))
                self._stop.wait(1.0)
        if pubsub is not None:
            try:
                pubsub.close()
            except Exception:
                pass


# --------------------------------------------------------------------------- stream decoding


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else ("" if v is None else str(v))


def _json_or_none(text: str) -> Any:
    if text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def decode_request(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A request-stream entry as the rollout analysis reads it.

    Returns ``{"request_id", "version", "latency_ms": float, "prediction", "score": float|None,
    "error": str|None, "shadow": bool, "shadow_of": str|None, "ts": float}``.
    """
    d = {_text(k): _text(v) for k, v in fields.items()}
    score = d.get("score", "")
    return {
        "request_id": d.get("request_id", ""),
        "version": d.get("version", ""),
        "latency_ms": float(d["latency_ms"]) if d.get("latency_ms") else None,
        "prediction": _json_or_none(d.get("prediction", "")),
        "score": float(score) if score not in ("", None) else None,
        "error": d.get("error") or None,
        "shadow": d.get("shadow") == "1",
        "shadow_of": d.get("shadow_of") or None,
        "ts": float(d["ts"]) if d.get("ts") else None,
    }


def decode_feedback(fields: Mapping[Any, Any]) -> dict[str, Any]:
    """A feedback-stream entry: ``{"request_id", "label", "ts": float}`` (label JSON-decoded)."""
    d = {_text(k): _text(v) for k, v in fields.items()}
    return {"request_id": d.get("request_id", ""), "label": _json_or_none(d.get("label", "")),
            "ts": float(d["ts"]) if d.get("ts") else None}
