from __future__ import annotations

import typer

from workers.cli._common import print_json


def register(app: typer.Typer) -> None:
    @app.command("version")
    def version(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Print the installed version."""
        from importlib.metadata import version as _v

        v = _v("retrain")
        print_json({"version": v}) if as_json else print(v)
