"""The request log: per-request records, buffered in memory and written to a stream by a thread.

The request path only encodes a record and appends it to an in-memory buffer
(:meth:`RequestLog.append`); the **log flusher** thread writes the buffered per-request records to
``keys.requests(model)`` every ``flush_interval`` seconds or ``flush_batch`` records, as
server-side script calls (one argument holding up to ``SCRIPT_RECORDS`` records; the script XADDs
each with MAXLEN ~).

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
import threading
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import redis
import structlog

if TYPE_CHECKING:
    from workers.router.router import RouterStats

log = structlog.get_logger(__name__)

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


def one_line(exc: BaseException) -> str:
    """``"<Type>: <message>"`` on one line, at most ``MAX_ERROR_CHARS`` long (a record's ``error``)."""
    text = f"{type(exc).__name__}: {exc}".replace("\r", " ").replace("\n", " ")
    return text[:MAX_ERROR_CHARS]


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
                        log.warning("router.request_log_failed", stream=self.stream, error=one_line(exc),
                                    buffered=len(buf), failures=self.stats.log_failures)
                    return False
                except redis.RedisError as exc:  # refused by the server (OOM, ...): never retry forever
                    self.stats.log_failures += 1
                    self.stats.records_dropped += len(batch)
                    log.error("router.request_log_refused", stream=self.stream, error=one_line(exc),
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


def append_records(append, version: str, rid: str, n_rows: int, preds, scores, latency: float, error: str | None,
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
