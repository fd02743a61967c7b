"""The enqueue relay: puts decided pipelines on Celery, outside the decision loop.

A start decision commits, in one transaction, the model's single-flight slot, the decision
record and an entry in the enqueue outbox (``keys.enqueue_outbox()``). Once its
``retrain.decided`` event is published, the decision loop queues ``[model, pipeline id]`` on
``keys.enqueue_queue()`` (oldest first) if its relay is up, else it enqueues the pipeline itself.
The relay pops that queue, claims the outbox entry (only while the pipeline still holds its slot,
under the model's enqueue lock), publishes the pipeline's first step (it sends the rest itself:
``workers.pipeline.canvas``) and marks the pipeline ``enqueued``.

Why a process of its own: a Celery publish costs about half a millisecond of Python in
Celery and kombu, and the decision loop would otherwise pay it between batches (and wait on the
broker). In the relay it runs on another core while the loop reads the next batch.

The relay process also evaluates: the decision service's run() cues it after each poll (a
byte on a pipe), and an evaluator thread of the relay runs the round (due models, policy,
records, the enqueue of its own start decisions) on this second core (two threads taking cues
in turn, so that one's round computes while the other's waits on Redis), while the service's process only
reads and records batches: one Python process is GIL-bound at a few thousand events a second.
While the relay is not ready the service evaluates on its own evaluator thread; both at once is
safe (per-model evaluation leases, as with several decision workers).

At least once, never lost: an entry popped by a relay that dies before the enqueue stays in the
outbox, and the decision service's outbox replay (which publishes ``retrain.decided`` first)
enqueues it after ``OUTBOX_GRACE_S``. The decision service hands nothing to a relay whose loop
stalled (it enqueues by itself meanwhile), kills one stuck for ``STUCK_AFTER_S``, and restarts a
relay process that died, backing off while it keeps dying. An entry enqueued twice (a replay
racing a stalled relay) is harmless: the pipeline's task ids are deterministic and every step is
idempotent by pipeline id and step.
"""

from __future__ import annotations

import functools
import gc
import json
import multiprocessing as mp
import os
import select
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import structlog

from config.keys import Keys
from events.bus import survive

log = structlog.get_logger(__name__)

WAIT_S = 0.5
"""How long one BLPOP waits before the relay checks whether to stop."""
RESTART_AFTER_S = 5.0
"""A relay process that died is restarted after this long, doubling while restarts keep dying ..."""
RESTART_MAX_S = 300.0
"""... up to this."""
HEALTHY_AFTER_S = 60.0
"""A relay that has run this long resets the restart backoff."""
STALLED_AFTER_S = 5.0
"""A relay whose loop has not come round for this long is not handed new pipelines (the loop enqueues them) ..."""
STUCK_AFTER_S = 60.0
"""... and after this long it is killed and restarted."""
START_TIMEOUT_S = 120.0
ROUND_WAIT_S = 0.5
"""Longest the relay's evaluator waits for a cue before it looks at the due set anyway."""
EVALUATOR_THREADS = 2
"""Evaluator threads in the relay process. They take cues in turn, so a cue that arrives while
one thread's round waits on Redis starts the other's: rounds overlap their round trips. Their
models never overlap: each round leases the models it evaluates."""


def enqueue_recorded(store, enqueue: Callable[[dict[str, Any]], Any], record: dict[str, Any], by: str) -> bool:
    """Put a decided pipeline on Celery and mark it enqueued; on failure it stays in the outbox (for the replay)."""
    try:
        enqueue(record)
    except Exception as exc:  # noqa: BLE001 - broker trouble: the outbox keeps the decision
        log.error("decision.enqueue_failed", model=record["model"], decision_id=record["id"],
                  pipeline_id=record["pipeline_id"], error=f"{type(exc).__name__}: {exc}")
        return False
    store.enqueued(record, time.time(), by=by)
    log.info("decision.pipeline_enqueued", model=record["model"], decision_id=record["id"],
             pipeline_id=record["pipeline_id"], queue=record["queue"], urgency=record["urgency"], by=by)
    return True


def celery_enqueue(record: dict[str, Any]) -> None:
    from workers.pipeline.canvas import start_pipeline

    start_pipeline(record)


