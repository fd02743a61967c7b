"""``retrain ingest``: serve the HTTP ingest (events, Alertmanager and Evidently adapters)."""

from __future__ import annotations

import typer

from workers.cli._common import check_server_options, fail


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest(
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to listen on."),
        port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port."),
        insecure_no_auth: bool = typer.Option(
            False, "--insecure-no-auth",
            help="Accept events without a bearer token when RETRAIN_INGEST_TOKEN is unset (trusted networks only).",
        ),
        max_batch: int = typer.Option(None, "--max-batch", min=1, help="Most events per request (default 500)."),
        max_body_bytes: int = typer.Option(None, "--max-body-bytes", min=256,
                                           help="Largest request body (default max batch x RETRAIN_MAX_EVENT_BYTES)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
        as_json: bool = typer.Option(False, "--json", help="Print the listening address as JSON on start."),
    ) -> None:
        """Serve POST /events, /adapters/alertmanager, /adapters/evidently and GET /healthz with uvicorn."""
        import uvicorn

        from config.logs import configure_logging
        from events.bus import EventBus
        from events.ingest import DEFAULT_MAX_BATCH, IngestConfigError, create_app
        from workers.cli._common import load_settings, ping_redis, print_json

        settings = load_settings()
        check_server_options(host, port, log_level)
        configure_logging(settings.log_level, settings.log_format)
        try:
            application = create_app(
                None, settings,
                insecure_no_auth=insecure_no_auth,
                max_batch=max_batch or DEFAULT_MAX_BATCH,
                max_body_bytes=max_body_bytes,
            )
        except IngestConfigError as exc:
            fail(str(exc))
        client = ping_redis(settings)
        application.state.bus = EventBus.from_settings(client, settings)
        if as_json:
            auth = bool(settings.ingest_token and settings.ingest_token.get_secret_value())
            print_json({"listening": f"http://{host}:{port}", "auth": auth})
        uvicorn.run(application, host=host, port=port, log_level=log_level.lower(), server_header=False)
