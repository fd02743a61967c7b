"""The decision worker around the pure policy: state in Redis, guards, records, real Celery enqueue."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

from config.settings import Settings
from events.bus import EventBus
from events.envelope import new_event
from tests.support import ROOT, retrain_cli, wait_for
from workers.decision.service import OUTBOX_GRACE_S, DecisionService

POLICY = """
[model]
name = "{name}"
task = "binary"
target = "y"

[triggers]
drift_threshold = 0.15
debounce_quiet = "{quiet}"
debounce_max_wait = "{max_wait}"
cooldown = "{cooldown}"
max_trainings_per_day = {budget}
"""


def write_policy(folder, name="churn", quiet="0s", max_wait="5m", cooldown="6h", budget=4):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(POLICY.format(name=name, quiet=quiet, max_wait=max_wait,
                                                       cooldown=cooldown, budget=budget))
    return folder


def queued(client, queue: str) -> int:
    return sum(client.llen(k) for k in client.keys(f"{queue}*") if client.type(k) == b"list")


@pytest.fixture
def make_service(redis_client, redis_server, tmp_path):
    def _make(name="worker-1", **policy):
        folder = write_policy(tmp_path / "policies", **policy)
        s = Settings(redis_url=redis_server.url, policy_dir=folder, state_dir=tmp_path / "state")
        svc = DecisionService(redis_client, s, name)
        svc.consumer.ensure_group()
        svc.consumer.block_ms = 10
        return svc
    return _make


@contextmanager
def running(svc):
    """``svc.run()`` (what the bootstep runs) on a thread of its own; stopped and joined on the way out."""
    import threading

    runner = threading.Thread(target=svc.run, daemon=True)
    runner.start()
    try:
        yield runner
    finally:
        svc.stop()
        runner.join(60)
    assert not runner.is_alive()


def step(svc, rounds=5):
    for _ in range(rounds):
        svc.consumer.poll(block_ms=10)
        svc.after_batch()


def drift(model="churn", score=0.2, **kw):
    return new_event("drift.data", model, {"drift_score": score, "drifted_features": ["age"]}, **kw)


def records(svc, model="churn"):
    return svc.store.recent_records(model, 100)


class TestDecisions:
    def test_drift_over_threshold_starts_one_pipeline_with_a_record(self, make_service, redis_client):
        """A drift signal over threshold writes a 'start' record with reasons and enqueues one pipeline on training.low."""
        svc = make_service()
        ev = drift(score=0.2)
        svc.bus.publish(ev)
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start" and rec["urgency"] == "medium"
        assert rec["event_ids"] == [ev.id]
        fired = {t["name"]: t for t in rec["triggers"] if t["triggered"]}
        assert set(fired) == {"data_drift"} and fired["data_drift"]["threshold"] == 0.15
        assert queued(redis_client, "training.low") == 1 and queued(redis_client, "training.high") == 0
        assert redis_client.hget(svc.keys.guard("churn"), "in_flight").decode() == rec["pipeline_id"]
        history = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(svc.keys.history("churn"))]
        step(svc)  # the decided event comes back through the stream into the model's history
        history = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(svc.keys.history("churn"))]
        assert history == ["drift.data", "retrain.decided"]

    def test_high_urgency_goes_to_training_high(self, make_service, redis_client):
        """Drift at or above 0.3 is high urgency and is enqueued on training.high."""
        svc = make_service()
        svc.bus.publish(drift(score=0.5))
        step(svc)
        assert queued(redis_client, "training.high") == 1

    def test_pipeline_message_names_its_pipeline_and_sends_no_task_sent_event(self, make_service, redis_client):
        """The queued message is the first step alone, with the failure handler; it shows model, pipeline and
        decision (not a repr of the context); one publish per enqueue; it is sent with ignore_result, so the
        enqueuer subscribes to no result channel."""
        svc = make_service()
        pubsub = redis_client.pubsub()
        pubsub.psubscribe("*celeryev*")  # where kombu's Redis transport publishes Celery events
        pubsub.get_message(timeout=1)
        svc.bus.publish(drift(score=0.5))
        step(svc)
        [rec] = records(svc)
        [key] = [k for k in redis_client.keys("training.high*") if redis_client.type(k) == b"list"]
        headers = json.loads(redis_client.lindex(key, 0))["headers"]
        assert headers["id"] == f"{rec['pipeline_id']}.validate_data"
        assert headers["argsrepr"] == (f"(model='churn', pipeline_id={rec['pipeline_id']!r}, "
                                       f"decision_id={rec['id']!r})")
        assert headers["kwargsrepr"] == "{}"
        assert headers["ignore_result"] is True
        body = json.loads(base64.b64decode(json.loads(redis_client.lindex(key, 0))["body"]))
        assert body[2]["chain"] is None  # the first step sends the rest (workers.pipeline.canvas)
        [errback] = body[2]["errbacks"]
        assert errback["task"] == "retrain.pipeline.failed" and errback["args"][0]["pipeline_id"] == rec["pipeline_id"]
        assert redis_client.pubsub_numsub(f"celery-task-meta-{headers['id']}") == [
            (f"celery-task-meta-{headers['id']}".encode(), 0)]
        sent = [m for m in iter(lambda: pubsub.get_message(timeout=0.2), None) if m["type"] == "pmessage"]
        assert not [m for m in sent if m["channel"].endswith(b"task.sent")]
        pubsub.close()

    def test_drift_persistence_reads_the_last_n_scores_from_redis(self, make_service, redis_client, tmp_path):
        """k=2 of n=3: a drift over threshold fires only when another of the last three was over it too."""
        svc = make_service()
        policy = tmp_path / "policies" / "churn.toml"
        policy.write_text(policy.read_text().replace("drift_threshold = 0.15",
                                                     "drift_threshold = 0.15\ndrift_persistence_k = 2\n"
                                                     "drift_persistence_n = 3"))
        svc.policies._scan(force=True)
        for score in (0.2, 0.05, 0.05, 0.2):  # the earlier 0.2 is 4th from last: outside the window
            svc.bus.publish(drift(score=score))
            step(svc, 2)
        assert [r["action"] for r in records(svc)] == ["suppress", "suppress"]
        assert "held in only 1 of the last 3" in records(svc)[0]["reason"]
        svc.bus.publish(drift(score=0.05))
        step(svc, 2)
        svc.bus.publish(drift(score=0.2))  # last three: 0.2, 0.05, 0.2
        step(svc, 2)
        newest = records(svc)[0]
        assert newest["action"] == "start" and "in 2 of the last 3 observations" in newest["reason"]

    def test_below_threshold_writes_no_record_and_clears_pending(self, make_service, redis_client):
        """A signal that fires nothing leaves no decision record and no pending state."""
        svc = make_service()
        svc.bus.publish(drift(score=0.05))
        step(svc)
        assert records(svc) == []
        assert redis_client.llen(svc.keys.pending_events("churn")) == 0
        assert redis_client.zcard(svc.keys.due()) == 0

    def test_debounce_collapses_a_burst_into_one_decision(self, make_service, redis_client):
        """Twenty drift signals within the quiet period become one decision listing all twenty events."""
        svc = make_service(quiet="1s", max_wait="30s")
        events = [drift(score=0.16 + i / 1000) for i in range(20)]
        for e in events:
            svc.bus.publish(e)
            step(svc, 1)
        assert records(svc) == []
        time.sleep(1.1)
        step(svc, 2)
        [rec] = records(svc)
        assert rec["action"] == "start" and sorted(rec["event_ids"]) == sorted(e.id for e in events)

    def test_debounce_max_wait_decides_during_a_continuous_stream(self, make_service):
        """Signals that never go quiet are still decided once the first is max_wait old."""
        svc = make_service(quiet="10s", max_wait="1s")
        svc.bus.publish(drift())
        step(svc, 1)
        deadline = time.time() + 1.5
        while time.time() < deadline:
            svc.bus.publish(drift())
            step(svc, 1)
            time.sleep(0.1)
        assert [r["action"] for r in records(svc)] == ["start"]

    def test_cooldown_suppresses_medium_and_high_overrides(self, make_service, redis_client):
        """After a training, a medium trigger is suppressed by the cooldown; a high one passes."""
        svc = make_service(cooldown="1h")
        svc.bus.publish(drift(score=0.2))
        step(svc)
        first = records(svc)[0]
        svc.store.release("churn", first["pipeline_id"])
        svc.bus.publish(drift(score=0.25))
        step(svc)
        latest = records(svc)[0]
        assert latest["action"] == "suppress" and latest["guard"] == "cooldown"
        assert "cooldown" in latest["reason"]
        svc.bus.publish(drift(score=0.4))
        step(svc)
        assert records(svc)[0]["action"] == "start" and records(svc)[0]["urgency"] == "high"

    def test_budget_limits_trainings_per_day(self, make_service):
        """With a budget of one training a day, a second high-urgency trigger is suppressed by the budget."""
        svc = make_service(budget=1, cooldown="0s")
        svc.bus.publish(drift(score=0.5))
        step(svc)
        svc.store.release("churn", records(svc)[0]["pipeline_id"])
        svc.bus.publish(drift(score=0.6))
        step(svc)
        latest = records(svc)[0]
        assert latest["action"] == "suppress" and latest["guard"] == "budget"

    def test_single_flight_coalesces_into_one_follow_up(self, make_service, redis_client):
        """Triggers during a running pipeline become exactly one follow-up decision after it ends."""
        svc = make_service(cooldown="0s")
        svc.bus.publish(drift(score=0.5))
        step(svc)
        running = records(svc)[0]["pipeline_id"]
        for score in (0.5, 0.6, 0.7):
            svc.bus.publish(drift(score=score))
            step(svc)
        assert len(records(svc)) == 1
        assert redis_client.hget(svc.keys.guard("churn"), "follow_up") == b"1"
        assert svc.store.release("churn", "p-someone-else") == 0
        assert svc.store.release("churn", running) == 2
        step(svc)
        recs = records(svc)
        assert len(recs) == 2 and recs[0]["action"] == "start" and len(recs[0]["event_ids"]) == 3
        assert queued(redis_client, "training.high") == 2

    def test_a_long_follow_up_list_is_read_newest_first_and_bounded_but_consumed_whole(
            self, make_service, redis_client, redis_server):
        """While a pipeline is in flight its model's signals stay pending; each evaluation meanwhile reads
        only the newest PENDING_READ entries (plus the list's length and first entry: the debounce window), so
        it costs the same however long the list grows. The follow-up's record lists the newest ids and counts
        all of them, explain says how many it leaves out, and the follow-up consumes the whole list."""
        from workers.decision.state import PENDING_READ, parse_pending_entry

        svc = make_service(cooldown="0s")
        svc.bus.publish(drift(score=0.5))
        step(svc)
        running = records(svc)[0]["pipeline_id"]
        extra = 30
        burst = [drift(score=0.5 + i / 1000) for i in range(PENDING_READ + extra)]
        svc.bus.publish_many(burst[:extra])
        step(svc)  # a first evaluation: deferred for the follow-up
        svc.bus.publish_many(burst[extra:])
        step(svc)
        assert len(records(svc)) == 1
        key = svc.keys.pending_events("churn")
        assert redis_client.llen(key) == PENDING_READ + extra
        [state] = svc.store.load(["churn"]).values()
        assert state.pending_count == PENDING_READ + extra and len(state.pending_entries) == PENDING_READ
        assert state.pending_ids == [e.id for e in burst[extra:]]
        assert state.pending_since == parse_pending_entry(redis_client.lindex(key, 0))[1]  # the first, not read
        assert state.pending_until == parse_pending_entry(redis_client.lindex(key, -1))[1]
        assert state.pending_since < state.pending_until
        assert svc.store.release("churn", running) == 2
        step(svc)
        follow_up = records(svc)[0]
        assert follow_up["action"] == "start" and follow_up["event_count"] == PENDING_READ + extra
        assert follow_up["event_ids"] == [e.id for e in burst[extra:]]
        assert redis_client.llen(key) == 0
        out = retrain_cli("explain", follow_up["id"], redis_url=redis_server.url)
        assert out.returncode == 0, out.stderr
        assert f"the newest {PENDING_READ}; {extra} earlier not listed" in " ".join(out.stdout.split())

    def test_measurements_the_worker_cannot_judge_start_nothing(self, make_service, redis_client):
        """An error metric measured with no baseline anywhere (it read as a drop from the default 1.0 to -3.2: a high
        start on every measurement), and concept drift measured as JS under the policy's PSI threshold."""
        svc = make_service()
        svc.bus.publish(new_event("performance.measured", "churn",
                                  {"metric": "rmse", "value": 3.2, "higher_is_better": False, "n_labeled": 5000}))
        svc.bus.publish(new_event("drift.concept", "churn", {"value": 0.25, "metric": "js"}))
        step(svc)
        assert [r for r in records(svc) if r["action"] == "start"] == []
        assert queued(redis_client, "training.high") + queued(redis_client, "training.low") == 0
        [state] = svc.store.load(["churn"]).values()
        from datetime import datetime, timezone

        from workers.decision.policy import evaluate
        decision = evaluate(svc.policies.get("churn"), state.model_signals(datetime.now(timezone.utc)))
        assert "no baseline" in decision.trigger("performance_drop").reason
        assert "not judged" in decision.trigger("concept_drift").reason

    def test_a_start_records_the_feature_version_it_trains_on(self, make_service, redis_client):
        """The announced feature-store version goes into the start record, which the pipeline stores with the model
        version: without it every version had none, and a later version change could never fire."""
        svc = make_service()
        svc.bus.publish(new_event("upstream.changed", "churn", {"feature_version": "v2", "breaking": False}))
        svc.bus.publish(drift(score=0.5))
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start" and rec["feature_version"] == "v2"

    def test_breaking_upstream_change_alerts_and_does_not_train(self, make_service, redis_client):
        """A removed feature is breaking: the decision is suppressed with the reason and an alert is raised."""
        svc = make_service()
        svc.bus.publish(new_event("upstream.changed", "churn", {"removed": ["age"], "breaking": True}))
        svc.bus.publish(drift(score=0.5))
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "suppress" and "breaking upstream change" in rec["reason"]
        assert queued(redis_client, "training.high") + queued(redis_client, "training.low") == 0
        alerts = redis_client.lrange(svc.keys.alerts("churn"), 0, -1)
        assert len(alerts) == 1 and json.loads(alerts[0])["data"]["severity"] == "critical"

    def test_manual_request_is_critical_and_one_shot(self, make_service, redis_client):
        """A manual request starts a critical pipeline at once and is consumed by that decision."""
        svc = make_service(quiet="1h")
        svc.bus.publish(new_event("retrain.requested", "churn", {"reason": "new labels", "requested_by": "ana"}))
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start" and rec["urgency"] == "critical"
        assert not redis_client.hexists(svc.keys.signals("churn"), "retrain.requested")

    def test_model_without_policy_is_suppressed_with_the_reason(self, make_service):
        """Signals for a model with no policy produce a suppressed record saying so."""
        svc = make_service()
        svc.bus.publish(drift(model="unknown-model", score=0.9))
        step(svc)
        [rec] = records(svc, "unknown-model")
        assert rec["action"] == "suppress" and "no policy" in rec["reason"]


class TestWarmUp:
    WARM_UP = ("import gc; from workers.decision.service import DecisionService; "
               "DecisionService.from_settings('warm-up-test').warm_up(); print(gc.get_freeze_count())")

    def test_warm_up_declares_the_pipeline_queues_and_freezes_the_heap(self, redis_server, redis_client):
        """A fresh service's warm-up declares the training queues on the broker and moves its heap out of the collector's reach."""
        for key in redis_client.keys("_kombu.binding*"):
            redis_client.delete(key)
        # The loop's own warm-up (no relay process: then the loop enqueues and loads Celery itself).
        env = {**os.environ, "RETRAIN_REDIS_URL": redis_server.url, "RETRAIN_DECISION_ENQUEUE_RELAY": "false"}
        out = subprocess.run([sys.executable, "-c", self.WARM_UP], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.split()[-1]) > 10_000  # Celery, the tasks and what they import
        bound = {m.split(b"\x06\x16")[-1] for m in redis_client.smembers("_kombu.binding.decision")}
        assert {b"training.high", b"training.low", b"gate", b"rollout"} <= bound


class TestEnqueueOutbox:
    def test_a_broker_error_keeps_the_decision_and_a_later_round_enqueues_it(self, make_service, redis_client, keys):
        """Enqueue fails: the slot and an outbox entry stay (no lost retrain, no second decision); the replay enqueues the real chain once."""
        from workers.decision.relay import celery_enqueue
        from workers.decision.service import OUTBOX_GRACE_S

        svc = make_service()
        broker = {"up": False}

        def enqueue(record):
            if not broker["up"]:
                raise ConnectionError("broker unreachable")
            celery_enqueue(record)

        svc.enqueue = enqueue
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start" and queued(redis_client, "training.low") == 0
        assert redis_client.hget(keys.guard("churn"), "in_flight").decode() == rec["pipeline_id"]
        assert set(svc.store.outbox()) == {rec["pipeline_id"]}
        later = time.time() + OUTBOX_GRACE_S + 1
        assert svc.replay_outbox(later) == 0  # still down: kept
        broker["up"] = True
        svc._last_replay = 0.0
        assert svc.replay_outbox(later) == 1
        assert queued(redis_client, "training.low") == 1 and svc.store.outbox() == {}
        assert redis_client.hget(keys.pipeline("churn", rec["pipeline_id"]), "status") == b"enqueued"
        svc._last_replay = 0.0
        assert svc.replay_outbox(later + 60) == 0 and queued(redis_client, "training.low") == 1

    def test_a_worker_that_dies_after_deciding_is_replayed_by_another(self, make_service, redis_client, keys):
        """The decision committed, then the worker died before enqueueing: another service enqueues it and publishes its retrain.decided once."""
        from workers.decision.service import OUTBOX_GRACE_S

        class Died(BaseException):
            pass

        dying = make_service("worker-1")
        dying.enqueue = lambda record: (_ for _ in ()).throw(Died())
        dying.bus.publish(drift(score=0.2))
        dying.consumer.poll(block_ms=10)
        with pytest.raises(Died):
            dying.after_batch()
        [rec] = records(dying)
        other = make_service("worker-2")
        assert other.replay_outbox(time.time()) == 0  # too young: its own worker may still be at it
        other._last_replay = 0.0
        assert other.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        assert queued(redis_client, "training.low") == 1 and other.store.outbox() == {}
        other.bus.publish(other._event("retrain.decided", rec))  # a replay of the event is a duplicate
        step(other)
        types = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(keys.history("churn"))]
        assert types.count("retrain.decided") == 1

    def test_a_slot_taken_meanwhile_turns_the_start_into_a_suppression(self, make_service, redis_client, keys):
        """If another pipeline took the slot after this worker loaded the state (its lock expired), nothing is enqueued and the record says why."""
        svc = make_service()
        svc.bus.publish(drift(score=0.2))
        svc.consumer.poll(block_ms=10)
        now = time.time()
        lease, states = svc.store.claim_and_load(["churn"], 30, now)
        redis_client.hset(keys.guard("churn"), "in_flight", "p-other-worker")
        svc._evaluate(states, now, lease=lease)
        [rec] = records(svc)
        assert rec["action"] == "suppress" and "another decision worker" in rec["reason"] and rec["pipeline_id"] is None
        assert redis_client.hget(keys.guard("churn"), "in_flight") == b"p-other-worker"
        assert queued(redis_client, "training.low") == 0 and svc.store.outbox() == {}

    def test_a_step_status_is_not_overwritten_by_enqueued(self, make_service, redis_client, keys):
        """A fast worker may mark the pipeline running before the enqueue returns; 'enqueued' never overwrites it."""
        svc = make_service()

        def enqueue(record):
            redis_client.hset(keys.pipeline(record["model"], record["pipeline_id"]), "status", "running:validate_data")

        svc.enqueue = enqueue
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        fields = redis_client.hgetall(keys.pipeline("churn", rec["pipeline_id"]))
        assert fields[b"status"] == b"running:validate_data" and b"enqueued_at" in fields


