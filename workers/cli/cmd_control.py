"""Operator commands: trigger a retrain, and promote/rollback/abort/pause/resume a rollout."""

from __future__ import annotations

import getpass

import typer

from workers.cli._common import console, fail, print_json
from workers.cli._common import connect


def _who(who: str | None) -> str:
    return who or getpass.getuser()


def _control():
    from workers.rollout.control import RolloutControl

    client, keys = connect()
    from config.settings import get_settings
    from workers.alerts import webhook_url_from_settings

    return RolloutControl(client, keys, webhook_url=webhook_url_from_settings(get_settings()))


def _show(state, as_json: bool, verb: str) -> None:
    out = {"model": state.model, "candidate": state.candidate, "production": state.production,
           "status": state.status, "phase": state.phase, "revision": state.revision, "reason": state.reason}
    if as_json:
        print_json(out)
    else:
        console.print(f"{verb}: {state.model} v{state.candidate} is now [bold]{state.status}[/] ({state.reason})")


def register(app: typer.Typer) -> None:
    @app.command("trigger")
    def trigger(
        model: str = typer.Argument(...),
        reason: str = typer.Option(..., "--reason", help="Why (recorded in the decision)."),
        who: str = typer.Option(None, "--who", help="Operator name (default: the current user)."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Ask for a retrain now (the `manual` trigger: critical urgency, still within the budget)."""
        from config.settings import get_settings
        from events.bus import EventBus
        from events.envelope import EventError, new_event

        client, _ = connect()
        try:
            event = new_event("retrain.requested", model, {"reason": reason, "requested_by": _who(who)},
                              source="urn:retrain:cli")
        except EventError as exc:
            fail(str(exc))
        EventBus.from_settings(client, get_settings()).publish(event)
        print_json({"event_id": event.id, "model": model}) if as_json else console.print(
            f"retrain requested for {model} (event {event.id})")

    def rollout_op(op: str, help_text: str):
        def command(
            model: str = typer.Argument(...),
            reason: str = typer.Option("", "--reason", help="Why (recorded with who)."),
            who: str = typer.Option(None, "--who"),
            as_json: bool = typer.Option(False, "--json"),
        ) -> None:
            from workers.rollout.control import RolloutConflict
            from workers.rollout.machine import TransitionError

            try:
                state = _control().manual(model, op, _who(who), reason)
            except (TransitionError, RolloutConflict) as exc:
                fail(str(exc))
            _show(state, as_json, op)

        command.__doc__ = help_text
        app.command(op)(command)

    rollout_op("rollback", "Emergency: traffic back to the previous production now, skipping analysis.")
    rollout_op("abort", "Stop the rollout and return traffic to production, without judging the candidate.")
    rollout_op("pause", "Stop advancing the rollout (a rollback verdict still rolls back).")
    rollout_op("resume", "Continue a paused rollout.")

    @app.command("promote")
    def promote(
        model: str = typer.Argument(...),
        version: int = typer.Option(None, "--version", help="A staged or rejected version to roll out."),
        force: bool = typer.Option(False, "--force", help="Roll out a version the gate rejected (recorded)."),
        reason: str = typer.Option("", "--reason"),
        who: str = typer.Option(None, "--who"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Promote the candidate of the running rollout now, or start the rollout of --version."""
        from workers.registry.store import RegistryError
        from workers.rollout.control import RolloutConflict
        from workers.rollout.machine import TransitionError

        control = _control()
        operator = _who(who)
        if version is None:
            try:
                state = control.manual(model, "promote", operator, reason)
            except (TransitionError, RolloutConflict) as exc:
                fail(str(exc))
            _show(state, as_json, "promote")
            return
        try:
            record = control.registry.get(model, version)
        except RegistryError as exc:
            fail(str(exc))
        override = record.status == "rejected"
        if override:
            if not force:
                fail(f"v{version} was rejected by the gate ({', '.join(_failed(record))}); "
                     "use --force --reason to override")
            if not reason:
                fail("--force needs --reason (the override is recorded)")
            # Staged before the rollout starts: the rollout then moves it on to shadow.
            control.registry.set_status(model, version, "staged", who=operator, why=f"gate override: {reason}")
        elif record.status not in ("staged", "rolled_back", "previous", "archived"):
            fail(f"v{version} is {record.status}; only staged, rejected (with --force) or earlier versions can be rolled out")
        try:
            state = control.begin(model, version, who=operator, why=reason or "operator promote")
        except Exception as exc:  # refused or failed, no rollout: a rejected version stays rejected
            if override:
                control.registry.set_status(model, version, "rejected", who=operator,
                                            why=f"gate override not applied: {exc}")
            if isinstance(exc, RolloutConflict):
                fail(str(exc))
            raise
        if override:
            control.registry.add_note(model, version, kind="gate_override", who=operator, why=reason,
                                      failed_checks=_failed(record))
        _show(state, as_json, "rollout started")


def _failed(record) -> list[str]:
    return [c["name"] for c in (record.gate or {}).get("checks", []) if not c.get("passed") and not c.get("skipped")]
