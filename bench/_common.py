"""Shared helpers for the benchmarks: a private Redis server, timing, JSON output."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")


@contextmanager
def private_redis():
    """A fresh embedded redis-server on a free port (never the machine's own Redis)."""
    from workers.redis_server import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="bench-redis-") as d:
        server = EmbeddedRedis(d).start()
        try:
            yield server
        finally:
            server.stop()


def redis_cpu_seconds(client) -> float:
    """CPU seconds the Redis server has used so far (user + system, its main thread and helpers)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def python_loop_seconds(n: int = 10_000_000) -> float:
    """Seconds one core takes for ``n`` additions in a Python loop: the machine's speed, to set
    figures from different runs (or days, on a shared VM) side by side."""
    start = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return round(time.perf_counter() - start, 3)


def emit(result: dict, as_json: bool) -> None:
    """Print the result (one JSON object with ``--json``), with the machine's load average and speed."""
    result = {**result, "load_avg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
              "python_loop_10m_s": python_loop_seconds()}
    if as_json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>40}: {v}")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
