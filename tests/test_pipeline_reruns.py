"""Pipeline steps run twice, as a redelivered or retried task runs them: the second run changes nothing.

The steps are called in-process on a real Redis (``run_step`` stores a step's output; calling a
step function directly is a re-run that died before its output was stored).
"""

from __future__ import annotations

import json
import os
import signal

import pandas as pd
import pytest
import redis

from config.settings import reset_settings
from events.bus import EventBus
from tests.support import wait_for
from tests.test_pipeline import request, setup_model
from workers.pipeline import steps
from workers.registry.store import ModelVersion, Registry
from workers.rollout.control import RolloutControl
from workers.router.traffic import read_traffic

MODEL = "churn"


@pytest.fixture
def pipeline_env(redis_client, tmp_path, monkeypatch):
    """Training data and a policy for ``churn`` in tmp_path, the settings pointed at them."""

    def _setup(**kwargs):
        for name, value in setup_model(tmp_path, **kwargs).items():
            monkeypatch.setenv(name, value)
        reset_settings()
        return tmp_path / "policies" / f"{MODEL}.toml"

    yield _setup
    monkeypatch.undo()
    reset_settings()


def context(pipeline_id: str) -> dict:
    return {"model": MODEL, "pipeline_id": pipeline_id, "decision_id": None, "triggers": [], "event_ids": [],
            "force": False}


def trained(pipeline_id: str) -> dict:
    return steps.run_step("train", steps.run_step("validate_data", context(pipeline_id)))


def published(client, keys) -> dict[str, str]:
    return {e["id"]: e["type"] for e in (json.loads(f[b"e"]) for _, f in client.xrange(keys.events_for(MODEL)))}


class TestGateRerun:
    def test_a_rejected_version_is_never_staged_by_a_rerun(self, pipeline_env, redis_client, keys, monkeypatch):
        """The gate rejects v1 and its gate.failed emit fails (the task retries); on the retry the
        check would pass. The re-run gate and a stage both fail with the same GateFailed, the event
        goes out, and v1 stays rejected and is never the candidate."""
        policy = pipeline_env(min_accuracy=0.99)
        out = trained("p-1")
        real_emit = steps._Env.emit

        def emit_with_a_broker_blip(env, ctx, etype, **data):
            if etype == "gate.failed":
                raise redis.ConnectionError("broker blip")
            return real_emit(env, ctx, etype, **data)

        monkeypatch.setattr(steps._Env, "emit", emit_with_a_broker_blip)
        with pytest.raises(redis.ConnectionError):
            steps.run_step("gate", out)
        monkeypatch.setattr(steps._Env, "emit", real_emit)
        registry = Registry(redis_client, keys)
        assert [(v.version, v.status) for v in registry.versions(MODEL)] == [(1, "rejected")]
        # A second look would pass (a timing check can; here the threshold is lowered).
        policy.write_text(policy.read_text().replace("min_accuracy = 0.99", "min_accuracy = 0.5"))
        from workers.policies import policy_store

        assert policy_store().all()[MODEL].gate.min_accuracy == 0.5
        with pytest.raises(steps.GateFailed) as rerun:
            steps.run_step("gate", out)
        with pytest.raises(steps.GateFailed) as staged:
            steps.run_step("stage", {**out, "gate": {"passed": True, "checks": []}})
        assert str(rerun.value) == str(staged.value) and "minimum_performance" in str(rerun.value)
        assert registry.get(MODEL, 1).status == "rejected" and registry.alias(MODEL, "candidate") is None
        events = published(redis_client, keys)
        assert events.get("p-1:gate.failed") == "gate.failed"
        assert "model.staged" not in events.values() and "gate.passed" not in events.values()


