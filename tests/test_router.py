"""The serving router on a real Redis: traffic table, sticky routing, cached table, shadow process,
request log, feedback, loading (previous kept, tampered refused), the HTTP server and ``retrain serve``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import uvicorn
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LinearRegression, LogisticRegression

from tests.support import ROOT, wait_for
from workers.redis_server import EmbeddedRedis, free_port
from workers.registry.artifacts import save_artifact
from workers.registry.store import ModelVersion, Registry
from workers.router.router import FeatureError, NoProductionVersion, Router, decode_feedback, decode_request
from workers.router.traffic import TrafficError, TrafficTable, read_traffic, write_traffic

RETRAIN = ROOT / ".venv" / "bin" / "retrain"
COLUMNS = ["a", "b", "c"]
RECORD_FIELDS = {"request_id", "version", "latency_ms", "prediction", "score", "error", "shadow", "ts"}


# --------------------------------------------------------------------------- test models


class ScriptedShadow(ClassifierMixin, BaseEstimator):
    """A classifier that sleeps ``delay`` seconds per call, or raises when ``fail`` (saved with skops)."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.delay = delay
        self.fail = fail

    def fit(self, X, y):
        self.classes_ = np.unique(y)
        self.n_features_in_ = X.shape[1]
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        return self

    def predict_proba(self, X):
        if self.fail:
            raise RuntimeError("shadow exploded")
        time.sleep(self.delay)
        return np.tile([0.4, 0.6], (len(X), 1))

    def predict(self, X):
        return self.classes_.take(self.predict_proba(X).argmax(axis=1))


def training_frame(seed: int = 0, n: int = 300) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, len(COLUMNS))), columns=COLUMNS)
    y = (X["a"] + 0.5 * X["b"] > 0).astype(int).to_numpy()
    return X, y


def row(i: int = 0) -> dict[str, float]:
    return {"a": 0.1 * (i % 7) - 0.3, "b": 0.2, "c": -1.0}


class CountingRegistry(Registry):
    """The real registry, counting how often a version is loaded."""

    def __init__(self, client, keys):
        super().__init__(client, keys)
        self.loads: list[int] = []

    def load(self, model, version, trusted_prefixes=None):
        self.loads.append(int(version))
        return super().load(model, version, trusted_prefixes)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def registry(redis_client, keys):
    return CountingRegistry(redis_client, keys)


@pytest.fixture
def make_version(registry, tmp_path):
    """Register a fitted model as a new version: ``make_version("m", est)`` -> version string."""
    counter = iter(range(1000))

    def _make(model: str = "m", estimator=None, seed: int = 0, status: str = "production", fast: bool = False) -> str:
        schema = {}
        if estimator is None:
            X, y = training_frame(seed)
            if fast:  # fitted on a numpy array: ~5x quicker per row; column order from the schema
                X = X.to_numpy()
                schema = {"columns": [{"name": c, "kind": "numeric", "dtype": "float64"} for c in COLUMNS]}
            estimator = LogisticRegression(C=0.5 + seed).fit(X, y)
        ref = save_artifact(estimator, tmp_path / f"{model}-{next(counter)}.skops")
        mv = registry.register(ModelVersion(model=model, version=0, status=status, artifact_uri=ref.uri,
                                            sha256=ref.sha256, training_schema=schema))
        return str(mv.version)

    return _make


@pytest.fixture
def open_router(redis_client, keys, registry):
    """Open routers (closed after the test): ``open_router("m", check_interval=...)``."""
    opened = []

    def _open(model: str = "m", **kw) -> Router:
        r = Router(model, redis_client, keys, kw.pop("registry", registry), **kw)
        opened.append(r)
        return r

    yield _open
    for r in opened:
        r.close()


@pytest.fixture
def trust_test_models(monkeypatch):
    """Let skops load the test's own model classes (in this process and the shadow process)."""
    from config.settings import DEFAULT_TRUSTED_PREFIXES, reset_settings

    prefix = ScriptedShadow.__module__.split(".")[0] + "."
    monkeypatch.setenv("RETRAIN_TRUSTED_PREFIXES", json.dumps([*DEFAULT_TRUSTED_PREFIXES, prefix]))
    reset_settings()
    yield
    monkeypatch.delenv("RETRAIN_TRUSTED_PREFIXES")
    reset_settings()


def request_records(client, keys, model: str = "m") -> list[dict]:
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in client.xrange(keys.requests(model))]


def command_calls(client, *commands: str) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in commands)


# --------------------------------------------------------------------------- traffic table


