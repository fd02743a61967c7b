"""Prometheus metrics: counters move with the actions, state gauges follow Redis, names are documented."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest

from events.bus import EventBus, StreamConsumer
from events.envelope import new_event
from tests.support import ROOT
from workers import metrics
from workers.decision.service import DecisionService

MODEL = "churn"


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else v


def val(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def documented_names() -> set[str]:
    return set(re.findall(r"``(retrain_[a-z_]+)", metrics.__doc__))


class TestEventCounters:
    def test_lifecycle_events_move_decision_gate_rollback_and_alert_counters(self):
        """Decided/suppressed events count per trigger, gate events per check, rollbacks by kind, alerts by severity."""
        samples = {  # name -> (metric, labels)
            "start_drift": ("retrain_decisions_total", {"action": "start", "trigger": "data_drift"}),
            "start_perf": ("retrain_decisions_total", {"action": "start", "trigger": "performance_drop"}),
            "suppress_none": ("retrain_decisions_total", {"action": "suppress", "trigger": "none"}),
            "regression_fail": ("retrain_gate_checks_total", {"check": "no_regression", "result": "fail"}),
            "latency_pass": ("retrain_gate_checks_total", {"check": "latency", "result": "pass"}),
            "gate_failed": ("retrain_gate_outcomes_total", {"result": "failed"}),
            "gate_passed": ("retrain_gate_outcomes_total", {"result": "passed"}),
            "fail_gate": ("retrain_pipeline_failures_total", {"step": "gate"}),
            "fail_train": ("retrain_pipeline_failures_total", {"step": "train"}),
            "auto": ("retrain_rollbacks_total", {"model": MODEL, "kind": "automatic"}),
            "manual": ("retrain_rollbacks_total", {"model": MODEL, "kind": "manual"}),
            "aborted": ("retrain_rollbacks_total", {"model": MODEL, "kind": "aborted"}),
            "advanced": ("retrain_rollout_transitions_total", {"model": MODEL, "transition": "advanced"}),
            "critical": ("retrain_alerts_total", {"severity": "critical"}),
            "ingested_gate": ("retrain_events_ingested_total", {"type": "gate.failed"}),
        }

        def read() -> dict[str, float]:
            return {name: val(metric, **labels) for name, (metric, labels) in samples.items()}

        before = read()
        events = [
            new_event("retrain.decided", MODEL, {"decision_id": "d-1", "urgency": "high",
                                                 "triggers": ["data_drift", "performance_drop"]}),
            new_event("retrain.suppressed", MODEL, {"decision_id": "d-2", "reason": "cooldown", "triggers": []}),
            new_event("gate.failed", MODEL, {"pipeline_id": "p", "passed": False, "failed_checks": ["no_regression"]}),
            new_event("gate.passed", MODEL, {"pipeline_id": "q", "passed": True, "failed_checks": [],
                                             "checks": [{"name": "latency", "passed": True},
                                                        {"name": "model_size", "passed": True, "skipped": True}]}),
            new_event("training.failed", MODEL, {"pipeline_id": "r", "step": "train", "error": "boom"}),
            new_event("rollout.advanced", MODEL, {"phase": "canary"}),
            new_event("rollout.rolled_back", MODEL, {"reason": "accuracy", "manual": False}),
            new_event("rollout.rolled_back", MODEL, {"reason": "by hand", "manual": True}),
            new_event("rollout.aborted", MODEL, {"reason": "stop", "aborted": True, "manual": True}),
            new_event("alert.raised", MODEL, {"severity": "critical", "title": "rolled back"}),
        ]
        metrics.observe_events(events)
        after = read()
        assert {k: after[k] - before[k] for k in before} == {k: 1.0 for k in before}
        assert val("retrain_gate_checks_total", check="model_size", result="pass") == 0  # skipped checks don't count

    def test_the_decision_worker_counts_each_committed_event_once(self, redis_client, settings, tmp_path):
        """The real decision service counts every event it records once per id (a redelivery is not counted), and its own decisions."""
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / f"{MODEL}.toml").write_text(f'[model]\nname = "{MODEL}"\n[triggers]\ndebounce_quiet = "0s"\n')
        svc = DecisionService(redis_client, settings.model_copy(update={"policy_dir": policies}), "metrics-1",
                              enqueue=lambda record: None)
        svc.consumer.ensure_group()
        before = {t: val("retrain_events_ingested_total", type=t)
                  for t in ("volume.accumulated", "drift.data", "retrain.decided")}
        decided = val("retrain_decisions_total", action="start", trigger="data_drift")
        volumes = [new_event("volume.accumulated", MODEL, {"new_samples": i}) for i in range(3)]
        drift = new_event("drift.data", MODEL, {"drift_score": 0.2, "drifted_features": ["age"]})
        svc.bus.publish_many([*volumes, drift])
        svc.bus.publish(volumes[0])  # redelivered by an at-least-once producer
        for _ in range(4):
            svc.consumer.poll(block_ms=10)
            svc.after_batch()  # decides, publishes retrain.decided; the next poll records it
        after = {t: val("retrain_events_ingested_total", type=t) - before[t] for t in before}
        assert after == {"volume.accumulated": 3, "drift.data": 1, "retrain.decided": 1}
        assert val("retrain_decisions_total", action="start", trigger="data_drift") - decided == 1
        assert svc.consumer.stats.duplicates == 1

    def test_ingest_helper_counts_by_source_and_outcome(self):
        """observe_ingest counts accepted and rejected events by source."""
        acc, rej = (val("retrain_ingest_events_total", source="http", outcome=o) for o in ("accepted", "rejected"))
        metrics.observe_ingest("http", accepted=5, rejected=2)
        assert val("retrain_ingest_events_total", source="http", outcome="accepted") == acc + 5
        assert val("retrain_ingest_events_total", source="http", outcome="rejected") == rej + 2

    def test_router_series_are_left_to_the_router(self):
        """The router's request series live on the router's own /metrics (workers.router.server, tested
        in test_router.py): the worker registry neither defines nor documents a second, unused set."""
        from workers.router import server

        text = generate_latest(REGISTRY).decode()
        assert "retrain_router_" not in text
        assert not {n for n in documented_names() if n.startswith("retrain_router_")}
        assert "workers.router.server" in metrics.__doc__ and "retrain_router_requests_total" in server.__doc__

    def test_pipeline_step_durations_observed_by_the_pipeline_code(self):
        """The pipeline's own _observe hook lands in retrain_pipeline_step_seconds{step}."""
        from workers.pipeline.steps import _observe

        count = val("retrain_pipeline_step_seconds_count", step="train")
        total = val("retrain_pipeline_step_seconds_sum", step="train")
        _observe("train", 1.5)
        assert val("retrain_pipeline_step_seconds_count", step="train") == count + 1
        assert val("retrain_pipeline_step_seconds_sum", step="train") == pytest.approx(total + 1.5)
        assert val("retrain_pipeline_step_seconds_bucket", step="train", le="2.5") >= 1


