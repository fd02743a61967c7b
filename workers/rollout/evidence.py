"""A rollout phase's evidence: the router's request records of the phase, delayed labels joined, read incrementally.

A tick judges the phase on every record served since it started. Reading and decoding the whole
window at every tick cost about 18 µs per record (0.16 s at 10,000 records, 9 s at 500,000), so
a rollout worker keeps each phase's decoded records between ticks and reads only the entries
written since its last read: a tick then costs the new entries plus the analysis.

The result is the one a full read would give: the records of the phase (served after it started,
by their own serve time), each with the last label its request got (a label may arrive before or
after its record; a later label for the same request replaces the earlier one). The cache is
per process (several rollout workers each keep their own and catch up from where they read) and
follows the streams: records and labels whose entries were trimmed (the streams' length bound) are
dropped as a full read would not see them, and a different rollout or phase, or streams that no
longer hold anything read before (the data replaced), are read afresh. At most
``MAX_CACHED_PHASES`` phases and ``MAX_CACHED_RECORDS`` records are kept, the least recently used
phases dropped first; a phase's records are bounded by its stream's length bound, as a full read's.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict, deque
from typing import Any

import redis

from config.keys import Keys

MAX_CACHED_PHASES = 8
MAX_CACHED_RECORDS = 1_000_000
"""Bounds of one process's cache: phases, and records over all of them (about 1.1 KB each, decoded, with
their labels: ~1.1 GB at the bound). Beyond either, the least recently used phases are dropped (the one
just read always stays: its tick needs it, as a full read would)."""
READ_CHUNK = 10_000
"""Entries per XRANGE call (a long window is read in chunks, never in one reply)."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id(entry_id: Any) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence), which orders as the stream does."""
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq)


def _next_id(entry_id: str) -> str:
    """The smallest stream id after ``entry_id`` (an XRANGE start that leaves it out; no ``(`` needed)."""
    ms, seq = _id(entry_id)
    return f"{ms}-{seq + 1}"


def _first_id(client: redis.Redis, stream: str) -> tuple[int, int] | None:
    first = client.xrange(stream, count=1)
    return _id(first[0][0]) if first else None