class TestTrafficTable:
    def test_write_bumps_revision_publishes_and_reads_back(self, redis_client, keys):
        """Every write increments the revision and announces the model name on the traffic channel."""
        pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(keys.traffic_channel())
        wait_for(lambda: pubsub.get_message(timeout=0.05) is None and pubsub.subscribed)
        r1 = write_traffic(redis_client, keys, "m", TrafficTable(production="3"))
        r2 = write_traffic(redis_client, keys, "m", TrafficTable(production="3", candidate="4", candidate_percent=5,
                                                                 shadow="4"))
        assert (r1, r2) == (1, 2)
        got = read_traffic(redis_client, keys, "m")
        assert (got.production, got.candidate, got.candidate_percent, got.shadow, got.revision) == ("3", "4", 5.0, "4", 2)
        messages = [pubsub.get_message(timeout=1.0) for _ in range(2)]
        assert [m["data"] for m in messages] == [b"m", b"m"]
        pubsub.close()

    def test_previous_follows_production_unless_given(self, redis_client, keys):
        """The outgoing production becomes ``previous``; a rollback swaps them; an explicit value wins."""
        write_traffic(redis_client, keys, "m", TrafficTable(production="1"))
        write_traffic(redis_client, keys, "m", TrafficTable(production="2"))
        assert read_traffic(redis_client, keys, "m").previous == "1"
        write_traffic(redis_client, keys, "m", TrafficTable(production="2", candidate="3", candidate_percent=50))
        assert read_traffic(redis_client, keys, "m").previous == "1"
        write_traffic(redis_client, keys, "m", TrafficTable(production="1"))
        assert read_traffic(redis_client, keys, "m").previous == "2"
        write_traffic(redis_client, keys, "m", TrafficTable(production="1", previous="7"))
        assert read_traffic(redis_client, keys, "m").previous == "7"

    def test_write_queued_in_a_transaction_applies_only_on_exec(self, redis_client, keys):
        """Queued into the caller's MULTI pipeline, the table changes together with the caller's state."""
        write_traffic(redis_client, keys, "m", TrafficTable(production="1", candidate="2", candidate_percent=25))
        with redis_client.pipeline(transaction=True) as pipe:
            pipe.set("retrain:test:rollout-state", "rolled_back")
            assert write_traffic(redis_client, keys, "m", TrafficTable(production="1"), pipe=pipe) is None
            assert read_traffic(redis_client, keys, "m").candidate == "2"
            pipe.execute()
        after = read_traffic(redis_client, keys, "m")
        assert (after.candidate, after.candidate_percent, after.revision) == (None, 0.0, 2)
        assert redis_client.get("retrain:test:rollout-state") == b"rolled_back"

    @pytest.mark.parametrize("table, reason", [
        ({"production": "1", "candidate": "2", "candidate_percent": 150}, "within 0..100"),
        ({"production": "1", "candidate_percent": 5}, "needs a candidate"),
        ({"production": "1", "candidate": "2", "candidate_percent": "lots"}, "must be a number"),
    ])
    def test_unservable_tables_are_refused(self, table, reason, redis_client, keys):
        """A percent out of range, or a percent without a candidate, is refused before anything is written."""
        with pytest.raises(TrafficError, match=reason):
            write_traffic(redis_client, keys, "m", table)
        assert read_traffic(redis_client, keys, "m").revision == 0

    def test_accepts_the_rollout_machines_table(self, redis_client, keys):
        """The rollout worker's own TrafficTable (no ``previous``) is written as is."""
        from workers.rollout.machine import TrafficTable as MachineTable

        write_traffic(redis_client, keys, "m", MachineTable(production="1", candidate="2", candidate_percent=5.0))
        got = read_traffic(redis_client, keys, "m")
        assert (got.production, got.candidate, got.candidate_percent, got.shadow) == ("1", "2", 5.0, None)


# --------------------------------------------------------------------------- routing


class TestRouting:
    def test_split_is_within_tolerance_and_sticky_across_calls_and_instances(self, make_version, open_router,
                                                                             redis_client, keys):
        """10,000 request ids at 25 % reach the candidate 25 % +- 2 % of the time, the same way every time."""
        v1, v2 = make_version(seed=0, fast=True), make_version(seed=1, fast=True)
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, candidate=v2, candidate_percent=25))
        router = open_router(check_interval=60)
        ids = [f"req-{i}" for i in range(10_000)]
        first = [router.predict(row(i), rid).version for i, rid in enumerate(ids)]
        share = first.count(v2) / len(ids)
        assert 0.23 <= share <= 0.27, share
        again = [router.predict(row(i), rid).version for i, rid in enumerate(ids[:2000])]
        assert again == first[:2000]
        other = open_router(check_interval=60)
        assert [other.predict(row(i), rid).version for i, rid in enumerate(ids[:2000])] == first[:2000]

    def test_raising_the_percent_keeps_earlier_candidate_requests_on_the_candidate(self, make_version, open_router,
                                                                                   redis_client, keys):
        """Going from 5 % to 25 % only adds request ids to the candidate; none flips back to production."""
        v1, v2 = make_version(seed=0, fast=True), make_version(seed=1, fast=True)
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, candidate=v2, candidate_percent=5))
        router = open_router()
        ids = [f"u{i}" for i in range(3000)]
        at5 = {rid for rid in ids if router.predict(row(), rid).served_by == "candidate"}
        rev = write_traffic(redis_client, keys, "m", TrafficTable(production=v1, candidate=v2, candidate_percent=25))
        wait_for(lambda: router.table.revision == rev, timeout=10)
        at25 = {rid for rid in ids if router.predict(row(), rid).served_by == "candidate"}
        assert at5 and at5 < at25

    def test_table_change_is_seen_quickly_without_a_redis_read_per_request(self, make_version, open_router,
                                                                           redis_client, keys):
        """Routing reads no Redis key per request, and a published change is served within a second."""
        v1, v2 = make_version(seed=0, fast=True), make_version(seed=1, fast=True)
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1))
        router = open_router(check_interval=60)
        reads = ("hget", "hgetall", "hmget", "get", "exists")
        before = command_calls(redis_client, *reads)
        writes_before = command_calls(redis_client, "evalsha")
        for i in range(2000):
            router.predict(row(i), f"r{i}")
        router.flush()
        assert command_calls(redis_client, *reads) == before
        assert command_calls(redis_client, "evalsha") > writes_before  # the log still reached Redis
        t0 = time.monotonic()
        rev = write_traffic(redis_client, keys, "m", TrafficTable(production=v1, candidate=v2, candidate_percent=100))
        wait_for(lambda: router.table.revision == rev, timeout=1.0, interval=0.01)
        assert time.monotonic() - t0 < 1.0
        assert router.predict(row(), "after").version == v2

    def test_a_change_whose_announcement_was_missed_is_caught_by_the_revision_check(self, make_version, open_router,
                                                                                    redis_client, keys):
        """A table written without PUBLISH (a lost message) is still picked up by the periodic check."""
        v1, v2 = make_version(seed=0), make_version(seed=1)
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1))
        router = open_router(check_interval=0.2)
        redis_client.hset(keys.traffic(model="m"), mapping={"production": v2, "revision": 7})
        wait_for(lambda: router.table.revision == 7, timeout=10)
        assert router.predict(row(), "x").version == v2

    def test_keeps_routing_while_redis_is_down(self, tmp_path, keys):
        """With Redis stopped, answers still come from the cached table and loaded versions."""
        import redis as redis_lib

        (tmp_path / "own-redis").mkdir()
        server = EmbeddedRedis(tmp_path / "own-redis").start()
        try:
            client = redis_lib.Redis.from_url(server.url, socket_timeout=1)
            reg = Registry(client, keys)
            X, y = training_frame(0)
            ref = save_artifact(LogisticRegression().fit(X, y), tmp_path / "m.skops")
            v = str(reg.register(ModelVersion(model="m", version=0, status="production", artifact_uri=ref.uri,
                                              sha256=ref.sha256)).version)
            write_traffic(client, keys, "m", TrafficTable(production=v))
            router = Router("m", client, keys, reg, check_interval=0.1)
            server.stop()
            answers = [router.predict(row(i), f"down-{i}") for i in range(200)]
            assert {a.version for a in answers} == {v}
            assert router.status()["pending_records"] > 0  # buffered until Redis is back
            router.close(timeout=0.5)
        finally:
            server.stop()

    def test_production_comes_from_the_registry_before_any_table_is_written(self, make_version, open_router, registry):
        """With no traffic table, the registry's production alias serves."""
        make_version(seed=0)
        v2 = make_version(seed=1)
        registry.set_alias("m", "production", int(v2), why="first deploy")
        assert open_router().predict(row(), "r").version == v2

    def test_no_production_version_is_an_error(self, open_router):
        """A model with nothing to serve raises NoProductionVersion."""
        with pytest.raises(NoProductionVersion, match="no production version"):
            open_router("ghost").predict(row(), "r")


