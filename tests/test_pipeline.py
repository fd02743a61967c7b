"""The training pipeline end to end on real workers: decision -> validate -> train -> gate -> stage -> rollout."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from events.bus import EventBus
from events.envelope import new_event
from tests.support import wait_for
from workers.decision.state import DecisionStore
from workers.registry.store import Registry
from workers.simulate import CATEGORICAL, TARGET, TIME, write_days

POLICY = """
[model]
name = "{name}"
task = "binary"
target = "{target}"

[data]
source = "{source}"
time_column = "{time}"
window = "30d"
categorical = {categorical}
min_rows = 200

[triggers]
debounce_quiet = "0s"
cooldown = "0s"

[training]
estimator = "sklearn.linear_model.LogisticRegression"
params = {{ max_iter = 200 }}

[training.search]
method = "random"
n_candidates = 2
cv = 2
space = {{ C = [0.1, 1.0] }}

[gate]
min_accuracy = {min_accuracy}
max_latency_p99_ms = 200
min_throughput_rows_per_s = 10
"""


def setup_model(tmp_path, name="churn", min_accuracy=0.6, **data_kwargs):
    data = tmp_path / "data" / name
    write_days(data, days=5, rows_per_day=400, **data_kwargs)
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / f"{name}.toml").write_text(POLICY.format(
        name=name, target=TARGET, source=f"{data}/**/*.parquet", time=TIME,
        categorical=json.dumps(CATEGORICAL), min_accuracy=min_accuracy))
    return {"RETRAIN_POLICY_DIR": str(policies), "RETRAIN_ARTIFACT_ROOT": str(tmp_path / "artifacts")}


def request(bus, model="churn", reason="test"):
    bus.publish(new_event("retrain.requested", model, {"reason": reason, "requested_by": "pytest"}))


@pytest.fixture
def stack(start_worker, redis_client, settings, keys, tmp_path):
    def _start(**kwargs):
        env = setup_model(tmp_path, **kwargs)
        start_worker("all", env=env)
        return EventBus.from_settings(redis_client, settings), Registry(redis_client, keys)
    return _start


class TestPipeline:
    @pytest.mark.slow
    def test_first_model_then_a_drift_retrain_staged_with_lineage(self, stack, redis_client, keys):
        """A manual request builds v1 (promoted directly as the first model); drift then stages v2 with lineage and starts its rollout."""
        bus, registry = stack()
        request(bus)
        wait_for(lambda: registry.alias("churn", "production") == 1, timeout=90, message="v1 in production")
        v1 = registry.get("churn", 1)
        assert v1.status == "production" and v1.parent_version is None and v1.sha256
        assert v1.training_schema and v1.reference_profile_uri
        assert v1.gate["first_model"] is True
        drift = new_event("drift.data", "churn", {"drift_score": 0.5, "drifted_features": ["tenure"]})
        bus.publish(drift)
        wait_for(lambda: registry.alias("churn", "candidate") == 2, timeout=90, message="v2 staged as candidate")
        v2 = registry.get("churn", 2)
        assert v2.parent_version == 1 and v2.pipeline_id and v2.decision_id
        assert drift.id in v2.trigger_event_ids and "data_drift" in v2.triggers
        assert v2.gate["passed"] is True and {c["name"] for c in v2.gate["checks"]} >= {
            "minimum_performance", "no_regression", "prediction_stability", "latency", "model_size"}
        decision = DecisionStore(redis_client, keys).get_record(v2.decision_id)
        assert decision["pipeline_id"] == v2.pipeline_id
        assert v2.trigger_event_count == decision["event_count"] >= len(v2.trigger_event_ids) >= 1
        wait_for(lambda: registry.get("churn", 2).status == "shadow", timeout=30, message="v2 in shadow")
        rollout = json.loads(redis_client.hget(keys.rollout("churn"), "state"))
        assert rollout["candidate"] == "2" and rollout["production"] == "1"
        expected = {"retrain.decided", "training.started", "training.succeeded", "gate.passed", "model.staged",
                    "rollout.started"}
        wait_for(lambda: expected <= set(history_types(redis_client, keys)), timeout=30,
                 message="the pipeline's events in the model's history (recorded by the decision worker)")

    @pytest.mark.slow
    def test_gate_failure_rejects_alerts_and_frees_the_slot(self, stack, redis_client, keys):
        """A candidate under the minimum accuracy is registered as rejected, alerts, and the model can decide again."""
        bus, registry = stack(min_accuracy=0.99)
        request(bus)
        wait_for(lambda: registry.versions("churn") and registry.versions("churn")[0].status == "rejected",
                 timeout=90, message="v1 rejected")
        wait_for(lambda: not redis_client.hexists(keys.guard("churn"), "in_flight"), timeout=20,
                 message="slot released")
        alerts = [json.loads(a)["data"] for a in redis_client.lrange(keys.alerts("churn"), 0, -1)]
        assert any("quality gate" in a["title"] and "minimum_performance" in a["message"] for a in alerts)
        assert registry.alias("churn", "production") is None
        wait_for(lambda: "gate.failed" in history_types(redis_client, keys), timeout=30, message="gate.failed recorded")
        assert "model.staged" not in history_types(redis_client, keys)

    @pytest.mark.slow
    def test_bad_training_data_stops_the_pipeline_listing_every_problem(self, stack, redis_client, keys, tmp_path):
        """Training data that fails validation stops at validate_data with training.failed and every problem."""
        bus, registry = stack()
        # Too few rows in the window AND a broken label column in one file.
        import pandas as pd

        for path in (tmp_path / "data" / "churn").rglob("*.parquet"):
            frame = pd.read_parquet(path).head(20)
            frame[TARGET] = None
            frame.to_parquet(path, index=False)
        request(bus)
        wait_for(lambda: b"failed" in (redis_client.hget(keys.pipeline("churn", _pipeline(redis_client, keys)), "status") or b""),
                 timeout=60, message="pipeline failed")
        pid = _pipeline(redis_client, keys)
        error = redis_client.hget(keys.pipeline("churn", pid), "error").decode()
        assert "min_rows" in error or "rows" in error
        assert "null" in error
        assert registry.versions("churn") == []
        # The event reaches the model's history once the decision worker has consumed it.
        wait_for(lambda: "training.failed" in history_types(redis_client, keys), timeout=30,
                 message="training.failed in the model's history")


def history_types(client, keys, model="churn") -> list[str]:
    """Event types in the model's history (what the decision worker has recorded so far)."""
    return [json.loads(f[b"e"])["type"] for _, f in client.xrange(keys.history(model))]