class PhaseEvidence:
    """One phase's records and the labels of its rollout, as read so far (and still in their streams)."""

    def __init__(self, rollout_ms: int, phase_started: float):
        self.rollout_ms = rollout_ms
        self.phase_started = phase_started
        self._reset()

    def _reset(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.record_ids: list[tuple[int, int]] = []  # each record's stream id, in stream order
        self.by_primary: dict[str, list[dict[str, Any]]] = {}
        self.labels: dict[str, Any] = {}
        self.label_ids: dict[str, tuple[int, int]] = {}  # the stream id of each request's last label
        self.label_order: deque[tuple[tuple[int, int], str]] = deque()  # (stream id, request id), as read
        # Stream ids are milliseconds: the phase's own millisecond also holds records written just
        # before it started, so the window opens at the next millisecond (losing at most one
        # millisecond of the new phase's evidence, against minutes of phase).
        self.requests_from = f"{int(self.phase_started * 1000) + 1}-0"
        self.feedback_from = f"{self.rollout_ms}-0"
        self.last_request: str | None = None
        self.last_feedback: str | None = None

    def read_new(self, client: redis.Redis, keys: Keys, model: str) -> None:
        """Forget what the streams no longer hold, then read what was written since the last read:
        labels first (onto the records they belong to), then records."""
        from workers.router.requestlog import decode_feedback, decode_request

        requests, feedback = keys.requests(model), keys.feedback(model)
        self._forget_trimmed(_first_id(client, requests), _first_id(client, feedback))
        for entry_id, fields in self._entries(client, feedback, "feedback"):
            fb = decode_feedback(fields)
            request_id, label, at = fb["request_id"], fb["label"], _id(entry_id)
            self.labels[request_id] = label
            self.label_ids[request_id] = at
            self.label_order.append((at, request_id))
            for rec in self.by_primary.get(request_id, ()):
                rec["label"] = label
        started = self.phase_started
        for entry_id, fields in self._entries(client, requests, "requests"):
            rec = decode_request(fields)
            # The router writes its log in batches up to ~0.25 s late, so a record served in the
            # previous phase may still land after the start: its own serve time must be past it too.
            if rec["ts"] is not None and rec["ts"] < started:
                continue
            primary = rec["shadow_of"] or rec["request_id"]
            rec["error"] = bool(rec["error"])
            rec["label"] = self.labels.get(primary)
            self.records.append(rec)
            self.record_ids.append(_id(entry_id))
            self.by_primary.setdefault(primary, []).append(rec)

    def _forget_trimmed(self, first_request: tuple[int, int] | None, first_feedback: tuple[int, int] | None) -> None:
        """Drop the records and labels whose entries the streams no longer hold (trimmed by their length
        bound, or the data replaced), as a full read would not see them."""
        for last, first in ((self.last_request, first_request), (self.last_feedback, first_feedback)):
            if last is not None and (first is None or first > _id(last)):  # all of it is gone
                self._reset()
                return
        if first_request is not None and self.record_ids and self.record_ids[0] < first_request:
            cut = bisect.bisect_left(self.record_ids, first_request)
            for rec in self.records[:cut]:
                primary = rec["shadow_of"] or rec["request_id"]
                kept = [r for r in self.by_primary.get(primary, ()) if r is not rec]
                if kept:
                    self.by_primary[primary] = kept
                else:
                    self.by_primary.pop(primary, None)
            del self.records[:cut], self.record_ids[:cut]
        while first_feedback is not None and self.label_order and self.label_order[0][0] < first_feedback:
            at, request_id = self.label_order.popleft()
            if self.label_ids.get(request_id) == at:  # its last label is gone, and every earlier one with it
                del self.labels[request_id], self.label_ids[request_id]
                for rec in self.by_primary.get(request_id, ()):
                    rec["label"] = None

    def _entries(self, client: redis.Redis, stream: str, which: str):
        start = self.requests_from if which == "requests" else self.feedback_from
        last = self.last_request if which == "requests" else self.last_feedback
        if last is not None:
            start = _next_id(last)
        while True:
            chunk = client.xrange(stream, min=start, count=READ_CHUNK)
            if not chunk:
                return
            for entry_id, fields in chunk:
                yield entry_id, fields
            last = _text(chunk[-1][0])
            if which == "requests":
                self.last_request = last
            else:
                self.last_feedback = last
            if len(chunk) < READ_CHUNK:
                return
            start = _next_id(last)


class EvidenceCache:
    """Phase evidence per (Redis server, key prefix, model), the least recently used dropped beyond
    ``size`` phases or ``max_records`` records."""

    def __init__(self, size: int = MAX_CACHED_PHASES, max_records: int = MAX_CACHED_RECORDS):
        self.size = size
        self.max_records = max_records
        self._phases: OrderedDict[tuple, PhaseEvidence] = OrderedDict()
        self._lock = threading.Lock()  # a worker may tick models on several threads

    def records(self, client: redis.Redis, keys: Keys, model: str, rollout_ms: int,
                phase_started: float) -> list[dict[str, Any]]:
        """The phase's records with their labels (a new list; the record dicts are shared: read-only)."""
        where = self._where(client, keys, model)
        with self._lock:
            phase = self._phases.pop(where, None)
        if phase is None or phase.rollout_ms != rollout_ms or phase.phase_started != phase_started:
            phase = PhaseEvidence(rollout_ms, phase_started)
        phase.read_new(client, keys, model)
        records = list(phase.records)
        with self._lock:
            self._phases[where] = phase
            held = sum(len(p.records) for p in self._phases.values())
            while len(self._phases) > 1 and (len(self._phases) > self.size or held > self.max_records):
                held -= len(self._phases.popitem(last=False)[1].records)
        return records

    def forget(self, client: redis.Redis, keys: Keys, model: str) -> None:
        """Drop the model's phase (its rollout ended)."""
        with self._lock:
            self._phases.pop(self._where(client, keys, model), None)

    @staticmethod
    def _where(client: redis.Redis, keys: Keys, model: str) -> tuple:
        kwargs = client.connection_pool.connection_kwargs
        return kwargs.get("host"), kwargs.get("port"), kwargs.get("path"), kwargs.get("db"), keys.prefix, model


PHASE_EVIDENCE = EvidenceCache()
"""This process's cache (rollout ticks build a new controller per task; the cache outlives them)."""
