"""Pipeline overhead: trigger -> staged version on real workers, minus the bare fit.

A real decision worker and a real "all"-role worker process run against a private Redis. Each
run publishes a manual retrain request and waits until the registry holds the staged version;
the bare fit (the same `train_candidate` on the same rows, in this process) is measured in the
same run. Overhead = end to end - bare fit: the decision, the Celery hops, data validation and
the time split, artifact writing and hashing, the gate (including its latency and size checks),
registration and events. Bar (issue 5): <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, Timer, emit, private_redis

POLICY = """
[model]
name = "bench"
task = "binary"
target = "churned"

[data]
source = "{source}"
time_column = "event_time"
window = "30d"
categorical = ["plan", "region"]
min_rows = 100

[triggers]
debounce_quiet = "0s"
cooldown = "0s"
max_trainings_per_day = 1000

[training]
estimator = "sklearn.linear_model.LogisticRegression"
params = {{ max_iter = 200 }}

[training.search]
method = "none"

[gate]
min_accuracy = 0.5
max_latency_p99_ms = 200
min_throughput_rows_per_s = 10
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows-per-day", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from workers.simulate import write_days

    with private_redis() as server, tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        write_days(folder / "data", days=5, rows_per_day=args.rows_per_day, seed=3)
        (folder / "policies").mkdir()
        (folder / "policies" / "bench.toml").write_text(POLICY.format(source=f"{folder}/data/**/*.parquet"))
        env = {**os.environ, "RETRAIN_REDIS_URL": server.url, "RETRAIN_STATE_DIR": str(folder / "state"),
               "RETRAIN_POLICY_DIR": str(folder / "policies"), "RETRAIN_ARTIFACT_ROOT": str(folder / "artifacts"),
               "RETRAIN_BUS_BLOCK_MS": "20", "RETRAIN_LOG_LEVEL": "WARNING"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("RETRAIN_")})
        from config.settings import get_settings, reset_settings
        from workers.app import _configure, app
        from workers.cli.cmd_worker import worker_command, worker_env
        from workers.connections import get_redis, reset_clients

        reset_settings()
        reset_clients()
        _configure(app)
        procs = []
        for role in ("decision", "all"):
            cmd = worker_command(role, 1, None, "WARNING", f"bench-{role}@local")
            procs.append(subprocess.Popen(cmd, env=worker_env(role, {**env, "RETRAIN_ROLE": role}), cwd=ROOT,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            deadline = time.time() + 90
            while len(app.control.ping(timeout=0.5) or []) < 2:
                if time.time() > deadline:
                    raise RuntimeError("workers did not start")
            result = run(get_redis(), get_settings(), args.runs, folder)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
    emit(result, args.json)


def run(client, settings, runs: int, folder: Path) -> dict:
    import pandas as pd

    from config.keys import keys_from_settings
    from config.policy import load_policy
    from events.bus import EventBus
    from events.envelope import new_event
    from workers.registry.store import Registry
    from workers.rollout.control import RolloutControl
    from workers.training.data import load_window, time_holdout
    from workers.training.fit import train_candidate

    keys = keys_from_settings(settings)
    bus = EventBus.from_settings(client, settings)
    registry = Registry(client, keys)
    control = RolloutControl(client, keys)
    policy = load_policy(folder / "policies" / "bench.toml")

    def trigger_and_wait(version: int) -> float:
        with Timer() as t:
            bus.publish(new_event("retrain.requested", "bench", {"reason": "bench", "requested_by": "bench"}))
            while True:
                try:
                    if registry.get("bench", version).status in ("staged", "shadow", "production"):
                        break
                except LookupError:
                    pass
                time.sleep(0.002)
        return t.seconds

    trigger_and_wait(1)  # v1: the first model (warms the worker's imports)
    while client.hget(keys.guard("bench"), "in_flight"):
        time.sleep(0.01)
    e2e = []
    for i in range(runs):
        version = 2 + i
        e2e.append(trigger_and_wait(version))
        while not client.hget(keys.rollout("bench"), "state") or \
                json.loads(client.hget(keys.rollout("bench"), "state"))["candidate"] != str(version):
            time.sleep(0.005)
        control.manual("bench", "abort", "bench", "measured; next run")
        while client.hget(keys.guard("bench"), "in_flight"):
            time.sleep(0.005)
    window = load_window(policy.data.source, policy.data.time_column, policy.data.window)
    split = time_holdout(window.frame, policy.data.time_column, policy.data.holdout_fraction)
    fits = []
    for _ in range(runs):
        with Timer() as t:
            train_candidate(split.train, policy)
        fits.append(t.seconds)
    e2e_med, fit_med = statistics.median(e2e), statistics.median(fits)
    return {"benchmark": "pipeline_overhead", "runs": runs, "rows": len(window.frame),
            "trigger_to_staged_s_median": round(e2e_med, 3), "trigger_to_staged_s_all": [round(x, 3) for x in e2e],
            "bare_fit_s_median": round(fit_med, 4), "overhead_s_median": round(e2e_med - fit_med, 3),
            "bar_overhead_s": 1.0, "meets_bar": e2e_med - fit_med <= 1.0}


if __name__ == "__main__":
    main()
