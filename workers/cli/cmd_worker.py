from __future__ import annotations

import os
import socket
import sys
from typing import Literal, Optional

import typer

from config.celery_config import ROLE_QUEUES
from workers.cli._common import fail

DEFAULT_POOL = {"decision": "solo", "training": "prefork", "gate": "prefork", "rollout": "solo", "all": "prefork"}
Pool = Literal["prefork", "solo", "threads"]
"""The Celery pools a worker can run here (eventlet and gevent are not installed)."""


def worker_command(role: str, concurrency: int | None = None, pool: str | None = None,
                   loglevel: str = "INFO", name: str | None = None) -> list[str]:
    """The argv of a Celery worker for a role (used by ``worker``, ``up`` and the tests)."""
    queues = ",".join(ROLE_QUEUES[role])
    pool = pool or DEFAULT_POOL[role]
    cmd = [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "-Q", queues, "-n", name or f"{role}@{socket.gethostname()}",
        "--pool", pool, "--loglevel", loglevel, "-E", "--without-mingle", "--without-gossip",
    ]
    if pool != "solo":
        cmd += ["--concurrency", str(concurrency or 1)]
    return cmd


def worker_env(role: str, base: dict[str, str] | None = None, pool: str | None = None) -> dict[str, str]:
    env = dict(base if base is not None else os.environ)
    env["RETRAIN_ROLE"] = role
    if env.get("RETRAIN_METRICS_PORT") and (pool or DEFAULT_POOL[role]) == "prefork":
        # Counts made in pool children reach the metrics server through this folder.
        import shutil
        from pathlib import Path

        folder = Path(env.get("RETRAIN_STATE_DIR", ".retrain")) / "metrics" / f"{role}-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(folder.resolve())
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")  # BLAS threads spin on small machines
    return env


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        role: str = typer.Option(..., "--role", help="decision | training | gate | rollout | all"),
        concurrency: int = typer.Option(1, "--concurrency", "-c", min=1),
        pool: Optional[Pool] = typer.Option(None, "--pool", help="Celery pool (default by role)."),
        loglevel: str = typer.Option("INFO", "--loglevel"),
        name: str = typer.Option(None, "--name", help="Worker node name (default ROLE@host)."),
    ) -> None:
        """Start a Celery worker for one role (the decision role also consumes the event stream)."""
        if role not in ROLE_QUEUES:
            fail(f"unknown role {role!r}: choose one of {', '.join(ROLE_QUEUES)}")
        from workers.connections import NoRedisConfigured, redis_url

        try:
            redis_url()
        except NoRedisConfigured as exc:
            fail(str(exc))
        cmd = worker_command(role, concurrency, pool, loglevel, name)
        os.execve(cmd[0], cmd, worker_env(role, pool=pool))