def _pipeline(client, keys):
    recs = DecisionStore(client, keys).recent_records("churn", 10)
    starts = [r for r in recs if r["action"] == "start"]
    return starts[0]["pipeline_id"] if starts else "none"


class TestCanvas:
    def test_the_rest_of_the_pipeline_is_one_chain_with_the_failure_handler_and_no_results_kept(self):
        """What the first step sends: train -> gate -> stage -> start_rollout, each with its deterministic id, its
        queue, the urgency's priority and ignore_result, and the failure handler on every step."""
        from workers.pipeline.canvas import pipeline_context, rest_of_pipeline

        ctx = pipeline_context({"model": "churn", "pipeline_id": "p-1", "id": "d-1", "urgency": "high",
                                "queue": "training.high"})
        canvas = rest_of_pipeline(ctx)
        steps = canvas.tasks
        assert [(s.task, s.options["task_id"], s.options["queue"]) for s in steps] == [
            ("retrain.pipeline.train", "p-1.train", "training.high"),
            ("retrain.pipeline.gate", "p-1.gate", "gate"),
            ("retrain.pipeline.stage", "p-1.stage", "gate"),
            ("retrain.pipeline.start_rollout", "p-1.start_rollout", "rollout"),
        ]
        assert all(s.options["priority"] == 7 and s.options["ignore_result"] is True for s in steps)
        [errback] = canvas.options["link_error"]  # a chain's link_error goes to each of its steps when sent
        assert errback["task"] == "retrain.pipeline.failed" and errback["args"][0]["pipeline_id"] == "p-1"

    @pytest.mark.slow
    def test_a_first_step_sent_with_the_whole_chain_leaves_the_rest_to_celery(self, start_worker, redis_client, keys,
                                                                              tmp_path):
        """A validate_data message that carries the rest of the chain (how an earlier release sent pipelines)
        does not send the rest a second time: only the chain's own train message goes out."""
        from celery import chain

        from workers.pipeline import tasks
        from workers.pipeline.canvas import pipeline_context

        env = setup_model(tmp_path)
        start_worker("training", env=env)
        ctx = pipeline_context({"model": "churn", "pipeline_id": "p-old", "id": "d-old", "urgency": "high",
                                "queue": "training.high"})
        parked = "rollout"  # no rollout worker runs here: the chain's train message waits there
        chain(tasks.validate_data.si(ctx).set(queue="training.high", task_id="p-old.validate_data"),
              tasks.train.s().set(queue=parked, task_id="p-old.train")).apply_async()
        fields = lambda: {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.pipeline("churn", "p-old")).items()}  # noqa: E731
        wait_for(lambda: fields().get("status") == "done:validate_data", timeout=60, message="validate_data to run")
        def parked_messages():
            return sum(redis_client.llen(k) for k in redis_client.keys(f"{parked}*") if redis_client.type(k) == b"list")

        wait_for(lambda: parked_messages() == 1, timeout=10, message="the chain's own train message")
        time.sleep(3)  # a second train message would go to training.high, where the worker runs it at once
        assert "train_started" not in fields() and fields()["status"] == "done:validate_data"
        assert parked_messages() == 1
