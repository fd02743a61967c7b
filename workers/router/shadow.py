"""The shadow process: mirrored requests answered by a child process, off the request path.

The **shadow process** answers mirrored requests (at most ``shadow_queue_size`` in flight; a
mirror beyond that is dropped and counted). It is a child process at idle CPU priority,
not a thread: a thread shares the GIL, so a CPU-bound shadow mirroring every request takes
half the interpreter and stalls answers behind it (measured here: p99 +5 ms at 2,000
requests/s). A slow or failing shadow only delays or fails its own log record (``shadow=1``).

The router side is :class:`ShadowProcess` (the mirror queue, the pipe, restarts); the child's
main loop is :func:`_shadow_child`, started as ``python -c`` with ``_CHILD_BOOT``. Frames on the
pipe are length-prefixed JSON, never pickle: nothing the child reads can run code in it.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from typing import Any

import numpy as np
import pandas as pd
import redis
import structlog

from config.keys import Keys
from workers.router.inputs import RouterError
from workers.router.models import LOAD_RETRY_S, LoadedModel
from workers.router.requestlog import STOP_TIMEOUT_S, RequestLog, append_records, one_line

log = structlog.get_logger(__name__)

SHADOW_QUEUE_SIZE = 1000
MIRROR_BATCH = 16
MIRROR_MAX_DELAY_S = 0.01
"""Mirrors go to the shadow process 16 at a time, or when the oldest waited 10 ms."""
PIPE_BYTES = 1 << 20
MAX_MIRROR_BYTES = 8 << 20
"""Pipe buffer asked for between the router and its shadow process, and the most bytes of
mirrors buffered on this side while the pipe is full."""
RESTART_BACKOFF_MAX_S = 60.0
KILL_WAIT_S = 5.0
"""How long ``stop`` waits for a killed shadow process to be gone before it goes on without it."""
SHADOW_NICE = 10
"""The shadow process runs at the lowest CPU priority (``SCHED_IDLE`` on Linux, else this nice
value): when cores are scarce the kernel runs the request path first and the shadow falls behind
(mirrors beyond the bound are dropped and counted) instead of the answers slowing down."""

SHADOW_COUNTERS = ("processed", "requests", "errors", "records_logged", "records_written", "records_dropped",
                   "log_failures", "load_failures")
"""Counters the shadow process shares with its router (written by the child, read by the parent)."""
_CHILD_BOOT = "from workers.router.shadow import _shadow_child; _shadow_child()"
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


_CONNECTION_CLASSES = {cls.__name__: cls for cls in (redis.SSLConnection, redis.UnixDomainSocketConnection,
                                                      redis.Connection)}
"""The connection classes a shadow process may be told to use, by name (most specific first)."""


def connection_spec(client: redis.Redis) -> tuple[str, dict[str, Any]]:
    """How the shadow process reconnects to the same server: a connection class name and its
    plain (JSON) settings; bytes settings are sent as UTF-8 text, other objects are left out."""
    pool = client.connection_pool
    kwargs: dict[str, Any] = {}
    for key, value in pool.connection_kwargs.items():
        if isinstance(value, bytes):
            try:
                value = value.decode()
            except UnicodeDecodeError:
                continue
        if value is None or isinstance(value, (str, int, float, bool)):
            kwargs[key] = value
    for name, cls in _CONNECTION_CLASSES.items():  # a subclass connects as its redis-py base class
        if issubclass(pool.connection_class, cls):
            return name, kwargs
    raise ValueError(f"the shadow process cannot use Redis connections of type {pool.connection_class.__name__}")


def _connection_class(name: str) -> type:
    return _CONNECTION_CLASSES[name]


def _read_frame(stream: Any) -> Any:
    """The next message from the router (a JSON value), or ``_EOF``; bad JSON raises ``ValueError``."""
    head = stream.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return _EOF
    (size,) = _FRAME.unpack(head)
    body = stream.read(size)
    if len(body) < size:
        return _EOF
    return json.loads(body)


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
    """Entry point of the shadow process: JSON frames of mirrors on stdin, records to Redis.

    The first frame is the spec (an object). Then ``["load", versions]`` to preload and ``["m",
    version, request_id, kind, features, n_rows, ts]`` to answer (see :func:`_mirror_message`).
    A frame that is not such a message is logged and skipped. End of input (the router closed the
    pipe, or died) flushes the log and exits.
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
    client = redis.Redis(connection_pool=redis.ConnectionPool(connection_class=_connection_class(connection_class),
                                                              **kwargs))
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
            estimator = registry.load(model_name, int(version), tuple(spec["trusted_prefixes"]))
            models[version] = LoadedModel(version, estimator, schema=getattr(mv, "training_schema", None))
        except Exception as exc:
            refused[version] = (time.monotonic(), f"cannot load version {version}: {one_line(exc)}")
            counters.load_failures += 1
            log.error("router.shadow_load_refused", model=model_name, version=version, error=one_line(exc))
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
        except ValueError as exc:  # a frame that is not JSON: skip it, never die
            log.error("router.shadow_bad_frame", model=model_name, error=one_line(exc))
            continue
        if item is _EOF:
            break
        if stopping.is_set():
            break
        if not _is_message(item):
            log.error("router.shadow_bad_frame", model=model_name, error=f"not a shadow message: {str(item)[:100]}")
            continue
        if item[0] == "load":
            keep = set(item[1])
            for version in item[1]:
                load(version)
            continue
        _, version, rid, kind, payload, n_rows, ts = item
        counters.requests += 1
        t0 = time.perf_counter()
        preds = scores = None
        error = None
        try:
            model = load(version)
            if isinstance(model, str):
                raise RouterError(model)
            X, n_rows = model.inputs(_features_from(kind, payload))
            preds, scores = model.run(X)
        except Exception as exc:
            error = one_line(exc)
            counters.errors += 1
        latency = (time.perf_counter() - t0) * 1000.0
        append_records(logged, version, rid, n_rows, preds, scores, latency, error, ts, True)
        counters.processed += 1
    request_log.stop()


