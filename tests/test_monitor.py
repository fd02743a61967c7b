"""`retrain monitor`: the monitors of a production model, run once against its data and logs."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from events.bus import EventBus
from tests.support import retrain_cli, wait_for
from tests.test_pipeline import request, setup_model
from workers.registry.store import Registry
from workers.simulate import write_days


class TestMonitor:
    @pytest.mark.slow
    def test_monitor_publishes_drift_volume_and_upstream_for_new_data(self, start_worker, redis_client, keys,
                                                                       settings, tmp_path, redis_server):
        """New drifted rows with a removed column: drift, volume and a breaking upstream change are published."""
        env = setup_model(tmp_path)
        start_worker("all", env=env)
        registry = Registry(redis_client, keys)
        request(EventBus.from_settings(redis_client, settings))
        wait_for(lambda: registry.alias("churn", "production") == 1, timeout=90, message="v1")
        v1 = registry.get("churn", 1)
        assert v1.reference_scores and v1.source_schema
        tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
        [path] = write_days(tmp_path / "data" / "churn" / "new", days=1, rows_per_day=600, end=tomorrow,
                            shift=1.5, seed=9)
        import pandas as pd

        pd.read_parquet(path).drop(columns=["region"]).to_parquet(path, index=False)
        out = retrain_cli("monitor", "churn", "--json", redis_url=redis_server.url, env=env)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["production"] == 1
        assert summary.get("drift_score", 0) >= 0.5, summary
        assert summary["volume"] >= 1
        assert summary["upstream"] == "breaking"
        published = [json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for("churn"))]
        kinds = {e["type"] for e in published if e["source"] == "urn:retrain:monitor"}
        assert {"drift.data", "volume.accumulated", "upstream.changed"} <= kinds
        upstream = [e for e in published if e["type"] == "upstream.changed"][-1]
        assert upstream["data"]["removed"] == ["region"] and upstream["data"]["breaking"] is True

        # Ids: a re-run in the same slot on the same data (a redelivered task) repeats them; new rows are news.
        from workers.monitor import run_monitors
        from workers.policies import PolicyStore

        policy = PolicyStore(env["RETRAIN_POLICY_DIR"]).get("churn")
        now = datetime.now(timezone.utc).timestamp()

        def run() -> dict[str, str]:
            seen = redis_client.xlen(keys.events_for("churn"))
            summary = run_monitors(redis_client, keys, "churn", policy, now=now)
            new = [e for e in (json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for("churn")))][seen:]
            new = [e for e in new if e["source"] == "urn:retrain:monitor"]  # not the decision worker's reactions
            assert [e["type"] for e in new] == summary["published"]
            return {e["type"]: e["id"] for e in new}

        first, again = run(), run()
        assert first == again and {"drift.data", "volume.accumulated", "upstream.changed"} <= set(first)
        write_days(tmp_path / "data" / "churn" / "newer", days=1, rows_per_day=50, end=tomorrow, seed=10)
        assert run()["volume.accumulated"] != first["volume.accumulated"]

    def test_monitor_without_policy_is_exit_2(self, redis_server, tmp_path):
        """An unknown model: one line, exit 2."""
        out = retrain_cli("monitor", "nope", redis_url=redis_server.url, env={"RETRAIN_POLICY_DIR": str(tmp_path)})
        assert out.returncode == 2 and "no policy" in out.stderr


class TestLivePerformance:
    def test_a_production_record_without_a_finite_baseline_still_reports_performance(self, redis_client, keys):
        """A NaN primary metric in the registry is not sent as the baseline (it would be refused); the measurement still goes out."""
        import random

        from config.policy import policy_from_dict
        from workers.monitor import run_monitors
        from workers.registry.store import ModelVersion

        registry = Registry(redis_client, keys)
        registry.register(ModelVersion(model="churn", version=0, status="production", artifact_uri="file:///x.skops",
                                       sha256="0" * 64, metrics={"primary": float("nan")},
                                       created_at=(datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()))
        registry.set_alias("churn", "production", 1)
        rng = random.Random(0)
        for i in range(300):
            label = rng.randint(0, 1)
            pred = label if rng.random() < 0.8 else 1 - label
            redis_client.xadd(keys.requests("churn"), {
                "request_id": f"r{i}", "version": "1", "latency_ms": "1.0", "prediction": json.dumps(pred),
                "score": f"{0.7 if pred else 0.3:.2f}", "error": "", "shadow": "0", "ts": f"{datetime.now().timestamp():.3f}"})
            redis_client.xadd(keys.feedback("churn"), {"request_id": f"r{i}", "label": json.dumps(label),
                                                       "ts": datetime.now().timestamp()})
        policy = policy_from_dict({"model": {"name": "churn", "task": "binary", "target": "y"}})
        summary = run_monitors(redis_client, keys, "churn", policy)
        assert "performance.measured" in summary["published"], summary
        [event] = [json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for("churn"))
                   if json.loads(f[b"e"])["type"] == "performance.measured"]
        assert event["data"].get("baseline") is None and 0.7 < event["data"]["value"] < 0.9