class TestDeadLetters:
    def test_dead_lettered_entries_count_per_group_and_show_as_backlog(self, redis_client, settings, keys):
        """A malformed entry dead-lettered by a tracked consumer raises the counter and the backlog gauge."""
        group = f"g-{uuid.uuid4().hex[:6]}"
        consumer = StreamConsumer(redis_client, keys, group, "c1", lambda evs, pipe: None, block_ms=10)
        consumer.ensure_group()
        metrics.track_consumer(consumer)
        assert val("retrain_events_dead_lettered_total", group=group) == 0
        bus = EventBus.from_settings(redis_client, settings)
        bus.publish_raw(MODEL, "{not json")
        bus.publish_raw(MODEL, json.dumps({"type": "drift.data"}))
        while consumer.poll(block_ms=10):
            pass
        assert val("retrain_events_dead_lettered_total", group=group) == 2
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_dead_letters") == 2

    def test_entries_trimmed_while_pending_are_counted(self, redis_client, settings, keys):
        """A pending entry whose payload was trimmed away counts in retrain_events_trimmed_total (and is dead-lettered)."""
        group = f"g-{uuid.uuid4().hex[:6]}"
        bus = EventBus.from_settings(redis_client, settings)
        stream = keys.events_for(MODEL)
        redis_client.xgroup_create(stream, group, id="$", mkstream=True)
        entry = bus.publish_raw(MODEL, new_event("volume.accumulated", MODEL, {"new_samples": 1}).to_json())
        redis_client.xreadgroup(group, "c1", {stream: ">"})  # delivered to c1, which then dies
        redis_client.xdel(stream, entry)  # trimmed while pending
        consumer = StreamConsumer(redis_client, keys, group, "c1", lambda evs, pipe: None, block_ms=10)
        consumer.ensure_group()
        metrics.track_consumer(consumer)
        consumer.poll(block_ms=10)
        assert val("retrain_events_trimmed_total", group=group) == 1
        assert any(d.get("entry_id") == _text(entry) for d in bus.dead_letters())


