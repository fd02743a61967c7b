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