class TestStartRolloutRerun:
    def test_first_model_promotion_rerun_is_a_no_op(self, pipeline_env, redis_client, keys):
        """start_rollout of the first model run twice: the second returns the same result and moves,
        writes and alerts nothing; one that died before the traffic write writes it."""
        pipeline_env()
        staged = steps.run_step("stage", steps.run_step("gate", trained("p-1")))
        first = steps.start_rollout(steps._Env(), staged)
        table = read_traffic(redis_client, keys, MODEL)
        again = steps.start_rollout(steps._Env(), staged)
        registry = Registry(redis_client, keys)
        assert again == first and first["rollout"] == steps.FIRST_MODEL_PROMOTED
        assert registry.alias(MODEL, "production") == 1 and registry.get(MODEL, 1).status == "production"
        assert len(registry.alias_history(MODEL, "production")) == 1
        assert read_traffic(redis_client, keys, MODEL).revision == table.revision == 1
        assert redis_client.lrange(keys.alerts(MODEL), 0, -1) == []
        assert "training.failed" not in published(redis_client, keys).values()
        redis_client.delete(keys.traffic(MODEL))  # as if the first run died before writing the table
        assert steps.start_rollout(steps._Env(), staged) == first
        assert read_traffic(redis_client, keys, MODEL).production == "1"

    def test_rollout_step_rerun_returns_the_pipelines_own_rollout(self, pipeline_env, redis_client, keys):
        """A re-run of start_rollout returns the rollout its pipeline started, running or finished,
        and never starts a second one (a rolled-back candidate is not rolled out again)."""
        pipeline_env()
        registry = Registry(redis_client, keys)
        for pid, status in (("p-1", "production"), ("p-2", "staged")):
            registry.register(ModelVersion(model=MODEL, version=0, status=status, artifact_uri=f"file:///x/{pid}",
                                           sha256="0" * 64, pipeline_id=pid))
        registry.set_alias(MODEL, "production", 1, who="test", why="setup")
        ctx = {**context("p-2"), "version": 2}
        assert steps.start_rollout(steps._Env(), ctx)["rollout"] == "shadow"
        control = RolloutControl(redis_client, keys)
        revision = control.load(MODEL)[0].revision
        assert steps.start_rollout(steps._Env(), ctx)["rollout"] == "shadow"
        assert control.load(MODEL)[0].revision == revision
        control.manual(MODEL, "rollback", "bob", "bad")
        revision = control.load(MODEL)[0].revision
        assert steps.start_rollout(steps._Env(), ctx)["rollout"] == "rolled_back"
        state = control.load(MODEL)[0]
        assert state.revision == revision and state.status == "rolled_back"
        assert registry.get(MODEL, 2).status == "rolled_back"


class TestFailureHandlerRerun:
    def test_a_failure_handled_twice_alerts_once(self, pipeline_env, redis_client, keys):
        """handle_failure run twice for one pipeline and step records one alert, with a fixed id."""
        pipeline_env()
        for _ in range(2):
            steps.handle_failure(context("p-9"), "train", RuntimeError("disk full"))
        alerts = [json.loads(a) for a in redis_client.lrange(keys.alerts(MODEL), 0, -1)]
        assert [a["id"] for a in alerts] == ["p-9:alert.raised:train"]
        assert alerts[0]["data"]["severity"] == "critical" and "disk full" in alerts[0]["data"]["message"]


class TestPipelineRecord:
    def test_the_pipeline_record_expires(self, pipeline_env, redis_client, keys):
        """The pipeline's status hash gets a TTL on every update: long enough for ops, not forever."""
        pipeline_env()
        steps._Env().mark(context("p-3"), status="running:train")
        ttl = redis_client.ttl(keys.pipeline(MODEL, "p-3"))
        assert 7 * 86400 <= ttl <= 366 * 86400


class TestTimeLimit:
    def test_the_soft_time_limit_is_not_swallowed_while_scoring_the_reference(self):
        """A task whose soft time limit strikes during reference scoring stops, instead of carrying on without one."""
        import pandas as pd
        from celery.exceptions import SoftTimeLimitExceeded

        from config.policy import policy_from_dict
        from workers.pipeline.steps import reference_scores

        class Slow:
            def predict_proba(self, X):
                raise SoftTimeLimitExceeded()

        class Broken:
            def predict_proba(self, X):
                raise ValueError("cannot score")

        policy = policy_from_dict({"model": {"name": "m", "task": "binary", "target": "y"}})
        holdout = pd.DataFrame({"x": [1.0, 2.0], "y": [0, 1]})
        with pytest.raises(SoftTimeLimitExceeded):
            reference_scores(Slow(), holdout, policy)
        assert reference_scores(Broken(), holdout, policy) == []  # an ordinary failure still means no reference