# --------------------------------------------------------------------------- loading


class TestLoading:
    def test_previous_production_stays_loaded_so_rollback_loads_nothing(self, make_version, open_router, registry,
                                                                        redis_client, keys):
        """Production, candidate and previous production are loaded ahead; a rollback switches with no load."""
        v1, v2, v3 = make_version(seed=0), make_version(seed=1), make_version(seed=2)
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1))
        router = open_router()
        rev = write_traffic(redis_client, keys, "m", TrafficTable(production=v2, candidate=v3, candidate_percent=10))
        wait_for(lambda: router.table.revision == rev, timeout=10)
        assert set(router.loaded_versions()) == {v1, v2, v3}
        loads = list(registry.loads)
        assert sorted(loads) == sorted(int(v) for v in (v1, v2, v3))
        rev = write_traffic(redis_client, keys, "m", TrafficTable(production=v1))  # roll back
        wait_for(lambda: router.table.revision == rev, timeout=10)
        assert router.predict(row(), "after-rollback").version == v1
        assert registry.loads == loads

    def test_tampered_artifact_is_refused_and_the_old_version_keeps_serving(self, make_version, open_router, registry,
                                                                            redis_client, keys):
        """A version whose bytes no longer match its sha256 is not loaded; production stays where it was."""
        v1, v2 = make_version(seed=0), make_version(seed=1)
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1))
        router = open_router()
        path = Path(registry.get("m", v2).artifact_uri.removeprefix("file://"))
        path.write_bytes(path.read_bytes() + b"tampered")
        rev = write_traffic(redis_client, keys, "m", TrafficTable(production=v2))
        wait_for(lambda: router.table.revision == rev, timeout=10)
        assert router.predict(row(), "r").version == v1
        status = router.status()
        assert "sha256 mismatch" in status["load_errors"][v2]
        assert status["stats"]["load_failures"] == 1 and v2 not in status["loaded"]


# --------------------------------------------------------------------------- request log and feedback