class TestDecisionAlerts:
    """A decision's alert: its event is written with the record, and its webhook is posted once, even when the
    worker dies between the commit and the post."""

    @pytest.fixture
    def hook(self):
        import threading
        from http.server import HTTPServer

        from tests.test_registry_and_failures import _Hook

        server = HTTPServer(("127.0.0.1", 0), _Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        _Hook.received.clear()
        yield f"http://127.0.0.1:{server.server_port}/hook", _Hook.received
        server.shutdown()

    def breaking_change(self, redis_client, redis_server, tmp_path, url):
        s = Settings(redis_url=redis_server.url, policy_dir=write_policy(tmp_path / "policies"),
                     state_dir=tmp_path / "state", alert_webhook_url=url)
        svc = DecisionService(redis_client, s, "worker-1")
        svc.consumer.ensure_group()
        svc.bus.publish(new_event("upstream.changed", "churn", {"removed": ["age"], "breaking": True}))
        svc.bus.publish(drift(score=0.5))
        svc.consumer.poll(block_ms=10)
        return svc

    def logged(self, redis_client, svc) -> list[str]:
        return [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(svc.keys.events_for("churn"))]

    def test_the_alert_is_posted_once_and_leaves_the_outbox(self, redis_client, redis_server, tmp_path, hook):
        url, received = hook
        svc = self.breaking_change(redis_client, redis_server, tmp_path, url)
        svc.after_batch()
        wait_for(lambda: received and not redis_client.exists(svc.keys.alert_webhook_outbox()),
                 message="the post, and the alert out of the webhook outbox")
        [body] = received
        assert body["alert"]["data"]["severity"] == "critical" and "age" in body["alert"]["data"]["message"]
        assert {"retrain.suppressed", "alert.raised"} <= set(self.logged(redis_client, svc))
        svc._last_replay = 0.0
        svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1)
        assert len(received) == 1

    def test_a_worker_that_dies_after_the_commit_loses_neither_the_events_nor_the_post(
            self, redis_client, redis_server, tmp_path, hook, monkeypatch):
        """Dying right after the commit (before any post): the suppression and the alert are in the model's log
        already, the alert waits in the webhook outbox, and the outbox replay posts it, once."""
        class Died(Exception):
            pass

        url, received = hook
        svc = self.breaking_change(redis_client, redis_server, tmp_path, url)
        alerts_key, new_pipeline = svc.keys.alerts("churn"), redis_client.pipeline

        def pipeline(*args, **kwargs):  # the transaction that records the alert commits, then the process is gone
            pipe = new_pipeline(*args, **kwargs)
            execute = pipe.execute

            def execute_and_die(*a, **k):
                alerting = any(cmd[0][1:2] == (alerts_key,) for cmd in pipe.command_stack)
                result = execute(*a, **k)
                if alerting:
                    raise Died("the worker process is gone")
                return result

            pipe.execute = execute_and_die
            return pipe

        monkeypatch.setattr(redis_client, "pipeline", pipeline)
        with pytest.raises(Died):
            svc.after_batch()
        monkeypatch.undo()
        [rec] = records(svc)
        assert rec["action"] == "suppress"
        assert {"retrain.suppressed", "alert.raised"} <= set(self.logged(redis_client, svc))
        outbox = svc.keys.alert_webhook_outbox()
        [alert_id] = [a.decode() for a in redis_client.hkeys(outbox)]
        assert received == []

        def replay(after_s: float) -> None:
            svc._last_replay = 0.0
            svc.replay_outbox(time.time() + after_s)

        replay(1)  # within the grace period: its own worker may still be posting it
        time.sleep(0.3)
        assert received == [] and redis_client.hlen(outbox) == 1
        redis_client.set(svc.keys.alert_sent(alert_id), "sending", ex=60)  # another run is posting it
        replay(OUTBOX_GRACE_S + 1)
        time.sleep(0.3)
        assert received == [] and redis_client.hlen(outbox) == 1  # left to that run (or to its claim's expiry)
        redis_client.delete(svc.keys.alert_sent(alert_id))  # that run died mid-post: its claim expired
        replay(OUTBOX_GRACE_S + 1)
        wait_for(lambda: received and not redis_client.exists(outbox), message="the replayed post")
        assert len(received) == 1 and received[0]["alert"]["id"] == alert_id
        assert redis_client.get(svc.keys.alert_sent(alert_id)) == b"sent"
        redis_client.hset(outbox, alert_id, json.dumps(received[0]["alert"]))  # as if left by a worker that died
        replay(OUTBOX_GRACE_S + 1)  # ... after the post: marked sent, so taken out without a second post
        wait_for(lambda: not redis_client.exists(outbox), message="the sent alert out of the outbox")
        assert len(received) == 1

    def test_a_suppression_whose_reason_is_over_the_event_size_still_decides(self, make_service, redis_client):
        """A breaking change that removes 4,500 columns: the record keeps the whole reason, its event a cut one,
        and the round commits (an event over the bus's size limit would have stopped every decision)."""
        svc = make_service()
        removed = [f"c{i}" for i in range(4500)]
        svc.bus.publish(new_event("upstream.changed", "churn", {"removed": removed, "breaking": True}))
        svc.bus.publish(drift(score=0.5))
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "suppress" and removed[-1] in rec["reason"]
        assert len(rec["reason"]) > svc.bus.max_event_bytes  # the whole reason would not fit an event
        [event] = [json.loads(f[b"e"]) for _, f in redis_client.xrange(svc.keys.events_for("churn"))
                   if json.loads(f[b"e"])["type"] == "retrain.suppressed"]
        assert event["data"]["decision_id"] == rec["id"] and rec["reason"].startswith(event["data"]["reason"])


