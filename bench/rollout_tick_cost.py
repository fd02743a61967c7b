"""What a rollout tick costs as its phase's window grows: the evidence read plus the analysis.

A phase holds N request records (a quarter of them shadow mirrors) and labels for half of its
primary requests, in a private Redis. Per window size:
- ``full``: the tick reads the whole window, as every tick did before the evidence cache (a new
  cache each time), then summarizes it (``summarize`` + ``shadow_pairs``);
- ``cold``: the first tick of a rollout worker with the cache (the same full read, kept);
- ``warm``: a later tick after 1 % more records and labels arrived: it reads only those.
Median of ``--repeat`` ticks each. The tick interval is 5 s, and a tick holds the model's lock
for at most 20 s: the tick must stay well below both as the window grows.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from _common import emit, private_redis

MODEL = "bench"


def write(client, keys, n: int, rng: random.Random, first: int = 0) -> None:
    now = time.time()
    pipe = client.pipeline(transaction=False)
    for i in range(first, first + n):
        shadow = i % 4 == 3
        rid = f"s{i}" if shadow else f"r{i}"
        pipe.xadd(keys.requests(MODEL), {
            "request_id": rid, "version": "2" if shadow else "1", "latency_ms": f"{rng.uniform(1, 9):.3f}",
            "prediction": str(rng.randint(0, 1)), "score": f"{rng.random():.4f}", "error": "",
            "shadow": "1" if shadow else "0", "shadow_of": f"r{i - 1}" if shadow else "", "ts": f"{now:.6f}"})
        if not shadow and i % 2 == 0:
            pipe.xadd(keys.feedback(MODEL), {"request_id": rid, "label": str(rng.randint(0, 1)), "ts": f"{now:.6f}"})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def tick(cache, client, keys, started: float) -> float:
    from workers.rollout.analysis import shadow_pairs, summarize

    t0 = time.perf_counter()
    records = cache.records(client, keys, MODEL, 0, started)
    summarize(records, "binary")
    shadow_pairs(records, "1", "2", "binary")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="window sizes (records), comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import redis

    from config.keys import Keys
    from workers.rollout.evidence import EvidenceCache

    keys = Keys(prefix="bench")
    rng = random.Random(0)
    out: dict = {"benchmark": "rollout_tick_cost", "tick_interval_s": 5, "tick_lock_s": 20, "windows": []}
    with private_redis() as server:
        client = redis.Redis.from_url(server.url)
        for size in (int(s) for s in args.sizes.split(",")):
            client.flushall()
            started = time.time() - 1
            write(client, keys, size, rng)
            full = statistics.median(tick(EvidenceCache(), client, keys, started) for _ in range(args.repeat))
            cache = EvidenceCache()
            cold = tick(cache, client, keys, started)
            warm, written, step = [], size, max(1, size // 100)
            for _ in range(args.repeat):
                write(client, keys, step, rng, first=written)
                written += step
                warm.append(tick(cache, client, keys, started))
            out["windows"].append({"records": size, "full_read_tick_s": round(full, 4), "cold_tick_s": round(cold, 4),
                                   "warm_tick_s": round(statistics.median(warm), 4),
                                   "speedup_warm_vs_full": round(full / statistics.median(warm), 1)})
    emit(out, args.json)
    if not args.json:
        print(json.dumps(out["windows"], indent=1))


if __name__ == "__main__":
    main()
