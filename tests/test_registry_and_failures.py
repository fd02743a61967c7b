"""Registry time queries, forced promotion, tampered artifacts, alerts, and a worker killed mid-fit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from events.bus import EventBus
from events.envelope import new_event
from tests.support import retrain_cli, wait_for
from tests.test_pipeline import POLICY, request, setup_model
from workers.registry.store import ModelVersion, Registry


def _version(registry, model="m", status="staged", pid=None):
    return registry.register(ModelVersion(model=model, version=0, status=status, artifact_uri="file:///x.skops",
                                          sha256="0" * 64, pipeline_id=pid))


class TestRegistry:
    def test_alias_history_answers_what_was_in_production_at_time_t(self, redis_client, keys):
        """Each alias move is appended with who/why; alias_at returns the version in force at any instant."""
        registry = Registry(redis_client, keys)
        for _ in range(3):
            _version(registry)
        registry.set_alias("m", "production", 1, who="pipeline", why="first model")
        t1 = time.time()
        time.sleep(0.02)
        registry.set_alias("m", "production", 2, who="ana", why="rollout completed")
        t2 = time.time()
        time.sleep(0.02)
        registry.set_alias("m", "production", 1, who="bob", why="rollback: latency")
        assert registry.alias_at("m", "production", t1 - 1) is None
        assert registry.alias_at("m", "production", t1).version == 1
        at2 = registry.alias_at("m", "production", t2)
        assert (at2.version, at2.who, at2.why, at2.previous) == (2, "ana", "rollout completed", 1)
        assert registry.alias_at("m", "production", time.time()).why == "rollback: latency"
        assert [m.version for m in registry.alias_history("m", "production")] == [1, 2, 1]

    def test_registration_is_idempotent_by_pipeline(self, redis_client, keys):
        """Registering twice for one pipeline returns the same version; numbers are never reused."""
        registry = Registry(redis_client, keys)
        a = _version(registry, pid="p-1")
        b = _version(registry, pid="p-1")
        c = _version(registry, pid="p-2")
        assert a.version == b.version == 1 and c.version == 2
        assert registry.get("m", 1).notes == [] and isinstance(registry.get("m", 1).trigger_event_ids, list)


class TestForcedPromotion:
    def test_rejected_version_needs_force_and_reason_and_the_override_is_recorded(self, redis_client, keys, redis_server):
        """`retrain promote --version V` refuses a rejected version; with --force --reason it starts the rollout and records the override."""
        registry = Registry(redis_client, keys)
        _version(registry, status="production")
        rejected = _version(registry, status="rejected")
        registry.update("m", rejected.version, gate={"checks": [{"name": "latency", "passed": False}]})
        registry.set_alias("m", "production", 1, who="t", why="setup")
        base = ["promote", "m", "--version", "2", "--who", "ana"]
        out = retrain_cli(*base, redis_url=redis_server.url)
        assert out.returncode == 2 and "rejected by the gate (latency)" in out.stderr
        out = retrain_cli(*base, "--force", redis_url=redis_server.url)
        assert out.returncode == 2 and "--reason" in out.stderr
        out = retrain_cli(*base, "--force", "--reason", "latency check flaky on CI box", "--json",
                          redis_url=redis_server.url)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "shadow"
        record = registry.get("m", 2)
        override = [n for n in record.notes if n.get("kind") == "gate_override"]
        assert override and override[0]["who"] == "ana" and override[0]["failed_checks"] == ["latency"]


class TestTriggerCommand:
    def test_trigger_publishes_a_manual_request(self, redis_client, keys, redis_server):
        """`retrain trigger MODEL --reason` publishes retrain.requested with who and why."""
        out = retrain_cli("trigger", "churn", "--reason", "new labels", "--who", "ana", "--json",
                          redis_url=redis_server.url)
        assert out.returncode == 0, out.stderr
        [(_, fields)] = redis_client.xrange(keys.events_for("churn"))
        event = json.loads(fields[b"e"])
        assert event["type"] == "retrain.requested" and event["data"] == {"reason": "new labels", "requested_by": "ana"}


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server API
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


class TestAlerts:
    def test_webhook_gets_a_slack_compatible_body_and_the_event_is_logged(self, redis_client, keys, settings):
        """raise_alert records the alert, publishes alert.raised, and POSTs JSON with a `text` field."""
        from workers.alerts import raise_alert, recent_alerts

        server = HTTPServer(("127.0.0.1", 0), _Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            bus = EventBus.from_settings(redis_client, settings)
            _Hook.received.clear()
            raise_alert(redis_client, keys, bus, "churn", "critical", "gate failed", "latency 80 ms > 50",
                        webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
            wait_for(lambda: _Hook.received, timeout=5, message="the webhook call")
        finally:
            server.shutdown()
        body = _Hook.received[0]
        assert body["text"] == "[CRITICAL] churn: gate failed - latency 80 ms > 50"
        assert body["alert"]["type"] == "alert.raised"
        assert recent_alerts(redis_client, keys, "churn")[0]["title"] == "gate failed"

    def test_an_alert_with_a_fixed_id_is_recorded_and_posted_once(self, redis_client, keys, settings):
        """raise_alert twice with one event_id (a re-run): one recorded alert, one webhook call, the
        event published under that id; another id is a new alert."""
        from workers.alerts import raise_alert, recent_alerts

        server = HTTPServer(("127.0.0.1", 0), _Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        try:
            bus = EventBus.from_settings(redis_client, settings)
            _Hook.received.clear()
            for _ in range(2):
                event = raise_alert(redis_client, keys, bus, "churn", "critical", "training failed", "disk full",
                                    webhook_url=url, event_id="p-1:alert.raised:train")
                assert event.id == "p-1:alert.raised:train"
            wait_for(lambda: _Hook.received, timeout=5, message="the webhook call")
            time.sleep(0.3)
            assert len(_Hook.received) == 1
            raise_alert(redis_client, keys, bus, "churn", "critical", "training failed", "disk full",
                        webhook_url=url, event_id="p-2:alert.raised:train")
            wait_for(lambda: len(_Hook.received) == 2, timeout=5, message="the second pipeline's webhook call")
        finally:
            server.shutdown()
        assert [a["id"] for a in recent_alerts(redis_client, keys, "churn")] == ["p-2:alert.raised:train",
                                                                               "p-1:alert.raised:train"]
        ids = {json.loads(f[b"e"])["id"] for _, f in redis_client.xrange(keys.events_for("churn"))}
        assert ids == {"p-1:alert.raised:train", "p-2:alert.raised:train"}


    def test_a_webhook_skipped_by_a_failed_run_is_sent_by_the_re_run(self, redis_client, keys, settings):
        """A run that records the alert, then fails to publish it (the broker hiccups) never posted; its re-run (same
        alert id) finds the alert recorded and still posts the webhook, once. A failed POST is retried the same way."""
        from workers.alerts import raise_alert

        server = HTTPServer(("127.0.0.1", 0), _Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        real = EventBus.from_settings(redis_client, settings)

        class Hiccup:
            calls = 0

            def publish(self, event):
                Hiccup.calls += 1
                if Hiccup.calls == 1:
                    raise ConnectionError("connection reset by peer")
                return real.publish(event)

        try:
            _Hook.received.clear()
            with pytest.raises(ConnectionError):
                raise_alert(redis_client, keys, Hiccup(), "churn", "critical", "pipeline failed", "disk full",
                            webhook_url=url, event_id="p-9:alert.raised:train")
            assert _Hook.received == []
            raise_alert(redis_client, keys, Hiccup(), "churn", "critical", "pipeline failed", "disk full",
                        webhook_url=url, event_id="p-9:alert.raised:train")
            wait_for(lambda: _Hook.received, timeout=5, message="the re-run's webhook call")
            wait_for(lambda: redis_client.get(keys.alert_sent("p-9:alert.raised:train")) == b"sent", timeout=5)
            raise_alert(redis_client, keys, Hiccup(), "churn", "critical", "pipeline failed", "disk full",
                        webhook_url=url, event_id="p-9:alert.raised:train")
            time.sleep(0.3)
            assert len(_Hook.received) == 1
            down = "http://127.0.0.1:9/hook"  # nothing listens: the POST fails and the claim is dropped
            raise_alert(redis_client, keys, Hiccup(), "churn", "critical", "rollout stuck", webhook_url=down,
                        event_id="p-10:alert.raised:rollout")
            wait_for(lambda: redis_client.get(keys.alert_sent("p-10:alert.raised:rollout")) is None, timeout=10)
            raise_alert(redis_client, keys, Hiccup(), "churn", "critical", "rollout stuck", webhook_url=url,
                        event_id="p-10:alert.raised:rollout")
            wait_for(lambda: len(_Hook.received) == 2, timeout=5, message="the retried webhook call")
        finally:
            server.shutdown()


SLOW_POLICY_PATCH = {
    'estimator = "sklearn.linear_model.LogisticRegression"': 'estimator = "sklearn.ensemble.RandomForestClassifier"',
    'params = {{ max_iter = 200 }}': 'params = {{ n_estimators = 300, random_state = 0 }}',
    'space = {{ C = [0.1, 1.0] }}': 'space = {{ max_depth = [12] }}',
    'n_candidates = 2': 'n_candidates = 1',
    'max_latency_p99_ms = 200': 'max_latency_p99_ms = 2000',
}


class TestWorkerKilledMidFit:
    @pytest.mark.slow
    def test_training_process_killed_mid_fit_reruns_and_registers_one_version(self, start_worker, redis_client,
                                                                              keys, settings, tmp_path, monkeypatch):
        """SIGKILL of the pool process running the fit: the task is redelivered, reruns, and exactly one version exists."""
        import tests.test_pipeline as tp

        policy = tp.POLICY
        for old, new in SLOW_POLICY_PATCH.items():
            policy = policy.replace(old, new)
        monkeypatch.setattr(tp, "POLICY", policy)
        env = setup_model(tmp_path)
        worker = start_worker("all", env=env)
        bus = EventBus.from_settings(redis_client, settings)
        request(bus)
        registry = Registry(redis_client, keys)

        def training_now():
            for raw in redis_client.scan_iter(match=keys.pipeline("churn", "*")):
                if redis_client.type(raw) == b"hash" and redis_client.hget(raw, "status") == b"running:train":
                    return raw
            return None

        wait_for(training_now, timeout=60, message="the train step to start")
        time.sleep(0.3)
        children = subprocess.run(["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True).stdout.split()
        assert children, "the prefork pool has a child process"
        for pid in children:
            os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: registry.alias("churn", "production") == 1, timeout=120, message="v1 after the rerun")
        time.sleep(1.0)
        assert [v.version for v in registry.versions("churn")] == [1]
        assert "WorkerLostError" in worker.log() or "lost" in worker.log().lower()


class TestTamperedArtifact:
    @pytest.mark.slow
    def test_tampered_production_artifact_fails_the_pipeline_with_an_alert(self, start_worker, redis_client, keys,
                                                                          settings, tmp_path):
        """A production artifact whose bytes changed is refused at load; the pipeline fails and alerts."""
        env = setup_model(tmp_path)
        start_worker("all", env=env)
        bus = EventBus.from_settings(redis_client, settings)
        registry = Registry(redis_client, keys)
        request(bus)
        wait_for(lambda: registry.alias("churn", "production") == 1, timeout=90, message="v1 in production")
        path = registry.get("churn", 1).artifact_uri.removeprefix("file://")
        with open(path, "ab") as f:
            f.write(b"tampered")
        wait_for(lambda: not redis_client.hexists(keys.guard("churn"), "in_flight"), timeout=20, message="slot free")
        request(bus, reason="again")
        wait_for(lambda: any("sha256" in json.loads(a)["data"].get("message", "") or
                             "tamper" in json.loads(a)["data"].get("message", "").lower()
                             for a in redis_client.lrange(keys.alerts("churn"), 0, -1)),
                 timeout=90, message="an alert about the tampered artifact")
        assert registry.alias("churn", "production") == 1
        assert [v.version for v in registry.versions("churn")] == [1]