class TestStaleSlot:
    @pytest.mark.parametrize("rollout_active, cleared", [(False, True), (True, False)])
    def test_an_old_slot_is_stale_only_without_an_active_rollout(self, make_service, redis_client, keys,
                                                                 rollout_active, cleared):
        """A slot held for more than 6 h is taken back, unless the model has a rollout in progress (paused ones too)."""
        from workers.decision.service import STALE_IN_FLIGHT_S

        svc = make_service(cooldown="0s")
        old = time.time() - STALE_IN_FLIGHT_S - 60
        redis_client.hset(keys.guard("churn"), mapping={"in_flight": "p-old", "in_flight_since": f"{old:.6f}"})
        if rollout_active:
            redis_client.sadd(keys.active_rollouts(), "churn")
        svc.bus.publish(drift(score=0.5))
        step(svc)
        [rec] = records(svc) or [None]

        def in_flight():
            return redis_client.hget(keys.guard("churn"), "in_flight").decode()

        if cleared:
            assert rec["action"] == "start" and in_flight() == rec["pipeline_id"]
        else:
            assert rec is None and in_flight() == "p-old"
            assert redis_client.hget(keys.guard("churn"), "follow_up") == b"1"


class TestRetention:
    def test_housekeeping_deletes_decision_records_past_their_retention(self, make_service, redis_client, keys):
        """Records older than decision_retention (90 days) go with their index entries; newer ones stay and still explain."""
        from workers.tasks import housekeeping

        svc = make_service()
        now = time.time()
        pipe = redis_client.pipeline(transaction=True)
        for i, age_days in enumerate((200, 91, 89, 1)):
            svc.store.write_record(pipe, {"id": f"d-{i}", "model": "churn", "timestamp": now - age_days * 86400,
                                          "action": "suppress"})
        redis_client.sadd(keys.models(), "churn")
        pipe.execute()
        assert housekeeping()["decision_records_deleted"] == 2
        assert [svc.store.get_record(f"d-{i}") is not None for i in range(4)] == [False, False, True, True]
        assert redis_client.zcard(keys.decisions("churn")) == 2 and redis_client.hlen(keys.decision_index()) == 2
        assert housekeeping()["decision_records_deleted"] == 0


