"""``retrain timeline MODEL --out FILE.png|FILE.html``: the model's history as one picture."""

from __future__ import annotations

from pathlib import Path

import typer

from workers.cli._common import fail, print_json


def register(app: typer.Typer) -> None:
    @app.command("timeline")
    def timeline(
        model: str = typer.Argument(..., help="Model name."),
        out: Path = typer.Option(..., "--out", "-o", help="Output file: .png, or .html (PNG embedded + event table)."),
        since: str = typer.Option(None, "--since", help="Start: a duration ago ('6h') or an ISO time."),
        until: str = typer.Option(None, "--until", help="End: a duration ago or an ISO time."),
        as_json: bool = typer.Option(False, "--json", help="Print what was drawn as one JSON object."),
    ) -> None:
        """Draw the live metric and drift with decisions, trainings, gate, rollout phases and rollbacks marked."""
        from workers.cli._common import connect
        from workers.cli.cmd_ops import require_model, time_bounds
        from workers.timeline import TimelineError, load_events, render_timeline

        if out.suffix.lower() not in (".png", ".html", ".htm"):
            fail(f"--out must end in .png or .html, got {out.name!r}")
        lo, hi = time_bounds(since, until)
        client, keys = connect()
        require_model(client, keys, model)
        events = load_events(client, keys, model, lo, hi)
        try:
            result = render_timeline(events, model, out)
        except TimelineError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"{out}: cannot write ({exc.strerror or exc})")
        if as_json:
            print_json(result.to_dict())
        else:
            print(result.path)
