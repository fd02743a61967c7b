"""Test support: real worker processes and small waiting helpers (no mocks of the system)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from workers.cli.cmd_worker import worker_command, worker_env

ROOT = Path(__file__).resolve().parent.parent


def retrain_cli(*args: str, redis_url: str | None = None, env: dict[str, str] | None = None,
                timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run ``retrain ARGS...`` (``python -m workers.cli``) as a user would, against ``redis_url``; output as text."""
    full_env = {**os.environ, **({"RETRAIN_REDIS_URL": redis_url} if redis_url else {}), **(env or {})}
    return subprocess.run([sys.executable, "-m", "workers.cli", *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=timeout)


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05, message: str = ""):
    """Poll until ``predicate()`` is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}: last={last!r}")


class WorkerProcess:
    """A real ``celery worker`` subprocess for one role."""

    def __init__(self, role: str, env: dict[str, str], log_dir: Path, name: str | None = None,
                 concurrency: int = 1, pool: str | None = None):
        self.role = role
        self.name = name or f"{role}-{uuid.uuid4().hex[:6]}@test"
        self.log_path = log_dir / f"{self.name.replace('@', '_')}.log"
        self.cmd = worker_command(role, concurrency, pool, "INFO", self.name)
        self.env = worker_env(role, env)
        self.proc: subprocess.Popen | None = None

    def start(self, app=None, timeout: float = 30.0) -> "WorkerProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if app is not None:
            wait_for(lambda: self._alive() and app.control.ping(destination=[self.name], timeout=0.5),
                     timeout=timeout, message=f"worker {self.name} to answer ping (log {self.log_path})")
        return self

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited with {self.proc.returncode}: {self.log()[-3000:]}")
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (main process and pool children)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)

    def stop(self, timeout: float = 15.0) -> int | None:
        if not self.proc:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