def warm_up_celery() -> None:
    from workers.pipeline.canvas import warm_up

    warm_up()


class EnqueueRelay:
    """Pops the enqueue queue and puts each pipeline on Celery (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: Keys, name: str,
                 enqueue: Callable[[dict[str, Any]], Any] | None = None):
        from workers.decision.state import DecisionStore

        self.redis = client
        self.keys = keys
        self.name = name
        self.owner = f"{name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        """Holder of the enqueue locks it takes: unique, so a successor never releases a predecessor's lock."""
        self.store = DecisionStore(client, keys)
        self.enqueue = enqueue or celery_enqueue
        self.relayed = 0

    def run(self, should_stop: Callable[[], bool], heartbeat: Callable[[], None] | None = None) -> None:
        """Relay until ``should_stop()``; errors are logged and retried, never fatal.

        ``heartbeat`` is called every time round the loop (at least every ``WAIT_S`` while idle).
        """
        queue = self.keys.enqueue_queue()
        while not should_stop():
            if heartbeat is not None:
                heartbeat()
            survive(lambda: self._relay_next(queue), "decision.relay", pause_s=0.5)

    def _relay_next(self, queue: str) -> None:
        item = self.redis.blpop([queue], timeout=WAIT_S)
        if item is not None:
            self.relay(item[1])

    def relay(self, entry: bytes | str) -> bool:
        """Enqueue one queue entry's pipeline if it still needs it; return whether this call enqueued it."""
        try:
            model, pipeline_id = json.loads(entry)
        except (ValueError, TypeError):
            log.error("decision.relay_bad_entry", entry=str(entry)[:200])
            return False
        record = self.store.claim_enqueue(model, pipeline_id, self.owner)
        if record is None:  # enqueued already, no longer holding its slot, or being enqueued by another
            return False
        try:
            done = enqueue_recorded(self.store, self.enqueue, record, by=self.name)
        finally:
            self.store.release_enqueue(model, self.owner)
        self.relayed += done
        return done