class TestBrokenState:
    def test_a_model_whose_state_cannot_be_read_is_retried_alone_with_one_alert(self, make_service, redis_client, keys):
        """Bad JSON in one model's production record and a wrong-type key in another: the healthy model is decided, the two are retried later with one alert each, and decided once fixed."""
        svc = make_service()
        for model in ("bad-json", "wrong-type"):
            write_policy(svc.settings.policy_dir, name=model)
        redis_client.hset(keys.aliases("bad-json"), "production", "3")
        redis_client.hset(keys.versions("bad-json"), "3", "{not json")
        svc.bus.publish_many([drift("bad-json", 0.4), drift("wrong-type", 0.4), drift("churn", 0.4)])
        svc.consumer.poll(block_ms=10)
        redis_client.delete(keys.trainings("wrong-type"))
        redis_client.set(keys.trainings("wrong-type"), "corrupted")
        now = time.time()
        svc.evaluate_due(now)
        assert records(svc)[0]["action"] == "start"
        errors = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.evaluation_errors()).items()}
        assert set(errors) == {"bad-json", "wrong-type"}
        assert "JSONDecodeError" in errors["bad-json"]
        assert keys.trainings("wrong-type") in errors["wrong-type"] and "WRONGTYPE" in errors["wrong-type"]
        for model in ("bad-json", "wrong-type"):
            assert redis_client.zscore(keys.due(), model) == pytest.approx(now + 60, abs=1)
            assert redis_client.llen(keys.pending_events(model)) == 1  # the signal is kept for the retry
            assert not records(svc, model)
        svc.evaluate_due(now + 61)  # still broken: retried, no second alert
        assert [redis_client.llen(keys.alerts(m)) for m in ("bad-json", "wrong-type")] == [1, 1]
        redis_client.hset(keys.versions("bad-json"), "3", json.dumps({"version": 3}))
        redis_client.delete(keys.trainings("wrong-type"))
        svc.evaluate_due(now + 122)
        assert [records(svc, m)[0]["action"] for m in ("bad-json", "wrong-type")] == ["start", "start"]
        assert not redis_client.exists(keys.evaluation_errors())

    def test_run_evaluates_on_its_own_thread_and_a_failing_round_does_not_stop_it(self, make_service):
        """run(): the consumer cues rounds that an evaluator thread runs; a round that raises is logged,
        the next cue runs the next one; stop() ends both threads."""
        import threading

        svc = make_service()
        real = svc.after_batch
        calls = {"n": 0, "threads": set()}

        def flaky():
            calls["n"] += 1
            calls["threads"].add(threading.current_thread().name)
            if calls["n"] == 1:
                raise RuntimeError("a bug in one round")
            real()

        svc.after_batch = flaky
        with running(svc):
            svc.bus.publish(drift(score=0.4))
            wait_for(lambda: records(svc), timeout=30, message="a decision from the evaluator thread")
            assert calls["n"] > 1 and calls["threads"] == {"decision-evaluator"}
        assert not any(t.name == "decision-evaluator" for t in threading.enumerate())

    def test_the_consumer_loop_survives_an_error_after_a_batch(self, make_service, redis_client):
        """An unexpected error in the after-batch evaluation is logged and the loop goes on consuming."""
        import threading

        svc = make_service()
        calls = {"n": 0}
        evaluate = svc.after_batch

        def flaky():
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("a bug in one round")
            evaluate()

        thread = threading.Thread(target=svc.consumer.run, kwargs={"idle_callback": flaky}, daemon=True)
        thread.start()
        try:
            svc.bus.publish(drift(score=0.4))
            wait_for(lambda: records(svc), timeout=10)
            assert calls["n"] > 1 and thread.is_alive()
        finally:
            svc.stop()
            thread.join(5)


