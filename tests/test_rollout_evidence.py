"""A rollout phase's evidence, read incrementally between ticks, equals a full read of the window."""

from __future__ import annotations

import json
import random
import time

import pytest

import workers.router.requestlog as requestlog
from workers.rollout import evidence
from workers.rollout.evidence import EvidenceCache

MODEL = "m"


def serve(client, keys, rid: str, *, version="1", shadow_of=None, ts=None, error=""):
    client.xadd(keys.requests(MODEL), {
        "request_id": rid, "version": version, "latency_ms": "2.5", "prediction": "1", "score": "0.7",
        "error": error, "shadow": "1" if shadow_of else "0", "shadow_of": shadow_of or "",
        "ts": f"{time.time() if ts is None else ts:.6f}"})


def label(client, keys, rid: str, value) -> None:
    client.xadd(keys.feedback(MODEL), {"request_id": rid, "label": json.dumps(value), "ts": f"{time.time():.6f}"})


def full_read(client, keys, rollout_ms: int, phase_started: float) -> list[dict]:
    """The window read whole, as every tick read it before the cache (the oracle)."""
    labels = {}
    for _, fields in client.xrange(keys.feedback(MODEL), min=f"{rollout_ms}-0"):
        fb = requestlog.decode_feedback(fields)
        labels[fb["request_id"]] = fb["label"]
    records = []
    for _, fields in client.xrange(keys.requests(MODEL), min=f"{int(phase_started * 1000) + 1}-0"):
        rec = requestlog.decode_request(fields)
        if rec["ts"] is not None and rec["ts"] < phase_started:
            continue
        records.append({**rec, "error": bool(rec["error"]), "label": labels.get(rec["shadow_of"] or rec["request_id"])})
    return records