def build_an_estimator_that_kills_its_worker(**params):
    """A policy's estimator build function (``tests.test_pipeline_reruns:...``) that dies as an
    OOM kill or a segfault in a fit does: SIGKILL of the process running it, every time."""
    os.kill(os.getpid(), signal.SIGKILL)


class TestSourceSchema:
    def test_the_recorded_schema_is_the_one_the_upstream_monitor_reads(self, pipeline_env, redis_client, keys, tmp_path):
        """A CSV with a date column and a boolean column with blanks: pandas reads both as object (text), Arrow as
        date and bool. The model version's source schema is read as the monitor reads it, so the unchanged source is
        not a breaking change at the next look (it was, at every look)."""
        from datetime import datetime, timedelta, timezone

        from events.producers.upstream import compare_schemas, schema_of_source
        from tests.test_pipeline import TARGET, TIME

        policy = pipeline_env()
        now = datetime.now(timezone.utc)
        rows = 300
        frame = pd.DataFrame({
            TIME: [(now - timedelta(hours=i)).isoformat() for i in range(rows)],
            "signup": [(now - timedelta(days=i)).date().isoformat() for i in range(rows)],
            "flag": [None if i % 50 == 0 else bool(i % 2) for i in range(rows)],
            "amount": [float(i % 17) for i in range(rows)],
            TARGET: [i % 2 for i in range(rows)],
        })
        csv = tmp_path / "csvdata" / "a.csv"
        csv.parent.mkdir()
        frame.to_csv(csv, index=False)
        text = policy.read_text()
        start = text.index('source = "')
        policy.write_text(text[:start] + f'source = "{csv}"' + text[text.index("\n", start):]
                          .replace("categorical = ", "categorical = [] # ", 1))
        out = steps.run_step("validate_data", context("p-csv"))
        diff = compare_schemas(out["source_schema"], schema_of_source(str(csv)))
        assert diff.verdict == "unchanged", diff


