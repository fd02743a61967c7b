"""``retrain emit`` and ``retrain dead-letters``: the event log from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from workers.cli._common import connect, console, fail, one_line, print_json


def _bus():
    from config.settings import get_settings
    from events.bus import EventBus

    client, _ = connect()
    return EventBus.from_settings(client, get_settings())


_ENTRY_ID = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MAX_ID_PART = 2**64 - 1


def check_entry_id(entry_id: str) -> None:
    """Exit 2 with one line unless ``entry_id`` is a full stream entry id ``<ms>-<seq>``."""
    found = _ENTRY_ID.match(entry_id)
    if not found or any(int(part) > _MAX_ID_PART for part in found.groups()):
        fail(f"--republish {entry_id!r}: not a dead-letter entry id (like 1718000000000-0; "
             "'retrain dead-letters' lists them)")


def _parse_data(pairs: list[str], data_json: str | None) -> dict:
    data: dict = {}
    if data_json:
        try:
            data = json.loads(data_json)
        except ValueError as exc:
            fail(f"--data is not valid JSON: {exc}")
        except RecursionError:
            fail("--data is nested too deeply")
        if not isinstance(data, dict):
            fail("--data must be a JSON object")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            data[key] = json.loads(value)
        except ValueError:
            data[key] = value
        except RecursionError:
            fail(f"--set {key}=...: the value is nested too deeply")
    return data


def register(app: typer.Typer) -> None:
    @app.command("emit")
    def emit(
        file: Path = typer.Option(None, "--file", "-f", help="JSON Lines file, one CloudEvent per line."),
        type: str = typer.Option(None, "--type", "-t", help="Event type for a single event (e.g. drift.data)."),
        model: str = typer.Option(None, "--model", "-m", help="Model name (the event subject)."),
        data: str = typer.Option(None, "--data", help="Event data as a JSON object."),
        set_: list[str] = typer.Option([], "--set", help="KEY=VALUE data field (repeatable; VALUE parsed as JSON)."),
        source: str = typer.Option("urn:retrain:cli", "--source"),
        as_json: bool = typer.Option(False, "--json", help="Print the JSON summary."),
    ) -> None:
        """Publish one event from flags, or many from a JSON Lines file; exit 0 only if none was rejected.

        A rejected flag event is one error line (exit 2); a file's rejected lines are listed (exit 1).
        """
        from config.policy import not_utf8
        from events.envelope import EventError, new_event

        events: list = []
        errors: list[dict] = []
        if file is not None:
            if type or model:
                fail("use either --file or --type/--model, not both")
            try:
                lines = file.read_text().splitlines()
            except FileNotFoundError:
                fail(f"{file}: no such file")
            except OSError as exc:
                fail(f"{file}: cannot read ({exc.strerror})")
            except UnicodeDecodeError as exc:
                fail(f"{file}: {not_utf8(exc)}")
            line_numbers = []
            for n, line in enumerate(lines, start=1):
                if line.strip():
                    events.append(line)
                    line_numbers.append(n)
        else:
            if not type or not model:
                fail("give --file, or both --type and --model")
            try:
                events.append(new_event(type, model, _parse_data(set_, data), source=source))
            except EventError as exc:  # the flags are the input: one line, exit 2
                fail(f"not a valid event: {one_line(exc)}")
            line_numbers = [0]
        result = _bus().publish_many(events) if events else None
        published = len(result.published) if result else 0
        if result:
            errors += [{"line": line_numbers[i], "reason": reason} for i, reason in result.rejected]
        if errors and file is None:
            fail(f"not published: {one_line(errors[0]['reason'])}")
        summary = {"published": published, "rejected": len(errors), "errors": errors}
        if as_json:
            print_json(summary)
        else:
            console.print(f"published {published}, rejected {len(errors)}")
            from rich.markup import escape

            for err in errors:
                console.print(f"  line {err['line']}: {escape(str(err['reason']))}", style="red")
        if errors:
            raise typer.Exit(1)

    @app.command("dead-letters")
    def dead_letters(
        republish: str = typer.Option(None, "--republish", help="Dead-letter entry id to publish again."),
        fixed: Path = typer.Option(None, "--fixed", help="File with the corrected event JSON to publish instead."),
        limit: int = typer.Option(50, "--limit", min=1),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """List dead-lettered events with their reasons, or re-publish one after a fix (exit 2 on a bad id)."""
        import redis

        from config.policy import not_utf8
        from events.envelope import EventError

        if republish:
            check_entry_id(republish)
            payload = None
            if fixed is not None:
                try:
                    payload = fixed.read_text()
                except OSError as exc:
                    fail(f"{fixed}: cannot read ({exc.strerror})")
                except UnicodeDecodeError as exc:
                    fail(f"{fixed}: {not_utf8(exc)}")
            try:
                event_id = _bus().republish_dead_letter(republish, payload)
            except KeyError as exc:
                fail(str(exc.args[0]))
            except EventError as exc:
                fail(f"still invalid, not re-published: {exc}")
            except redis.ResponseError as exc:  # an id the format check let through
                fail(f"--republish {republish!r}: Redis refused the id ({one_line(exc)})")
            out = {"republished": republish, "event_id": event_id}
            print_json(out) if as_json else console.print(f"re-published {republish} as event {event_id}")
            return
        letters = _bus().dead_letters(limit)
        if as_json:
            print_json({"dead_letters": letters})
            return
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"dead letters ({len(letters)})")
        for col in ("id", "reason", "payload"):
            table.add_column(col, overflow="fold")
        for d in letters:  # escaped: a payload or reason may hold "[/x]", markup to rich
            table.add_row(escape(d["id"]), escape(d.get("reason", "")), escape((d.get("payload") or "")[:120]))
        console.print(table)