def _model_state(client, keys, model):
    """The recorded per-model state, without the times that depend on when it was written."""
    pending = client.lrange(keys.pending_events(model), 0, -1)
    return {
        "signals": {k: json.loads(v)["data"] for k, v in client.hgetall(keys.signals(model)).items()},
        "drift": client.lrange(keys.drift_history(model), 0, -1),
        "pending": [entry.split(b" ", 1)[1] for entry in pending],
        "history": [json.loads(f[b"e"])["id"] for _, f in client.xrange(keys.history(model))],
        "stamped": all(float(entry.split(b" ", 1)[0]) > 0 for entry in pending),  # when each was recorded
    }


class TestBatchRecording:
    def test_pending_entries_give_the_ids_and_the_debounce_window(self):
        """Each pending entry is "<recorded at> <event id>": its id and the time it was recorded; an entry without a
        time (an older layout) is an id whose time is unknown."""
        from workers.decision.state import parse_pending_entry, pending_entry

        entries = [pending_entry("100.500000", "e-1").encode(), pending_entry("103.000000", "e 2"), b"legacy-id"]
        assert [parse_pending_entry(e) for e in entries] == [("e-1", 100.5), ("e 2", 103.0), ("legacy-id", None)]
        # bare ids that read as numbers are ids, not times (one would be 1970, another past year 9999)
        assert [parse_pending_entry(e) for e in [b"1001", b"8e12", b"inf x", b"nan y"]] == [
            ("1001", None), ("8e12", None), ("inf x", None), ("nan y", None)]

    def test_the_debounce_window_comes_from_the_first_and_last_entries(self):
        """The window is the first entry's time to the newest's, each parsed alone; a first entry without a time
        (written before entries carried one) is older than any maximum wait; untimed entries alone have no window."""
        from workers.decision.state import pending_entry, pending_window

        first, mid, last = pending_entry("100.0", "a"), pending_entry("90.0", "b"), pending_entry("105.5", "c")
        assert pending_window(first, [mid, last]) == (100.0, 105.5)  # the first entry, even if not read
        assert pending_window(b"legacy", [mid.encode(), last]) == (0.0, 105.5)  # not the newest ones' 90.0
        assert pending_window(b"legacy", [b"legacy", b"older-layout"]) == (None, None)
        assert pending_window("", []) == (None, None)

    def test_a_legacy_head_does_not_hold_a_continuous_stream_past_its_maximum_wait(self, make_service, redis_client):
        """An untimed entry left at the head of a long pending list by an older release: the model decides, though
        its newest signals keep arriving inside the quiet period (the newest 100 alone would say the burst began
        just now)."""
        from workers.decision.state import PENDING_READ

        svc = make_service(quiet="1h", max_wait="5m")
        key = svc.keys.pending_events("churn")
        redis_client.rpush(key, "legacy-event-id")
        svc.bus.publish_many([drift(score=0.2) for _ in range(PENDING_READ + 5)])
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start" and rec["event_count"] == PENDING_READ + 6
        assert any("maximum" in c["reason"] for c in rec["checks"] if c["guard"] == "debounce")

    def test_a_batch_leaves_the_same_state_as_its_events_one_by_one(self, redis_client, keys):
        """Folding a batch per model (latest signals, drift, pending ids, a promotion's clearing) equals recording each event alone."""
        from workers.decision.service import record_events

        def sequence(model):
            return [
                drift(model, 0.4), new_event("volume.accumulated", model, {"new_samples": 5}),
                new_event("schedule.tick", model, {"schedule": "daily"}), drift(model, 0.5),
                new_event("rollout.completed", model, {"version": 2}),
                drift(model, 0.05), new_event("upstream.changed", model, {"feature_version": "v3"}),
                new_event("rollout.completed", model, {"version": 3}), drift(model, 0.07),
            ]

        pipe = redis_client.pipeline(transaction=True)
        touched, urgent = record_events(keys, sequence("batched"), pipe)
        pipe.execute()
        for event in sequence("single"):
            pipe = redis_client.pipeline(transaction=True)
            record_events(keys, [event], pipe)
            pipe.execute()
        batched, single = _model_state(redis_client, keys, "batched"), _model_state(redis_client, keys, "single")
        assert batched["signals"] == single["signals"]
        assert set(batched["signals"]) == {b"schedule.tick", b"drift.data"}
        assert batched["signals"][b"drift.data"]["drift_score"] == 0.07
        assert batched["drift"] == single["drift"] == [b"0.07"]
        assert len(batched["pending"]) == len(single["pending"]) == 7
        assert len(batched["history"]) == len(single["history"]) == 9
        assert batched["stamped"] and single["stamped"]
        assert touched == {"batched"} and urgent == set()

    def test_a_large_batch_registers_and_schedules_every_model_and_trims_the_drift_history(self, redis_client, keys):
        """Over 1,000 models in one batch all land in the models and due sets; a manual request moves its model's due time; the drift history keeps the newest scores."""
        from workers.decision.service import DRIFT_HISTORY_LEN, record_events

        redis_client.zadd(keys.due(), {"m-0": 9e9, "m-1": 9e9})  # already due later (a debounce)
        events = [drift(f"m-{i}", 0.01) for i in range(1200)]
        events += [drift("deep", i / 1000) for i in range(DRIFT_HISTORY_LEN + 10)]
        events.append(new_event("retrain.requested", "m-1", {"reason": "test", "requested_by": "me"}))
        pipe = redis_client.pipeline(transaction=True)
        touched, urgent = record_events(keys, events, pipe, schedule=True)
        pipe.execute()
        assert redis_client.scard(keys.models()) == 1201 and redis_client.zcard(keys.due()) == 1201
        assert redis_client.zscore(keys.due(), "m-0") == 9e9  # NX: a later due time stays
        assert redis_client.zscore(keys.due(), "m-1") < 9e9  # a manual request is due now
        assert urgent == {"m-1"} and len(touched) == 1201
        kept = [float(x) for x in redis_client.lrange(keys.drift_history("deep"), 0, -1)]
        assert kept == [i / 1000 for i in reversed(range(10, DRIFT_HISTORY_LEN + 10))]


    def test_a_corrupted_key_fails_its_batch_with_nothing_applied_and_nothing_lost(self, make_service, redis_client, keys):
        """A model whose state key holds the wrong type: the batch applies nothing, its other models are then recorded once each, and the bad model's event is dead-lettered, not acked away."""
        svc = make_service()
        svc.consumer.max_deliveries = 2
        svc.consumer.claim_idle_ms = 1
        redis_client.set(keys.drift_history("corrupt"), "not a list")
        events = [drift("alpha", 0.05), drift("corrupt", 0.05), drift("beta", 0.05), drift("alpha", 0.06)]
        svc.bus.publish_many(events)
        pipe = redis_client.pipeline(transaction=True)
        from workers.decision.service import record_events

        record_events(keys, events, pipe)
        with pytest.raises(Exception, match="WRONGTYPE"):
            pipe.execute()
        assert not redis_client.exists(keys.history("alpha"), keys.history("beta"), keys.models())  # all or nothing
        for _ in range(8):
            svc.consumer.poll(block_ms=10)
            time.sleep(0.01)
        assert _model_state(redis_client, keys, "alpha")["history"] == [events[0].id, events[3].id]
        assert _model_state(redis_client, keys, "beta")["history"] == [events[2].id]
        assert not redis_client.exists(keys.history("corrupt"))
        [letter] = svc.bus.dead_letters()
        assert json.loads(letter["payload"])["id"] == events[1].id


