"""The event bus on a real Redis: publish, consume, ack, reclaim, dead-letter, de-duplicate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import redis

from config.keys import Keys
from events.bus import PAYLOAD_FIELD, EventBus, StreamConsumer
from events.envelope import EventError, new_event, parse_event
from events.types import EVENT_TYPES
from tests.support import ROOT, wait_for

EFFECTS = "retrain:test:effects"

SAMPLE_DATA = {
    "drift.data": {"drift_score": 0.4, "drifted_features": ["age"]},
    "drift.concept": {"value": 0.3, "metric": "psi"},
    "performance.measured": {"metric": "accuracy", "value": 0.8, "baseline": 0.9, "n_labeled": 500},
    "volume.accumulated": {"new_samples": 1000},
    "schedule.tick": {"schedule": "0 3 * * *"},
    "upstream.changed": {"feature_version": "v2", "removed": ["x"], "breaking": True},
    "retrain.requested": {"reason": "new labels", "requested_by": "ana"},
    "retrain.decided": {"decision_id": "d1", "urgency": "high", "triggers": ["data_drift"]},
    "retrain.suppressed": {"decision_id": "d2", "reason": "cooldown"},
    "training.started": {"pipeline_id": "p1"},
    "training.succeeded": {"pipeline_id": "p1", "version": 2},
    "training.failed": {"pipeline_id": "p1", "error": "boom"},
    "gate.passed": {"pipeline_id": "p1", "version": 2, "passed": True},
    "gate.failed": {"pipeline_id": "p1", "version": 2, "passed": False, "failed_checks": ["latency"]},
    "model.staged": {"version": 2, "pipeline_id": "p1"},
    "rollout.started": {"version": 2, "phase": "shadow", "traffic": 0},
    "rollout.advanced": {"version": 2, "phase": "canary", "traffic": 5},
    "rollout.paused": {"version": 2, "reason": "insufficient evidence"},
    "rollout.resumed": {"version": 2},
    "rollout.completed": {"version": 2, "traffic": 100},
    "rollout.rolled_back": {"version": 2, "reason": "accuracy"},
    "rollout.aborted": {"version": 2, "reason": "operator"},
    "alert.raised": {"severity": "critical", "title": "gate failed"},
}


def effect_handler(events, pipe):
    for e in events:
        pipe.hincrby(EFFECTS, e.id, 1)


def make_consumer(client, keys, name="c1", handler=effect_handler, **kw):
    c = StreamConsumer(client, keys, "g", name, handler, batch_size=kw.pop("batch_size", 100), block_ms=50, **kw)
    c.ensure_group()
    return c


class ExecReplyCutter:
    """A TCP proxy to Redis that, once armed, passes the next EXEC on, swallows its reply and cuts the client off:
    the server ran the transaction, the client never hears so."""

    def __init__(self, port: int):
        import socket
        import threading

        self.armed = False
        self.cut = 0
        self._target = port
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.port = self._listen.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self._listen.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            exec_sent = threading.Event()

            def up(client=client, server=server, exec_sent=exec_sent):
                try:
                    while data := client.recv(65536):
                        if self.armed and b"EXEC" in data:  # before sending: the reply must not slip through
                            self.armed = False
                            exec_sent.set()
                        server.sendall(data)
                except OSError:
                    pass

            def down(client=client, server=server, exec_sent=exec_sent, socket=socket):
                try:
                    while data := server.recv(65536):
                        if exec_sent.is_set():
                            self.cut += 1
                            client.shutdown(socket.SHUT_RDWR)  # close() alone waits for the other thread's recv
                            client.close()
                            server.close()
                            return
                        client.sendall(data)
                except OSError:
                    pass

            threading.Thread(target=up, daemon=True).start()
            threading.Thread(target=down, daemon=True).start()

    def close(self) -> None:
        self._listen.close()


def drain(consumer, rounds=20):
    for _ in range(rounds):
        if consumer.poll(block_ms=10) == 0:
            break


@pytest.fixture
def bus(redis_client, keys):
    return EventBus(redis_client, keys, max_event_bytes=4096)


class TestEnvelope:
    def test_every_event_type_is_covered_by_a_sample(self):
        """The round-trip test below exercises every declared event type."""
        assert set(SAMPLE_DATA) == set(EVENT_TYPES)

    @pytest.mark.parametrize("etype", sorted(SAMPLE_DATA))
    def test_every_event_type_round_trips_through_the_stream(self, etype, bus, redis_client, keys):
        """Each type is published, read back through a consumer group, and equals the original."""
        event = new_event(etype, "churn", SAMPLE_DATA[etype])
        bus.publish(event)
        got = []
        c = make_consumer(redis_client, keys, handler=lambda evs, pipe: got.extend(evs))
        drain(c)
        assert got == [event]
        assert got[0].typed_data() == event.typed_data()

    @pytest.mark.parametrize("raw, reason", [
        ("{not json", "malformed JSON"),
        ('["a list"]', "must be a JSON object"),
        ({"type": "drift.data"}, "missing field 'id'"),
        ("WRONG_TYPE", "unknown event type"),
        ("MISSING_DATA_FIELD", "missing field 'data.drift_score'"),
        ("BAD_VALUE", "drift_score"),
        ("UNIX_TIME", "time must be an RFC 3339 timestamp"),
        ("DATE_ONLY", "time must be an RFC 3339 timestamp"),
        ("YEAR_9999", "time must be between 1970 and 2200"),
        ("YEAR_1", "time must be between 1970 and 2200"),
    ])
    def test_producer_rejects_bad_events_with_a_reason(self, raw, reason, bus):
        """Malformed JSON, a wrong type or missing fields are refused before publishing, with the reason."""
        good = new_event("drift.data", "churn", {"drift_score": 0.2}).model_dump(mode="json")
        raw = {"WRONG_TYPE": {**good, "type": "drift.nope"},
               "MISSING_DATA_FIELD": {**good, "data": {"drifted_features": []}},
               "BAD_VALUE": {**good, "data": {"drift_score": "high"}},
               "UNIX_TIME": {**good, "time": 1714557600},
               "DATE_ONLY": {**good, "time": "2024-05-01"},
               # time windows around these overflow (they broke `retrain timeline` for good)
               "YEAR_9999": {**good, "time": "9999-12-31T23:59:59-01:00"},
               "YEAR_1": {**good, "time": "0001-01-01T00:00:01+01:00"}}.get(raw, raw) if isinstance(raw, str) else raw
        with pytest.raises(EventError, match=reason):
            bus.publish(raw)

    @pytest.mark.parametrize("etype, data", [
        ("performance.measured", {"metric": "accuracy", "value": float("nan"), "n_labeled": 500}),
        ("performance.measured", {"metric": "accuracy", "value": 0.8, "baseline": float("-inf"), "n_labeled": 500}),
        ("drift.concept", {"value": "Infinity"}),
        ("drift.concept", {"value": float("inf")}),
    ])
    def test_non_finite_numbers_are_refused_at_publish(self, etype, data, bus, redis_client, keys):
        """NaN or an infinity in typed data is refused before publishing (it would be written as null, or pass a threshold)."""
        with pytest.raises(EventError, match="finite number"):
            new_event(etype, "churn", data)
        good = json.loads(new_event(etype, "churn", {**data, **SAMPLE_DATA[etype]}).to_json())
        as_dict = {**good, "data": {**good["data"], **data}}
        as_text = json.dumps(as_dict)  # Python writes NaN/Infinity literals, which the JSON parser reads
        for raw in (as_dict, as_text):
            with pytest.raises(EventError, match="finite number"):
                bus.publish(raw)
        assert redis_client.xlen(keys.events_for("churn")) == 0

    def test_event_nested_deeper_than_the_consumer_reads_is_refused_at_publish(self, bus, redis_client, keys):
        """Data nested too deep to read back (or to serialize) is refused with a reason, not dead-lettered later."""
        def nested(depth):
            value: list = []
            for _ in range(depth):
                value = [value]
            return value

        ok = new_event("drift.data", "churn", {"drift_score": 0.1, "shape": nested(100)})
        deep = new_event("drift.data", "churn", {"drift_score": 0.1, "shape": nested(250)})
        deeper = new_event("drift.data", "churn", {"drift_score": 0.1, "shape": nested(900)})
        result = bus.publish_many([ok, deep, deeper])
        assert result.published == [ok.id]
        assert [i for i, _ in result.rejected] == [1, 2]
        assert "would not read back" in result.rejected[0][1]
        assert "cannot be written as JSON" in result.rejected[1][1]
        with pytest.raises(EventError, match="would not read back"):
            parse_event(json.loads(deep.to_json()), max_bytes=65536)
        got = []
        drain(make_consumer(redis_client, keys, handler=lambda evs, pipe: got.extend(evs)))
        assert [e.id for e in got] == [ok.id] and bus.dead_letters() == []

    def test_oversize_event_is_rejected(self, bus):
        """An event over the configured byte limit is refused with its size in the reason."""
        big = new_event("drift.data", "churn", {"drift_score": 0.1, "drifted_features": ["f" * 50] * 200})
        with pytest.raises(EventError, match="over the limit of 4096"):
            bus.publish(big)

    def test_publish_many_reports_each_rejection_and_publishes_the_rest(self, bus, redis_client, keys):
        """A batch with bad lines publishes the good ones and lists the bad ones by index."""
        good = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(3)]
        result = bus.publish_many([good[0], "{", good[1], {"id": "x"}, good[2]])
        assert result.published == [e.id for e in good]
        assert [i for i, _ in result.rejected] == [1, 3]
        assert redis_client.xlen(keys.events_for("m")) == 3


class TestFastDataCheck:
    @pytest.mark.parametrize("etype", sorted(SAMPLE_DATA))
    def test_fast_check_accepts_and_rejects_exactly_what_the_typed_model_does(self, etype):
        """The validate-only data check used by parse_event agrees with the typed model on good and broken data."""
        from pydantic import ValidationError

        from events.envelope import _DATA_CHECKS

        model = EVENT_TYPES[etype]
        good = SAMPLE_DATA[etype]
        variants = [good, {}, {**good, "extra": [1, {"a": None}]}]
        for name in model.model_fields:
            variants += [{**good, name: bad} for bad in (None, "x", "0.5", -1, 0, 2.5, [], ["a", 1], {}, True,
                                                          float("nan"), float("inf"), "Infinity", "-inf")]
            variants.append({k: v for k, v in good.items() if k != name})
        outcomes = []
        for data in variants:
            try:
                model.model_validate(data)
                expected = True
            except ValidationError:
                expected = False
            try:
                _DATA_CHECKS[etype](data)
                got = True
            except ValidationError:
                got = False
            assert got == expected, (etype, data)
            outcomes.append(got)
        assert True in outcomes and False in outcomes  # both sides of the check were exercised


class TestConsumer:
    def test_a_commit_whose_reply_is_lost_is_not_sent_again(self, bus, redis_client, redis_server, keys):
        """The connection drops after the server ran a batch's EXEC, before its reply: a client with redis-py's default
        retry policy would send the whole transaction again and apply the effects twice. The bus commits without
        re-sending: the entry stays pending, and redelivered it is acked as a duplicate; one effect."""
        cutter = ExecReplyCutter(int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
        try:
            through = redis.Redis(host="127.0.0.1", port=cutter.port)  # default options: retries on connection errors
            assert through.connection_pool.get_connection().retry._retries > 0
            c = make_consumer(through, keys, claim_idle_ms=1)
            event = new_event("volume.accumulated", "churn", {"new_samples": 5})
            bus.publish(event)
            cutter.armed = True
            with pytest.raises(redis.ConnectionError):
                c.poll(block_ms=10)
            assert cutter.cut == 1 and redis_client.hget(EFFECTS, event.id) == b"1"
            time.sleep(0.01)
            drain(c)
            assert redis_client.hget(EFFECTS, event.id) == b"1"
            assert redis_client.xpending(keys.events_for("churn"), "g")["pending"] == 0 and c.stats.duplicates == 1
        finally:
            cutter.close()

    def test_a_dead_letter_refused_for_lack_of_memory_leaves_its_entry_pending(self, bus, redis_client, keys):
        """Redis full (noeviction): the dead letter of a malformed entry is refused, and the entry is not acked
        without it (an XACK is not refused when memory is full); it is dead-lettered once memory is back."""
        bus.publish_raw("churn", b'{"not": "an event"}')
        c = make_consumer(redis_client, keys, claim_idle_ms=1)
        stream = keys.events_for("churn")
        redis_client.config_set("maxmemory", 1)  # far below what it uses: every write that may grow memory is refused
        try:
            with pytest.raises(redis.ResponseError, match="dead letter refused"):
                c.poll(block_ms=10)
        finally:
            redis_client.config_set("maxmemory", 0)
        assert redis_client.xpending(stream, "g")["pending"] == 1 and bus.dead_letters() == []
        assert c.stats.dead_lettered == 0
        time.sleep(0.01)
        c.poll(block_ms=10)  # reclaims its own pending entry
        [letter] = bus.dead_letters()
        assert letter["payload"] == '{"not": "an event"}' and redis_client.xpending(stream, "g")["pending"] == 0
        assert c.stats.dead_lettered == 1

    def test_raw_garbage_in_the_stream_is_dead_lettered_and_consumption_continues(self, bus, redis_client, keys):
        """Invalid entries injected straight into the stream go to the dead-letter stream with the reason."""
        bus.publish_raw("churn", "{broken")
        bus.publish_raw("churn", json.dumps({"specversion": "1.0", "type": "drift.data"}))
        redis_client.xadd(keys.events_for("churn"), {"other": "field"})
        ok = new_event("drift.data", "churn", {"drift_score": 0.3})
        bus.publish(ok)
        c = make_consumer(redis_client, keys)
        drain(c)
        assert redis_client.hget(EFFECTS, ok.id) == b"1"
        letters = bus.dead_letters()
        reasons = sorted(d["reason"] for d in letters)
        assert len(letters) == 3
        assert any("malformed JSON" in r for r in reasons)
        assert any("missing field 'id'" in r for r in reasons)
        assert any("no 'e' field" in r for r in reasons)
        assert {d["payload"] for d in letters} >= {"{broken"}
        assert redis_client.xpending(keys.events_for("churn"), "g")["pending"] == 0

    def test_an_entry_that_is_not_utf8_is_dead_lettered_whole_and_its_neighbours_proceed(self, bus, redis_client, keys):
        """Bytes that are not UTF-8 in the stream: a dead letter keeping them as received, the rest applied."""
        before = new_event("drift.data", "churn", {"drift_score": 0.3})
        after = new_event("drift.data", "churn", {"drift_score": 0.2})
        bus.publish(before)
        bus.publish_raw("churn", b"\xff\xfe{not utf-8")
        bus.publish(after)
        c = make_consumer(redis_client, keys)
        drain(c)
        assert redis_client.hget(EFFECTS, before.id) == redis_client.hget(EFFECTS, after.id) == b"1"
        assert redis_client.xpending(keys.events_for("churn"), "g")["pending"] == 0
        [letter] = bus.dead_letters()
        assert "malformed JSON" in letter["reason"] or "UTF-8" in letter["reason"]
        assert letter["payload"] == "\\xff\\xfe{not utf-8"  # shown with escapes
        raw = redis_client.xrange(keys.dead_letters())[0][1][b"payload"]
        assert raw == b"\xff\xfe{not utf-8"  # stored as received
        with pytest.raises(EventError):
            bus.republish_dead_letter(letter["id"])

    def test_the_size_limit_counts_bytes_at_the_producer_as_at_the_consumer(self, bus, redis_client, keys):
        """An event of 3,000 two-byte characters is 6,000 bytes: refused at publish, not dead-lettered later."""
        wide = new_event("retrain.requested", "churn", {"reason": "é" * 3000, "requested_by": "ana"})
        with pytest.raises(EventError, match=r"event is \d+ bytes, over the limit of 4096"):
            bus.publish(wide)
        with pytest.raises(EventError, match="over the limit of 4096"):
            parse_event(wide.to_json(), max_bytes=4096)
        fits = new_event("retrain.requested", "churn", {"reason": "é" * 1500, "requested_by": "ana"})
        bus.publish(fits)  # 3,000 bytes of reason: within the limit
        drain(make_consumer(redis_client, keys))
        assert redis_client.hget(EFFECTS, fits.id) == b"1" and bus.dead_letters() == []

    def test_duplicate_event_ids_have_one_effect(self, bus, redis_client, keys):
        """The same event id published three times (in one batch and later) is applied once."""
        e = new_event("volume.accumulated", "m", {"new_samples": 5})
        bus.publish(e)
        bus.publish(e)
        c = make_consumer(redis_client, keys)
        drain(c)
        bus.publish(e)
        drain(c)
        assert redis_client.hget(EFFECTS, e.id) == b"1"
        assert c.stats.duplicates == 2

    def test_two_consumers_holding_copies_of_one_event_id_apply_it_once(self, bus, redis_client, keys):
        """A producer's retry puts one event id in the stream twice; two consumers each read a copy.

        The one that reads second finds the first one's claim, leaves its copy pending without
        applying it, and the copy is acked as a duplicate once the first has committed.
        """
        import threading

        e = new_event("volume.accumulated", "m", {"new_samples": 5})
        bus.publish(e)
        bus.publish(e)
        inside, release = threading.Event(), threading.Event()

        def slow(events, pipe):
            inside.set()
            assert release.wait(10)
            effect_handler(events, pipe)

        a = make_consumer(redis_client, keys, name="a", handler=slow, batch_size=1, claim_idle_ms=60_000)
        b = make_consumer(redis_client, keys, name="b", batch_size=1, claim_idle_ms=60_000)
        first = threading.Thread(target=a.poll, kwargs={"block_ms": 10})
        first.start()
        try:
            assert inside.wait(10)
            assert b.poll(block_ms=10) == 1  # read the second copy while a is still handling the first
            assert b.stats.held_elsewhere == 1 and not redis_client.hexists(EFFECTS, e.id)
        finally:
            release.set()
            first.join(10)
        assert redis_client.hget(EFFECTS, e.id) == b"1"
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 1  # b's copy, until reclaimed
        drain(make_consumer(redis_client, keys, name="c", claim_idle_ms=1))
        assert redis_client.hget(EFFECTS, e.id) == b"1"
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 0
        assert redis_client.zscore(keys.seen(keys.shard_of("m")), e.id) > 0  # the commit's mark replaced the claim

    def test_a_dead_consumers_claim_is_taken_over_once_stale(self, bus, redis_client, keys):
        """A claim left by a consumer that died mid-batch does not block the event for good."""
        e = new_event("volume.accumulated", "m", {"new_samples": 5})
        redis_client.zadd(keys.seen(keys.shard_of("m")), {e.id: -(time.time() - 120)})  # the dead one's claim
        bus.publish(e)
        drain(make_consumer(redis_client, keys, claim_idle_ms=60_000))
        assert redis_client.hget(EFFECTS, e.id) == b"1"

    def test_a_process_with_another_shard_count_is_refused(self, bus, redis_client, keys):
        """Streams written with 4 shards: a publisher or consumer counting 8 would lose models' events."""
        from config.keys import StreamLayoutError

        bus.publish(new_event("volume.accumulated", "m", {"new_samples": 5}))
        other = Keys(prefix=keys.prefix, shards=keys.shards * 2)
        with pytest.raises(StreamLayoutError, match=f"written with {keys.shards} shards, and this process uses "
                                                    f"{keys.shards * 2}"):
            EventBus(redis_client, other).publish(new_event("volume.accumulated", "m", {"new_samples": 6}))
        with pytest.raises(StreamLayoutError):
            make_consumer(redis_client, other)
        streams = set(other.all_event_streams()) | set(keys.all_event_streams())
        assert sum(redis_client.xlen(st) for st in streams) == 1  # the refused publish wrote nothing
        make_consumer(redis_client, keys)  # the same count is fine
        drain(make_consumer(redis_client, keys))
        assert redis_client.hlen(EFFECTS) == 1

    def test_ack_only_after_the_effect_commits(self, bus, redis_client, keys):
        """When the handler fails, nothing is acked and the entry stays pending for a retry."""
        e = new_event("volume.accumulated", "m", {"new_samples": 5})
        bus.publish(e)

        def failing(events, pipe):
            raise RuntimeError("disk full")

        c = make_consumer(redis_client, keys, handler=failing)
        drain(c)
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 1
        assert not redis_client.hexists(EFFECTS, e.id)

    def test_poison_event_is_dead_lettered_after_max_deliveries_and_others_proceed(self, bus, redis_client, keys):
        """An event whose handling always fails is retried, then dead-lettered; its batch-mates are handled."""
        poison = new_event("volume.accumulated", "m", {"new_samples": 13})
        fine = new_event("volume.accumulated", "m", {"new_samples": 1})
        bus.publish_many([poison, fine])

        def handler(events, pipe):
            if any(ev.id == poison.id for ev in events):
                raise RuntimeError("cannot handle 13")
            effect_handler(events, pipe)

        committed = []
        c = make_consumer(redis_client, keys, handler=handler, max_deliveries=3, claim_idle_ms=1,
                          on_committed=lambda events: committed.extend(ev.id for ev in events))
        for _ in range(10):
            c.poll(block_ms=10)
            time.sleep(0.01)
        assert redis_client.hget(EFFECTS, fine.id) == b"1"
        assert committed == [fine.id]  # told once, after its own commit; the failed batch told nothing
        letters = bus.dead_letters()
        assert len(letters) == 1 and "delivered 4 times" in letters[0]["reason"]
        assert letters[0]["reason"].endswith("; last error: RuntimeError: cannot handle 13")  # why, not just how often
        assert parse_event(letters[0]["payload"]).id == poison.id
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 0
        assert redis_client.keys(keys.last_error("*", "*", "*")) == []  # kept until the dead letter, then gone

    def test_restarted_consumer_with_its_own_poison_entry_keeps_handling_new_events(self, bus, redis_client, keys):
        """Restarted under the same name with a poison entry of its own pending, a consumer handles new events and dead-letters the poison entry after max_deliveries."""
        poison = new_event("volume.accumulated", "m", {"new_samples": 13})
        bus.publish(poison)

        def handler(events, pipe):
            if any(ev.id == poison.id for ev in events):
                raise RuntimeError("cannot handle 13")
            effect_handler(events, pipe)

        make_consumer(redis_client, keys, handler=handler, max_deliveries=3).poll(block_ms=10)
        assert redis_client.xpending(keys.events_for("m"), "g")["consumers"] == [{"name": b"c1", "pending": 1}]
        fresh = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(3)]
        bus.publish_many(fresh)
        restarted = make_consumer(redis_client, keys, handler=handler, max_deliveries=3, claim_idle_ms=1)  # also "c1"
        for _ in range(10):
            restarted.poll(block_ms=10)
            time.sleep(0.01)
        assert {e.id: redis_client.hget(EFFECTS, e.id) for e in fresh} == {e.id: b"1" for e in fresh}
        [letter] = bus.dead_letters()
        assert parse_event(letter["payload"]).id == poison.id and "delivered 4 times" in letter["reason"]
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 0
        more = new_event("volume.accumulated", "m", {"new_samples": 7})
        bus.publish(more)
        drain(restarted)
        assert redis_client.hget(EFFECTS, more.id) == b"1"

    def test_a_command_failing_inside_the_transaction_acks_nothing_and_loses_nothing(self, bus, redis_client, keys):
        """Redis runs the rest of a MULTI when one command fails: the batch is neither acked nor marked seen; an all-or-nothing handler applies each good event once, the bad one is dead-lettered and applies after a fix."""
        broken = "retrain:test:broken"
        redis_client.set(broken, "a string, not a hash")  # e.g. a key corrupted by hand
        good = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(3)]
        bad = new_event("volume.accumulated", "m", {"new_samples": 13})
        bus.publish_many([good[0], bad, *good[1:]])
        # One script for the batch that checks before it writes (as the decision worker's does);
        # the seen marks that follow it in the transaction still run when it fails.
        all_or_nothing = """
        if ARGV[1] == '1' and redis.call('TYPE', KEYS[2]).ok ~= 'none' and redis.call('TYPE', KEYS[2]).ok ~= 'hash' then
          return redis.error_reply('WRONGTYPE ' .. KEYS[2] .. ' is not a hash')
        end
        for i = 3, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end
        if ARGV[1] == '1' then redis.call('HSET', KEYS[2], ARGV[2], 1) end
        """

        def handler(events, pipe):
            has_bad = any(e.id == bad.id for e in events)
            pipe.eval(all_or_nothing, 2, EFFECTS, broken, int(has_bad), bad.id, *[e.id for e in events])

        committed = []
        c = make_consumer(redis_client, keys, handler=handler, max_deliveries=2, claim_idle_ms=1,
                          on_committed=lambda events: committed.extend(ev.id for ev in events))
        c.poll(block_ms=10)  # the batch fails, then its events are committed one at a time
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 1
        assert redis_client.zscore(keys.seen(keys.shard_of("m")), bad.id) is None
        assert {e.id: redis_client.hget(EFFECTS, e.id) for e in good} == {e.id: b"1" for e in good}
        for _ in range(8):
            c.poll(block_ms=10)
            time.sleep(0.01)
        assert {e.id: redis_client.hget(EFFECTS, e.id) for e in good} == {e.id: b"1" for e in good}
        assert sorted(committed) == sorted(e.id for e in good)
        [letter] = bus.dead_letters()
        assert parse_event(letter["payload"]).id == bad.id
        assert redis_client.xpending(keys.events_for("m"), "g")["pending"] == 0
        redis_client.delete(broken)  # the fix; then the operator re-publishes the dead letter
        bus.republish_dead_letter(letter["id"])
        drain(c)
        assert redis_client.hget(broken, bad.id) == b"1" and redis_client.hget(EFFECTS, bad.id) == b"1"
        assert committed.count(bad.id) == 1

    def test_dead_letter_can_be_republished_after_a_fix(self, bus, redis_client, keys):
        """A dead-lettered payload, fixed by the operator, is validated, re-published and removed."""
        bus.publish_raw("churn", json.dumps({**new_event("drift.data", "churn", {"drift_score": 0.2}).model_dump(mode="json"),
                                             "data": {"drift_score": 7}}))
        drain(make_consumer(redis_client, keys))
        [letter] = bus.dead_letters()
        fixed = json.loads(letter["payload"])
        fixed["data"]["drift_score"] = 0.7
        with pytest.raises(EventError):
            bus.republish_dead_letter(letter["id"])  # unchanged payload is still invalid
        bus.republish_dead_letter(letter["id"], json.dumps(fixed))
        assert bus.dead_letters() == []
        drain(make_consumer(redis_client, keys))
        assert redis_client.hget(EFFECTS, fixed["id"]) == b"1"

    def test_retention_trims_old_entries(self, bus, redis_client, keys):
        """Entries older than the retention are trimmed with MINID; new ones stay."""
        stream = keys.events_for("m")
        old_id = f"{int((time.time() - 3600) * 1000)}-0"
        redis_client.xadd(stream, {PAYLOAD_FIELD: "{}"}, id=old_id)
        bus.publish(new_event("volume.accumulated", "m", {"new_samples": 1}))
        bus.trim_older_than(60)
        ids = [i.decode() for i, _ in redis_client.xrange(stream)]
        assert old_id not in ids and len(ids) == 1

    def test_every_key_carries_the_model_hash_tag(self):
        """Per-model keys keep the model name as a Redis Cluster hash tag."""
        k = Keys(prefix="p", shards=8)
        for name in ("signals", "guard", "versions", "aliases", "rollout", "traffic", "requests", "history"):
            assert "{churn}" in getattr(k, name)("churn")
        assert k.events_for("churn") == k.events(k.shard_of("churn"))