class TestStateGauges:
    def test_stream_lag_age_and_pending_follow_the_decision_group(self, redis_client, keys):
        """Undelivered entries show as lag with the oldest one's age; read but unacked ones move to pending."""
        stream, shard = keys.events_for(MODEL), str(keys.shard_of(MODEL))
        redis_client.xgroup_create(stream, metrics.CONSUMER_GROUP, id="0", mkstream=True)
        old_ms = int(time.time() * 1000) - 30_000
        for i in range(3):
            redis_client.xadd(stream, {"e": "{}"}, id=f"{old_ms + i}-0")
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_stream_length", shard=shard) == 3
        assert val("retrain_stream_lag", shard=shard) == 3 and val("retrain_stream_pending", shard=shard) == 0
        assert 29 <= val("retrain_stream_lag_seconds", shard=shard) < 60
        redis_client.xreadgroup(metrics.CONSUMER_GROUP, "c", {stream: ">"}, count=2)
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_stream_lag", shard=shard) == 1 and val("retrain_stream_pending", shard=shard) == 2
        redis_client.xreadgroup(metrics.CONSUMER_GROUP, "c", {stream: ">"}, count=5)
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_stream_lag", shard=shard) == 0 and val("retrain_stream_lag_seconds", shard=shard) == 0

    def test_fallback_count_matches_redis_lag_and_extrapolates_past_the_cap(self, redis_client):
        """Without XINFO lag, undelivered entries are counted exactly under the cap and estimated above it."""
        stream = f"retrain:test-lag:{uuid.uuid4().hex[:6]}"
        base = 1_700_000_000_000
        for i in range(100):
            redis_client.xadd(stream, {"e": "x"}, id=f"{base + i * 1000}-0")
        redis_client.xgroup_create(stream, "g", id="0")
        redis_client.xreadgroup("g", "c", {stream: ">"}, count=40)
        [info] = redis_client.xinfo_groups(stream)
        last = info["last-delivered-id"].decode()
        count, exact = metrics.count_undelivered(redis_client, stream, last)
        assert exact and count == 60
        if info.get("lag") is not None:  # Redis 7 knows it too
            assert count == info["lag"]
        estimate, exact = metrics.count_undelivered(redis_client, stream, last, cap=10)
        assert not exact and abs(estimate - 60) <= 2

    def test_rollout_traffic_alias_and_slot_gauges(self, redis_client, keys):
        """A canary rollout waiting for evidence shows its phase, status, candidate share, wait, versions and slot."""
        from workers.registry.store import Registry
        from workers.rollout.machine import RolloutState
        from workers.router.traffic import TrafficTable, write_traffic

        now = datetime.now(timezone.utc)
        state = RolloutState(model=MODEL, candidate="5", production="2", started_at=now - timedelta(hours=1),
                             phase_started_at=now - timedelta(minutes=30), phase="canary", phase_index=1,
                             status="canary", waiting_since=now - timedelta(minutes=10),
                             last_analysis={"insufficient_evidence": True, "verdict": "hold", "reasons": []})
        redis_client.hset(keys.rollout(MODEL), mapping={"state": json.dumps(state.to_dict()), "revision": "1"})
        redis_client.sadd(keys.models(), MODEL, "idle")
        write_traffic(redis_client, keys, MODEL, TrafficTable(production="2", candidate="5", candidate_percent=5))
        registry = Registry(redis_client, keys)
        registry.set_alias(MODEL, "production", 2)
        registry.set_alias(MODEL, "candidate", 5)
        redis_client.hset(keys.guard(MODEL), "in_flight", "p-1")
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_rollout_phase", model=MODEL) == 1
        assert val("retrain_rollout_state", model=MODEL, status="canary") == 1
        assert sum(val("retrain_rollout_state", model=MODEL, status=s) for s in metrics.ROLLOUT_STATUSES) == 1
        assert val("retrain_rollout_candidate_percent", model=MODEL) == 5
        assert 590 <= val("retrain_rollout_waiting_seconds", model=MODEL) < 700
        assert val("retrain_model_version", model=MODEL, alias="production") == 2
        assert val("retrain_model_version", model=MODEL, alias="candidate") == 5
        assert val("retrain_pipeline_in_flight", model=MODEL) == 1
        assert val("retrain_rollout_phase", model="idle") == -1
        assert val("retrain_rollout_state", model="idle", status="none") == 1
        # The rollout ends: the gauges follow on the next refresh.
        state.status, state.waiting_since = "completed", None
        redis_client.hset(keys.rollout(MODEL), mapping={"state": json.dumps(state.to_dict()), "revision": "2"})
        redis_client.hdel(keys.guard(MODEL), "in_flight")
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_rollout_phase", model=MODEL) == -1
        assert val("retrain_rollout_state", model=MODEL, status="completed") == 1
        assert val("retrain_rollout_state", model=MODEL, status="canary") == 0
        assert val("retrain_rollout_waiting_seconds", model=MODEL) == 0
        assert val("retrain_pipeline_in_flight", model=MODEL) == 0

    def test_queue_length_sums_kombu_priority_lists(self, redis_client, keys):
        """Messages in a queue's plain and priority lists add up in retrain_queue_length{queue}."""
        redis_client.lpush("training.low", "a", "b")
        redis_client.lpush("training.low\x06\x163", "c")
        metrics.collect_from_redis(redis_client, keys)
        assert val("retrain_queue_length", queue="training.low") == 3
        assert val("retrain_queue_length", queue="gate") == 0