class TestRequestLog:
    def test_records_hold_exactly_the_contract_fields(self, make_version, open_router, redis_client, keys):
        """Each answer is logged with request id, version, latency, prediction, score, error, shadow, ts."""
        v1 = make_version(seed=0)
        router = open_router()
        answers = {f"r{i}": router.predict(row(i), f"r{i}") for i in range(3)}
        assert router.flush()
        records = request_records(redis_client, keys)
        assert len(records) == 3
        for rec in records:
            assert set(rec) == RECORD_FIELDS
            answer = answers[rec["request_id"]]
            assert rec["version"] == v1 and rec["shadow"] == "0" and rec["error"] == ""
            assert json.loads(rec["prediction"]) == answer.prediction
            assert float(rec["score"]) == pytest.approx(answer.score)
            assert float(rec["latency_ms"]) == pytest.approx(answer.latency_ms, abs=1e-3)
            assert abs(float(rec["ts"]) - time.time()) < 60

    def test_scores_follow_the_task(self, make_version, open_router, registry):
        """Binary: positive-class probability; multiclass: top probability; regression: the value."""
        X, y = training_frame(0)
        binary = LogisticRegression().fit(X, y)
        multi = LogisticRegression().fit(X, np.digitize(X["a"], [-0.5, 0.5]))
        reg = LinearRegression().fit(X, X["a"] * 2 + 1)
        make_version("bin", binary), make_version("multi", multi), make_version("reg", reg)
        one = pd.DataFrame([row(3)], columns=COLUMNS)
        p = open_router("bin").predict(row(3), "x")
        assert p.score == pytest.approx(binary.predict_proba(one)[0, 1]) and p.prediction == binary.predict(one)[0]
        p = open_router("multi").predict(row(3), "x")
        assert p.score == pytest.approx(multi.predict_proba(one)[0].max()) and p.prediction == multi.predict(one)[0]
        p = open_router("reg").predict(row(3), "x")
        assert p.score == pytest.approx(reg.predict(one)[0]) == p.prediction

    def test_a_number_too_large_for_a_float_is_the_requests_fault(self, make_version, open_router):
        """A feature of 10**400 (valid JSON) cannot become a float: a FeatureError (400), not the model's failure."""
        make_version(seed=0)
        with pytest.raises(FeatureError, match="cannot use these features"):
            open_router().predict({"a": 10**400, "b": 1.0, "c": 1.0}, "huge")

    def test_a_batch_logs_one_record_per_row(self, make_version, open_router, redis_client, keys):
        """A list of dicts is answered row by row and logged as ``<id>#<row>``."""
        make_version(seed=0)
        router = open_router()
        answer = router.predict([row(1), row(2), row(3)], "batch")
        assert len(answer.prediction) == len(answer.score) == 3
        router.flush()
        assert [r["request_id"] for r in request_records(redis_client, keys)] == ["batch#0", "batch#1", "batch#2"]

    def test_bad_features_are_refused_and_logged_as_an_error(self, make_version, open_router, redis_client, keys):
        """A row missing a feature raises FeatureError naming it, and the failure is logged for the version."""
        v1 = make_version(seed=0)
        router = open_router()
        with pytest.raises(FeatureError, match="missing feature.*c"):
            router.predict({"a": 1.0, "b": 2.0}, "bad")
        router.flush()
        [rec] = request_records(redis_client, keys)
        assert rec["request_id"] == "bad" and rec["version"] == v1 and "missing feature" in rec["error"]
        assert decode_request(rec)["error"] and decode_request(rec)["prediction"] is None

    def test_feedback_is_appended_with_its_fields(self, make_version, open_router, redis_client, keys):
        """Delayed labels go to the feedback stream as request_id, label (typed JSON) and ts."""
        make_version(seed=0)
        router = open_router()
        router.feedback("r1", 1)
        router.feedback("r2", "churned")
        entries = [fields for _, fields in redis_client.xrange(keys.feedback("m"))]
        assert [set(k.decode() for k in e) for e in entries] == [{"request_id", "label", "ts"}] * 2
        assert [decode_feedback(e)["label"] for e in entries] == [1, "churned"]
        with pytest.raises(FeatureError):
            router.feedback("r3", {"not": "a label"})

    def test_a_regression_model_takes_numeric_labels_only(self, make_version, open_router, redis_client, keys):
        """A label for a regression model must be a number: text or a boolean is refused with the reason, and
        nothing reaches the feedback stream the rollout analysis reads."""
        X, _ = training_frame(0)
        make_version("reg", LinearRegression().fit(X, X["a"] * 2 + 1))
        router = open_router("reg")
        router.feedback("r1", 3.5)
        router.feedback("r2", 4)
        for bad in ("n/a", True):
            with pytest.raises(FeatureError, match="must be a number for the regression model"):
                router.feedback("r3", bad)
        assert [decode_feedback(f)["label"] for _, f in redis_client.xrange(keys.feedback("reg"))] == [3.5, 4]


# --------------------------------------------------------------------------- inputs


class TestInputs:
    def test_a_pipeline_with_categories_gets_a_typed_one_row_frame(self, make_version, open_router, registry, tmp_path):
        """Mixed numeric/categorical rows reach a ColumnTransformer pipeline with the training dtypes,
        categories given as numbers are turned into the trained text, and the answer equals the model's."""
        from sklearn.compose import ColumnTransformer
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        X, y = training_frame(0)
        X["plan"] = np.where(X["c"] > 0, "1", "2")
        pipe = make_pipeline(ColumnTransformer([("num", StandardScaler(), ["a", "b"]),
                                                ("cat", OneHotEncoder(handle_unknown="ignore"), ["plan"])]),
                             LogisticRegression()).fit(X, y)
        ref = save_artifact(pipe, tmp_path / "pipe.skops")
        schema = {"columns": [{"name": "a", "kind": "numeric", "dtype": "float64"},
                              {"name": "b", "kind": "numeric", "dtype": "float64"},
                              {"name": "c", "kind": "numeric", "dtype": "float64"},
                              {"name": "plan", "kind": "categorical", "dtype": "str"}]}
        registry.register(ModelVersion(model="p", version=0, status="production", artifact_uri=ref.uri,
                                       sha256=ref.sha256, training_schema=schema))
        router = open_router("p")
        expected = pipe.predict_proba(pd.DataFrame([{"a": 0.3, "b": -1.0, "c": 0.0, "plan": "1"}]))[0, 1]
        assert router.predict({"a": 0.3, "b": -1.0, "c": 0.0, "plan": "1"}, "x").score == pytest.approx(expected)
        assert router.predict({"a": 0.3, "b": -1.0, "c": 0.0, "plan": 1}, "y").score == pytest.approx(expected)
        batch = router.predict([{"a": 0.3, "b": -1.0, "c": 0.0, "plan": "1"}] * 2, "z")
        assert batch.score == pytest.approx([expected, expected])

    def test_separator_characters_in_free_text_do_not_break_the_log(self, make_version, open_router, redis_client,
                                                                     keys):
        """A request id holding the log batch's separator characters is logged as one record, cleaned."""
        make_version(seed=0)
        router = open_router()
        router.predict(row(), "odd\x1fid\x1e")
        router.predict(row(), "plain")
        router.flush()
        records = request_records(redis_client, keys)
        assert [r["request_id"] for r in records] == ["odd\ufffdid\ufffd", "plain"]
        assert all(set(r) == RECORD_FIELDS for r in records)


