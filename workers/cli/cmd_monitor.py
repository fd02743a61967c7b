from __future__ import annotations

import typer

from workers.cli._common import console, fail, print_json
from workers.cli._common import connect


def register(app: typer.Typer) -> None:
    @app.command("monitor")
    def monitor(
        model: str = typer.Argument(...),
        dry_run: bool = typer.Option(False, "--dry-run", help="Measure and print, publish nothing."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Run the model's monitors once (drift, volume, upstream, live performance, concept drift) and publish."""
        from workers.monitor import run_monitors
        from workers.policies import policy_store

        client, keys = connect()
        policy = policy_store().get(model)
        if policy is None:
            fail(f"no policy for model {model!r}")
        summary = run_monitors(client, keys, model, policy, publish=not dry_run)
        if as_json:
            print_json(summary)
            return
        console.print(f"[bold]{model}[/] production v{summary['production']}")
        for key in ("drift_score", "volume", "upstream", "performance", "concept_drift"):
            if key in summary:
                console.print(f"  {key}: {summary[key]}")
        for note in summary["notes"]:
            console.print(f"  [yellow]note[/] {note}")
        console.print(f"  published: {', '.join(summary['published']) or 'nothing'}")
