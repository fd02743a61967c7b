from __future__ import annotations

import os
import sys

import typer

from workers.cli._common import fail


def register(app: typer.Typer) -> None:
    @app.command("beat")
    def beat(loglevel: str = typer.Option("INFO", "--loglevel")) -> None:
        """Run the periodic scheduler (celery-redbeat: one active at a time, lock in Redis)."""
        from workers.connections import NoRedisConfigured, redis_url

        try:
            redis_url()
        except NoRedisConfigured as exc:
            fail(str(exc))
        cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "-S", "redbeat.RedBeatScheduler",
               "--loglevel", loglevel]
        os.execv(cmd[0], cmd)
