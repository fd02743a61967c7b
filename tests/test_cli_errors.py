"""The ``retrain`` command line answers bad input with one stderr line, never a traceback.

Every case runs the installed ``.venv/bin/retrain`` in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import typer

from tests.support import ROOT

RETRAIN = ROOT / ".venv" / "bin" / "retrain"
LATIN1_POLICY = '[model]\nname = "caf\xe9"\n'.encode("latin-1")


def run(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN_")}
    return subprocess.run([str(RETRAIN), *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})}, cwd=cwd or ROOT)


def assert_one_line(out: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr, out.stderr
    assert len(lines) == 1, out.stderr
    assert out.returncode == code, (out.returncode, out.stderr)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def redis_env(redis_server, tmp_path) -> dict[str, str]:
    return {"RETRAIN_REDIS_URL": redis_server.url, "RETRAIN_STATE_DIR": str(tmp_path / "state")}


@pytest.fixture
def latin1_policy(tmp_path) -> Path:
    path = tmp_path / "latin1.toml"
    path.write_bytes(LATIN1_POLICY)
    return path


class TestNonUtf8Files:
    @pytest.mark.parametrize("command", ["decide", "drift", "gate", "backtest"])
    def test_a_latin1_policy_is_one_line_naming_the_file(self, command, latin1_policy, tmp_path):
        """decide/drift/gate/backtest --policy on a non-UTF-8 file: exit 2, one line naming it."""
        snap = tmp_path / "s.json"
        snap.write_text('{"last_training_date": "2026-01-01T00:00:00Z"}')
        data = tmp_path / "d.csv"
        data.write_text("x,y\n1,0\n2,1\n")
        model = tmp_path / "c.skops"
        model.write_bytes(b"")
        args = {
            "decide": ["--snapshot", str(snap)],
            "drift": ["--reference", str(data), "--current", str(data)],
            "gate": ["--candidate", str(model), "--data", str(data)],
            "backtest": ["--data", str(data)],
        }[command]
        out = run(command, "--policy", str(latin1_policy), *args)
        assert_one_line(out, 2, str(latin1_policy), "not UTF-8")

    def test_emit_file_not_utf8(self, redis_env, tmp_path):
        """``emit --file`` on a non-UTF-8 file: exit 2, one line naming the file."""
        path = tmp_path / "events.jsonl"
        path.write_bytes(b'\xff\xfe{"type": "drift.data"}\n')
        assert_one_line(run("emit", "--file", str(path), env=redis_env), 2, str(path), "not UTF-8")

    def test_republish_with_a_non_utf8_fix(self, redis_env, tmp_path):
        path = tmp_path / "fixed.json"
        path.write_bytes(b"\xe9{}")
        out = run("dead-letters", "--republish", "1-0", "--fixed", str(path), env=redis_env)
        assert_one_line(out, 2, str(path), "not UTF-8")


class TestDeadLetterIds:
    @pytest.mark.parametrize("entry_id", ["nosuch", "12-x", "1-2-3", "99999999999999999999-0"])
    def test_a_malformed_id_is_one_line(self, redis_env, entry_id):
        """``dead-letters --republish`` with an id Redis would refuse: exit 2, one line, no Redis error."""
        out = run("dead-letters", "--republish", entry_id, env=redis_env)
        assert_one_line(out, 2, "not a dead-letter entry id", entry_id)

    def test_a_well_formed_unknown_id_says_so(self, redis_env):
        out = run("dead-letters", "--republish", "1-0", env=redis_env)
        assert_one_line(out, 2, "no dead letter with id 1-0")


class TestStoredTextIsNotMarkup:
    """Stored text (event ids, reasons, payloads) may hold "[/x]", which rich reads as a closing tag: printed as is."""

    def test_dead_letters_listing(self, redis_env, redis_client):
        from config.keys import Keys

        redis_client.xadd(Keys().dead_letters(), {"reason": "bad [/alert] id", "payload": '{"id": "[/alert]"}',
                                                  "stream": "s", "entry_id": "1-0", "time": "0", "group": "g"})
        out = run("dead-letters", env=redis_env)
        assert out.returncode == 0, out.stderr
        assert "bad [/alert] id" in " ".join(out.stdout.split())

    def test_explain_of_a_reason_with_brackets(self, redis_env, redis_client):
        from config.keys import Keys
        from workers.decision.state import DecisionStore

        record = {"id": "d-brackets", "model": "m", "time": "2026-01-01T00:00:00+00:00", "timestamp": 1.0,
                  "action": "start", "urgency": "critical", "reason": "manual: fix [/x] now", "triggers": [
                      {"name": "manual", "triggered": True, "urgency": "critical", "value": None, "threshold": None,
                       "reason": "fix [/x] now (requested by [bold]ana)"}],
                  "checks": [], "suppressed": [], "event_ids": ["[/e]"]}
        pipe = redis_client.pipeline()
        DecisionStore(redis_client, Keys()).write_record(pipe, record)
        pipe.execute()
        out = run("explain", "d-brackets", env=redis_env)
        assert out.returncode == 0, out.stderr
        text = " ".join(out.stdout.split())
        assert "fix [/x] now" in text and "[bold]ana" in text and "[/e]" in text

    def test_emit_file_rejections(self, redis_env, tmp_path):
        path = tmp_path / "events.jsonl"
        path.write_text('{"type": "[/x]", "subject": "m", "data": {}}\n')
        out = run("emit", "--file", str(path), env=redis_env)
        assert out.returncode == 1 and "Traceback" not in out.stderr and "MarkupError" not in out.stderr + out.stdout
        assert "line 1:" in out.stdout and "[/x]" in out.stdout


class TestSettingsAndConnection:
    @pytest.mark.parametrize("command", [["ingest"], ["worker", "--role", "decision"], ["status"],
                                         ["dead-letters"], ["beat"], ["serve"]])
    def test_a_bad_setting_names_the_variable(self, command, redis_env):
        """RETRAIN_STREAM_SHARDS=abc: exit 2, one line naming the variable, not 'cannot reach Redis'."""
        out = run(*command, env={**redis_env, "RETRAIN_STREAM_SHARDS": "abc"})
        line = assert_one_line(out, 2, "RETRAIN_STREAM_SHARDS", "invalid setting")
        assert "Redis" not in line

    def test_inconsistent_settings_are_one_line_naming_them(self, redis_env):
        out = run("status", env={**redis_env, "RETRAIN_DEDUP_RETENTION": "1m", "RETRAIN_BUS_CLAIM_IDLE": "30s"})
        assert_one_line(out, 2, "invalid setting", "RETRAIN_DEDUP_RETENTION (1m)", "RETRAIN_BUS_CLAIM_IDLE")

    def test_an_unparsable_setting_names_the_variable(self, redis_env):
        out = run("status", env={**redis_env, "RETRAIN_TRUSTED_PREFIXES": "not json"})
        assert_one_line(out, 2, "invalid setting RETRAIN_TRUSTED_PREFIXES")

    def test_an_unreachable_redis_says_so_without_the_password(self):
        """A refused connection is named as one; the password in the URL is never printed."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        for command in (["status"], ["ingest", "--insecure-no-auth"]):
            line = assert_one_line(run(*command, env={"RETRAIN_REDIS_URL": url}), 2,
                                   "cannot reach Redis (ConnectionError)")
            assert "s3cret" not in line

    def test_a_bad_redis_url_is_not_called_unreachable(self):
        out = run("status", env={"RETRAIN_REDIS_URL": "http://:s3cret@example/0"})
        line = assert_one_line(out, 2, "Redis URL is not usable")
        assert "s3cret" not in line