# --------------------------------------------------------------------------- shadow


class TestShadow:
    def test_stop_goes_on_when_a_killed_shadow_process_is_not_gone_in_time(self):
        """A shadow process that ignores SIGTERM is killed; if it is still not reaped after the wait (a process at
        idle priority on saturated cores may not run for seconds), stop() logs it and returns instead of raising."""
        import sys

        from workers.router.shadow import ShadowProcess

        class NotReapedInTime(subprocess.Popen):
            def wait(self, timeout=None):
                raise subprocess.TimeoutExpired(self.args, timeout)

        proc = NotReapedInTime([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout.readline() == b"ready\n"
        shadow = ShadowProcess({"model": "m"})
        shadow._proc, shadow._fd = proc, proc.stdin.fileno()
        shadow.stop(timeout=0.5)
        assert subprocess.Popen.wait(proc, 10) == -signal.SIGKILL

    def test_a_slow_shadow_does_not_slow_the_answers(self, make_version, open_router, redis_client, keys,
                                                     trust_test_models):
        """With a shadow sleeping 200 ms per call, answers stay fast; mirrors beyond the queue are dropped and counted."""
        X, y = training_frame(0)
        v1 = make_version(seed=0)
        slow = make_version(estimator=ScriptedShadow(delay=0.2).fit(X, y), status="shadow")
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, shadow=slow))
        router = open_router(shadow_queue_size=10)
        router.predict(row(), "warm")
        wait_for(lambda: router.status()["stats"]["shadow_requests"] >= 1, timeout=30, message="shadow process up")
        latencies = []
        for i in range(300):
            t0 = time.perf_counter()
            assert router.predict(row(i), f"s{i}").version == v1
            latencies.append((time.perf_counter() - t0) * 1000)
        assert np.percentile(latencies, 99) < 50, np.percentile(latencies, 99)
        stats = router.status()["stats"]
        assert stats["shadow_dropped"] > 0 and stats["shadow_requests"] < 100
        wait_for(lambda: any(r["shadow"] == "1" for r in request_records(redis_client, keys)), timeout=30)
        mirrored = [r for r in request_records(redis_client, keys) if r["shadow"] == "1"]
        assert all(r["version"] == slow and r["shadow_of"] == r["request_id"] for r in mirrored)
        assert all(float(r["latency_ms"]) >= 190 for r in mirrored)
        router.close(timeout=0.5)

    def test_a_failing_shadow_never_fails_the_request_and_its_error_is_logged(self, make_version, open_router,
                                                                              redis_client, keys, trust_test_models):
        """Every request succeeds; each mirrored call is logged with shadow=1, shadow_of and the error."""
        X, y = training_frame(0)
        v1 = make_version(seed=0)
        bad = make_version(estimator=ScriptedShadow(fail=True).fit(X, y), status="shadow")
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, shadow=bad))
        router = open_router()
        answers = [router.predict(row(i), f"f{i}") for i in range(20)]
        assert all(a.version == v1 for a in answers)
        wait_for(lambda: router.flush(timeout=1.0), timeout=30, message="mirrors answered")
        records = request_records(redis_client, keys)
        mirrored = {r["shadow_of"]: r for r in records if r["shadow"] == "1"}
        assert set(mirrored) == {f"f{i}" for i in range(20)}
        assert all(r["version"] == bad and "shadow exploded" in r["error"] and r["prediction"] == ""
                   for r in mirrored.values())
        assert set(next(iter(mirrored.values()))) == RECORD_FIELDS | {"shadow_of"}
        primary = [r for r in records if r["shadow"] == "0"]
        assert len(primary) == 20 and all(r["error"] == "" for r in primary)

    def test_shadow_agrees_record_by_record_with_production(self, make_version, open_router, redis_client, keys):
        """A shadow of the same model answers every mirrored request (rows of a batch too) identically,
        paired by shadow_of."""
        v1 = make_version(seed=0)
        twin = make_version(seed=0, status="shadow")
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, shadow=twin))
        router = open_router()
        for i in range(30):
            router.predict(row(i), f"t{i}")
        wait_for(lambda: router.flush(timeout=1.0), timeout=30, message="mirrors answered")
        router.predict([row(i) for i in range(200)], "big")  # a batch: one frame larger than a pipe write
        wait_for(lambda: router.flush(timeout=1.0), timeout=30, message="batch mirror answered")
        records = [decode_request(fields) for _, fields in redis_client.xrange(keys.requests("m"))]
        primary = {r["request_id"]: r for r in records if not r["shadow"]}
        mirrored = [r for r in records if r["shadow"]]
        assert len(mirrored) == 230
        for r in mirrored:
            assert (r["prediction"], r["score"]) == (primary[r["shadow_of"]]["prediction"],
                                                     pytest.approx(primary[r["shadow_of"]]["score"]))

    @pytest.mark.slow
    def test_a_killed_shadow_process_is_restarted(self, make_version, open_router, redis_client, keys):
        """When the shadow process dies, the watcher starts a new one and mirroring resumes."""
        v1 = make_version(seed=0)
        twin = make_version(seed=0, status="shadow")
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, shadow=twin))
        router = open_router(check_interval=0.2)
        router.predict(row(), "first")
        wait_for(lambda: router.flush(timeout=1.0), timeout=30)
        os.kill(router._shadow._proc.pid, signal.SIGKILL)
        # Mirrors sent while the new process is being started are dropped (and counted): wait until it is in place.
        wait_for(lambda: router.status()["stats"]["shadow_restarts"] == 1, timeout=10)
        wait_for(lambda: router.status()["stats"]["shadow_alive"] == 1, timeout=10)
        served = router.status()["stats"]["shadow_requests"]
        for i in range(5):
            router.predict(row(i), f"later{i}")
        wait_for(lambda: router.status()["stats"]["shadow_requests"] >= served + 5, timeout=30)

    def test_mirrors_of_frames_arrays_and_numpy_values_agree_with_production(self, make_version, open_router,
                                                                             redis_client, keys):
        """DataFrame, 2-D array and numpy-scalar features reach the shadow intact (sent as JSON)."""
        v1 = make_version(seed=0)
        twin = make_version(seed=0, status="shadow")
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, shadow=twin))
        router = open_router()
        X, _ = training_frame(1, n=20)
        X["c"] = (X["c"] * 10).round().astype("int64")
        router.predict(X, "frame")
        router.predict(X.to_numpy(), "array")
        router.predict({"a": np.float32(0.5), "b": np.int64(1), "c": np.float64(-1.0)}, "numpy")
        wait_for(lambda: router.flush(timeout=1.0), timeout=30, message="mirrors answered")
        records = [decode_request(fields) for _, fields in redis_client.xrange(keys.requests("m"))]
        primary = {r["request_id"]: r for r in records if not r["shadow"]}
        mirrored = [r for r in records if r["shadow"]]
        assert len(mirrored) == 41 and router.status()["stats"]["shadow_dropped"] == 0
        for r in mirrored:
            assert not r["error"], r["error"]
            assert (r["prediction"], r["score"]) == (primary[r["shadow_of"]]["prediction"],
                                                     pytest.approx(primary[r["shadow_of"]]["score"]))

    def test_the_shadow_process_never_unpickles_what_it_reads(self, make_version, open_router, redis_client, keys,
                                                              tmp_path):
        """A pickle on the shadow's pipe is skipped as a bad frame (its code does not run) and
        mirroring goes on: the pipe carries JSON only."""
        import pickle
        import struct

        marker = tmp_path / "unpickled"

        class Gadget:
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        v1 = make_version(seed=0)
        twin = make_version(seed=0, status="shadow")
        write_traffic(redis_client, keys, "m", TrafficTable(production=v1, shadow=twin))
        router = open_router()
        router.predict(row(), "first")
        wait_for(lambda: router.flush(timeout=1.0), timeout=30, message="shadow process up")
        body = pickle.dumps(Gadget())
        with router._shadow._wlock:
            router._shadow._out += struct.pack("<I", len(body)) + body
        router._shadow.send_pending()
        served = router.status()["stats"]["shadow_requests"]
        for i in range(5):
            router.predict(row(i), f"after{i}")
        answered = lambda: router.status()["stats"]["shadow_requests"] >= served + 5  # noqa: E731
        wait_for(lambda: marker.exists() or answered(), timeout=30)
        assert not marker.exists(), "the shadow process ran the code of a pickle it was sent"
        assert answered()


