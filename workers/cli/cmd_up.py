"""``retrain up``: the whole system on this machine, until Ctrl-C."""

from __future__ import annotations

import os
import signal
import threading

import typer

from workers.cli._common import console, fail, load_settings, ping_redis, print_json

PORT_RANGE = {"min": 0, "max": 65535}
"""Port options: 0 means 'none' (or 'any free port' for Redis), else a TCP port."""


def register(app: typer.Typer) -> None:
    @app.command("up")
    def up(
        roles: str = typer.Option("decision,training,gate,rollout", "--roles", help="Worker roles to start."),
        beat: bool = typer.Option(True, "--beat/--no-beat", help="Run the periodic scheduler (rollout ticks)."),
        serve_port: int = typer.Option(0, "--serve-port", help="Also run the router on this port (0 = no).",
                                       **PORT_RANGE),
        ingest_port: int = typer.Option(0, "--ingest-port", help="Also run HTTP ingest on this port (0 = no).",
                                        **PORT_RANGE),
        flower_port: int = typer.Option(0, "--flower-port", help="Also run Flower on this port (0 = no).",
                                        **PORT_RANGE),
        redis_port: int = typer.Option(0, "--redis-port", help="Port for the embedded Redis (0 = free port).",
                                       **PORT_RANGE),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line once everything runs."),
    ) -> None:
        """Run Redis (embedded unless RETRAIN_REDIS_URL), one worker per role, beat and optional servers."""
        from workers.cli.exits import exited_child, log_sizes
        from workers.supervisor import ROLES, LocalSystem

        settings = load_settings()
        wanted = [r.strip() for r in roles.split(",") if r.strip()]
        unknown = [r for r in wanted if r not in ROLES]
        if unknown:
            fail(f"unknown role(s): {', '.join(unknown)}; choose from {', '.join(ROLES)}")
        if ingest_port and settings.ingest_token is None:
            fail("set RETRAIN_INGEST_TOKEN before exposing HTTP ingest")
        if settings.redis_url is not None:
            # The workers would only say it after their start-up timeout, as a Celery error.
            ping_redis(settings)
        stop = threading.Event()
        # SIGHUP too: a closed terminal or a dropped ssh session must stop the children (each in a session of its
        # own, they never see the terminal's hang-up), not leave Redis and the workers running without their parent.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
        system = LocalSystem(settings.state_dir)
        earlier_logs = log_sizes(system.state_dir / "logs")
        try:
            external = settings.redis_url.get_secret_value() if settings.redis_url else None
            url = system.start_redis(external, port=redis_port or None)
            os.environ["RETRAIN_REDIS_URL"] = url
            from config.settings import reset_settings
            from workers.app import _configure, app as celery_app
            from workers.connections import reset_clients

            reset_settings()
            reset_clients()
            _configure(celery_app)
            system.start_workers(wanted)
            if beat:
                system.start_beat()
            if serve_port:
                system.start_cli("router", "serve", "--host", "127.0.0.1", "--port", str(serve_port))
            if ingest_port:
                system.start_cli("ingest", "ingest", "--host", "127.0.0.1", "--port", str(ingest_port))
            if flower_port:
                auth = os.environ.get("FLOWER_BASIC_AUTH")
                system.start_flower(flower_port, auth)
            names = [f"{r}@{os.uname().nodename}" for r in wanted]
            system.wait_for_workers(celery_app, names)
            info = {"redis_url": _mask(url), "embedded_redis": system.redis is not None,
                    "state_dir": str(settings.state_dir), "processes": [
                        {"name": c.name, "pid": c.proc.pid, "log": str(c.log_path)} for c in system.children]}
            if as_json:
                print_json(info)
            else:
                console.print(f"[green]up[/]: Redis {info['redis_url']}  state {info['state_dir']}")
                for p in info["processes"]:
                    console.print(f"  {p['name']:<18} pid {p['pid']:<8} log {p['log']}")
                console.print("Ctrl-C stops everything.")
            while not stop.wait(1.0):
                system.check_alive()
        except RuntimeError as exc:  # a child exited, or the workers did not start in time
            fail(exited_child(system, earlier_logs) or str(exc).splitlines()[0])
        finally:
            system.stop()
        if not as_json:
            console.print("stopped cleanly")


def _mask(url: str) -> str:
    """Hide a password in a Redis URL before printing it."""
    if "@" in url and ":" in url.split("@")[0]:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url