class TestLastResort:
    """``run_app`` turns what no command expected into one line, and keeps exit semantics."""

    @staticmethod
    def app_raising(exc: BaseException) -> typer.Typer:
        app = typer.Typer()

        @app.command()
        def boom() -> None:
            raise exc

        return app

    def test_an_unexpected_error_is_one_line_exit_1(self, capsys):
        from workers.cli._common import run_app

        assert run_app(self.app_raising(RuntimeError("disk\non fire")), []) == 1
        assert capsys.readouterr().err == "error: RuntimeError: disk on fire\n"

    def test_keyboard_interrupt_and_system_exit_keep_their_meaning(self, capsys):
        from workers.cli._common import run_app

        assert run_app(self.app_raising(KeyboardInterrupt()), []) == 130
        with pytest.raises(SystemExit) as exit_:
            run_app(self.app_raising(SystemExit(3)), [])
        assert exit_.value.code == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestFlagInput:
    def test_emit_of_an_unknown_type_is_one_stderr_line(self, redis_env):
        """``emit --type bogus.type``: the flags are the input, so exit 2 and one stderr line, nothing on stdout."""
        out = run("emit", "--type", "bogus.type", "--model", "churn", env=redis_env)
        assert_one_line(out, 2, "unknown event type 'bogus.type'")
        assert out.stdout == ""

    def test_emit_of_a_bad_subject_is_not_wrapped(self, redis_env):
        out = run("emit", "--type", "drift.data", "--model", "bad model!", "--set", "drift_score=0.3", "--json",
                  env={**redis_env, "COLUMNS": "40"})
        assert_one_line(out, 2, "subject", "should match pattern")
        assert out.stdout == ""

    def test_an_unknown_worker_pool_is_one_line(self, redis_env):
        """``worker --pool bogus`` is refused before Celery starts: one line naming the choices."""
        out = run("worker", "--role", "decision", "--pool", "bogus", env=redis_env)
        assert_one_line(out, 2, "--pool", "'bogus'", "prefork", "solo")

    def test_a_bad_cli_log_level_is_one_line(self, redis_env):
        out = run("status", env={**redis_env, "RETRAIN_CLI_LOG_LEVEL": "bogus"})
        assert_one_line(out, 2, "RETRAIN_CLI_LOG_LEVEL", "'bogus'", "WARNING")

    @pytest.mark.parametrize("option", ["--serve-port", "--ingest-port", "--flower-port", "--redis-port"])
    def test_up_refuses_a_port_out_of_range(self, option, redis_env):
        """``up`` checks its ports (0 = none) before it starts anything."""
        out = run("up", "--no-beat", option, "70000", env={**redis_env, "RETRAIN_INGEST_TOKEN": "t" * 32})
        assert_one_line(out, 2, f"'{option}'", "65535")