class TestOneRunAtATime:
    def test_two_deliveries_of_a_step_never_run_it_at_once(self, pipeline_env, redis_client, keys):
        """A second delivery of train while the first runs is turned away (StepBusy: its task retries later); once the
        first is done, the second gets its output, and the artifact on disk is the one whose hash was stored."""
        import threading

        from workers.pipeline.lease import StepBusy
        from workers.registry.artifacts import sha256_hex

        policy = pipeline_env()
        policy.write_text(policy.read_text().replace(  # a fit of a second or so: time for the second delivery
            'estimator = "sklearn.linear_model.LogisticRegression"', 'estimator = "sklearn.ensemble.RandomForestClassifier"'
        ).replace("params = { max_iter = 200 }", "params = { n_estimators = 300, random_state = 0 }"
                  ).replace("space = { C = [0.1, 1.0] }", "space = { max_depth = [12] }"))
        out = steps.run_step("validate_data", context("p-7"))
        first: dict = {}
        runner = threading.Thread(target=lambda: first.update(steps.run_step("train", out)))
        runner.start()
        lease = keys.step_lease(MODEL, "p-7", "train")
        wait_for(lambda: redis_client.exists(lease), timeout=30, interval=0.002, message="the first run's lease")
        with pytest.raises(StepBusy):  # the second delivery does not start while the first trains
            steps.run_step("train", out)
        assert not first
        runner.join(120)
        assert first and not redis_client.exists(lease)
        again = steps.run_step("train", out)
        assert again == first
        path = again["artifact_uri"].removeprefix("file://")
        assert sha256_hex(open(path, "rb").read()) == again["sha256"]

    def test_the_lease_is_renewed_and_a_dead_holder_on_this_host_is_taken_over(self, redis_client, keys):
        """A lease outlives its TTL while its run goes on; a holder process of this host that is gone is replaced at
        once; one on another host is waited for."""
        import socket
        import subprocess
        import sys
        import time

        from workers.pipeline.lease import StepBusy, StepLease

        key = keys.step_lease(MODEL, "p-8", "train")
        with StepLease(redis_client, key, lease_s=1.0) as held:
            time.sleep(2.5)  # two and a half TTLs
            assert redis_client.get(key).decode() == held.token
            with pytest.raises(StepBusy):
                with StepLease(redis_client, key):
                    pass
        assert not redis_client.exists(key)
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        redis_client.set(key, f"{socket.gethostname()}:{gone.pid}:dead", px=30_000)
        with StepLease(redis_client, key) as taken:
            assert redis_client.get(key).decode() == taken.token
        redis_client.set(key, "another-host:1:alive", px=30_000)
        with pytest.raises(StepBusy, match="another-host"):
            with StepLease(redis_client, key):
                pass


    @pytest.mark.slow
    def test_a_delivery_that_finds_its_step_running_elsewhere_retries_until_it_can(self, start_worker, redis_client,
                                                                                   keys, tmp_path):
        """On a real worker: validate_data's lease is held by a run on another host; the task does not run the step,
        retries (STEP_BUSY_RETRY_S later), and runs it once that run has let the lease go."""
        from workers.pipeline.tasks import STEP_BUSY_RETRY_S, validate_data

        worker = start_worker("all", env=setup_model(tmp_path))
        lease = keys.step_lease(MODEL, "p-busy", "validate_data")
        redis_client.set(lease, "another-host:1:busy", px=60_000)  # longer than a cold pool process takes to start
        validate_data.apply_async((context("p-busy"),), task_id="p-busy.validate_data", queue="training.high")
        wait_for(lambda: "pipeline.step_busy" in worker.log(), timeout=30, message="the busy delivery")
        assert not redis_client.exists(keys.step_done(MODEL, "p-busy", "validate_data"))
        redis_client.delete(lease)  # the other host's run ends
        wait_for(lambda: redis_client.exists(keys.step_done(MODEL, "p-busy", "validate_data")),
                 timeout=STEP_BUSY_RETRY_S + 30, message=f"the retried step (log {worker.log_path})")


class TestSuperseded:
    def test_a_pipeline_whose_slot_another_holds_runs_no_further_step(self, pipeline_env, redis_client, keys):
        """The decision worker cleared p-old's slot as stale and started p-new: p-old's next step is refused (two
        pipelines never run for one model), its failure is a warning, and p-new's slot stays; its own slot, or a free
        one, lets a step run."""
        pipeline_env()
        redis_client.hset(keys.guard(MODEL), "in_flight", "p-new")
        with pytest.raises(steps.PipelineSuperseded, match="p-new holds the single-flight slot"):
            steps.run_step("validate_data", context("p-old"))
        assert not redis_client.exists(keys.step_done(MODEL, "p-old", "validate_data"))
        steps.handle_failure(context("p-old"), "validate_data", steps.PipelineSuperseded("superseded"))
        alerts = [json.loads(a)["data"] for a in redis_client.lrange(keys.alerts(MODEL), 0, -1)]
        assert [(a["severity"], a["title"]) for a in alerts] == [("warning", "training pipeline superseded")]
        assert redis_client.hget(keys.guard(MODEL), "in_flight") == b"p-new"
        assert steps.run_step("validate_data", context("p-new"))["n_train"] > 0
        redis_client.hdel(keys.guard(MODEL), "in_flight")
        assert steps.run_step("validate_data", context("p-old"))["n_train"] > 0


