"""The event bus on Redis Streams.

Producers validate and XADD (pipelined) into the model's shard of the event stream.
Consumers read in batches through a consumer group, skip event ids they have already
handled and claim the new ones (one script per shard: a copy of an id another live consumer
holds stays pending until that one commits), let the handler queue its effects into one
MULTI/EXEC together with the "seen" marks (which overwrite the claims), and XACK only after that
transaction committed with no failed command. Entries left pending by a dead
consumer are reclaimed with XAUTOCLAIM; an entry delivered ``max_deliveries`` times, or one
that is not a valid event, moves to the dead-letter stream with the reason and the original
payload. Delivery is at least once; effects are once per event id.

Trimming never drops an event unaccounted for. Retention (``trim_older_than``, XTRIM MINID) stops
at the oldest entry a consumer group has pending or not yet delivered. The memory bound
(``MAXLEN ~`` on every add) can still take entries a group lags behind on: a pending entry
whose payload was trimmed gets a dead-letter entry with its id, and entries trimmed before
they were ever delivered get one dead-letter entry with their count (that count needs the
group lag of Redis 7 or later).

Hot paths are written for CPU per event (the bus shares a small machine with Redis and the
workers): the publisher writes each chunk with one script call per shard instead of one XADD
command per event; the consumer reads raw replies (no per-entry dict building) and keeps its
own per-batch commands (seen marks, acks) to a handful, so the handler's effects decide the
cost of a batch.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import structlog

from config.keys import Keys, StreamLayoutError
from events.envelope import CloudEvent, EventError, check_size, parse_event, stream_json

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

# The de-duplication check of one shard's share of a batch, and a claim on each new id, in one
# step: two consumers holding copies of one event id (a producer's retry) never both handle it.
# A claim is the id in the shard's seen set with a negative score (minus the claim time); the
# commit's seen mark overwrites it with the (positive) commit time, so claiming costs one ZADD
# per new id and releasing nothing. A claim older than the claim idle time is a dead consumer's
# and is taken over (its entry is reclaimed by then).
CLAIM_NEW = """
-- KEYS[1]: seen ; ARGV[1]: now ; ARGV[2]: claims at or before this time are stale ; ARGV[3..]: event ids (distinct)
-- returns per id: 0 new (claimed now), 1 seen (handled before), 2 claimed by a live consumer
local stale = tonumber(ARGV[2])
local out, claims = {}, {}
local claim = '-' .. ARGV[1]
for first = 3, #ARGV, 1000 do
  local last = math.min(first + 999, #ARGV)
  local scores = redis.call('ZMSCORE', KEYS[1], unpack(ARGV, first, last))
  for i = first, last do
    local score = scores[i - first + 1]
    if score and tonumber(score) >= 0 then out[#out + 1] = 1
    elseif score and -tonumber(score) > stale then out[#out + 1] = 2
    else
      out[#out + 1] = 0
      claims[#claims + 1] = claim
      claims[#claims + 1] = ARGV[i]
    end
  end
end
for i = 1, #claims, 1000 do redis.call('ZADD', KEYS[1], unpack(claims, i, math.min(i + 999, #claims))) end
return out
"""

# Drops claims (negative scores) on ids whose handling failed before the commit; a seen mark
# (positive) is left alone.
RELEASE_CLAIMS = """
for i = 1, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) < 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return 0
"""

TRIMMED_REASON = "trimmed from the stream before it was handled"
"""Dead-letter reason of a pending entry whose payload was trimmed away (the payload is unknown)."""

# Dead-letters entries that were deleted while pending, each once: an id still pending is
# acked and recorded in one step, so two consumers that both see it record it once.
DEAD_LETTER_GONE = """
-- KEYS[1]: the stream ; KEYS[2]: the dead-letter stream
-- ARGV[1]: group ; ARGV[2]: reason ; ARGV[3]: time ; ARGV[4]: dead-letter MAXLEN (approximate)
-- ARGV[5]: '1' when the ids already left the pending list (XAUTOCLAIM takes deleted ones out)
-- ARGV[6..]: entry ids
local n = 0
for i = 6, #ARGV do
  if redis.call('XACK', KEYS[1], ARGV[1], ARGV[i]) == 1 or ARGV[5] == '1' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'reason', ARGV[2], 'payload', '',
               'stream', KEYS[1], 'entry_id', ARGV[i], 'time', ARGV[3], 'group', ARGV[1])
    n = n + 1
  end
end
return n
"""

# Dead-letters entries of one stream: each XADD to the dead letters, then its XACK. A refused
# XADD (Redis out of memory under noeviction, a wrong type) stops there, before its XACK: an entry
# is never acked without its dead letter. The refused entry and those after it stay pending.
DEAD_LETTER = """
-- KEYS[1]: the dead-letter stream ; KEYS[2]: the stream
-- ARGV[1]: group ; ARGV[2]: dead-letter MAXLEN (approximate) ; ARGV[3]: time
-- ARGV[4..]: (entry id, reason, payload) per entry
-- returns {entries dead-lettered, the refusal or false}
local n = 0
for i = 4, #ARGV, 3 do
  local added = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'reason', ARGV[i + 1],
                            'payload', ARGV[i + 2], 'stream', KEYS[2], 'entry_id', ARGV[i], 'time', ARGV[3],
                            'group', ARGV[1])
  if type(added) == 'table' and added.err then return {n, added.err} end
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[i])
  n = n + 1
end
return {n, false}
"""

LAST_ERROR_TTL_S = 7 * 86400
"""How long the last handling error of an entry is kept for its dead letter (:meth:`StreamConsumer.reclaim`)."""

# Accounts, once, for what trimming took from one group on one stream: pending entries older
# than the first entry left (their payload is gone) and entries trimmed before they were ever
# delivered. The second needs Redis 7+ and a group that has read before (a valid read
# counter): its lag then counts every entry added and not delivered, trimmed ones included, so
# lag minus the entries still there to deliver is the loss. That is known while the group is
# behind the first entry, or caught up with the last; the counter is then reset (XGROUP SETID
# ENTRIESREAD) so the same loss is never counted twice.
SETTLE_TRIMMED = """
-- KEYS[1]: the stream ; KEYS[2]: the dead-letter stream
-- ARGV[1]: group ; ARGV[2]: time ; ARGV[3]: dead-letter MAXLEN ; ARGV[4]: most pending entries per call
-- ARGV[5]: reason for a pending entry ; ARGV[6]: reason for undelivered ones (after their count)
-- returns {pending entries dead-lettered, entries trimmed before delivery}
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local function map(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
local function before(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am), tonumber(bm)
  return am < bm or (am == bm and tonumber(as) < tonumber(bs))
end
local function dead_letter(id, reason)
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'reason', reason, 'payload', '',
             'stream', KEYS[1], 'entry_id', id, 'time', ARGV[2], 'group', ARGV[1])
end
local info = map(redis.call('XINFO', 'STREAM', KEYS[1]))
local first = info['first-entry'] and info['first-entry'][1] or nil
local settled = 0
local gone = redis.call('XPENDING', KEYS[1], ARGV[1], '-', first and ('(' .. first) or '+', ARGV[4])
for _, p in ipairs(gone) do
  if redis.call('XACK', KEYS[1], ARGV[1], p[1]) == 1 then
    dead_letter(p[1], ARGV[5])
    settled = settled + 1
  end
end
local group
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local t = map(g)
  if t['name'] == ARGV[1] then group = t end
end
if not group or type(group['lag']) ~= 'number' or type(group['entries-read']) ~= 'number' then
  return {settled, 0}
end
local last = group['last-delivered-id']
local behind = first and before(last, first)
local present
if behind or not first then
  present = info['length']
elseif last == info['last-generated-id'] then
  present = 0
else
  return {settled, 0}
end
local lost = group['lag'] - present
if lost <= 0 then return {settled, 0} end
local upto = info['last-generated-id']
if behind then
  local ms, seq = string.match(first, '^(%d+)-(%d+)$')
  if tonumber(seq) > 0 then
    upto = ms .. '-' .. string.format('%.0f', tonumber(seq) - 1)
  else
    upto = string.format('%.0f', tonumber(ms) - 1) .. '-18446744073709551615'
  end
end
dead_letter('(' .. last .. ' .. ' .. upto .. ']', lost .. ' ' .. ARGV[6])
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], upto, 'ENTRIESREAD', info['entries-added'] - present)
return {settled, lost}
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
        self._layout_checked = False

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
                payload = stream_json(event)
                check_size(payload, max_bytes)
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

    def publish_in(self, pipe, events: Iterable[CloudEvent]) -> PublishResult:
        """Queue the events' writes into the caller's transaction ``pipe``: they are written with
        its other commands (a record and the event that announces it), or not at all.

        An event over the size limit is left out and logged as an error (its record, the caller's
        own write, still goes in: one oversized event must not stop the transaction).
        """
        result = PublishResult()
        by_stream: dict[str, list[str]] = {}
        for index, event in enumerate(events):
            payload = stream_json(event)
            try:
                check_size(payload, self.max_event_bytes)
            except EventError as exc:
                log.error("bus.event_left_out", event_id=event.id, type=event.type, model=event.subject,
                          error=str(exc))
                result.rejected.append((index, str(exc)))
                continue
            by_stream.setdefault(self.keys.events_for(event.subject), []).append(payload)
            result.published.append(event.id)
        if by_stream:
            self._queue_writes(pipe, by_stream)
        return result

    def _write(self, by_stream: dict[str, list[str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._queue_writes(pipe, by_stream)
        pipe.execute()

    def _queue_writes(self, pipe, by_stream: dict[str, list[str]]) -> None:
        # EVAL with the (small) body rather than EVALSHA: no SCRIPT EXISTS round trip per
        # chunk, and no NOSCRIPT failure of some shards after a server restart.
        if not self._layout_checked:
            check_stream_layout(self.redis, self.keys)
            self._layout_checked = True
        for stream, payloads in by_stream.items():
            pipe.eval(XADD_MANY, 1, stream, self.maxlen, *payloads)

    def publish_raw(self, model_or_shard: str | int, payload: str | bytes) -> str:
        """Write a payload without validation (for tests and re-publishing raw entries)."""
        stream = self.keys.events(model_or_shard) if isinstance(model_or_shard, int) else self.keys.events_for(model_or_shard)
        return self.redis.xadd(stream, {PAYLOAD_FIELD: payload}, maxlen=self.maxlen, approximate=True)

    def trim_older_than(self, seconds: float) -> int:
        """Drop entries older than ``seconds`` from every shard (XTRIM MINID); return how many.

        Never an entry a consumer group still needs: the cut stops at the oldest entry any
        group has pending or has not been delivered yet (a group behind by more than the
        retention keeps the stream long). How many old entries were kept back is logged.
        """
        wanted = (int((time.time() - seconds) * 1000), 0)
        trimmed = 0
        for stream in self.keys.all_event_streams():
            needed, group = self._oldest_needed(stream)
            cut = wanted if needed is None else min(wanted, needed)
            trimmed += self.redis.xtrim(stream, minid=_id_text(cut), approximate=False) or 0
            if cut < wanted:
                kept = self._count_older(stream, _id_text(wanted))
                if kept:
                    log.warning("bus.trim_held_back", stream=stream, kept=kept, group=group,
                                oldest_needed=_id_text(cut))
        return trimmed

    def _oldest_needed(self, stream: str) -> tuple[tuple[int, int] | None, str | None]:
        """The oldest entry id of ``stream`` some group has pending or not yet delivered, and that group."""
        try:
            groups = self.redis.xinfo_groups(stream)
        except redis.ResponseError:  # no such stream
            return None, None
        oldest: tuple[int, int] | None = None
        holder = None
        for group in groups:
            ms, seq = _id_tuple(group["last-delivered-id"])
            needed = (ms, seq + 1)  # the first entry not delivered yet
            if group["pending"]:
                oldest_pending = self.redis.xpending(stream, group["name"])["min"]
                if oldest_pending is not None:  # None: acked since XINFO
                    needed = min(needed, _id_tuple(oldest_pending))
            if oldest is None or needed < oldest:
                oldest, holder = needed, _s(group["name"])
        return oldest, holder

    def _count_older(self, stream: str, before: str, limit: int = 100_000) -> int:
        """How many entries of ``stream`` have an id below ``before`` (counted up to ``limit``)."""
        count, start = 0, "-"
        while count < limit:
            page = self.redis.xrange(stream, min=start, max=f"({before}", count=1000)
            if not page:
                break
            count += len(page)
            start = f"({_s(page[-1][0])}"
        return count

    # --- dead letters ------------------------------------------------------------------
    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        entries = self.redis.xrevrange(self.keys.dead_letters(), count=count)
        return [{"id": _s(eid), **{_text(k): _text(v) for k, v in fields.items()}} for eid, fields in entries]

    def republish_dead_letter(self, entry_id: str, payload: str | None = None) -> str:
        """Validate and publish a dead-lettered payload (or a fixed one), then remove the entry."""
        entries = self.redis.xrange(self.keys.dead_letters(), min=entry_id, max=entry_id)
        if not entries:
            raise KeyError(f"no dead letter with id {entry_id}")
        original = entries[0][1].get(b"payload", b"")  # bytes: parse_event reads them as received
        event = parse_event(payload if payload is not None else original, max_bytes=self.max_event_bytes)
        event_id = self.publish(event)
        self.redis.xdel(self.keys.dead_letters(), entry_id)
        return event_id


def survive(step: Callable[[], Any], what: str, *, pause_s: float = 1.0) -> Exception | None:
    """Run one step of a long-lived loop; log what it raises and pause, instead of ending the loop.

    A lost connection (Redis restarting) is a warning and a short pause; anything else is logged
    with its traceback (a loop that stops is worse than one that retries). Returns the exception.
    """
    try:
        step()
    except redis.ConnectionError as exc:
        log.warning(f"{what}.connection_lost", error=str(exc))
        time.sleep(0.5)
        return exc
    except Exception as exc:  # noqa: BLE001 - see above
        log.exception(f"{what}.error", error=str(exc))
        time.sleep(pause_s)
        return exc
    return None


def check_stream_layout(client: redis.Redis, keys: Keys) -> None:
    """Record the shard count on first use; refuse a process that counts shards differently.

    A model's events go to shard ``crc32(model) % shards``: a publisher or consumer with another
    count would write to or read from the wrong streams, and the events of some models would sit
    in shards nobody reads.
    """
    pipe = client.pipeline(transaction=False)
    pipe.set(keys.stream_layout(), keys.shards, nx=True)
    pipe.get(keys.stream_layout())
    stored = pipe.execute()[1]
    if stored is not None and int(stored) != keys.shards:
        raise StreamLayoutError(
            f"this Redis holds event streams written with {int(stored)} shards, and this process uses "
            f"{keys.shards} (RETRAIN_STREAM_SHARDS): events would land in shards nobody reads; use "
            f"{int(stored)}, or drain every consumer group and delete {keys.stream_layout()} to change it")


def _s(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: Any) -> Any:
    """Bytes as text for people to read: bytes that are not UTF-8 show as escapes, never raise."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else value


def _id_tuple(entry_id: str | bytes) -> tuple[int, int]:
    ms, _, seq = _s(entry_id).partition("-")
    return int(ms), int(seq or 0)


def _id_text(entry_id: tuple[int, int]) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


@dataclass
class ConsumerStats:
    read: int = 0
    handled: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    reclaimed: int = 0
    failed_batches: int = 0
    held_elsewhere: int = 0
    """Entries left pending because another consumer was handling a copy of the same event id."""
    trimmed: int = 0
    """Entries trimmed from the stream before this consumer's group handled them (each dead-lettered)."""


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
        self._once = once_client(client)  # commits: never re-sent after a lost reply
        self._shard_of: dict[str, int] = {}
        self._stopping = False
        self._last_claim = 0.0
        self._own_pending: dict[str, str] = dict.fromkeys(self.streams, "0")
        """Per stream, the id after which our own pending entries are still to be re-read (a restart)."""
        self._trim_counter = 0
        self._group_ready = False
        self._claim_sha = hashlib.sha1(CLAIM_NEW.encode()).hexdigest()  # loaded on the first NOSCRIPT

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
        """Check the shard layout (:func:`check_stream_layout`) and create the group on every shard."""
        check_stream_layout(self.redis, self.keys)
        for stream in self.streams:
            try:
                self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    # --- the loop ------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    def run(self, idle_callback: Callable[[], None] | None = None) -> None:
        """Poll (and call ``idle_callback`` after each poll) until :meth:`stop`; errors are logged, never fatal."""
        if not self._group_ready:  # a decision worker's bootstep has done it already
            self.ensure_group()

        def step() -> None:
            self.poll()
            if idle_callback is not None:
                idle_callback()

        while not self._stopping:
            failed = survive(step, "bus.loop")
            if failed is not None and "NOGROUP" in str(failed):  # the stream or group was deleted under us
                with contextlib.suppress(Exception):
                    self.ensure_group()

    def poll(self, block_ms: int | None = None) -> int:
        """Read, handle and ack one batch; return how many entries were processed."""
        entries: list[tuple[str, Any, Any]] = []
        if self._own_pending:
            entries = self._read_own_pending()
        if not entries and time.monotonic() - self._last_claim > self.claim_idle_ms / 1000 / 2:
            self._last_claim = time.monotonic()
            self.settle_trimmed()
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

    def _read_own_pending(self) -> list[tuple[str, Any, Any]]:
        """The next batch of entries left pending under this consumer's name (after a restart).

        One pass: each such entry is tried once more here, in order. One that fails again stays
        pending and is not re-read by this pass, so a poison entry cannot hold back new
        entries; the reclaim path (XAUTOCLAIM also claims one's own idle entries) retries it
        and dead-letters it after ``max_deliveries``.
        """
        cursors = self._own_pending
        reply = self._xreadgroup(list(cursors), list(cursors.values()), block_ms=None)
        left = {_s(stream): items[-1][0] for stream, items in reply if items}
        self._own_pending = {stream: _s(last) for stream, last in left.items()}
        return self._entries(reply)

    def _read(self, start: str, block_ms: int | None) -> list[tuple[str, Any, Any]]:
        """XREADGROUP over every shard; entries as (stream, entry id, raw fields)."""
        return self._entries(self._xreadgroup(self.streams, [start] * len(self.streams), block_ms))

    def _xreadgroup(self, streams: list[str], ids: list[str], block_ms: int | None) -> list[tuple[Any, list]]:
        """One XREADGROUP, the raw reply as (stream, [(entry id, raw fields), ...]) pairs."""
        args: list[Any] = ["XREADGROUP", "GROUP", self.group, self.consumer, "COUNT", self.batch_size]
        if block_ms is not None:
            args += ["BLOCK", block_ms]
        args += ["STREAMS", *streams, *ids]
        reply = self._raw.execute_command(*args)
        if not reply:
            return []
        return list(reply.items()) if isinstance(reply, dict) else reply

    def _entries(self, reply: list[tuple[Any, list]]) -> list[tuple[str, Any, Any]]:
        """Flatten a read reply to (stream, entry id, raw fields); dead-letter entries trimmed while pending."""
        out: list[tuple[str, Any, Any]] = []
        for stream, items in reply:
            stream = _s(stream)
            gone = [entry_id for entry_id, fields in items if not fields]
            if gone:  # a pending entry whose payload was trimmed shows with no fields
                self._dead_letter_gone(stream, gone)
                items = [item for item in items if item[1]]
            out += [(stream, entry_id, fields) for entry_id, fields in items]
        return out

    def _dead_letter_gone(self, stream: str, entry_ids: Sequence[Any], *, left_pending: bool = False) -> int:
        """Dead-letter (reason, entry id; the payload is gone) and ack entries deleted while pending, each once."""
        written = self.redis.eval(
            DEAD_LETTER_GONE, 2, stream, self.keys.dead_letters(), self.group, TRIMMED_REASON,
            f"{time.time():.3f}", MAX_DEAD_LETTER_LEN, "1" if left_pending else "0", *entry_ids)
        if written:
            self.stats.dead_lettered += written
            self.stats.trimmed += written
            log.warning("bus.trimmed_before_handled", stream=stream, group=self.group, count=written,
                        entry_ids=[_s(i) for i in entry_ids[:20]])
        return written

    def settle_trimmed(self) -> int:
        """Dead-letter what trimming took from this group before it was handled; return how many entries.

        Each pending entry older than the first entry left in its stream (``MAXLEN ~`` took its
        payload) gets a dead-letter entry with its id, and is acked. Entries trimmed before they
        were ever delivered (a group more than ``maxlen`` entries behind) get one dead-letter
        entry with their count, seen while the group is still behind them or once it has caught
        up; this part needs Redis 7 or later and a group that has read before (the group lag).
        Both run as one script per stream, so a loss is recorded once however many consumers look.
        """
        total = 0
        for stream in self.streams:
            settled, lost = self.redis.eval(
                SETTLE_TRIMMED, 2, stream, self.keys.dead_letters(), self.group, f"{time.time():.3f}",
                MAX_DEAD_LETTER_LEN, self.batch_size, TRIMMED_REASON,
                "entries trimmed from the stream before they were delivered")
            if settled:
                log.warning("bus.trimmed_before_handled", stream=stream, group=self.group, count=settled)
            if lost:
                log.warning("bus.trimmed_before_delivered", stream=stream, group=self.group, count=lost)
            self.stats.dead_lettered += settled + (1 if lost else 0)
            self.stats.trimmed += settled + lost
            total += settled + lost
        return total

    def reclaim(self) -> list[tuple[str, str, dict]]:
        """XAUTOCLAIM entries idle on dead consumers; dead-letter those delivered too often."""
        claimed: list[tuple[str, str, dict]] = []
        for stream in self.streams:
            reply = self.redis.xautoclaim(stream, self.group, self.consumer, self.claim_idle_ms,
                                          start_id="0-0", count=self.batch_size)
            items = [(entry_id, fields) for entry_id, fields in reply[1] if entry_id is not None and fields]
            if len(reply) > 2 and reply[2]:  # Redis 7: deleted while pending, already out of the pending list
                self._dead_letter_gone(stream, reply[2], left_pending=True)
            # Redis 6.2 shows such entries as nil, without their id, and leaves them pending:
            # settle_trimmed() finds them by id (pending, older than the first entry).
            if not items:
                continue
            info = self.redis.xpending_range(stream, self.group, min=items[0][0], max=items[-1][0],
                                             count=len(items) * 2 + 10, consumername=self.consumer)
            deliveries = {_s(p["message_id"]): p["times_delivered"] for p in info}
            dead: list[tuple[str, Any, str]] = []
            for entry_id, fields in items:
                entry_id = _s(entry_id)
                if deliveries.get(entry_id, 0) > self.max_deliveries:
                    payload = fields.get(PAYLOAD_FIELD.encode(), b"")  # kept as received
                    dead.append((entry_id, payload, f"delivered {deliveries[entry_id]} times without success"))
                else:
                    claimed.append((stream, entry_id, fields))
            if dead:
                self._dead_letter_failed(stream, dead)
        self.stats.reclaimed += len(claimed)
        if claimed:
            log.info("bus.reclaimed", count=len(claimed), consumer=self.consumer)
        return claimed

    def _dead_letter_failed(self, stream: str, dead: list[tuple[str, Any, str]]) -> None:
        """Dead-letter entries whose handling kept failing, each reason followed by the entry's last error."""
        errors = self.redis.mget([self.keys.last_error(self.group, stream, entry_id) for entry_id, _, _ in dead])
        dead = [(entry_id, payload, f"{reason}; last error: {_s(error)}" if error else reason)
                for (entry_id, payload, reason), error in zip(dead, errors)]
        written = self._dead_letter_many(stream, dead)
        self.redis.delete(*[self.keys.last_error(self.group, stream, entry_id) for entry_id, _, _ in dead[:written]])

    def _dead_letter_many(self, stream: str, dead: list[tuple[str, Any, str]]) -> int:
        """Dead-letter ``(entry id, payload, reason)`` entries of ``stream`` and ack each (see DEAD_LETTER).

        Counted and logged once written; a refusal (Redis out of memory) raises after the ones
        written before it, and leaves the rest pending for a later try.
        """
        args: list[Any] = [self.group, MAX_DEAD_LETTER_LEN, f"{time.time():.3f}"]
        for entry_id, payload, reason in dead:
            args += (entry_id, reason, payload)
        written, refusal = self.redis.eval(DEAD_LETTER, 2, self.keys.dead_letters(), stream, *args)
        for entry_id, _, reason in dead[:written]:
            log.warning("bus.dead_lettered", stream=stream, entry_id=entry_id, reason=reason)
        self.stats.dead_lettered += written
        if refusal:
            raise redis.ResponseError(f"dead letter refused, entries left pending: {_s(refusal)}")
        return written

    # --- handling ------------------------------------------------------------------------
    def process(self, entries: Sequence[tuple[str, Any, Any]]) -> None:
        """Validate, de-duplicate, handle and ack a batch of (stream, entry id, fields) entries."""
        self.stats.read += len(entries)
        valid: list[tuple[str, Any, CloudEvent]] = []
        append = valid.append
        invalid: dict[str, list[tuple[str, Any, str]]] = {}
        max_bytes = self.max_event_bytes
        for stream, entry_id, fields in entries:
            # the common case inline: a raw reply's field list holding just the payload
            raw = fields[1] if type(fields) is list and len(fields) == 2 and fields[0] == _PAYLOAD_KEY else _payload(fields)
            try:
                if raw is None:
                    raise EventError(f"stream entry has no '{PAYLOAD_FIELD}' field")
                append((stream, entry_id, parse_event(raw, max_bytes=max_bytes)))
            except EventError as exc:
                # The payload as received, bytes that are not UTF-8 included: the dead letter keeps it whole.
                kept = raw if raw is not None else json.dumps({_text(k): _text(v) for k, v in _field_dict(fields).items()})
                invalid.setdefault(stream, []).append((_s(entry_id), kept, str(exc)))
        for stream, dead in invalid.items():
            self._dead_letter_many(stream, dead)
        if not valid:
            return
        fresh, dupes = self._split_seen(valid)
        try:
            self._commit(fresh, dupes, keep_claims=True)  # kept for the one-at-a-time retry below
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
        # A copy of an id already in this batch is a duplicate here; the script sees each id once.
        first_of: dict[str, int] = {}
        copies: list[int] = []
        for s, idx in by_shard.items():
            unique = []
            for i in idx:
                event_id = valid[i][2].id
                if event_id in first_of:
                    copies.append(i)
                else:
                    first_of[event_id] = i
                    unique.append(i)
            idx[:] = unique
        now = time.time()
        stale = repr(now - self.claim_idle_ms / 1000)
        pipe = self._raw.pipeline(transaction=False)
        order = list(by_shard.items())
        for s, idx in order:
            pipe.evalsha(self._claim_sha, 1, self.keys.seen(s), repr(now), stale,
                         *[valid[i][2].id for i in idx])
        try:
            replies = pipe.execute()
        except redis.exceptions.NoScriptError:  # a restarted (or flushed) server: load it and retry once
            self._claim_sha = self.redis.script_load(CLAIM_NEW)
            return self._split_seen(valid)
        state = [0] * len(valid)
        for (_, idx), flags in zip(order, replies):
            for i, flag in zip(idx, flags):
                state[i] = flag
        for i in copies:
            state[i] = 1
        fresh, dupes, held = [], [], 0
        for flag, item in zip(state, valid):
            if flag == 0:
                fresh.append(item)
            elif flag == 1:
                dupes.append(item)
            else:  # left pending: acked as a duplicate once the holder commits, or taken over if it died
                held += 1
        if held:
            self.stats.held_elsewhere += held
            log.info("bus.held_by_another_consumer", count=held, consumer=self.consumer)
        return fresh, dupes

    def _commit(self, fresh, dupes=(), *, keep_claims: bool = False) -> None:
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
        pipe = self._once.pipeline(transaction=True)
        events = [e for _, _, e in fresh]
        if events:
            try:
                self.handler(events, pipe)
            except BaseException:
                if not keep_claims:
                    self._release(fresh)  # the entries stay pending: whoever retries them may claim them now
                raise
        now = time.time()
        score = repr(now)  # formatted once: the protocol packer formats a float per argument, at ~1 us each
        by_shard: dict[int, list] = {}
        shard_of, shard = self._shard_of, self._shard
        for e in events:
            s = shard_of.get(e.subject)
            if s is None:
                s = shard(e.subject)
            marks = by_shard.get(s)
            if marks is None:
                marks = by_shard[s] = []
            marks += (score, e.id)
        self._trim_counter += 1
        trim = self._trim_counter % 100 == 0
        for s, marks in by_shard.items():
            pipe.execute_command("ZADD", self.keys.seen(s), *marks)  # over the claims: marks, positive
            if trim:
                pipe.zremrangebyscore(self.keys.seen(s), 0, now - self.dedup_retention_s)
                # stale claims (scores -t with t older than the claim idle time)
                pipe.zremrangebyscore(self.keys.seen(s), -(now - self.claim_idle_ms / 1000), "(0")
        if len(pipe):
            results = pipe.execute(raise_on_error=False)
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                self._unmark(by_shard, release=not keep_claims)
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

    def _unmark(self, by_shard: dict[int, list], *, release: bool) -> None:
        """Take back the seen marks of a batch whose transaction had a failed command.

        With ``release`` they go; without, they turn back into this consumer's claims (negative
        scores), held for the one-at-a-time retry.
        """
        undo = self.redis.pipeline(transaction=False)
        claim = repr(-time.time())
        for s, marks in by_shard.items():
            if release:
                undo.zrem(self.keys.seen(s), *marks[1::2])
            else:
                undo.execute_command("ZADD", self.keys.seen(s), "XX", *[x for i in marks[1::2] for x in (claim, i)])
        undo.execute()

    def _release(self, items) -> None:
        """Drop this consumer's claims on ``items`` (their handling failed before the commit)."""
        by_shard: dict[int, list] = {}
        for _, _, e in items:
            by_shard.setdefault(self._shard(e.subject), []).append(e.id)
        try:
            undo = self.redis.pipeline(transaction=False)
            for s, ids in by_shard.items():
                undo.eval(RELEASE_CLAIMS, 1, self.keys.seen(s), *ids)
            undo.execute()
        except redis.RedisError as exc:  # the claims go stale after the claim idle time anyway
            log.warning("bus.claim_release_failed", error=str(exc), size=len(items))

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
                self._note_error(item[0], item[1], exc)

    def _note_error(self, stream: str, entry_id: Any, exc: Exception) -> None:
        """Keep an entry's last handling error for the dead letter it may end in (see _dead_letter_failed)."""
        try:
            self.redis.set(self.keys.last_error(self.group, stream, _s(entry_id)),
                           f"{type(exc).__name__}: {exc}"[:500], ex=LAST_ERROR_TTL_S)
        except redis.RedisError as err:  # the log line above has it anyway
            log.warning("bus.last_error_not_kept", error=str(err))


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False
_gc_paused_since = 0.0
GC_MAX_PAUSE_S = 10.0
"""Threads whose pauses overlap back to back would keep the collector off for good: a pauser leaving
after it has been off this long runs a collection itself (what the collector would have done)."""


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the duration (re-entrant, thread-safe).

    A batch allocates tens of thousands of short-lived objects that reference counting frees
    when the batch ends; left on, the collector would run dozens of times per batch and
    walk every object the worker holds each time it reaches the oldest generation. The
    collector resumes (if it was on) when the last pauser leaves.
    """
    global _gc_pausers, _gc_was_enabled, _gc_paused_since
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            _gc_paused_since = time.monotonic()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        collect = False
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
            elif _gc_was_enabled and time.monotonic() - _gc_paused_since > GC_MAX_PAUSE_S:
                _gc_paused_since = time.monotonic()
                collect = True
        if collect:
            gc.collect()


def once_client(client: redis.Redis) -> redis.Redis:
    """A client with ``client``'s connection settings, on a pool of its own, that never re-sends a command.

    redis-py retries a command, a whole MULTI/EXEC included, after a connection error when the
    client was built with a retry policy (``redis.Redis(host=...)`` has one by default), also when
    the error came after the server ran the EXEC and only its reply was lost: the effects would
    apply twice. The bus commits a batch through this client instead, so such an error reaches it:
    the entries stay pending, and redelivered they find their seen marks and are acked as
    duplicates.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "retry_on_error": []}
    kwargs.pop("retry_on_timeout", None)
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs))


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