def wait_for_cue(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` for cue bytes on the pipe ``fd``; take them all. Returns whether there was one."""
    readable, _, _ = select.select([fd], [], [], timeout)
    if not readable:
        return False
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
    return True


def run_rounds(wait_for_cue: Callable[[], object], should_stop: Callable[[], bool], round_: Callable[[], object],
               what: str, heartbeat: Callable[[], None] = lambda: None, pause_s: float = 0.5) -> None:
    """An evaluator thread's loop: a round after each cue (``wait_for_cue`` returns on one or after its
    own timeout) until ``should_stop``; errors are logged, never fatal (:func:`events.bus.survive`)."""
    while not should_stop():
        heartbeat()
        wait_for_cue()
        if should_stop():
            break
        survive(round_, what, pause_s=pause_s)


def evaluate_rounds(svc, cue_fd: int, should_stop: Callable[[], bool], heartbeat: Callable[[], None],
                    cue_turn: threading.Lock) -> None:
    """A relay evaluator thread: a round of due models each time the decision service cues one
    (or every ``ROUND_WAIT_S``). ``svc``: a relay-less DecisionService. The threads sharing
    ``cue_turn`` wait for cues one at a time (see ``EVALUATOR_THREADS``)."""
    def next_cue() -> None:
        with cue_turn:
            wait_for_cue(cue_fd, ROUND_WAIT_S)

    run_rounds(next_cue, should_stop, svc.evaluate_due, "decision.relay_round", heartbeat)


class OldestBeat:
    """Heartbeats of several threads reported as one: the shared value holds the oldest thread's latest beat,
    so one thread that stops coming round shows as a stall even while the others keep beating."""

    def __init__(self, shared, threads: int):
        self.shared = shared
        self._beats = [time.monotonic()] * threads
        self._lock = threading.Lock()

    def beat(self, index: int) -> None:
        with self._lock:
            self._beats[index] = time.monotonic()
            if self.shared is not None:
                self.shared.value = min(self._beats)


def relay_main(settings, name: str, stop, ready, parent_pid: int, start_cpu=None, beat=None, cue=None,
               eval_beat=None) -> None:
    """The relay process: load Celery, say ready, relay (and with ``cue``, evaluate) until told to stop
    or the parent is gone.

    ``stop`` and ``ready`` are :class:`SharedFlag` objects; ``start_cpu`` (a shared double) receives the
    CPU seconds the start took (imports, warm-up);
    ``beat`` (a shared double) the ``time.monotonic()`` of the relay loop's latest round, and
    ``eval_beat`` the oldest of the evaluator threads' latest rounds; ``cue`` (the read end of a pipe) asks for an
    evaluation round: a byte per cue, never a lock a killed process could leave taken.
    """
    from config.keys import keys_from_settings
    from config.logs import configure_logging
    from workers.connections import new_redis

    # The relay shares the worker's process group: Ctrl-C and a service manager's SIGTERM reach
    # it too. It finishes the pipeline in hand and stops (SIGTERM), or leaves stopping to the
    # decision service (SIGINT), rather than dying between a publish and its bookkeeping.
    terminating: list[int] = []
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: terminating.append(signum))
    configure_logging(settings.log_level, settings.log_format, force=True)
    # A socket timeout: a half-open connection must not hold BLPOP (and the stop checks) forever.
    relay = EnqueueRelay(new_redis(settings, socket_timeout=WAIT_S + 10), keys_from_settings(settings), name)
    try:
        warm_up_celery()
    except Exception as exc:  # noqa: BLE001 - the broker may come later; the first enqueue retries
        log.warning("decision.relay_warm_up_failed", error=str(exc))
    if cue is not None:
        from workers.decision.service import DecisionService

        svc = DecisionService(relay.redis, settings, name, relay=False)  # enqueues its starts itself
    gc.collect()
    gc.freeze()  # what is loaded now stays out of the collector's walks (see DecisionService.warm_up)

    def heartbeat() -> None:
        if beat is not None:
            beat.value = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process on the host

    eval_beats = OldestBeat(eval_beat, EVALUATOR_THREADS)

    def should_stop() -> bool:
        return bool(terminating) or stop.is_set() or os.getppid() != parent_pid

    if start_cpu is not None:
        start_cpu.value = time.process_time()
    heartbeat()  # before ready: a start that took long is not a stall
    for i in range(EVALUATOR_THREADS):
        eval_beats.beat(i)
    evaluators: list[threading.Thread] = []
    if cue is not None:
        os.set_blocking(cue.fileno(), False)
        turn = threading.Lock()
        evaluators = [threading.Thread(target=evaluate_rounds, name=f"relay-evaluator-{i}", daemon=True,
                                       args=(svc, cue.fileno(), should_stop, functools.partial(eval_beats.beat, i), turn))
                      for i in range(EVALUATOR_THREADS)]
        for evaluator in evaluators:
            evaluator.start()
    ready.set()
    log.info("decision.relay_started", relay=name, pid=os.getpid(), evaluates=cue is not None)

    relay.run(should_stop, heartbeat)
    for evaluator in evaluators:
        evaluator.join(30)  # each sees the stop within ROUND_WAIT_S (or its turn), after the round in hand
    log.info("decision.relay_stopped", relay=name, relayed=relay.relayed)


class SharedFlag:
    """A flag in shared memory between a process and its child: set and read without a lock.

    Not a ``multiprocessing.Event``: its ``set()`` waits for every process sleeping in ``wait()`` to
    acknowledge, so a decision worker SIGKILLed while polling for its relay's readiness left the
    relay blocked in ``set()`` forever (an orphan that never exits). Here ``wait`` polls.
    """

    POLL_S = 0.02

    def __init__(self, ctx):
        self._value = ctx.Value("b", 0, lock=False)

    def set(self) -> None:
        self._value.value = 1

    def is_set(self) -> bool:
        return bool(self._value.value)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set():
            if time.monotonic() >= deadline:
                return False
            time.sleep(self.POLL_S)
        return True


class RelayProcess:
    """An :class:`EnqueueRelay` in a child process of the decision service, restarted if it dies.

    Spawned, not forked: the decision service runs beside other threads (the Celery worker's),
    and a forked child could inherit a lock one of them held.
    """

    def __init__(self, settings, name: str):
        self.settings = settings
        self.name = name
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._stop = None
        self._ready = None
        self._start_cpu = None
        self._beat = None
        self._eval_beat = None
        self._cue = None
        self._start_cpu_before = 0.0
        self._started_at = 0.0
        self._failures = 0
        self._stopped = False
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start_cpu_seconds(self) -> float:
        """CPU seconds the relay processes started so far spent starting (loading Celery), not relaying."""
        return self._start_cpu_before + (self._start_cpu.value if self._start_cpu is not None else 0.0)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def stalled_for(self) -> float:
        """Seconds since the relay's loop or one of its evaluator threads (the oldest of them) last came round (0 while starting)."""
        if self._beat is None or not self._ready.is_set():
            return 0.0
        return max(0.0, time.monotonic() - min(self._beat.value, self._eval_beat.value))

    def cue(self) -> None:
        """Ask the relay's evaluator for a round (the decision service does after each poll).

        A byte on a pipe, written without blocking: a relay that is gone or not reading just
        leaves the pipe full (a cue is pending anyway), and nothing here can hang on it.
        """
        if self._cue is None:
            return
        try:
            os.write(self._cue.fileno(), b"c")
        except OSError:  # full (BlockingIOError) or no reader left (BrokenPipeError)
            pass

    def ready(self) -> bool:
        """Alive, done loading Celery and going round its loop: entries queued now are enqueued in milliseconds."""
        return self.alive() and self._ready.is_set() and self.stalled_for() < STALLED_AFTER_S

    def start(self, wait: bool = True) -> bool:
        """Start the relay process; with ``wait``, until it has loaded Celery (or died). Returns whether it is ready."""
        self._stopped = False
        if self._start_cpu is not None:
            self._start_cpu_before += self._start_cpu.value
        # Kept on self: the child unpickles them after start() returns.
        self._stop, self._ready = SharedFlag(self._ctx), SharedFlag(self._ctx)
        self._start_cpu = self._ctx.Value("d", 0.0, lock=False)
        self._beat = self._ctx.Value("d", time.monotonic(), lock=False)
        self._eval_beat = self._ctx.Value("d", time.monotonic(), lock=False)
        if self._cue is not None:
            self._cue.close()
        cue_reader, self._cue = self._ctx.Pipe(duplex=False)
        os.set_blocking(self._cue.fileno(), False)
        self._started_at = time.monotonic()  # before the spawn: a spawn that fails counts as an attempt
        self._proc = self._ctx.Process(target=relay_main, name="enqueue-relay", daemon=True,
                                       args=(self.settings, self.name, self._stop, self._ready, os.getpid(),
                                             self._start_cpu, self._beat, cue_reader, self._eval_beat))
        self._proc.start()
        cue_reader.close()  # the child's now
        if not wait:
            return False
        deadline = self._started_at + START_TIMEOUT_S
        while not self._ready.wait(0.2):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                return False
        return True

    def ensure_running(self) -> bool:
        """Restart a relay process that died, is stuck or never came up, after a backoff; return whether
        it was restarted now. Never raises (it runs in the decision loop)."""
        if self._stopped or not self._started_at:  # stopped on purpose, or never asked to start
            return False
        now = time.monotonic()
        if self._proc is not None and self._proc.is_alive():
            stalled = self.stalled_for()
            starting_too_long = not self._ready.is_set() and now - self._started_at > START_TIMEOUT_S
            if stalled < STUCK_AFTER_S and not starting_too_long:
                if self._failures and now - self._started_at > HEALTHY_AFTER_S:
                    self._failures = 0
                return False
            log.error("decision.relay_stuck", relay=self.name, pid=self._proc.pid, stalled_s=round(stalled, 1),
                      ready=self._ready.is_set())
            self._proc.kill()
            self._proc.join(5)
        delay = min(RESTART_MAX_S, RESTART_AFTER_S * 2 ** self._failures)
        if now - self._started_at < delay:
            return False
        log.error("decision.relay_died", relay=self.name, restarts=self.restarts + 1,
                  exitcode=self._proc.exitcode if self._proc is not None else "never started")
        self._failures += 1
        self.restarts += 1
        try:
            self.start(wait=False)
        except Exception as exc:  # noqa: BLE001 - no process, no file descriptors: retried after the backoff
            log.error("decision.relay_start_failed", relay=self.name, error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        self._stopped = True
        if self._proc is None:
            return
        self._stop.set()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._proc = None