class ShadowProcess:
    """Mirrors answered by a child process, at most ``size`` of them in flight.

    The child is a fresh interpreter (``python -c``, not ``multiprocessing``: nothing of the
    caller's ``__main__`` is re-imported) with its own GIL, at idle CPU priority, so a
    CPU-heavy, slow or failing shadow does not compete with the request path. A mirror is
    encoded as JSON on the request path into an output buffer that goes to the child's stdin with one
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
            data = _frame(_mirror_message(item))
        except Exception:  # features with no JSON form (or too deep): never the request's failure
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
                try:
                    proc.wait(KILL_WAIT_S)
                except subprocess.TimeoutExpired:  # killed, but at idle priority on busy cores it may not have run yet
                    log.warning("router.shadow_process_not_reaped", model=self.spec["model"], pid=proc.pid)
        with self._lock:
            unanswered = max(0, self._accepted - self._lost - self.counters.processed)
            self.dropped += unanswered
            self._lost += unanswered
        if self._cleanup is not None:
            self._cleanup()


def _frame(message: Any) -> bytes:
    """``message`` as one length-prefixed JSON frame (numpy scalars and timestamps made plain)."""
    body = _ENCODER.encode(message).encode()
    return _FRAME.pack(len(body)) + body


def _plain(value: Any) -> Any:
    """The JSON form of what ``json`` does not know: numpy scalars and arrays, timestamps, NA."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "isoformat"):  # datetime, date, pd.Timestamp
        return value.isoformat()
    if value is pd.NA:
        return None
    raise TypeError(f"{type(value).__name__} has no JSON form")


_ENCODER = json.JSONEncoder(default=_plain, separators=(",", ":"))


def _mirror_message(item: tuple) -> list:
    """The frame for ``("m", version, request_id, features, n_rows, ts)``: features become
    ``(kind, value)``: ``"json"`` as given (dict or list of dicts), ``"frame"`` a DataFrame's columns,
    dtypes and rows, ``"array"`` a numpy array's dtype and nested lists."""
    tag, version, rid, features, n_rows, ts = item
    if isinstance(features, pd.DataFrame):
        kind, value = "frame", {"columns": features.columns.tolist(),
                                "dtypes": [str(d) for d in features.dtypes],
                                "rows": features.to_numpy(dtype=object).tolist()}
    elif isinstance(features, np.ndarray):
        kind, value = "array", {"dtype": features.dtype.str, "rows": features.tolist()}
    else:
        kind, value = "json", features
    return [tag, version, rid, kind, value, n_rows, ts]


def _features_from(kind: str, value: Any) -> Any:
    """The features a mirror was sent with, rebuilt in the shadow process (see :func:`_mirror_message`)."""
    if kind == "frame":
        frame = pd.DataFrame(value["rows"], columns=range(len(value["columns"])))
        for i, dtype in enumerate(value["dtypes"]):
            if str(frame.dtypes[i]) != dtype:
                try:
                    frame[i] = frame[i].astype(dtype)
                except (TypeError, ValueError):
                    pass  # kept as rebuilt; the model decides whether it can use it
        frame.columns = value["columns"]
        return frame
    if kind == "array":
        return np.array(value["rows"], dtype=np.dtype(value["dtype"]))
    return value


def _is_message(item: Any) -> bool:
    """Whether a decoded frame is a ``load`` or a mirror message."""
    if not isinstance(item, list) or not item:
        return False
    if item[0] == "load":
        return len(item) == 2 and isinstance(item[1], list)
    return item[0] == "m" and len(item) == 7 and item[3] in ("json", "frame", "array")


def _grow_pipe(fd: int) -> None:
    """Ask for a 1 MiB pipe (Linux ``F_SETPIPE_SZ``) so bursts of mirrors fit; fine if refused."""
    try:
        import fcntl

        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)
    except (ImportError, OSError):
        pass