def server_time(client) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def lease_score(expires_at: float) -> float:
    """A leased model's score in the due set, as another worker's claim writes it: minus its expiry."""
    return -expires_at


class TestClaiming:
    def test_claim_skips_models_leased_elsewhere_or_no_longer_due(self, make_service, redis_client):
        """A worker only loads due models, leasing them (minus the expiry, on the Redis server's clock); one
        leased by another worker keeps its lease, and an expired lease (its evaluator died) is taken over."""
        svc = make_service()
        for m in ("due", "leased", "done", "abandoned"):
            svc.bus.publish(drift(model=m, score=0.05))
        svc.consumer.poll(block_ms=10)
        now = time.time()
        theirs = lease_score(server_time(redis_client) + 20)
        redis_client.zadd(svc.keys.due(), {"leased": theirs, "abandoned": lease_score(server_time(redis_client) - 1)})
        redis_client.zrem(svc.keys.due(), "done")  # evaluated by another worker meanwhile
        mine, states = svc.store.claim_and_load(["due", "leased", "done", "abandoned"], 30, now)
        assert set(states) == {"due", "abandoned"}
        assert -float(mine) == pytest.approx(server_time(redis_client) + 30, abs=2)
        assert redis_client.zscore(svc.keys.due(), "leased") == theirs
        assert redis_client.zscore(svc.keys.due(), "due") == redis_client.zscore(svc.keys.due(), "abandoned") == float(mine)
        assert redis_client.zscore(svc.keys.due(), "done") is None
        # A leased model is out of every worker's due range until its lease expires.
        assert svc.evaluate_due(now + 1) == 0
        assert svc.store.release_leases(["due", "leased"], mine, now) == 1  # only what this lease holds
        assert redis_client.zscore(svc.keys.due(), "due") == pytest.approx(now)
        assert redis_client.zscore(svc.keys.due(), "leased") == theirs

    def test_a_manual_request_during_a_debounced_evaluation_is_decided_now(self, make_service, redis_client):
        """A manual request recorded while its model is being evaluated leaves the lease alone; the evaluation,
        which defers (a 10-minute quiet period), ends seeing the newer entry and makes the model due now,
        and the next round starts the pipeline (a critical request does not wait for the quiet period)."""
        svc = make_service(quiet="10m", max_wait="1h")
        svc.bus.publish(drift(score=0.05))
        svc.consumer.poll(block_ms=10)
        now = time.time()
        lease, states = svc.store.claim_and_load(["churn"], 30, now)
        manual = new_event("retrain.requested", "churn", {"reason": "hotfix"})
        svc.bus.publish(manual)
        svc.consumer.poll(block_ms=10)
        assert redis_client.zscore(svc.keys.due(), "churn") == float(lease)  # the request left the lease alone
        svc._evaluate(states, now, lease=lease)
        assert 0 < redis_client.zscore(svc.keys.due(), "churn") <= time.time()  # not the debounce's time
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start" and rec["urgency"] == "critical" and manual.id in rec["event_ids"]

    def test_entries_recorded_during_an_evaluation_stay_pending_and_due(self, make_service, redis_client):
        """The evaluation consumes the pending list up to the newest entry it read, by value: one recorded
        meanwhile stays, and the model is due again now."""
        svc = make_service()
        first = drift(score=0.05)
        svc.bus.publish(first)
        svc.consumer.poll(block_ms=10)
        now = time.time()
        lease, states = svc.store.claim_and_load(["churn"], 30, now)
        later = drift(score=0.06)
        svc.bus.publish(later)
        svc.consumer.poll(block_ms=10)
        svc._evaluate(states, now, lease=lease)
        pending = redis_client.lrange(svc.keys.pending_events("churn"), 0, -1)
        assert [e.split(b" ", 1)[1].decode() for e in pending] == [later.id]
        assert 0 < redis_client.zscore(svc.keys.due(), "churn") <= time.time()

    def test_a_pipeline_released_during_an_evaluation_neither_breaks_the_lease_nor_strands_the_follow_up(
            self, make_service, redis_client, keys):
        """A follow-up release while the model is leased leaves the lease alone (no second worker evaluates it
        at once); the evaluation, which saw the pipeline in flight and would wait for it, finds the slot free
        and makes the model due now, and the next round starts the follow-up pipeline."""
        svc = make_service()
        other = make_service(name="worker-2")
        redis_client.hset(keys.guard("churn"), mapping={"in_flight": "p-1", "in_flight_since": time.time(),
                                                        "follow_up": "1"})
        svc.bus.publish(drift(score=0.5))
        svc.consumer.poll(block_ms=10)
        now = time.time()
        lease, states = svc.store.claim_and_load(["churn"], 30, now)
        assert states["churn"].guard["in_flight"] == "p-1"
        assert svc.store.release("churn", "p-1") == 2
        assert redis_client.zscore(keys.due(), "churn") == float(lease)  # the lease holds
        assert other.store.claim_and_load(["churn"], 30, time.time())[1] == {}  # no second evaluation at once
        svc._evaluate(states, now, lease=lease)
        assert not redis_client.hexists(keys.guard("churn"), "follow_up")
        assert 0 < redis_client.zscore(keys.due(), "churn") <= time.time()
        step(svc)
        assert [r["action"] for r in records(svc)] == ["start"]

    def test_an_evaluation_whose_lease_was_taken_over_leaves_the_due_set_to_the_new_holder(
            self, make_service, redis_client, keys):
        """A slow evaluation whose lease expired and was taken over by another worker ends without touching the
        new holder's lease; it still drops the entries it consumed."""
        svc = make_service()
        other = make_service(name="worker-2")
        svc.bus.publish(drift(score=0.05))
        svc.consumer.poll(block_ms=10)
        now = time.time()
        lease, states = svc.store.claim_and_load(["churn"], 30, now)
        redis_client.zadd(keys.due(), {"churn": lease_score(server_time(redis_client) - 1)})  # as if expired
        theirs, taken = other.store.claim_and_load(["churn"], 30, time.time())
        assert set(taken) == {"churn"}
        svc._evaluate(states, now, lease=lease)
        assert redis_client.zscore(keys.due(), "churn") == float(theirs)
        assert redis_client.llen(keys.pending_events("churn")) == 0

