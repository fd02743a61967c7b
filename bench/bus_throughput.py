"""Event bus throughput: end to end (publish -> read -> handler -> ack) vs raw XADD vs Celery.

All three against the same private Redis in the same run, 1,000 models:
  (a) raw pipelined XADD of pre-serialised payloads (the ceiling),
  (b) our bus end to end: a publisher process and a consumer process in a consumer group,
      the handler persisting one effect per event in the same transaction as the dedup marks
      (the latest event id per model and type, one HSET per model and batch, as a real
      handler aggregates; ``--handler per-event`` issues one HSET per event instead, and
      ``--consumers 2`` runs two consumer processes in the group),
  (c) one Celery task per event on a real worker doing the same effect (the common anti-pattern).
Bar (issue 2): (b) >= 50,000 events/s and >= 40x (c).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import time

from _common import ROOT, Timer, emit, private_redis, redis_cpu_seconds

MODELS = 1000
TYPES = [
    ("drift.data", lambda i: {"drift_score": (i % 100) / 100, "drifted_features": ["f1"]}),
    ("performance.measured", lambda i: {"metric": "accuracy", "value": 0.9, "n_labeled": i % 1000}),
    ("volume.accumulated", lambda i: {"new_samples": i}),
    ("drift.concept", lambda i: {"value": 0.05}),
]


def make_events(n: int):
    from events.envelope import new_event

    return [new_event(TYPES[i % 4][0], f"model-{i % MODELS}", TYPES[i % 4][1](i)) for i in range(n)]


def bench_raw_xadd(url: str, n: int, keys) -> float:
    import redis

    client = redis.Redis.from_url(url)
    payload = make_events(1)[0].to_json()
    pipe = client.pipeline(transaction=False)
    with Timer() as t:
        for i in range(n):
            pipe.xadd(keys.events_for(f"model-{i % MODELS}"), {"e": payload})
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()
    for s in keys.all_event_streams():
        client.delete(s)
    return n / t.seconds


def _consumer_proc(url: str, n: int, name: str, per_event: bool, total, cpu, ready, done):
    import redis

    from config.keys import Keys
    from events.bus import StreamConsumer

    keys = Keys()
    client = redis.Redis.from_url(url)

    def handler(events, pipe):
        if per_event:
            for e in events:
                pipe.hset(keys.signals(e.subject), e.type, e.id)
            return
        latest: dict[str, dict[str, str]] = {}
        for e in events:
            latest.setdefault(e.subject, {})[e.type] = e.id
        for model, mapping in latest.items():
            pipe.hset(keys.signals(model), mapping=mapping)

    c = StreamConsumer(client, keys, "bench", name, handler, batch_size=2000, block_ms=100)
    c.ensure_group()
    ready.set()
    seen = 0
    cpu0 = time.process_time()
    while total.value < n:
        c.poll()
        done_now = c.stats.handled + c.stats.duplicates
        if done_now != seen:
            with total.get_lock():
                total.value += done_now - seen
            seen = done_now
    with cpu.get_lock():
        cpu.value += time.process_time() - cpu0
    done.set()


def bench_end_to_end(url: str, n: int, consumers: int = 1, per_event: bool = False) -> tuple[float, dict]:
    import redis

    from config.keys import Keys
    from events.bus import EventBus

    ctx = mp.get_context("fork")
    total, cpu = ctx.Value("q", 0), ctx.Value("d", 0.0)
    done = ctx.Event()
    procs, readies = [], []
    for i in range(consumers):  # forked before the events exist: a worker does not hold the publisher's data
        ready = ctx.Event()
        proc = ctx.Process(target=_consumer_proc, args=(url, n, f"c{i + 1}", per_event, total, cpu, ready, done))
        proc.start()
        procs.append(proc)
        readies.append(ready)
    for ready in readies:
        ready.wait(30)
    events = make_events(n)  # built (and validated) before the clock: monitors do this part
    client = redis.Redis.from_url(url)
    bus = EventBus(client, Keys())
    server_cpu0 = redis_cpu_seconds(client)
    with Timer() as t:
        cpu0 = time.process_time()
        bus.publish_many(events)
        publish_s = time.perf_counter() - t.start
        publish_cpu = time.process_time() - cpu0
        done.wait(600)
    server_cpu = redis_cpu_seconds(client) - server_cpu0
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    for s in Keys().all_event_streams():
        client.delete(s)
    client.delete(*client.keys("retrain:seen:*"))
    return n / t.seconds, {
        "publish_only_per_s": round(n / publish_s),
        "cpu_us_per_event": {"publisher": round(publish_cpu / n * 1e6, 2), "consumers": round(cpu.value / n * 1e6, 2),
                             "redis_server": round(server_cpu / n * 1e6, 2)},
    }


def bench_celery(url: str, n: int, state_dir: str) -> float:
    """One Celery task per event on a real worker (solo pool, the decision role's pool)."""
    env = {**os.environ, "RETRAIN_REDIS_URL": url, "RETRAIN_STATE_DIR": state_dir, "BENCH_CELERY": "1"}
    cmd = [sys.executable, "-m", "celery", "-A", "bench._celery_tasks", "worker", "-Q", "bench",
           "--pool", "solo", "--loglevel", "WARNING", "--without-mingle", "--without-gossip", "-n", "bench@local"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        os.environ["RETRAIN_REDIS_URL"] = url
        sys.path.insert(0, str(ROOT))
        from bench._celery_tasks import app, handle_event

        deadline = time.time() + 60
        while not app.control.ping(destination=["bench@local"], timeout=0.5):
            if time.time() > deadline:
                raise RuntimeError("celery worker did not start")
        import redis

        client = redis.Redis.from_url(url)
        events = [e.to_json() for e in make_events(n)]
        with Timer() as t:
            for payload in events:
                handle_event.apply_async((payload,), queue="bench")
            while int(client.get("bench:celery:done") or 0) < n:
                time.sleep(0.01)
        return n / t.seconds
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--celery-events", type=int, default=5_000)
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes in the group")
    parser.add_argument("--handler", choices=["per-model", "per-event"], default="per-model",
                        help="per-model: one HSET per model and batch; per-event: one HSET per event")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import tempfile

    from config.keys import Keys

    with private_redis() as server:
        raw = bench_raw_xadd(server.url, args.events, Keys())
        e2e, extra = bench_end_to_end(server.url, args.events, args.consumers, args.handler == "per-event")
        with tempfile.TemporaryDirectory() as state:
            celery_rate = bench_celery(server.url, args.celery_events, state)
    try:
        import hiredis  # noqa: F401

        parser_name = "hiredis"
    except ImportError:
        parser_name = "python"
    result = {
        "benchmark": "bus_throughput",
        "models": MODELS,
        "events": args.events,
        "consumers": args.consumers,
        "handler": args.handler,
        "redis_parser": parser_name,
        "raw_xadd_per_s": round(raw),
        "end_to_end_per_s": round(e2e),
        **extra,
        "celery_task_per_event_per_s": round(celery_rate),
        "ratio_vs_celery": round(e2e / celery_rate, 1),
        "ratio_vs_raw_xadd": round(e2e / raw, 3),
        "bar_end_to_end_per_s": 50_000,
        "bar_ratio_vs_celery": 40,
        "meets_bar": e2e >= 50_000 and e2e / celery_rate >= 40,
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
