"""``retrain decide``: run the decision policy offline on a snapshot of a model's signals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from workers.cli._common import console, fail, print_json

_URGENCY_STYLE = {"none": "dim", "low": "cyan", "medium": "yellow", "high": "red", "critical": "bold red"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def read_snapshot(path: str) -> dict[str, Any]:
    """Read a snapshot JSON object from ``path``; bad input raises ``CliError`` (exit 2)."""
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        fail(f"{path}: no such snapshot file")
    except IsADirectoryError:
        fail(f"{path}: is a directory, not a snapshot file")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"{path}: cannot read ({_one_line(getattr(exc, 'strerror', None) or exc)})")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
    if not isinstance(data, dict):
        fail(f"{path}: a snapshot must be a JSON object, not {type(data).__name__}")
    return data


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return str(value)


def _render(decision: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    style = _URGENCY_STYLE.get(decision.urgency, "")
    verdict = "[bold green]retrain[/]" if decision.retrain else "[bold]no retrain[/]"
    console.print(
        f"{escape(decision.model)}: {verdict}, urgency [{style}]{decision.urgency}[/] "
        f"(at {decision.now.isoformat()})"
    )
    table = Table(show_header=True, header_style="bold")
    for column in ("trigger", "fired", "urgency"):
        table.add_column(column, no_wrap=True)
    table.add_column("value", max_width=24, overflow="fold")
    table.add_column("threshold", no_wrap=True)
    table.add_column("reason", ratio=1, overflow="fold")
    for t in decision.triggers:
        fired = "[green]yes[/]" if t.triggered else ("[yellow]suppressed[/]" if t.suppression else "no")
        table.add_row(
            t.name, fired, f"[{_URGENCY_STYLE.get(t.urgency, '')}]{t.urgency}[/]",
            escape(_show(t.value)), escape(_show(t.threshold)), escape(t.reason),
        )
    console.print(table)
    if decision.suppressed:
        held = ", ".join(f"{s.trigger} ({s.kind})" for s in decision.suppressed)
        console.print(f"[yellow]suppressed:[/] {escape(held)}", highlight=False)
    for a in decision.alerts:
        console.print(f"[bold red]alert[/] {escape(f'{a.name} [{a.severity}]: {a.message}')}", highlight=False)


def register(app: typer.Typer) -> None:
    @app.command("decide")
    def decide(
        policy: str = typer.Option(..., "--policy", help="Per-model policy TOML file."),
        snapshot: str = typer.Option(..., "--snapshot", help="JSON snapshot of the model's signals."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Decide whether a model should retrain, from a policy and a snapshot of its signals."""
        from config.policy import PolicyError, load_policy
        from workers.decision.policy import evaluate
        from workers.decision.triggers import ModelSignals

        try:
            pol = load_policy(policy)
        except PolicyError as exc:
            fail(_one_line(exc))
        data = read_snapshot(snapshot)
        try:
            signals = ModelSignals.from_snapshot(data)
        except ValueError as exc:
            fail(f"{snapshot}: {_one_line(exc)}")
        model = data.get("model")
        if model is not None and str(model) != pol.model.name:
            fail(f"{snapshot}: snapshot is for model '{model}' but the policy is for '{pol.model.name}'")
        decision = evaluate(pol, signals, signals.now)
        if as_json:
            print_json(decision.to_dict())
        else:
            _render(decision)
