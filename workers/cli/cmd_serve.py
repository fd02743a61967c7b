"""``retrain serve``: the router's HTTP server (predict, feedback, /healthz, /metrics) on uvicorn."""

from __future__ import annotations

import typer

from workers.cli._common import check_server_options, fail, print_json


def _models_to_serve(requested: list[str]) -> tuple[list[str] | None, list[str]]:
    """``(names to restrict to, or None for every registered model; models registered now)``.

    Without ``--model`` an empty registry is fine (a fresh system): the server starts with no
    model and serves each one from its first request after it is registered.
    """
    from workers.cli._common import connect
    from workers.registry.store import Registry

    client, keys = connect()
    known = Registry(client, keys).models()
    if not requested:
        return None, known
    unknown = [m for m in requested if m not in known]
    if unknown:
        hint = f" (known: {', '.join(known[:10])})" if known else " (the registry holds no models)"
        fail(f"unknown model {unknown[0]!r}{hint}")
    names = list(dict.fromkeys(requested))
    return names, names


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
        model: list[str] = typer.Option(None, "--model", "-m",
                                        help="Serve only this model (repeat for several; default: every model "
                                             "in the registry, including ones registered after the start)."),
        log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON line with the address, then serve."),
    ) -> None:
        """Serve predictions through the router: traffic split from Redis, shadow, request log, feedback."""
        names, serving = _models_to_serve([m for m in (model or []) if m] if model else [])
        check_server_options(host, port, log_level)

        import uvicorn

        from config.logs import configure_logging
        from config.settings import get_settings
        from workers.router.server import create_app

        settings = get_settings()
        configure_logging(settings.log_level, settings.log_format)
        if as_json:
            print_json({"url": f"http://{host}:{port}", "models": serving, "discover": names is None})
        uvicorn.run(create_app(names), host=host, port=port, log_level=log_level.lower(), access_log=False)