class TestServerOptions:
    @pytest.mark.parametrize("command", ["ingest", "serve"])
    def test_a_bad_log_level_or_a_taken_port_is_one_line(self, command, redis_env):
        """Both servers check their options first: an unknown log level (ingest raised KeyError, exit 1) and a port
        in use (ingest exited 3 with uvicorn's line) are exit 2 with one line."""
        env = {**redis_env, "RETRAIN_INGEST_TOKEN": "t"}
        assert_one_line(run(command, "--log-level", "bogus", env=env), 2, "unknown log level 'bogus'")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert_one_line(run(command, "--port", str(port), env=env), 2, f"cannot listen on 127.0.0.1:{port}")

    def test_emit_data_nested_too_deeply_is_one_line(self, redis_env):
        deep = "[" * 5000 + "]" * 5000
        assert_one_line(run("emit", "--type", "drift.data", "--model", "m", "--data", '{"x": ' + deep + "}",
                            env=redis_env), 2, "nested too deeply")
        assert_one_line(run("emit", "--type", "drift.data", "--model", "m", "--set", "x=" + deep, env=redis_env),
                        2, "nested too deeply")


class TestUp:
    def test_an_unreachable_external_redis_is_the_usual_line(self, tmp_path):
        """``up`` with RETRAIN_REDIS_URL on a closed port: exit 2 'cannot reach Redis', no password, nothing started."""
        url = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
        out = run("up", "--no-beat", env={"RETRAIN_REDIS_URL": url, "RETRAIN_STATE_DIR": str(tmp_path / "state")})
        line = assert_one_line(out, 2, "cannot reach Redis (ConnectionError)")
        assert "s3cret" not in line
        assert not list((tmp_path / "state" / "logs").glob("*.log"))

    def test_a_child_that_exits_gives_its_own_reason(self, redis_env, tmp_path):
        """The router cannot bind its port: the one error line carries the router's last log line,
        not what an earlier run left in the same log."""
        logs = tmp_path / "state" / "logs"
        logs.mkdir(parents=True)
        (logs / "router.log").write_text("error: an earlier run's complaint\n")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            out = run_up("--roles", "", "--no-beat", "--serve-port", str(port), env=redis_env)
        line = assert_one_line(out, 2, "router exited with status 2", f"cannot listen on 127.0.0.1:{port}",
                               str(logs / "router.log"))
        assert "earlier run" not in line


