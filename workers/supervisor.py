"""Run the whole system locally: Redis (embedded unless configured), one worker per role, beat,
and optionally the router, the ingest server and Flower — and stop all of it cleanly.

Used by ``retrain up`` and ``retrain demo``. Every child runs in its own process group and is
stopped with SIGTERM (then SIGKILL after a grace period), also on Ctrl-C and on exceptions.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from workers.cli.cmd_worker import worker_command, worker_env
from workers.connections import url_file
from workers.redis_server import EmbeddedRedis

log = structlog.get_logger(__name__)


def _make_private(path: Path, mode: int, fd: int | None = None) -> None:
    """Set a log folder's or file's mode; one this user may write but not chmod (a teammate's, in a shared
    state folder, or on a file system without modes) is left as it is, with a warning."""
    try:
        if fd is None:
            path.chmod(mode)
        else:
            os.fchmod(fd, mode)
    except OSError as exc:
        log.warning("supervisor.log_mode_unchanged", path=str(path), error=exc.strerror or str(exc))

ROLES = ("decision", "training", "gate", "rollout")
STOP_GRACE_S = 10.0


@dataclass
class Child:
    name: str
    cmd: list[str]
    proc: subprocess.Popen
    log_path: Path


@dataclass
class LocalSystem:
    state_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    redis_url: str | None = None
    redis: EmbeddedRedis | None = None
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        logs = self.state_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        _make_private(logs, 0o700)  # the children's logs (events, model names, data paths) are for this user only

    # --- Redis ----------------------------------------------------------------------------
    def start_redis(self, external_url: str | None = None, port: int | None = None) -> str:
        if external_url:
            self.redis_url = external_url
        else:
            # A password of its own: any local user could otherwise write to it (register a version whose
            # artifact is theirs, say). It reaches the children in RETRAIN_REDIS_URL and the CLI through the
            # URL file (mode 0600), never on a command line.
            self.redis = EmbeddedRedis(self.state_dir / "redis", port=port,
                                       password=secrets.token_urlsafe(24)).start()
            self.redis_url = self.redis.url
        write_private(url_file_for(self.state_dir), self.redis_url)
        return self.redis_url

    def child_env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, **self.env, **extra}
        env["RETRAIN_REDIS_URL"] = self.redis_url or ""
        env["RETRAIN_STATE_DIR"] = str(self.state_dir)
        env.setdefault("RETRAIN_LOG_FORMAT", "json")
        return env

    # --- children ---------------------------------------------------------------------------
    def spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.state_dir / "logs" / f"{name}.log"
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _make_private(log_path, 0o600, fd)  # the mode above only applies to a new file
        handle = os.fdopen(fd, "ab")
        proc = subprocess.Popen(cmd, env=env or self.child_env(), stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        handle.close()
        child = Child(name, cmd, proc, log_path)
        self.children.append(child)
        return child

    def start_workers(self, roles=ROLES, concurrency: int = 1) -> None:
        for role in roles:
            cmd = worker_command(role, concurrency, None, "INFO", f"{role}@{os.uname().nodename}")
            self.spawn(f"worker-{role}", cmd, worker_env(role, self.child_env()))

    def start_beat(self) -> None:
        schedule = self.state_dir / "beat-schedule"
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "-S", "redbeat.RedBeatScheduler",
               "--loglevel", "INFO", "-s", str(schedule)]
        self.spawn("beat", cmd)

    def start_cli(self, name: str, *args: str) -> Child:
        return self.spawn(name, [sys.executable, "-m", "workers.cli", *args])

    def start_flower(self, port: int, basic_auth: str | None) -> Child:
        """Flower on 127.0.0.1; ``basic_auth`` (``user:password``) goes through its environment, never argv."""
        return self.spawn("flower", flower_command(port), flower_env(self.child_env(), basic_auth))

    def wait_for_workers(self, app, names: list[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(names)
        while pending and time.monotonic() < deadline:
            self.check_alive()
            replies = app.control.ping(destination=list(pending), timeout=0.5) or []
            for reply in replies:
                pending -= set(reply)
        if pending:
            raise RuntimeError(f"workers did not start: {', '.join(sorted(pending))} (logs in {self.state_dir / 'logs'})")

    def check_alive(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                tail = child.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{child.name} exited with status {code}; log tail:\n{tail}")

    def stop(self) -> None:
        """SIGTERM every child (process group), wait, SIGKILL stragglers, then stop Redis."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_GRACE_S
        for child in self.children:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.proc.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(child.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.proc.wait()
        self.children.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        path = url_file_for(self.state_dir)
        if path.exists():
            path.unlink()

    def __enter__(self) -> "LocalSystem":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def flower_command(port: int) -> list[str]:
    """Flower's argv: nothing secret, since any local user can read it with ``ps``."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "flower", f"--port={port}", "--address=127.0.0.1"]


def flower_env(base: dict[str, str], basic_auth: str | None) -> dict[str, str]:
    """``base`` with Flower's credentials in ``FLOWER_BASIC_AUTH`` (which Flower reads), or none."""
    env = dict(base)
    env.pop("FLOWER_BASIC_AUTH", None)
    if basic_auth:
        env["FLOWER_BASIC_AUTH"] = basic_auth
    return env


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from creation, also when it existed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # the mode above only applies to a new file
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def url_file_for(state_dir: Path) -> Path:
    from config.settings import Settings

    return url_file(Settings(state_dir=state_dir))
