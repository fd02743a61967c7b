from __future__ import annotations

import signal
import sys
from pathlib import Path

import typer

from workers.cli._common import console, err_console, fail, print_json


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # the demo's own cleanup (Redis, workers, beat, router) runs on the way out


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
        state_dir: Path = typer.Option(None, "--state-dir", help="Where the demo keeps its files (default .retrain/demo)."),
        live: bool = typer.Option(None, "--live/--no-live", help="Live terminal view (default: on a terminal)."),
    ) -> None:
        """Run the whole loop locally: embedded Redis, real workers, a router with traffic, three scenarios."""
        from config.settings import get_settings
        from workers.demo.run import Demo, StateDirRefused, check_state_dir

        folder = state_dir or Path(get_settings().state_dir) / "demo"
        try:
            check_state_dir(folder)  # before anything starts: the demo empties its folder
        except StateDirRefused as exc:
            fail(str(exc))
        show_live = (not as_json and sys.stdout.isatty()) if live is None else live
        say = (lambda text: err_console.print(text)) if as_json else (lambda text: console.print(text))
        runner = Demo(folder, live=show_live, say=say)
        signal.signal(signal.SIGTERM, _terminated)  # stop what the demo started, as on Ctrl-C
        try:
            result = runner.run()
        except KeyboardInterrupt:
            runner.finish()
            raise
        if as_json:
            print_json(result)
        else:
            from rich.table import Table

            table = Table(title=f"retrain demo: {'all scenarios as expected' if result['ok'] else 'NOT all as expected'}"
                                f" ({result['seconds']}s)")
            for col in ("scenario", "expected", "outcome", "key figures", "ok"):
                table.add_column(col, overflow="fold")
            for s in result["scenarios"]:
                table.add_row(s["name"], s["expected"], s["outcome"], _figures(s),
                              "[green]yes[/]" if s["ok"] else "[red]no[/]")
            console.print(table)
            if result.get("error"):
                console.print(f"[red]error[/]: {result['error']}")
            if result.get("timeline"):
                console.print(f"timeline picture: {result['timeline']}")
            console.print(f"logs and data: {result['state_dir']}")
        if not result["ok"]:
            raise typer.Exit(1)


_SHOWN = ("drift_scores", "urgency", "search_best_params", "gate_checks_passed", "failed_checks", "rolled_back_in",
          "candidate_accuracy", "production_accuracy", "seconds")


def _figures(scenario: dict) -> str:
    parts = []
    for key in _SHOWN:
        value = scenario.get(key)
        if value is None or value == []:
            continue
        if isinstance(value, float):
            value = f"{value:.3f}" if key != "seconds" else f"{value:.1f}s"
        parts.append(f"{key.replace('_', ' ')}: {value}")
    return "\n".join(parts)