class TestIncrementalEvidence:
    @pytest.mark.parametrize("trim", [None, 60], ids=["whole streams", "streams trimmed to 60 entries"])
    def test_reads_between_ticks_give_what_a_full_read_gives(self, redis_client, keys, monkeypatch, trim):
        """Random interleavings of records (primary and shadow, some served before the phase), labels arriving
        before and after their records, and relabels, read a few entries at a time: after every batch the kept
        evidence equals a full read of the window; with the streams trimmed (their length bound), records and
        labels that left them are gone from the evidence too."""
        monkeypatch.setattr(evidence, "READ_CHUNK", 7)
        rng = random.Random(7)
        rollout_ms = int(time.time() * 1000) - 5000
        label(redis_client, keys, "early", 0)  # a label from before the phase, for a request served in it
        phase_started = time.time()
        time.sleep(0.002)
        cache = EvidenceCache()
        served: list[str] = []
        for batch in range(12):
            for _ in range(rng.randint(0, 40)):
                pick = rng.random()
                if pick < 0.45 or not served:
                    rid = "early" if batch == 0 and not served else f"r{len(served)}"
                    late = rng.random() < 0.1  # served in the previous phase, logged after the start
                    serve(redis_client, keys, rid, ts=phase_started - 0.2 if late else None,
                          error="boom" if rng.random() < 0.05 else "")
                    served.append(rid)
                elif pick < 0.6:
                    serve(redis_client, keys, f"s{rng.randint(0, 9999)}", version="2",
                          shadow_of=rng.choice(served))
                elif pick < 0.9:
                    label(redis_client, keys, rng.choice(served), rng.randint(0, 1))
                else:  # a label for a request not logged yet
                    label(redis_client, keys, f"r{len(served) + rng.randint(0, 3)}", rng.randint(0, 1))
            if trim:
                redis_client.xtrim(keys.requests(MODEL), maxlen=trim, approximate=False)
                redis_client.xtrim(keys.feedback(MODEL), maxlen=trim // 2, approximate=False)
            kept = cache.records(redis_client, keys, MODEL, rollout_ms, phase_started)
            assert kept == full_read(redis_client, keys, rollout_ms, phase_started)
        assert any(r["label"] is not None for r in kept) and any(r["shadow_of"] for r in kept)
        assert all(r["ts"] >= phase_started for r in kept)
        if trim:
            assert len(kept) <= trim < len(served)

    def test_a_tick_decodes_only_what_was_written_since_the_last(self, redis_client, keys, monkeypatch):
        decoded = []
        real = requestlog.decode_request
        monkeypatch.setattr(requestlog, "decode_request", lambda fields: decoded.append(1) or real(fields))
        phase_started = time.time() - 1
        cache = EvidenceCache()
        for i in range(500):
            serve(redis_client, keys, f"a{i}")
        assert len(cache.records(redis_client, keys, MODEL, 0, phase_started)) == 500
        assert len(decoded) == 500
        for i in range(7):
            serve(redis_client, keys, f"b{i}")
        label(redis_client, keys, "a3", 1)
        records = cache.records(redis_client, keys, MODEL, 0, phase_started)
        assert len(records) == 507 and len(decoded) == 507
        assert [r["label"] for r in records if r["request_id"] == "a3"] == [1]

    def test_a_new_phase_or_replaced_data_is_read_afresh(self, redis_client, keys):
        """Another phase start, another rollout, or streams whose last-read entry is gone (trimmed past it, or the data
        replaced) are not served from the kept records."""
        cache = EvidenceCache()
        first = time.time() - 1
        for i in range(5):
            serve(redis_client, keys, f"a{i}")
        assert len(cache.records(redis_client, keys, MODEL, 0, first)) == 5
        time.sleep(0.002)
        second = time.time()
        time.sleep(0.002)
        serve(redis_client, keys, "b0")
        assert [r["request_id"] for r in cache.records(redis_client, keys, MODEL, 0, second)] == ["b0"]
        assert len(cache.records(redis_client, keys, MODEL, 1, first)) == 6  # another rollout, the same phase start
        redis_client.delete(keys.requests(MODEL))
        serve(redis_client, keys, "c0")
        assert [r["request_id"] for r in cache.records(redis_client, keys, MODEL, 1, first)] == ["c0"]

    def test_only_the_most_recently_used_phases_are_kept(self, redis_client, keys):
        """At most ``size`` phases and ``max_records`` records are kept, the least recently used dropped first;
        the phase just read stays even when it alone is over the record bound."""
        started = time.time() - 1
        for i in range(3):
            serve(redis_client, keys, f"a{i}")
        cache = EvidenceCache(size=2)
        for model in ("m", "other", "third"):
            cache.records(redis_client, keys, model, 0, started)
        assert [where[-1] for where in cache._phases] == ["other", "third"]
        cache = EvidenceCache(max_records=4)
        cache.records(redis_client, keys, "empty", 0, started)
        cache.records(redis_client, keys, MODEL, 0, started)
        assert [where[-1] for where in cache._phases] == ["empty", MODEL]  # 0 + 3 records
        serve(redis_client, keys, "a3")
        serve(redis_client, keys, "a4")
        assert len(cache.records(redis_client, keys, MODEL, 0, started)) == 5
        assert [where[-1] for where in cache._phases] == [MODEL]  # 5 > 4: the other dropped, this one kept

    @pytest.mark.parametrize("entries", [25_000])
    def test_a_window_longer_than_one_read_is_read_in_chunks(self, redis_client, keys, entries):
        """More entries than one XRANGE call returns (READ_CHUNK): all are read, none twice."""
        pipe = redis_client.pipeline(transaction=False)
        now = time.time()
        for i in range(entries):
            pipe.xadd(keys.requests(MODEL), {"request_id": f"r{i}", "version": "1", "latency_ms": "1", "prediction": "1",
                                             "score": "", "error": "", "shadow": "0", "ts": f"{now:.6f}"})
        pipe.execute()
        records = EvidenceCache().records(redis_client, keys, MODEL, 0, now - 60)
        assert [r["request_id"] for r in records] == [f"r{i}" for i in range(entries)]