def run_up(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """``retrain up ...`` expected to stop by itself; if it does not, SIGTERM makes it stop its children."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN_")}
    proc = subprocess.Popen([str(RETRAIN), "up", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**base, **env}, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        stdout, stderr = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


class TestForcedPromotionRefused:
    def test_a_refused_forced_promotion_keeps_the_rejection(self, redis_client, keys, redis_env):
        """``promote --version V --force`` while another rollout runs: exit 2, V stays rejected, no override note."""
        from workers.registry.store import ModelVersion, Registry

        registry = Registry(redis_client, keys)
        for status in ("production", "rejected", "staged"):
            registry.register(ModelVersion(model="m", version=0, status=status, artifact_uri="file:///x.skops",
                                           sha256="0" * 64))
        registry.update("m", 2, gate={"checks": [{"name": "latency", "passed": False}]})
        registry.set_alias("m", "production", 1, who="t", why="setup")
        started = run("promote", "m", "--version", "3", "--who", "ana", "--json", env=redis_env)
        assert started.returncode == 0, started.stderr
        out = run("promote", "m", "--version", "2", "--force", "--reason", "flaky check", "--who", "ana", env=redis_env)
        assert_one_line(out, 2, "a rollout of m v3 is still")
        record = registry.get("m", 2)
        assert record.status == "rejected"
        assert not [n for n in record.notes if n.get("kind") == "gate_override"]
        assert record.notes[-1]["why"].startswith("gate override not applied")


class TestDemoFolder:
    def test_sigterm_stops_what_the_demo_started(self, tmp_path):
        """``timeout``/a supervisor sends SIGTERM: the demo stops its Redis and workers on the way out."""
        import signal
        import time

        base = {k: v for k, v in os.environ.items() if not k.startswith("RETRAIN_")}
        demo = subprocess.Popen([str(RETRAIN), "demo", "--json", "--no-live", "--state-dir", str(tmp_path / "demo")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                                env={**base, "RETRAIN_STATE_DIR": str(tmp_path / "state")}, start_new_session=True)

        def children() -> set[int]:
            out = set()
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    fields = stat.read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == demo.pid:
                    out.add(int(stat.parent.name))
            return out

        started: set[int] = set()
        try:
            deadline = time.monotonic() + 60
            while len(children()) < 3 and time.monotonic() < deadline:  # Redis and the first workers
                time.sleep(0.2)
            started = children()
            assert len(started) >= 3, "the demo did not start its processes"
            demo.send_signal(signal.SIGTERM)
            demo.wait(60)
            left = {pid for pid in started if Path(f"/proc/{pid}").exists()
                    and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
            assert left == set()
        finally:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
            for pid in started:  # whatever a failure left behind
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def test_a_folder_the_demo_did_not_make_is_refused_and_kept(self, tmp_path):
        """``demo --state-dir`` on a non-empty folder without the demo's marker: exit 2, nothing deleted."""
        folder = tmp_path / "mine"
        folder.mkdir()
        (folder / "keep.txt").write_text("precious")
        out = run("demo", "--json", "--state-dir", str(folder), env={"RETRAIN_STATE_DIR": str(tmp_path / "state")})
        assert_one_line(out, 2, str(folder), "not made by the demo")
        assert (folder / "keep.txt").read_text() == "precious"

    def test_reset_refuses_a_foreign_folder_and_clears_its_own(self, tmp_path):
        from workers.demo.run import MARKER, StateDirRefused, reset_state_dir

        foreign = tmp_path / "foreign"
        foreign.mkdir()
        (foreign / "keep.txt").write_text("precious")
        with pytest.raises(StateDirRefused, match="not made by the demo"):
            reset_state_dir(foreign)
        assert (foreign / "keep.txt").read_text() == "precious" and not (foreign / MARKER).exists()

        ours = tmp_path / "demo"
        reset_state_dir(ours)  # new: made and marked
        assert [p.name for p in ours.iterdir()] == [MARKER]
        (ours / "logs").mkdir()
        (ours / "logs" / "old.log").write_text("last run")
        (ours / "link").symlink_to(foreign)
        reset_state_dir(ours)  # a previous demo folder: cleared and reused; a link's target stays
        assert [p.name for p in ours.iterdir()] == [MARKER]
        assert (foreign / "keep.txt").read_text() == "precious"

        empty = tmp_path / "empty"
        empty.mkdir()
        reset_state_dir(empty)  # an empty folder holds nothing to lose
        assert (empty / MARKER).is_file()

    def test_a_dead_worker_still_gives_the_json_result(self, tmp_path):
        """A process of the system dies: ``run()`` returns the failure result (what ``--json`` prints)
        with the process's own last log line, instead of raising."""
        import json
        import sys

        from workers.demo.run import Demo
        from workers.supervisor import LocalSystem

        class DyingWorker(Demo):
            def start_system(self) -> None:
                self.system = LocalSystem(self.state_dir)
                self.system.spawn("worker-training", [sys.executable, "-c",
                                                      "print('MemoryError: out of memory'); raise SystemExit(3)"])
                self.wait(lambda: False, 30, "the workers")

        result = DyingWorker(tmp_path / "demo", live=False, say=lambda text: None).run()
        assert result["ok"] is False
        assert result["error"].startswith("worker-training exited with status 3: MemoryError: out of memory")
        assert all(s["outcome"] == "not run" for s in result["scenarios"])
        json.dumps(result)