class TestWorkerLostEveryTime:
    @pytest.mark.slow
    def test_a_step_whose_worker_dies_every_time_fails_the_pipeline(self, start_worker, redis_client, keys, settings,
                                                                  tmp_path, monkeypatch):
        """A train step that kills its pool process on every delivery runs MAX_STEP_STARTS times, then
        the pipeline fails (record, training.failed, critical alert, slot released) instead of looping."""
        import tests.test_pipeline as tp

        monkeypatch.setattr(tp, "POLICY", tp.POLICY.replace(
            'estimator = "sklearn.linear_model.LogisticRegression"',
            'estimator = "tests.test_pipeline_reruns:build_an_estimator_that_kills_its_worker"'))
        worker = start_worker("all", env=setup_model(tmp_path))
        request(EventBus.from_settings(redis_client, settings))
        pid = wait_for(lambda: _decided_pipeline(redis_client, keys), timeout=30, message="a pipeline decided")
        record = keys.pipeline(MODEL, pid)
        wait_for(lambda: redis_client.hget(record, "status") == b"failed:train", timeout=180,
                 message=f"the pipeline failed at train (log {worker.log_path})")
        reason = f"worker lost {steps.MAX_STEP_STARTS} times while running train"
        assert redis_client.hget(record, "error").decode() == reason
        # The status is the failure handler's first write and the slot's release its last.
        wait_for(lambda: not redis_client.hexists(keys.guard(MODEL), "in_flight"), timeout=20, message="slot released")
        events = {e["id"]: e for e in (json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for(MODEL)))}
        assert events[f"{pid}:training.failed"]["data"]["error"] == reason
        alerts = [json.loads(a)["data"] for a in redis_client.lrange(keys.alerts(MODEL), 0, -1)]
        assert [(a["severity"], a["message"]) for a in alerts] == [("critical", reason)]
        assert worker.log().count("exited with 'signal 9 (SIGKILL)'") == steps.MAX_STEP_STARTS  # ran 3 times, not 4
        assert int(redis_client.get(keys.step_deliveries(MODEL, pid, "train"))) == steps.MAX_STEP_STARTS + 1
        assert Registry(redis_client, keys).versions(MODEL) == []

    def test_a_step_past_the_limit_is_not_run_and_a_finished_one_is_returned(self, pipeline_env, redis_client, keys):
        """Starts that never came back (the counter) stop the step; a step already done returns its output."""
        pipeline_env()
        ctx = context("p-4")
        redis_client.set(keys.step_deliveries(MODEL, "p-4", "validate_data"), steps.MAX_STEP_STARTS)
        with pytest.raises(steps.PipelineStepFailed, match=f"^worker lost {steps.MAX_STEP_STARTS} times while "
                                                           "running validate_data$"):
            steps.run_step("validate_data", ctx)
        assert not redis_client.exists(keys.step_done(MODEL, "p-4", "validate_data"))
        assert "training.started" not in published(redis_client, keys).values()
        redis_client.delete(keys.step_deliveries(MODEL, "p-4", "validate_data"))
        out = steps.run_step("validate_data", ctx)
        redis_client.set(keys.step_deliveries(MODEL, "p-4", "validate_data"), steps.MAX_STEP_STARTS * 2)
        assert steps.run_step("validate_data", ctx) == out

    def test_starts_that_end_in_an_exception_do_not_count_as_lost_workers(self, pipeline_env, redis_client, keys,
                                                                          monkeypatch):
        """A step retried for a transient error more often than MAX_STEP_STARTS (autoretry allows
        more) still runs: only starts whose process never came back count towards the limit."""
        pipeline_env()
        real_emit = steps._Env.emit
        blips = []

        def emit_with_broker_blips(env, ctx, etype, **data):
            if etype == "training.started" and len(blips) <= steps.MAX_STEP_STARTS:
                blips.append(etype)
                raise redis.ConnectionError("broker blip")
            return real_emit(env, ctx, etype, **data)

        monkeypatch.setattr(steps._Env, "emit", emit_with_broker_blips)
        for _ in range(steps.MAX_STEP_STARTS + 1):
            with pytest.raises(redis.ConnectionError):
                steps.run_step("validate_data", context("p-5"))
        out = steps.run_step("validate_data", context("p-5"))
        assert out["n_train"] > 0 and len(blips) == steps.MAX_STEP_STARTS + 1