class TestExplain:
    def test_explain_prints_the_record_as_json_and_exit_2_for_unknown(self, make_service, redis_server, tmp_path):
        """`retrain explain ID --json` prints the stored record; an unknown id is one line and exit 2."""
        svc = make_service()
        svc.bus.publish(drift(score=0.2))
        step(svc)
        rec = records(svc)[0]
        out = retrain_cli("explain", rec["id"], "--json", redis_url=redis_server.url)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["id"] == rec["id"] and shown["triggers"] == rec["triggers"]
        out = retrain_cli("explain", "d-nope", redis_url=redis_server.url)
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


class TestTwoWorkers:
    @pytest.mark.slow
    def test_two_decision_workers_never_start_two_pipelines_for_one_model(self, start_worker, redis_client,
                                                                           settings, tmp_path):
        """Two real decision worker processes consuming one stream start exactly one pipeline per model."""
        folder = tmp_path / "policies"
        for m in ("a", "b", "c"):
            write_policy(folder, name=m, quiet="0s", cooldown="6h")
        env = {"RETRAIN_POLICY_DIR": str(folder)}
        start_worker("decision", env=env)
        start_worker("decision", env=env)
        bus = EventBus.from_settings(redis_client, settings)
        for _ in range(40):
            bus.publish_many([drift(model=m, score=0.5) for m in ("a", "b", "c")])
            time.sleep(0.02)
        from workers.decision.state import DecisionStore
        from config.keys import keys_from_settings

        store = DecisionStore(redis_client, keys_from_settings(settings))
        wait_for(lambda: all(any(r["action"] == "start" for r in store.recent_records(m, 100)) for m in "abc"),
                 timeout=30, message="a start decision for each model")
        keys = keys_from_settings(settings)

        def enqueuers() -> list:  # a record is committed before its relay enqueues the pipeline
            return [redis_client.hget(keys.pipeline(m, r["pipeline_id"]), "enqueued_by")
                    for m in "abc" for r in store.recent_records(m, 100) if r["action"] == "start"]

        wait_for(lambda: all(enqueuers()), timeout=30, message="every start enqueued")
        time.sleep(1.0)  # room for a second start, if either worker were to make one
        for m in "abc":
            starts = [r for r in store.recent_records(m, 100) if r["action"] == "start"]
            assert len(starts) == 1, starts
        assert queued(redis_client, "training.high") == 3
        deciders = {r["decided_by"] for m in "abc" for r in store.recent_records(m, 100)}
        assert deciders  # records name the worker that decided
        enqueuers = {e.decode() for e in enqueuers()}
        assert enqueuers and all(e.endswith("@test:relay") for e in enqueuers)  # relays (any worker's) enqueued