def _fail(events, pipe):
    raise RuntimeError("not now")


def _redis_7(client) -> bool:
    return int(client.info("server")["redis_version"].split(".")[0]) >= 7


class TestTrimming:
    TRIMMED = "trimmed from the stream before it was handled"

    @pytest.mark.parametrize("path", ["restart", "autoclaim", "settle"])
    def test_pending_entries_trimmed_away_are_dead_lettered_with_their_ids(self, path, bus, redis_client, keys):
        """Pending entries whose payload MAXLEN trimmed away get a dead-letter entry each (reason, entry id), once, on every read path; the rest are handled."""
        events = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(5)]
        bus.publish_many(events)
        stream = keys.events_for("m")
        ids = [i.decode() for i, _ in redis_client.xrange(stream)]
        make_consumer(redis_client, keys, handler=_fail, claim_idle_ms=60_000).poll(block_ms=10)
        assert redis_client.xpending(stream, "g")["pending"] == 5
        redis_client.xtrim(stream, maxlen=2, approximate=False)  # what MAXLEN ~ on publish does to a lagging group
        time.sleep(0.01)
        if path == "restart":  # the same name: its own pending entries come back with no fields
            c = make_consumer(redis_client, keys, name="c1", claim_idle_ms=60_000)
        else:  # another consumer: XAUTOCLAIM (Redis 7 reports deleted ids) or the sweep of pending ids
            c = make_consumer(redis_client, keys, name="c2", claim_idle_ms=1)
            c.reclaim() if path == "autoclaim" else c.settle_trimmed()
        drain(c)
        time.sleep(0.01)
        drain(c)
        c.settle_trimmed()
        letters = bus.dead_letters()
        assert sorted(d["entry_id"] for d in letters) == ids[:3]
        assert {(d["reason"], d["payload"], d["stream"], d["group"]) for d in letters} == {(self.TRIMMED, "", stream, "g")}
        assert c.stats.trimmed == 3 and c.stats.dead_lettered == 3
        assert {e.id: redis_client.hget(EFFECTS, e.id) for e in events[3:]} == {e.id: b"1" for e in events[3:]}
        assert redis_client.xpending(stream, "g")["pending"] == 0

    @pytest.mark.parametrize("seen", ["behind", "caught_up"])
    def test_entries_trimmed_before_delivery_are_counted_once_in_a_dead_letter(self, seen, bus, redis_client, keys):
        """Entries MAXLEN trimmed before the group read them give one dead-letter entry with their count, once.

        ``behind``: noticed before the group reads on; ``caught_up``: the group read past the gap first.
        """
        if not _redis_7(redis_client):
            pytest.skip("the group lag this needs comes with Redis 7")
        idle = 1 if seen == "behind" else 60_000
        c = make_consumer(redis_client, keys, claim_idle_ms=idle)
        other = make_consumer(redis_client, keys, name="c2", claim_idle_ms=1)  # looks on every poll
        first = new_event("volume.accumulated", "m", {"new_samples": 100})
        bus.publish(first)
        drain(c)
        events = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(5)]
        bus.publish_many(events)
        stream = keys.events_for("m")
        redis_client.xtrim(stream, maxlen=2, approximate=False)
        if seen == "caught_up":
            drain(c)
            assert bus.dead_letters() == []  # not looked yet: the group read on past the gap
        for _ in range(3):
            drain(c)
            drain(other)
            time.sleep(0.01)
        [letter] = bus.dead_letters()
        assert letter["reason"] == "3 entries trimmed from the stream before they were delivered"
        assert letter["payload"] == "" and letter["stream"] == stream
        assert {e.id: redis_client.hget(EFFECTS, e.id) for e in events[3:]} == {e.id: b"1" for e in events[3:]}
        assert c.stats.trimmed + other.stats.trimmed == 3
        later = new_event("volume.accumulated", "m", {"new_samples": 9})
        bus.publish(later)
        drain(c)
        assert c.settle_trimmed() == 0 and len(bus.dead_letters()) == 1
        assert redis_client.hget(EFFECTS, later.id) == b"1"

    def test_retention_never_trims_entries_a_group_has_pending_or_not_yet_delivered(self, bus, redis_client, keys):
        """trim_older_than stops at the oldest entry a group has pending or not delivered, and logs how many it kept."""
        from structlog.testing import capture_logs

        stream = keys.events_for("m")
        hour_ago = int((time.time() - 3600) * 1000)
        old = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(6)]
        ids = [redis_client.xadd(stream, {PAYLOAD_FIELD: e.to_json()}, id=f"{hour_ago}-{i + 1}").decode()
               for i, e in enumerate(old)]
        make_consumer(redis_client, keys, name="c1", batch_size=2).poll(block_ms=10)  # handles old[0:2]
        make_consumer(redis_client, keys, name="c2", handler=_fail, batch_size=2).poll(block_ms=10)  # old[2:4] pending
        with capture_logs() as logs:
            assert bus.trim_older_than(60) == 2
        assert [i.decode() for i, _ in redis_client.xrange(stream)] == ids[2:]
        [held] = [entry for entry in logs if entry["event"] == "bus.trim_held_back"]
        assert held["kept"] == 4 and held["group"] == "g" and held["oldest_needed"] == ids[2]

        redis_client.xgroup_create(stream, "audit", id="0")  # a group that has read nothing holds everything
        drain(make_consumer(redis_client, keys, name="c3", claim_idle_ms=1))
        assert redis_client.xpending(stream, "g")["pending"] == 0
        assert bus.trim_older_than(60) == 0
        redis_client.xgroup_destroy(stream, "audit")
        assert bus.trim_older_than(60) == 4
        assert redis_client.xlen(stream) == 0


