"""The event bus on Redis Streams.

Producers validate and XADD (pipelined) into the model's shard of the event stream.
Consumers read in batches through a consumer group, skip event ids they have already
handled, let the handler queue its effects into one MULTI/EXEC together with the "seen"
marks, and XACK only after that transaction committed with no failed command. Entries left pending by a dead
consumer are reclaimed with XAUTOCLAIM; an entry delivered ``max_deliveries`` times, or one
that is not a valid event, moves to the dead-letter stream with the reason and the original
payload. Delivery is at least once; effects are once per event id.

Hot paths are written for CPU per event (the bus shares a small machine with Redis and the
workers): the publisher writes each chunk with one script call per shard instead of one XADD
command per event; the consumer reads raw replies (no per-entry dict building) and keeps its
own per-batch commands (seen marks, acks) to a handful, so the handler's effects decide the
cost of a batch.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from config.keys import Keys
from events.envelope import CloudEvent, EventError, parse_event

log = structlog.get_logger(__name__)

PAYLOAD_FIELD = "e"
_PAYLOAD_KEY = PAYLOAD_FIELD.encode()
MAX_DEAD_LETTER_LEN = 100_000

# One call appends a chunk of payloads to one stream shard, each entry as XADD would write it
# (MAXLEN ~ per entry): the client packs one command instead of one per event.
XADD_MANY = """
-- KEYS[1]: the stream ; ARGV[1]: MAXLEN (approximate) ; ARGV[2..]: payloads
local maxlen = ARGV[1]
for i = 2, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', 'e', ARGV[i])
end
return #ARGV - 1
"""

Handler = Callable[[list[CloudEvent], "redis.client.Pipeline"], None]
"""Queue the effects of a batch of new events into the (transactional) pipeline."""
Committed = Callable[[list[CloudEvent]], None]
"""Told the events whose effects just committed (each event id once): for counters, not state."""


@dataclass
class PublishResult:
    published: list[str] = field(default_factory=list)
    """Event ids written to the stream."""
    rejected: list[tuple[int, str]] = field(default_factory=list)
    """(index in the input, reason) for each event refused."""


class EventBus:
    """Publish events and manage the stream (the producer side, plus housekeeping)."""

    def __init__(self, client: redis.Redis, keys: Keys, *, maxlen: int = 1_000_000, max_event_bytes: int = 65536):
        self.redis = client
        self.keys = keys
        self.maxlen = maxlen
        self.max_event_bytes = max_event_bytes
        self._stream_of: dict[str, str] = {}

    @classmethod
    def from_settings(cls, client: redis.Redis, settings) -> "EventBus":
        from config.keys import keys_from_settings

        return cls(client, keys_from_settings(settings), maxlen=settings.stream_maxlen,
                   max_event_bytes=settings.max_event_bytes)

    def publish(self, event: CloudEvent | dict | str | bytes) -> str:
        """Validate and publish one event; return its id. Raise EventError if invalid."""
        result = self.publish_many([event])
        if result.rejected:
            raise EventError(result.rejected[0][1])
        return result.published[0]

    def publish_many(self, events: Iterable[CloudEvent | dict | str | bytes], *, chunk: int = 5000) -> PublishResult:
        """Validate every event and publish the valid ones, ``chunk`` at a time.

        Each chunk is one pipelined round trip with one ``XADD_MANY`` call per shard; the
        entries of a shard keep their input order.
        """
        result = PublishResult()
        by_stream: dict[str, list[str]] = {}
        pending = 0
        max_bytes = self.max_event_bytes
        stream_of = self._stream_of
        published = result.published
        for index, item in enumerate(events):
            try:
                event = item if isinstance(item, CloudEvent) else parse_event(item, max_bytes=max_bytes)
                payload = event.to_json()
                if len(payload) > max_bytes:
                    raise EventError(f"event is {len(payload)} bytes, over the limit of {max_bytes}")
            except EventError as exc:
                result.rejected.append((index, str(exc)))
                continue
            subject = event.subject
            stream = stream_of.get(subject)
            if stream is None:
                stream = stream_of[subject] = self.keys.events_for(subject)
                if len(stream_of) > 100_000:
                    stream_of.clear()
            payloads = by_stream.get(stream)
            if payloads is None:
                payloads = by_stream[stream] = []
            payloads.append(payload)
            published.append(event.id)
            pending += 1
            if pending >= chunk:
                self._write(by_stream)
                by_stream, pending = {}, 0
        if pending:
            self._write(by_stream)
        return result

    def _write(self, by_stream: dict[str, list[str]]) -> None:
        # EVAL with the (small) body rather than EVALSHA: no SCRIPT EXISTS round trip per
        # chunk, and no NOSCRIPT failure of some shards after a server restart.
        pipe = self.redis.pipeline(transaction=False)
        for stream, payloads in by_stream.items():
            pipe.eval(XADD_MANY, 1, stream, self.maxlen, *payloads)
        pipe.execute()

    def publish_raw(self, model_or_shard: str | int, payload: str | bytes) -> str:
        """Write a payload without validation (for tests and re-publishing raw entries)."""
        stream = self.keys.events(model_or_shard) if isinstance(model_or_shard, int) else self.keys.events_for(model_or_shard)
        return self.redis.xadd(stream, {PAYLOAD_FIELD: payload}, maxlen=self.maxlen, approximate=True)

    def trim_older_than(self, seconds: float) -> int:
        """Drop entries older than ``seconds`` from every shard (XTRIM MINID ~)."""
        min_id = f"{int((time.time() - seconds) * 1000)}-0"
        return sum(self.redis.xtrim(s, minid=min_id, approximate=False) or 0 for s in self.keys.all_event_streams())

    # --- dead letters ------------------------------------------------------------------
    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        entries = self.redis.xrevrange(self.keys.dead_letters(), count=count)
        return [{"id": _s(eid), **{_s(k): _s(v) for k, v in fields.items()}} for eid, fields in entries]

    def republish_dead_letter(self, entry_id: str, payload: str | None = None) -> str:
        """Validate and publish a dead-lettered payload (or a fixed one), then remove the entry."""
        entries = self.redis.xrange(self.keys.dead_letters(), min=entry_id, max=entry_id)
        if not entries:
            raise KeyError(f"no dead letter with id {entry_id}")
        original = _s(entries[0][1].get(b"payload", b""))
        event = parse_event(payload if payload is not None else original, max_bytes=self.max_event_bytes)
        event_id = self.publish(event)
        self.redis.xdel(self.keys.dead_letters(), entry_id)
        return event_id


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class ConsumerStats:
    read: int = 0
    handled: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    failed_batches: int = 0


class StreamConsumer:
    """A member of a consumer group over every shard of the event stream.

    ``poll()`` reads one batch, handles it and acks it; run it in a loop (``run()``), or call
    it from a test. Safe to run many consumers (processes or hosts) in one group.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        group: str,
        consumer: str,
        handler: Handler,
        *,
        batch_size: int = 1000,
        block_ms: int = 500,
        max_deliveries: int = 5,
        claim_idle_ms: int = 30_000,
        dedup_retention_s: float = 7 * 86400,
        max_event_bytes: int = 65536,
        pause_gc: bool = True,
        on_committed: Committed | None = None,
    ):
        self.redis = client
        self.keys = keys
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.dedup_retention_s = dedup_retention_s
        self.max_event_bytes = max_event_bytes
        self.pause_gc = pause_gc
        self.on_committed = on_committed
        self.streams = keys.all_event_streams()
        self.stats = ConsumerStats()
        # Same connections, no response callbacks: raw replies for the hot read path.
        self._raw = raw_client(client)
        self._shard_of: dict[str, int] = {}
        self._stopping = False
        self._last_claim = 0.0
        self._own_pending_done = False
        self._trim_counter = 0

    @classmethod
    def from_settings(cls, client, settings, group: str, consumer: str, handler: Handler,
                      on_committed: Committed | None = None) -> "StreamConsumer":
        from config.keys import keys_from_settings

        return cls(
            client, keys_from_settings(settings), group, consumer, handler,
            batch_size=settings.bus_batch_size, block_ms=settings.bus_block_ms,
            max_deliveries=settings.bus_max_deliveries,
            claim_idle_ms=int(settings.bus_claim_idle.total_seconds() * 1000),
            dedup_retention_s=settings.dedup_retention.total_seconds(),
            max_event_bytes=settings.max_event_bytes, on_committed=on_committed,
        )

    def ensure_group(self) -> None:
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # --- the loop ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    def run(self, idle_callback: Callable[[], None] | None = None) -> None:
        """Poll (and call ``idle_callback`` after each poll) until :meth:`stop`; errors are logged, never fatal."""
        self.ensure_group()
        while not self._stopping:
            try:
                self.poll()
                if idle_callback is not None:
                    idle_callback()
            except redis.ConnectionError as exc:  # Redis restarting: wait and carry on
                log.warning("bus.connection_lost", error=str(exc))
                time.sleep(0.5)
            except Exception as exc:  # noqa: BLE001 - a consumer that stops is worse than one that retries
                log.exception("bus.loop_error", error=str(exc))
                time.sleep(1.0)
                if "NOGROUP" in str(exc):  # the stream or group was deleted under us
                    with contextlib.suppress(Exception):
                        self.ensure_group()

    def poll(self, block_ms: int | None = None) -> int:
        """Read, handle and ack one batch; return how many entries were processed."""
        entries: list[tuple[str, str, dict]] = []
        if not self._own_pending_done:
            # After a restart under the same name, our own unacked entries come first.
            entries = self._read("0", block_ms=None)
            if not entries:
                self._own_pending_done = True
        if not entries and time.monotonic() - self._last_claim > self.claim_idle_ms / 1000 / 2:
            self._last_claim = time.monotonic()
            entries = self.reclaim()
        if not entries:
            entries = self._read(">", block_ms=self.block_ms if block_ms is None else block_ms)
        if entries:
            if self.pause_gc:
                with gc_paused():
                    self.process(entries)
            else:
                self.process(entries)
        return len(entries)

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, Any, Any]]:
        """XREADGROUP over every shard; entries as (stream, entry id, raw fields)."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.batch_size]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *self.streams, *([start] * len(self.streams))]
        reply = self._raw.execute_command(*args)
        if not reply:
            return []
        out: list[tuple[str, Any, Any]] = []
        for stream, items in (reply.items() if isinstance(reply, dict) else reply):
            stream = _s(stream)
            gone = [entry_id for entry_id, fields in items if not fields]
            if gone:  # a deleted entry still pending shows with no fields
                self.redis.xack(stream, self.group, *gone)
                items = [item for item in items if item[1]]
            out += [(stream, entry_id, fields) for entry_id, fields in items]
        return out

    def reclaim(self) -> list[tuple[str, str, dict]]:
        """XAUTOCLAIM entries idle on dead consumers; dead-letter those delivered too often."""
        claimed: list[tuple[str, str, dict]] = []
        for stream in self.streams:
            reply = self.redis.xautoclaim(stream, self.group, self.consumer, self.claim_idle_ms,
                                          start_id="0-0", count=self.batch_size)
            items = [(entry_id, fields) for entry_id, fields in reply[1] if fields]
            for gone in (reply[2] if len(reply) > 2 else []):  # deleted while pending
                self.redis.xack(stream, self.group, gone)
            if not items:
                continue
            info = self.redis.xpending_range(stream, self.group, min=items[0][0], max=items[-1][0],
                                             count=len(items) * 2 + 10, consumername=self.consumer)
            deliveries = {_s(p["message_id"]): p["times_delivered"] for p in info}
            pipe = self.redis.pipeline(transaction=False)
            dead = 0
            for entry_id, fields in items:
                entry_id = _s(entry_id)
                if deliveries.get(entry_id, 0) > self.max_deliveries:
                    payload = _s(fields.get(PAYLOAD_FIELD.encode(), b""))
                    self._dead_letter(stream, entry_id, payload,
                                      f"delivered {deliveries[entry_id]} times without success", pipe=pipe)
                    dead += 1
                else:
                    claimed.append((stream, entry_id, fields))
            if dead:
                pipe.execute()
        self.stats.reclaimed += len(claimed)
        if claimed:
            log.info("bus.reclaimed", count=len(claimed), consumer=self.consumer)
        return claimed

    def _dead_letter(self, stream: str, entry_id: str, payload: str, reason: str, pipe=None) -> None:
        target = pipe if pipe is not None else self.redis.pipeline(transaction=True)
        target.xadd(self.keys.dead_letters(), {
            "reason": reason, "payload": payload, "stream": stream, "entry_id": entry_id,
            "time": f"{time.time():.3f}", "group": self.group,
        }, maxlen=MAX_DEAD_LETTER_LEN, approximate=True)
        target.xack(stream, self.group, entry_id)
        if pipe is None:
            target.execute()
        self.stats.dead_lettered += 1
        log.warning("bus.dead_lettered", stream=stream, entry_id=entry_id, reason=reason)

    # --- handling ------------------------------------------------------------------------
    def process(self, entries: Sequence[tuple[str, Any, Any]]) -> None:
        """Validate, de-duplicate, handle and ack a batch of (stream, entry id, fields) entries."""
        self.stats.read += len(entries)
        valid: list[tuple[str, Any, CloudEvent]] = []
        append = valid.append
        pipe = None
        max_bytes = self.max_event_bytes
        for stream, entry_id, fields in entries:
            # the common case inline: a raw reply's field list holding just the payload
            raw = fields[1] if type(fields) is list and len(fields) == 2 and fields[0] == _PAYLOAD_KEY else _payload(fields)
            try:
                if raw is None:
                    raise EventError(f"stream entry has no '{PAYLOAD_FIELD}' field")
                append((stream, entry_id, parse_event(raw, max_bytes=max_bytes)))
            except EventError as exc:
                pipe = pipe or self.redis.pipeline(transaction=False)
                shown = _s(raw) if raw is not None else json.dumps({_s(k): _s(v) for k, v in _field_dict(fields).items()})
                self._dead_letter(stream, _s(entry_id), shown, str(exc), pipe=pipe)
        if pipe is not None:
            pipe.execute()
        if not valid:
            return
        fresh, dupes = self._split_seen(valid)
        try:
            self._commit(fresh, dupes)
        except redis.ConnectionError:
            raise
        except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the bus
            self.stats.failed_batches += 1
            log.exception("bus.batch_failed", error=str(exc), size=len(fresh))
            self._commit_one_by_one(fresh, dupes)
        self.stats.duplicates += len(dupes)

    def _shard(self, model: str) -> int:
        shard = self._shard_of.get(model)
        if shard is None:
            if len(self._shard_of) > 100_000:
                self._shard_of.clear()
            shard = self._shard_of[model] = self.keys.shard_of(model)
        return shard

    def _split_seen(self, valid):
        """Split a batch into new events and ones whose id was already handled."""
        by_shard: dict[int, list[int]] = {}
        shard_of, shard = self._shard_of, self._shard
        for i, (_, _, event) in enumerate(valid):
            s = shard_of.get(event.subject)
            if s is None:
                s = shard(event.subject)
            idx = by_shard.get(s)
            if idx is None:
                idx = by_shard[s] = []
            idx.append(i)
        pipe = self._raw.pipeline(transaction=False)
        order = list(by_shard.items())
        for s, idx in order:
            pipe.execute_command("ZMSCORE", self.keys.seen(s), *[valid[i][2].id for i in idx])
        seen_flags = [False] * len(valid)
        for (_, idx), scores in zip(order, pipe.execute()):
            for i, score in zip(idx, scores):
                if score is not None:
                    seen_flags[i] = True
        fresh, dupes, batch_ids = [], [], set()
        for flag, item in zip(seen_flags, valid):
            event_id = item[2].id
            if flag or event_id in batch_ids:
                dupes.append(item)
            else:
                batch_ids.add(event_id)
                fresh.append(item)
        return fresh, dupes

    def _commit(self, fresh, dupes=()) -> None:
        """Commit a batch: the handler's effects with the seen marks in one MULTI/EXEC, then the XACKs.

        Effects and seen marks commit together, so an event's effect happens once per id
        whatever is redelivered. The acks follow only when every command of the transaction
        succeeded: Redis runs the rest of a MULTI when one command fails at EXEC time
        (WRONGTYPE on a corrupted key, a script error), so a failure takes the batch's seen
        marks back and raises with nothing acked; the entries stay pending for the
        one-at-a-time retry, and then the dead-letter stream. A crash between the EXEC and
        the acks leaves entries pending that are marked seen: redelivered, they are acked as
        duplicates.
        """
        pipe = self.redis.pipeline(transaction=True)
        events = [e for _, _, e in fresh]
        if events:
            self.handler(events, pipe)
        now = time.time()
        by_shard: dict[int, list] = {}
        shard_of, shard = self._shard_of, self._shard
        for e in events:
            s = shard_of.get(e.subject)
            if s is None:
                s = shard(e.subject)
            marks = by_shard.get(s)
            if marks is None:
                marks = by_shard[s] = []
            marks += (now, e.id)
        self._trim_counter += 1
        trim = self._trim_counter % 100 == 0
        for s, marks in by_shard.items():
            pipe.execute_command("ZADD", self.keys.seen(s), *marks)
            if trim:
                pipe.zremrangebyscore(self.keys.seen(s), 0, now - self.dedup_retention_s)
        if len(pipe):
            results = pipe.execute(raise_on_error=False)
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                self._unmark(by_shard)
                raise failed
        acks: dict[str, list] = {}
        for items in (fresh, dupes):
            for stream, entry_id, _ in items:
                ids = acks.get(stream)
                if ids is None:
                    ids = acks[stream] = []
                ids.append(entry_id)
        if acks:
            ack = self._raw.pipeline(transaction=False)
            for stream, ids in acks.items():
                ack.execute_command("XACK", stream, self.group, *ids)
            ack.execute()
        self.stats.handled += len(events)
        if events and self.on_committed is not None:
            # After the commit, so a batch that fails and is retried one event at a time counts
            # each event once; a crash right here loses the count, never the state.
            try:
                self.on_committed(events)
            except Exception:  # noqa: BLE001 - the batch is committed; counting must not undo that
                log.exception("bus.on_committed_failed", size=len(events))

    def _unmark(self, by_shard: dict[int, list]) -> None:
        """Take back the seen marks of a batch whose transaction had a failed command."""
        undo = self.redis.pipeline(transaction=False)
        for s, marks in by_shard.items():
            undo.zrem(self.keys.seen(s), *marks[1::2])
        undo.execute()

    def _commit_one_by_one(self, fresh, dupes) -> None:
        """After a failed batch, isolate the poison event(s); they stay pending for a retry."""
        self._commit([], dupes)
        for item in fresh:
            try:
                self._commit([item])
            except redis.ConnectionError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("bus.event_failed", event_id=item[2].id, model=item[2].subject, error=str(exc))


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration (re-entrant, thread-safe).

    A batch allocates tens of thousands of short-lived objects that reference counting frees
    when the batch ends; left on, the collector would run dozens of times per batch and
    walk every object the worker holds each time it reaches the oldest generation. The
    collector resumes (if it was on) when the last pauser leaves.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def raw_client(client: redis.Redis) -> redis.Redis:
    """A client on ``client``'s connection pool whose replies skip redis-py's response callbacks.

    For the hot paths (XREADGROUP, ZMSCORE, scripts) where building dicts per entry would cost
    more than the command itself.
    """
    raw = redis.Redis(connection_pool=client.connection_pool)
    raw.response_callbacks = {}
    return raw


def _field_dict(fields: Any) -> dict:
    if isinstance(fields, dict):
        return fields
    return dict(zip(fields[::2], fields[1::2])) if fields else {}


def _payload(fields: Any) -> Any:
    """The payload of a stream entry, from a raw field list or a field dict; None if absent."""
    fields = _field_dict(fields)
    return fields.get(_PAYLOAD_KEY, fields.get(PAYLOAD_FIELD))
