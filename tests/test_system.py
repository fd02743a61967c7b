"""The user's first hour: `retrain up`, `retrain demo`, compose.yaml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.support import ROOT, wait_for

RETRAIN = [sys.executable, "-m", "workers.cli"]


def _clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN_")}
    env["RETRAIN_STATE_DIR"] = str(tmp_path / "state")
    return env


def _celery_children(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "celery" in line]


class TestUp:
    @pytest.mark.slow
    def test_up_starts_everything_and_stops_cleanly(self, tmp_path):
        """`retrain up` starts embedded Redis, a worker per role and beat; SIGTERM stops all of them."""
        env = _clean_env(tmp_path)
        proc = subprocess.Popen([*RETRAIN, "up", "--json"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            line = proc.stdout.readline()
            info = json.loads(line)
            names = {p["name"] for p in info["processes"]}
            assert names == {"worker-decision", "worker-training", "worker-gate", "worker-rollout", "beat"}
            assert info["embedded_redis"] is True
            url_file = tmp_path / "state" / "redis" / "url"
            assert url_file.read_text().startswith("redis://:") and "@127.0.0.1:" in url_file.read_text()
            assert url_file.stat().st_mode & 0o777 == 0o600
            password = url_file.read_text().split(":")[2].split("@")[0]  # the embedded Redis has one of its own
            assert password not in line and password not in open(f"/proc/{proc.pid}/cmdline").read()
            import redis as redis_py

            with pytest.raises(redis_py.AuthenticationError):  # without it, nobody gets in
                redis_py.Redis.from_url(url_file.read_text().replace(f":{password}@", "")).ping()
            # Other commands find the running system through the URL file.
            status = subprocess.run([*RETRAIN, "emit", "--type", "volume.accumulated", "--model", "m",
                                     "--set", "new_samples=5", "--json"], env=env, cwd=ROOT,
                                    capture_output=True, text=True)
            assert json.loads(status.stdout)["published"] == 1, status.stderr
            pids = [p["pid"] for p in info["processes"]]
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=40)
        assert code == 0, proc.stderr.read()
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        assert not (tmp_path / "state" / "redis" / "url").exists()


    @pytest.mark.slow
    def test_a_hang_up_stops_everything_too(self, tmp_path):
        """SIGHUP (the terminal closed, the ssh session dropped) stops `retrain up` and its children like SIGTERM;
        they used to outlive it, Redis and workers adopted by init."""
        env = _clean_env(tmp_path)
        proc = subprocess.Popen([*RETRAIN, "up", "--roles", "rollout", "--no-beat", "--json"], env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            info = json.loads(proc.stdout.readline())
            pids = [p["pid"] for p in info["processes"]]
        finally:
            proc.send_signal(signal.SIGHUP)
            code = proc.wait(timeout=40)
        assert code == 0, proc.stderr.read()
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        assert not (tmp_path / "state" / "redis" / "url").exists()


class TestDemo:
    @pytest.mark.slow
    def test_demo_json_says_every_scenario_ended_as_expected(self, tmp_path):
        """`retrain demo --json` plays the three scenarios on real processes and all end as expected."""
        env = _clean_env(tmp_path)
        started = time.monotonic()
        out = subprocess.run([*RETRAIN, "demo", "--json", "--state-dir", str(tmp_path / "demo")], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=240)
        result = json.loads(out.stdout)
        assert [s["name"] for s in result["scenarios"]] == ["drift", "corrupted data", "worse live"]
        assert result["ok"] is True, json.dumps(result, indent=1) + out.stderr[-3000:]
        assert out.returncode == 0
        drift, corrupted, worse = result["scenarios"]
        assert drift["phases"] == ["shadow", "canary", "25%", "50%", "100%"]
        assert corrupted["failed_checks"] and corrupted["production"] == drift["version"]
        assert worse["rolled_back_in"] in ("shadow", "canary", "25%", "50%")
        print(f"demo took {time.monotonic() - started:.1f}s")


class TestCompose:
    def compose(self):
        return yaml.safe_load((ROOT / "compose.yaml").read_text())

    def test_every_service_command_is_a_real_cli_entry_point(self):
        """Each service's command runs `retrain <command> --help` successfully in the image's entry point."""
        compose = self.compose()
        services = compose["services"]
        assert {"redis", "decision", "training", "gate", "rollout", "beat", "router", "ingest", "flower"} <= set(services)
        for name, svc in services.items():
            if name in ("redis", "flower"):
                continue
            command = svc["command"]
            out = subprocess.run([*RETRAIN, command[0], "--help"], capture_output=True, text=True, cwd=ROOT)
            assert out.returncode == 0, f"{name}: retrain {command[0]} --help failed: {out.stderr}"
            # every option given in compose exists in the command's help
            for arg in command[1:]:
                if arg.startswith("--"):
                    assert arg in out.stdout, f"{name}: {arg} is not an option of retrain {command[0]}"
        flower = services["flower"]
        assert flower["entrypoint"][:4] == ["celery", "-A", "workers.app", "flower"]
        assert "FLOWER_BASIC_AUTH" in flower["environment"]  # basic auth from the environment, not argv
        assert not any("basic-auth" in c for c in flower.get("command") or [])

    def test_redis_is_durable_and_protected_and_metrics_not_published(self):
        """Redis runs with AOF, noeviction and a password; only router, ingest and Flower publish ports, on loopback."""
        services = self.compose()["services"]
        cmd = " ".join(services["redis"]["command"])
        assert "--appendonly yes" in cmd and "--maxmemory-policy noeviction" in cmd and "--requirepass" in cmd
        published = {n for n, s in services.items() if s.get("ports")}
        assert published == {"router", "ingest", "flower"}
        for n in published:
            assert all(str(p).startswith("127.0.0.1:") for p in services[n]["ports"])
        for n in ("decision", "training", "gate", "rollout", "router", "ingest"):
            assert "healthcheck" in services[n]

    @pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (.ci/run installs it)")
    def test_docker_compose_validates_the_file(self):
        """Debian's docker-compose validates compose.yaml (no Docker engine needed)."""
        env = {**os.environ, "REDIS_PASSWORD": "x", "RETRAIN_INGEST_TOKEN": "y", "FLOWER_BASIC_AUTH": "a:b"}
        out = subprocess.run(["docker-compose", "-f", str(ROOT / "compose.yaml"), "config", "-q"],
                             capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, out.stderr