def _spawn(mode: str, name: str, ready: str, env_extra=None):
    env = {**os.environ, "READY_FILE": ready, **(env_extra or {})}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "bus_consumer_proc.py"), mode, name],
                            env=env, cwd=ROOT, start_new_session=True)


class TestCrashes:
    @pytest.mark.parametrize("mode", ["hang", "crash-after-commit"])
    def test_killed_consumer_entries_are_reclaimed_and_applied_exactly_once(self, mode, bus, redis_client, keys, tmp_path):
        """A consumer SIGKILLed mid-batch loses nothing and applies nothing twice.

        ``hang``: killed after reading, before committing: every entry stays pending and is
        reclaimed by another consumer. ``crash-after-commit``: killed right after the
        transaction that holds the effects and the acks: nothing is pending, nothing redone.
        """
        events = [new_event("volume.accumulated", f"m{i % 7}", {"new_samples": i}) for i in range(50)]
        bus.publish_many(events)
        ready = tmp_path / "ready"
        victim = _spawn(mode, "victim", str(ready), {"BATCH": "1000"})
        try:
            wait_for(ready.exists, timeout=20, message="victim to read a batch")
            if mode == "hang":
                os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
        finally:
            if victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
        pending = sum(redis_client.xpending(s, "g")["pending"] for s in keys.all_event_streams())
        assert pending == (50 if mode == "hang" else 0)
        survivor = _spawn("run", "survivor", str(tmp_path / "unused"), {"CLAIM_IDLE_MS": "300"})
        try:
            wait_for(lambda: sum(redis_client.xpending(s, "g")["pending"] for s in keys.all_event_streams()) == 0,
                     timeout=20, message="survivor to reclaim and ack everything")
        finally:
            os.killpg(survivor.pid, signal.SIGTERM)
            survivor.wait(timeout=10)
        counts = {k.decode(): int(v) for k, v in redis_client.hgetall(EFFECTS).items()}
        assert counts == {e.id: 1 for e in events}

    def test_unacked_entries_survive_a_redis_restart(self, bus, redis_client, keys):
        """With AOF on, a hard-killed Redis comes back with the stream, the group and its pending entries."""
        from workers.redis_server import EmbeddedRedis

        server = EmbeddedRedis(__import__("tempfile").mkdtemp(prefix="aof-")).start()
        try:
            import redis as _r

            client = _r.Redis.from_url(server.url)
            b = EventBus(client, keys)
            events = [new_event("volume.accumulated", "m", {"new_samples": i}) for i in range(5)]
            b.publish_many(events)
            c = StreamConsumer(client, keys, "g", "c1", lambda ev, p: (_ for _ in ()).throw(RuntimeError("x")),
                               block_ms=10)
            c.ensure_group()
            c.poll(block_ms=10)
            time.sleep(1.2)  # appendfsync everysec
            server.stop(kill=True)
            server.start()
            client = _r.Redis.from_url(server.url)
            assert client.xpending(keys.events_for("m"), "g")["pending"] == 5
            got = []
            c2 = StreamConsumer(client, keys, "g", "c1", lambda ev, p: got.extend(ev), block_ms=10)
            c2.poll(block_ms=10)
            assert [e.id for e in got] == [e.id for e in events]
        finally:
            server.stop()


class TestGcPaused:
    def test_overlapping_pauses_do_not_keep_the_collector_off_for_good(self, monkeypatch):
        """Pauses that overlap back to back (the relay's evaluator threads under load: the next round starts
        before the last one ends), so the pausers never drop to zero: a reference cycle is still collected, by
        a pauser leaving after the collector has been off GC_MAX_PAUSE_S."""
        import gc
        import weakref

        from events import bus

        monkeypatch.setattr(bus, "GC_MAX_PAUSE_S", 0.2)
        assert gc.isenabled()
        collected = []

        class Node:
            pass

        held = bus.gc_paused()
        held.__enter__()
        a, b = Node(), Node()
        a.other, b.other = b, a
        weakref.finalize(a, collected.append, True)
        del a, b
        deadline = time.monotonic() + 5
        while not collected and time.monotonic() < deadline:
            nxt = bus.gc_paused()
            nxt.__enter__()  # the next pause begins before the current one ends: never zero pausers
            held.__exit__(None, None, None)
            held = nxt
            assert not gc.isenabled()
            time.sleep(0.05)
        held.__exit__(None, None, None)
        assert collected, "the cycle was never collected while pauses overlapped"
        assert gc.isenabled()