# --------------------------------------------------------------------------- HTTP


class _Server:
    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=20, message="uvicorn started")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def http(make_version, redis_client, keys, registry):
    """A real uvicorn server on a free port serving models ``m`` (with production) and ``empty``."""
    from workers.router.server import create_app

    make_version(seed=0)
    app = create_app(["m", "empty"], client=redis_client, keys=keys, registry=registry)
    with _Server(app) as client:
        yield client


class TestHTTP:
    def test_predict_answers_with_the_contract_fields(self, http):
        """A valid body is answered 200 with request_id, version, prediction and score; an id is made when absent."""
        r = http.post("/models/m/predict", json={"request_id": "abc", "features": row()})
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"request_id", "version", "prediction", "score"} and body["request_id"] == "abc"
        assert body["version"] == "1" and body["prediction"] in (0, 1) and 0 <= body["score"] <= 1
        made = http.post("/models/m/predict", json={"features": row()}).json()["request_id"]
        assert isinstance(made, str) and len(made) >= 16

    @pytest.mark.parametrize("content, status, reason", [
        ({"request_id": "x"}, 422, "features"),
        ({"features": row(), "extra": 1}, 422, "extra"),
        ({"features": "not a dict"}, 422, "features"),
        ({"features": {"a": 1.0}}, 400, "missing feature"),
        ({"features": {"a": "high", "b": 1.0, "c": 2.0}}, 400, "'high'"),
        ("{not json", 422, "JSON"),
    ])
    def test_bad_bodies_get_a_reason_and_no_traceback(self, http, content, status, reason):
        """Malformed or unusable bodies are answered 4xx with a one-line reason."""
        if isinstance(content, str):
            r = http.post("/models/m/predict", content=content, headers={"content-type": "application/json"})
        else:
            r = http.post("/models/m/predict", json=content)
        assert r.status_code == status
        detail = r.json()["detail"]
        assert isinstance(detail, str) and reason.lower() in detail.lower() and "Traceback" not in detail

    def test_unknown_model_and_model_without_production_are_404(self, http):
        """A model the server does not serve, or one with nothing in production, is 404."""
        r = http.post("/models/nope/predict", json={"features": row()})
        assert r.status_code == 404 and "unknown model" in r.json()["detail"]
        r = http.post("/models/empty/predict", json={"features": row()})
        assert r.status_code == 404 and "no production version" in r.json()["detail"]
        assert http.post("/models/nope/feedback", json={"request_id": "x", "label": 1}).status_code == 404

    def test_feedback_is_accepted_and_stored(self, http, redis_client, keys):
        """Feedback answers 202 and lands in the feedback stream; a non-scalar label is 422."""
        r = http.post("/models/m/feedback", json={"request_id": "abc", "label": 0})
        assert r.status_code == 202
        [(_, fields)] = redis_client.xrange(keys.feedback("m"))
        assert decode_feedback(fields)["request_id"] == "abc" and decode_feedback(fields)["label"] == 0
        assert http.post("/models/m/feedback", json={"request_id": "abc", "label": [1]}).status_code == 422

    def test_oversized_requests_are_413_and_long_labels_400(self, http, redis_client, keys):
        """Over MAX_ROWS_PER_REQUEST rows, or a body declared over MAX_BODY_BYTES, is refused before any row is
        logged (one huge batch made the request log drop other clients' records); a label over MAX_LABEL_CHARS is a
        400 whose reason does not echo it."""
        from workers.router.router import MAX_LABEL_CHARS
        from workers.router.server import MAX_BODY_BYTES, MAX_ROWS_PER_REQUEST

        r = http.post("/models/m/predict", json={"features": [row(1)] * (MAX_ROWS_PER_REQUEST + 1)})
        assert r.status_code == 413 and str(MAX_ROWS_PER_REQUEST) in r.json()["detail"]
        r = http.post("/models/m/predict", content=b" " * (MAX_BODY_BYTES + 1), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = http.post("/models/m/feedback", json={"request_id": "abc", "label": "x" * (MAX_LABEL_CHARS + 1)})
        assert r.status_code == 400 and len(r.text) < 500
        assert redis_client.xlen(keys.feedback("m")) == 0
        assert http.post("/models/m/predict", json={"features": [row(1)] * 10}).status_code == 200

    def test_healthz_and_metrics(self, http):
        """Health reports what each model serves (503 while one has no production); metrics count by version."""
        for i in range(3):
            http.post("/models/m/predict", json={"request_id": f"q{i}", "features": row(i)})
        http.post("/models/m/predict", json={"features": {"a": 1.0}})
        health = http.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        assert health.json()["models"]["m"]["production"] == "1"
        assert health.json()["models"]["empty"]["production"] is None
        text = http.get("/metrics").text
        assert 'retrain_router_requests_total{model="m",served_by="production",version="1"} 3.0' in text
        assert 'retrain_router_errors_total{kind="features",model="m",version="1"} 1.0' in text
        assert 'retrain_router_latency_seconds_count{model="m",version="1"} 3.0' in text
        assert 'retrain_router_shadow_dropped_total{model="m"} 0.0' in text
        assert 'retrain_router_traffic_revision{model="m"}' in text

    def test_metrics_documented_by_the_server_are_the_ones_it_exposes(self, http):
        """Every ``retrain_router_*`` series the server's docstring lists is on its real /metrics with
        those labels, nothing undocumented is, and the request, error, latency and feedback series
        move with real requests."""
        import re

        from prometheus_client.parser import text_string_to_metric_families

        from workers.router import server

        documented = {name: set(filter(None, labels.split(",")))
                      for name, labels in re.findall(r"``(retrain_router_[a-z_]+)\{?([a-z_,]*)\}?``", server.__doc__)}

        def scrape() -> dict[str, list]:
            """Documented-style name (``_total`` for counters) -> samples, ``_created`` series left out."""
            families = text_string_to_metric_families(http.get("/metrics").text)
            return {f.name + ("_total" if f.type == "counter" else ""): f.samples for f in families
                    if f.name.startswith("retrain_router_") and not f.name.endswith("_created")}

        def value(series: dict[str, list], sample: str, **labels: str) -> float:
            return sum(s.value for samples in series.values() for s in samples
                       if s.name == sample and s.labels == labels)

        before = scrape()
        http.post("/models/m/predict", json={"request_id": "d1", "features": row()})
        http.post("/models/m/predict", json={"request_id": "d2", "features": [row(1), row(2)]})
        http.post("/models/m/predict", json={"features": {"a": 1.0}})
        http.post("/models/empty/predict", json={"features": row()})
        http.post("/models/m/feedback", json={"request_id": "d1", "label": 1})
        after = scrape()
        assert documented and set(documented) == set(after), set(documented) ^ set(after)
        for name, samples in after.items():
            assert samples, f"{name} has no series after real requests"
            for s in samples:
                assert set(s.labels) - {"le"} == documented[name], (s.name, s.labels)
        moves = {
            ("retrain_router_requests_total", (("model", "m"), ("served_by", "production"), ("version", "1"))): 2,
            ("retrain_router_errors_total", (("kind", "features"), ("model", "m"), ("version", "1"))): 1,
            ("retrain_router_errors_total", (("kind", "no_production"), ("model", "empty"), ("version", ""))): 1,
            ("retrain_router_latency_seconds_count", (("model", "m"), ("version", "1"))): 2,
            ("retrain_router_feedback_total", (("model", "m"),)): 1,
        }
        for (sample, labels), n in moves.items():
            moved = value(after, sample, **dict(labels)) - value(before, sample, **dict(labels))
            assert moved == n, (sample, labels, moved)


@pytest.fixture
def open_server(redis_client, keys, registry):
    """Start real uvicorn servers on ``create_app(models, ...)`` (stopped after the test)."""
    from workers.router.server import create_app

    servers = []

    def _open(models=None, **kw) -> httpx.Client:
        server = _Server(create_app(models, client=redis_client, keys=keys, registry=registry, **kw))
        client = server.__enter__()
        servers.append(server)
        return client

    yield _open
    for server in servers:
        server.__exit__()


class TestDiscovery:
    def test_a_router_started_on_an_empty_registry_serves_models_registered_later(self, open_server,
                                                                                    make_version):
        """With no model list the router starts empty (healthz 200 saying so); a model registered
        afterwards is served on its first request, no restart; an unregistered name is 404 with a reason."""
        http = open_server(None, discovery_interval=0.2)
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["models"] == {}
        assert "no model" in health.json()["detail"]
        r = http.post("/models/m/predict", json={"features": row()})
        assert r.status_code == 404 and "unknown model 'm'" in r.json()["detail"]
        assert "registry" in r.json()["detail"]
        version = make_version("m", seed=0)
        answered = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
            http.post("/models/m/predict", json={"request_id": "late", "features": row()})),
            timeout=10, message="the late model served")
        assert answered.json()["version"] == version
        assert http.post("/models/m/feedback", json={"request_id": "late", "label": 1}).status_code == 202
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["models"]["m"]["production"] == version
        nope = http.post("/models/nope/predict", json={"features": row()})
        assert nope.status_code == 404 and "unknown model 'nope'" in nope.json()["detail"]

    def test_unknown_names_are_looked_up_at_most_once_per_interval(self, open_server, make_version, redis_client):
        """Requests for many unregistered names cost at most one registry read per discovery interval."""
        make_version("m", seed=0)
        http = open_server(None, discovery_interval=30.0)
        assert http.post("/models/m/predict", json={"features": row()}).status_code == 200
        before = command_calls(redis_client, "smembers", "sismember", "scard", "sscan")
        for i in range(40):
            assert http.post(f"/models/nope-{i}/predict", json={"features": row()}).status_code == 404
        assert command_calls(redis_client, "smembers", "sismember", "scard", "sscan") - before <= 1

    def test_an_explicit_model_list_restricts_what_is_served(self, open_server, make_version):
        """``create_app(["m"])`` serves m only: a model registered in the registry but not listed is 404."""
        make_version("m", seed=0)
        make_version("other", seed=1)
        http = open_server(["m"])
        assert http.post("/models/m/predict", json={"features": row()}).status_code == 200
        r = http.post("/models/other/predict", json={"features": row()})
        assert r.status_code == 404 and "unknown model 'other'" in r.json()["detail"]
        assert set(http.get("/healthz").json()["models"]) == {"m"}


