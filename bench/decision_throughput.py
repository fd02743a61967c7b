"""Decision worker throughput and latency: 1,000 models, mixed signals, real Redis.

(a) throughput: N events published as fast as possible; the decision service (its own process,
    the same code the Celery bootstep runs) records every event, evaluates every touched model
    and writes decision records; events/s = N / (first publish -> last event handled and no
    model left due).
(b) latency at a paced 5,000 events/s: time from an event's publish to the enqueue of the
    pipeline it caused (decision record -> Celery message on training.*), p50/p99.
(c) baseline in the same run: one Celery task per event doing the same state update.
Bars (issue 3): >= 20,000 events/s; p99 <= 50 ms at 5,000 events/s.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Timer, emit, private_redis

MODELS = 1000
POLICY = """
[model]
name = "template"
[triggers]
debounce_quiet = "0s"
debounce_max_wait = "0s"
cooldown = "1h"
max_trainings_per_day = 1000
"""


def _event(i: int, rng: random.Random, hot: bool = False):
    from events.envelope import new_event

    model = f"model-{i % MODELS}"
    kind = i % 4
    if kind == 0:
        return new_event("drift.data", model, {"drift_score": 0.4 if hot else rng.uniform(0, 0.1),
                                               "drifted_features": ["f1"]})
    if kind == 1:
        return new_event("performance.measured", model, {"metric": "accuracy", "value": 0.9, "baseline": 0.91,
                                                         "n_labeled": 500})
    if kind == 2:
        return new_event("volume.accumulated", model, {"new_samples": rng.randint(0, 1000)})
    return new_event("drift.concept", model, {"value": rng.uniform(0, 0.05), "metric": "psi"})


def _settings(url: str, folder: Path):
    from config.settings import Settings

    return Settings(redis_url=url, state_dir=folder, policy_dir=folder / "none", default_policy=folder / "p.toml",
                    bus_block_ms=20)


def _service_proc(url: str, folder: str, stop, ready):
    import redis

    from workers.decision.service import DecisionService

    settings = _settings(url, Path(folder))
    svc = DecisionService(redis.Redis.from_url(url), settings, "bench-1")
    svc.consumer.ensure_group()
    ready.set()
    while not stop.is_set():
        svc.consumer.poll()
        svc.after_batch()


def _wait_drained(client, keys, n_expected: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.xinfo_groups(keys.events(0))
        pending = sum(g["pending"] for s in keys.all_event_streams() for g in client.xinfo_groups(s))
        lag_ok = all(_delivered(client, s) for s in keys.all_event_streams())
        if pending == 0 and lag_ok and client.zcard(keys.due()) == 0:
            return
        time.sleep(0.01)
    raise RuntimeError("decision service did not drain")


def _delivered(client, stream) -> bool:
    groups = {g["name"].decode(): g for g in client.xinfo_groups(stream)}
    g = groups.get("decision")
    if not g:
        return False
    last = client.xinfo_stream(stream)["last-generated-id"]
    return g["last-delivered-id"] == last


def run_service(url: str, folder: Path):
    ctx = mp.get_context("fork")
    stop, ready = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_service_proc, args=(url, str(folder), stop, ready))
    proc.start()
    ready.wait(30)
    return proc, stop


def bench_throughput(url: str, folder: Path, n: int) -> dict:
    import redis

    from config.keys import Keys
    from events.bus import EventBus

    client = redis.Redis.from_url(url)
    keys = Keys()
    rng = random.Random(1)
    events = [_event(i, rng, hot=(i % 97 == 0)) for i in range(n)]
    proc, stop = run_service(url, folder)
    bus = EventBus(client, keys)
    with Timer() as t:
        bus.publish_many(events)
        _wait_drained(client, keys, n)
    stop.set()
    proc.join(10)
    records = sum(client.zcard(keys.decisions(f"model-{m}")) for m in range(MODELS))
    started = sum(1 for m in range(MODELS) if client.hget(keys.guard(f"model-{m}"), "in_flight"))
    return {"events": n, "events_per_s": round(n / t.seconds), "decision_records": records,
            "pipelines_enqueued": started}


def bench_latency(url: str, folder: Path, rate: int, seconds: float) -> dict:
    """Paced publishing; hot events (drift over threshold) on fresh models start pipelines."""
    import redis

    from config.keys import Keys
    from events.bus import EventBus

    client = redis.Redis.from_url(url)
    for k in client.scan_iter("retrain:*"):
        client.delete(k)
    keys = Keys()
    proc, stop = run_service(url, folder)
    bus = EventBus(client, keys)
    rng = random.Random(2)
    sent_at: dict[str, float] = {}
    total = int(rate * seconds)
    chunk = max(1, rate // 100)  # publish every 10 ms
    start = time.perf_counter()
    i = 0
    hot_models = 0
    while i < total:
        batch = []
        for _ in range(chunk):
            hot = (i % 50 == 0) and hot_models < MODELS
            e = _event(i if not hot else hot_models * 4, rng, hot=hot)
            if hot:
                hot_models += 1
            batch.append(e)
            i += 1
        now = time.time()
        bus.publish_many(batch)
        for e in batch:
            if e.type == "drift.data" and e.data["drift_score"] > 0.15:
                sent_at.setdefault(e.subject, now)
        target = start + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    achieved = total / (time.perf_counter() - start)
    _wait_drained(client, keys, total)
    stop.set()
    proc.join(10)
    latencies = []
    for model, t0 in sent_at.items():
        pid = client.hget(keys.guard(model), "in_flight")
        if not pid:
            continue
        enq = client.hget(keys.pipeline(model, pid.decode()), "enqueued_at")
        if enq:
            latencies.append((float(enq) - t0) * 1000)
    lat = np.array(latencies)
    return {"rate_target": rate, "rate_achieved": round(achieved), "decisions_measured": len(lat),
            "latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None}


def bench_celery_baseline(url: str, n: int) -> float:
    from bus_throughput import bench_celery

    with tempfile.TemporaryDirectory() as state:
        return bench_celery(url, n, state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--rate", type=int, default=5_000)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--celery-events", type=int, default=3_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with private_redis() as server, tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "p.toml").write_text(POLICY)
        tp = bench_throughput(server.url, folder, args.events)
        lat = bench_latency(server.url, folder, args.rate, args.seconds)
        celery_rate = bench_celery_baseline(server.url, args.celery_events)
    result = {"benchmark": "decision_throughput", "models": MODELS, **{f"throughput_{k}": v for k, v in tp.items()},
              **{f"latency_{k}" if not k.startswith("latency") else k: v for k, v in lat.items()},
              "celery_task_per_event_per_s": round(celery_rate),
              "ratio_vs_celery": round(tp["events_per_s"] / celery_rate, 1),
              "bar_events_per_s": 20_000, "bar_p99_ms_at_5000_per_s": 50,
              "meets_bar": tp["events_per_s"] >= 20_000 and (lat["latency_p99_ms"] or 1e9) <= 50}
    emit(result, args.json)


if __name__ == "__main__":
    main()