class TestFirstModel:
    def test_its_completion_is_in_the_log_before_anyone_sees_it_in_production(self, pipeline_env, redis_client,
                                                                              keys, monkeypatch):
        """A monitor that sees the first model in production and reports drift at once: its signal lands after
        rollout.completed, so the decision worker's reset of the old model's signals does not wipe it (it did on a
        slow machine: the drift landed between the alias move and the event)."""
        import workers.router.traffic as traffic
        from events.envelope import new_event

        pipeline_env()
        bus, seen, read = EventBus(redis_client, keys), [], traffic.read_traffic

        def react(client, keys_, model):  # what promote_first does right after the alias move
            if not seen:
                seen.append(Registry(redis_client, keys).alias(MODEL, "production"))
                bus.publish(new_event("drift.data", MODEL, {"drift_score": 0.5, "drifted_features": ["tenure"]}))
            return read(client, keys_, model)

        monkeypatch.setattr(traffic, "read_traffic", react)
        out = steps.run_step("start_rollout", steps.run_step("stage", steps.run_step("gate", trained("p-1"))))
        assert out["rollout"] == steps.FIRST_MODEL_PROMOTED and seen == [1]
        types = list(published(redis_client, keys).values())
        assert types.index("rollout.completed") < types.index("drift.data")


class TestGateBreakdown:
    def test_a_tampered_production_artifact_fails_the_pipeline(self, pipeline_env, redis_client, keys):
        """The gate cannot load production (its bytes changed): a pipeline failure (training.failed,
        critical alert naming the tampering, slot released), not a candidate the gate blocked."""
        from workers.registry.artifacts import ArtifactTampered

        pipeline_env()
        steps.run_step("start_rollout", steps.run_step("stage", steps.run_step("gate", trained("p-1"))))
        registry = Registry(redis_client, keys)
        with open(registry.get(MODEL, 1).artifact_uri.removeprefix("file://"), "ab") as f:
            f.write(b"tampered")
        redis_client.hset(keys.guard(MODEL), "in_flight", "p-2")
        ctx = trained("p-2")
        with pytest.raises(ArtifactTampered) as tampered:
            steps.run_step("gate", ctx)
        steps.handle_failure(ctx, "gate", tampered.value)  # what the chain's link_error does
        reason = str(tampered.value)
        assert "sha256" in reason
        record = keys.pipeline(MODEL, "p-2")
        assert redis_client.hget(record, "status") == b"failed:gate"
        assert redis_client.hget(record, "error").decode() == reason
        events = {e["id"]: e for e in (json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for(MODEL)))}
        assert events["p-2:training.failed"]["data"] == {"pipeline_id": "p-2", "decision_id": None, "step": "gate",
                                                         "error": reason}
        alert = json.loads(redis_client.lrange(keys.alerts(MODEL), 0, 0)[0])["data"]
        assert (alert["severity"], alert["title"], alert["message"]) == (
            "critical", "training pipeline failed at gate", reason)
        assert not redis_client.hexists(keys.guard(MODEL), "in_flight")
        assert [v.version for v in registry.versions(MODEL)] == [1]

    def test_a_failed_check_is_still_a_blocked_candidate(self, pipeline_env, redis_client, keys):
        """The gate's own GateFailed stays a warning without training.failed."""
        pipeline_env()
        steps.handle_failure(context("p-6"), "gate", steps.GateFailed("gate failed for v1: minimum_performance (0.5)"))
        alert = json.loads(redis_client.lrange(keys.alerts(MODEL), 0, 0)[0])["data"]
        assert (alert["severity"], alert["title"]) == ("warning", "quality gate blocked a candidate")
        assert "training.failed" not in published(redis_client, keys).values()


def _decided_pipeline(client, keys) -> str | None:
    from workers.decision.state import DecisionStore

    starts = [r for r in DecisionStore(client, keys).recent_records(MODEL, 10) if r["action"] == "start"]
    return starts[0]["pipeline_id"] if starts else None