class TestExposition:
    def test_every_documented_name_is_exposed_and_every_exposed_name_documented(self, redis_client, keys):
        """The exposition text carries each name the module documents, and nothing undocumented with the prefix."""
        metrics.collect_from_redis(redis_client, keys)
        text = generate_latest(REGISTRY).decode()
        exposed = {n for n in re.findall(r"^# TYPE (retrain_[a-z_]+) ", text, flags=re.M)
                   if not n.endswith("_created")}  # prometheus_client's creation-time series
        documented = documented_names()
        assert len(documented) >= 25
        assert documented == exposed, documented ^ exposed

    def test_server_refreshes_state_on_each_scrape(self, redis_client, settings, keys):
        """The metrics server answers /metrics and re-reads Redis per scrape (new events show as lag)."""
        server = metrics.start_metrics_server(0, "127.0.0.1", client=redis_client, keys=keys, min_refresh_s=0)
        try:
            shard = keys.shard_of(MODEL)
            first = httpx.get(server.url, timeout=10)
            assert first.status_code == 200 and "retrain_events_ingested_total" in first.text
            line = f'retrain_stream_lag{{shard="{shard}"}}'
            assert f"{line} 0.0" in first.text
            EventBus.from_settings(redis_client, settings).publish_many(
                [new_event("schedule.tick", MODEL, {}) for _ in range(2)])
            second = httpx.get(server.url, timeout=10)
            assert f"{line} 2.0" in second.text
        finally:
            server.shutdown()

    def test_server_from_env_only_when_the_port_is_set(self, redis_server):
        """start_metrics_server_from_env does nothing without RETRAIN_METRICS_PORT and serves when it is set."""
        assert metrics.start_metrics_server_from_env({}) is None
        server = metrics.start_metrics_server_from_env({"RETRAIN_METRICS_PORT": "0",
                                                        "RETRAIN_METRICS_ADDR": "127.0.0.1"})
        try:
            assert server is not None and httpx.get(server.url, timeout=10).status_code == 200
        finally:
            server.shutdown()

    def test_prefork_children_are_aggregated_in_multiprocess_mode(self, tmp_path):
        """With PROMETHEUS_MULTIPROC_DIR, a step timed in a forked child shows on the parent's server."""
        script = textwrap.dedent("""
            import multiprocessing, sys, httpx
            from workers import metrics
            def child():
                metrics.PIPELINE_STEP_SECONDS.labels(step="gate").observe(2.0)
                event = {"type": "gate.failed", "subject": "m", "data": {"failed_checks": ["latency"]}}
                metrics.observe_events([event])
            p = multiprocessing.get_context("fork").Process(target=child)
            p.start(); p.join()
            server = metrics.start_metrics_server(0, "127.0.0.1", redis_state=False)
            print(httpx.get(server.url, timeout=10).text)
            server.shutdown()
        """)
        env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert 'retrain_pipeline_step_seconds_count{step="gate"} 1.0' in out.stdout
        assert 'retrain_gate_checks_total{check="latency",result="fail"} 1.0' in out.stdout