# --------------------------------------------------------------------------- CLI


class TestServeCommand:
    @pytest.mark.parametrize("args, message", [
        (["--port", "70000"], "--port"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    ])
    def test_bad_arguments_are_one_line_and_exit_2(self, args, message, redis_server, redis_client):
        """An invalid port or an unknown model is refused with one line on stderr and exit status 2."""
        out = subprocess.run([str(RETRAIN), "serve", *args], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "RETRAIN_REDIS_URL": redis_server.url})
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0]

    @pytest.mark.slow
    def test_serve_answers_over_http(self, make_version, redis_server):
        """``retrain serve --model m`` starts a server that answers predict and health."""
        version = make_version(seed=0)
        port = free_port()
        proc = subprocess.Popen([str(RETRAIN), "serve", "--port", str(port), "--model", "m", "--json"],
                                env={**os.environ, "RETRAIN_REDIS_URL": redis_server.url},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = json.loads(proc.stdout.readline())
            assert first == {"url": f"http://127.0.0.1:{port}", "models": ["m"], "discover": False}

            def healthy():
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, timeout=30, message="retrain serve healthy")
            r = httpx.post(f"http://127.0.0.1:{port}/models/m/predict", json={"features": row()}, timeout=5)
            assert r.status_code == 200 and r.json()["version"] == version
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)

    @pytest.mark.slow
    def test_serve_starts_on_an_empty_registry_and_serves_a_model_registered_later(self, make_version,
                                                                                  redis_server, redis_client):
        """``retrain serve`` with no ``--model`` on a fresh system runs (healthz 200, no models) and
        serves a model registered after it started, without a restart."""
        port = free_port()
        proc = subprocess.Popen([str(RETRAIN), "serve", "--port", str(port), "--json"],
                                env={**os.environ, "RETRAIN_REDIS_URL": redis_server.url},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            first = json.loads(proc.stdout.readline() or "null")
            assert first == {"url": base, "models": [], "discover": True}, proc.stderr.read() if proc.poll() else first

            def health():
                try:
                    return httpx.get(f"{base}/healthz", timeout=1)
                except httpx.HTTPError:
                    return None

            up = wait_for(health, timeout=30, message="retrain serve up")
            assert up.status_code == 200 and up.json()["models"] == {}
            version = make_version(seed=0)

            def served():
                r = httpx.post(f"{base}/models/m/predict", json={"features": row()}, timeout=5)
                return r if r.status_code == 200 else None

            assert wait_for(served, timeout=30, message="the late model served").json()["version"] == version
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(20)
