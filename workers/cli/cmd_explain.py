"""``retrain explain ID``: why a decision (or rollout step) was taken."""

from __future__ import annotations

import typer

from workers.cli._common import connect, console, fail, print_json


def render_decision(record: dict) -> None:
    """The record as panels and tables; every stored text is escaped (a reason may hold "[/x]": markup to rich)."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    def e(value) -> str:
        return escape(str(value))

    head = (f"[bold]{e(record['id'])}[/]  model [bold]{e(record['model'])}[/]  {e(record['time'])}\n"
            f"action [bold]{e(record['action'])}[/]  urgency {e(record['urgency'])}  queue {e(record.get('queue') or '-')}  "
            f"pipeline {e(record.get('pipeline_id') or '-')}\n{e(record['reason'])}")
    console.print(Panel(head, title="decision"))
    table = Table(title="triggers")
    for col in ("trigger", "fired", "urgency", "value", "threshold", "reason"):
        table.add_column(col, overflow="fold")
    for t in record.get("triggers", []):
        table.add_row(e(t["name"]), "yes" if t.get("triggered") else "no", e(t.get("urgency", "")),
                      e(t.get("value")), e(t.get("threshold")), e(t.get("reason", "")))
    console.print(table)
    if record.get("checks"):
        guards = Table(title="guards")
        for col in ("guard", "passed", "reason"):
            guards.add_column(col)
        for g in record["checks"]:
            guards.add_row(e(g["guard"]), "yes" if g["passed"] else "no", e(g["reason"]))
        console.print(guards)
    for s in record.get("suppressed", []):
        console.print(f"[yellow]suppressed[/] {e(s.get('trigger'))}: {e(s.get('reason'))}")
    ids = record.get("event_ids", [])
    more = record.get("event_count", len(ids)) - len(ids)
    newest = f" (the newest {len(ids)}; {more} earlier not listed)" if more > 0 else ""
    console.print(f"contributing events{newest}: {e(', '.join(ids) or '-')}")


def register(app: typer.Typer) -> None:
    @app.command("explain")
    def explain(
        record_id: str = typer.Argument(..., help="A decision id (d-...), a pipeline id (p-...) or rollout:MODEL."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Explain a decision: every trigger with value, threshold and reason, the guards, the events."""
        from workers.decision.state import DecisionStore

        client, keys = connect()
        store = DecisionStore(client, keys)
        record = store.get_record(record_id)
        if record is None:
            from workers.cli.explain_more import find_other

            other = find_other(client, keys, record_id)
            if other is None:
                fail(f"no decision, pipeline or rollout with id {record_id!r}")
            print_json(other) if as_json else console.print_json(data=other)
            return
        if as_json:
            print_json(record)
        else:
            render_decision(record)
