"""Ops views: ``retrain status``, ``retrain history``, ``retrain models``.

What the on-call engineer asks first: what serves now, what is rolling out and how far, what
was decided last and why, what is training, what is waiting for evidence, what alerted; and
the model's event log filtered by type and time. Read-only; every command has ``--json``.
The ``model_status`` / ``model_summary`` / ``history_events`` functions are reusable (the demo's
live view can call them).
"""

from __future__ import annotations

import fnmatch
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import typer

from workers.cli._common import console, fail, print_json

RECENT_ALERTS = 5
DEFAULT_HISTORY_LIMIT = 200
PIPELINE_STEPS = ("validate_data", "train", "gate", "stage", "start_rollout")
"""Order of the pipeline steps (as ``workers.pipeline.canvas.STEPS``; kept here so the views do not
import Celery)."""


# --------------------------------------------------------------------------- reading state
def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _iso_from_epoch(value: Any) -> str | None:
    try:
        return datetime.fromtimestamp(float(_s(value)), timezone.utc).isoformat()
    except (TypeError, ValueError):
        return None


def _parse_dt(value: Any) -> datetime | None:
    if not value:
        return None
    d = datetime.fromisoformat(str(value))
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def known_models(client, keys) -> list[str]:
    return sorted(_s(m) for m in client.smembers(keys.models()))


def require_model(client, keys, model: str) -> None:
    """Exit 2 with one line unless the system has seen ``model``."""
    if client.sismember(keys.models(), model) or client.exists(keys.history(model), keys.versions(model)):
        return
    names = known_models(client, keys)
    hint = f"; known: {', '.join(names[:10])}" if names else "; no models recorded yet"
    fail(f"unknown model {model!r}{hint}")


def pipeline_status(client, keys, model: str, pipeline_id: str) -> dict[str, Any]:
    """The pipeline's hash as a status: current step and state, per-step seconds, error."""
    raw = {_s(k): _s(v) for k, v in client.hgetall(keys.pipeline(model, pipeline_id)).items()}
    status = raw.get("status", "unknown")
    state, _, step = status.partition(":")
    if not step:
        state, step = status, None
    if state == "done" and step in PIPELINE_STEPS:
        i = PIPELINE_STEPS.index(step)
        step, state = (PIPELINE_STEPS[i + 1], "queued") if i + 1 < len(PIPELINE_STEPS) else (step, "done")
    steps = []
    for name in PIPELINE_STEPS:
        if f"{name}_seconds" in raw or f"{name}_started" in raw:
            seconds = raw.get(f"{name}_seconds")
            steps.append({"step": name, "started": _iso_from_epoch(raw.get(f"{name}_started")),
                          "seconds": float(seconds) if seconds else None})
    return {
        "pipeline_id": pipeline_id,
        "status": status,
        "state": state,
        "step": step,
        "decision_id": raw.get("decision_id"),
        "enqueued_at": _iso_from_epoch(raw.get("enqueued_at")),
        "steps": steps,
        "error": raw.get("error"),
        "failed_step": raw.get("failed_step"),
    }


def _rollout_policy(model: str):
    """The model's rollout section, or the defaults the rollout worker uses when it has no policy."""
    from config.policy import RolloutSection

    try:
        from workers.policies import policy_store

        policy = policy_store().get(model)
    except Exception:  # noqa: BLE001 - an unreadable policy folder: the worker's defaults
        policy = None
    return policy.rollout if policy is not None else RolloutSection()


def rollout_view(client, keys, model: str, now: datetime) -> dict[str, Any] | None:
    """The stored rollout state as a status (read as JSON: no analysis code is imported)."""
    raw = client.hget(keys.rollout(model), "state")
    if not raw:
        return None
    st = json.loads(raw)
    status = st.get("status")
    active = status not in ("completed", "rolled_back", "aborted")
    last = st.get("last_analysis") or {}
    view: dict[str, Any] = {
        "status": status,
        "active": active,
        "phase": st.get("phase"),
        "phase_index": st.get("phase_index"),
        "candidate": st.get("candidate"),
        "production": st.get("production"),
        "started_at": st.get("started_at"),
        "phase_started_at": st.get("phase_started_at"),
        "updated_at": st.get("updated_at"),
        "paused": bool(st.get("paused")),
        "reason": st.get("reason"),
        "revision": st.get("revision"),
        "last_analysis": {k: last.get(k) for k in ("verdict", "reasons", "sample_sizes", "insufficient_evidence")}
        if last else None,
        "insufficient_evidence": None,
    }
    if active and last.get("insufficient_evidence"):
        since = _parse_dt(st.get("waiting_since"))
        if since is None:  # holding within the phase's minimum duration: the streak's first look
            streak = [h for h in st.get("history") or [] if h.get("kind") == "analysis"]
            first = streak[-1].get("first_at") if streak and streak[-1].get("insufficient_evidence") else None
            since = _parse_dt(first) or _parse_dt(st.get("phase_started_at"))
        wait: dict[str, Any] = {"since": since.isoformat() if since else None,
                                "seconds": round((now - since).total_seconds(), 1) if since else None,
                                "reasons": last.get("reasons") or []}
        from workers.rollout.machine import with_phases

        cfg = with_phases(_rollout_policy(model), st.get("phases"))  # the phases the rollout began with
        if cfg.phases:
            idx = min(int(st.get("phase_index") or 0), len(cfg.phases) - 1)
            limit = cfg.phases[idx].max_wait if cfg.phases[idx].max_wait is not None else cfg.max_wait
            wait["max_wait_seconds"] = limit.total_seconds()
            wait["then"] = cfg.on_insufficient_evidence
            if st.get("waiting_since"):
                wait["deadline"] = (_parse_dt(st["waiting_since"]) + limit).isoformat()
        view["insufficient_evidence"] = wait
    return view


def _version_brief(mv) -> dict[str, Any]:
    return {"version": mv.version, "status": mv.status, "created_at": mv.created_at, "metrics": mv.metrics,
            "decision_id": mv.decision_id, "parent_version": mv.parent_version}


def model_status(client, keys, model: str, *, alerts: int = RECENT_ALERTS,
                 now: datetime | None = None) -> dict[str, Any]:
    """Everything ``retrain status`` shows about one model, as one JSON-ready dict.

    Parameters
    ----------
    client : redis.Redis
    keys : config.keys.Keys
    model : str
    alerts : int
        How many recent alerts to include.
    now : datetime, optional
        For the insufficient-evidence wait (default: now).

    Returns
    -------
    dict
        ``model``, ``production``, ``previous``, ``candidate`` (version records, or None),
        ``rollout`` (status, phase, insufficient-evidence wait), ``traffic`` (the router's
        split), ``last_decision``, ``in_flight`` (pipeline and step), ``alerts``.
    """
    from workers.alerts import recent_alerts
    from workers.decision.state import DecisionStore
    from workers.registry.store import Registry, RegistryError
    from workers.router.traffic import read_traffic

    now = now or datetime.now(timezone.utc)
    registry = Registry(client, keys)
    aliases = registry.aliases(model)

    moves = {}
    for move in registry.alias_history(model):  # the last move of each alias says since when
        moves[move.alias] = move

    def version(alias: str) -> dict[str, Any] | None:
        if alias not in aliases:
            return None
        try:
            out = _version_brief(registry.get(model, aliases[alias]))
        except RegistryError:
            out = {"version": aliases[alias], "status": "missing"}
        move = moves.get(alias)
        out["since"] = move.to_dict()["time"] if move is not None and move.version == aliases[alias] else None
        return out

    records = DecisionStore(client, keys).recent_records(model, 1)
    last = None
    if records:
        r = records[0]
        last = {"id": r.get("id"), "time": r.get("time"), "action": r.get("action"), "urgency": r.get("urgency"),
                "reason": r.get("reason"), "pipeline_id": r.get("pipeline_id"),
                "triggers": [t["name"] for t in r.get("triggers", []) if t.get("triggered")]}
    guard = {_s(k): _s(v) for k, v in client.hgetall(keys.guard(model)).items()}
    in_flight = None
    if guard.get("in_flight"):
        in_flight = pipeline_status(client, keys, model, guard["in_flight"])
        in_flight["since"] = _iso_from_epoch(guard.get("in_flight_since"))
        if in_flight["state"] == "done" and in_flight["step"] == PIPELINE_STEPS[-1]:
            in_flight["state"] = "rolling out"  # the slot is held until the rollout ends
    traffic = read_traffic(client, keys, model)
    return {
        "model": model,
        "production": version("production"),
        "previous": version("previous"),
        "candidate": version("candidate"),
        "rollout": rollout_view(client, keys, model, now),
        "traffic": traffic.to_dict() if traffic.revision else None,
        "last_decision": last,
        "in_flight": in_flight,
        "alerts": recent_alerts(client, keys, model, alerts),
    }


def model_summary(client, keys, model: str) -> dict[str, Any]:
    """One line of ``retrain models``: aliases, version counts by status, last decision, rollout."""
    from workers.registry.store import Registry

    registry = Registry(client, keys)
    versions = registry.versions(model)
    counts: dict[str, int] = {}
    for mv in versions:
        counts[mv.status] = counts.get(mv.status, 0) + 1
    aliases = registry.aliases(model)
    newest = client.zrevrange(keys.decisions(model), 0, 0, withscores=True)
    raw_state = client.hget(keys.rollout(model), "state")
    rollout = json.loads(raw_state) if raw_state else None
    return {
        "model": model,
        "production": aliases.get("production"),
        "candidate": aliases.get("candidate"),
        "previous": aliases.get("previous"),
        "versions": len(versions),
        "status_counts": dict(sorted(counts.items())),
        "last_decision_id": _s(newest[0][0]) if newest else None,
        "last_decision_time": datetime.fromtimestamp(newest[0][1], timezone.utc).isoformat() if newest else None,
        "rollout_status": rollout.get("status") if rollout else None,
        "in_flight": _s(client.hget(keys.guard(model), "in_flight") or b"") or None,
        "events": int(client.xlen(keys.history(model))),
    }


def type_filter(patterns: list[str] | None) -> list[str] | None:
    """Expand ``--type`` values (repeatable, comma-separated, globs) to known event types; exit 2 on a miss."""
    from events.types import EVENT_TYPES

    if not patterns:
        return None
    wanted: list[str] = []
    for item in patterns:
        for pat in (p.strip() for p in item.split(",")):
            if not pat:
                continue
            hits = [t for t in EVENT_TYPES if fnmatch.fnmatchcase(t, pat)]
            if not hits:
                fail(f"--type {pat!r} matches no event type; known: {', '.join(EVENT_TYPES)}")
            wanted += [t for t in hits if t not in wanted]
    return wanted


def time_bounds(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    from workers.timeline import parse_time_bound

    now = datetime.now(timezone.utc)
    try:
        lo, hi = parse_time_bound(since, now), parse_time_bound(until, now)
    except ValueError as exc:
        fail(str(exc))
    if lo is not None and hi is not None and lo > hi:
        fail(f"--since ({lo.isoformat()}) is after --until ({hi.isoformat()})")
    return lo, hi


def history_events(client, keys, model: str, *, types: list[str] | None = None, since: datetime | None = None,
                   until: datetime | None = None, limit: int | None = DEFAULT_HISTORY_LIMIT) -> dict[str, Any]:
    """The model's event log in a window, filtered by type; the newest ``limit`` matches, oldest first."""
    from workers.timeline import load_events

    events = load_events(client, keys, model, since, until)
    if types is not None:
        allowed = set(types)
        events = [e for e in events if e.get("type") in allowed]
    matched = len(events)
    if limit is not None and matched > limit:
        events = events[-limit:]
    return {"model": model, "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None, "types": types, "matched": matched,
            "count": len(events), "truncated": matched > len(events), "events": events}


# --------------------------------------------------------------------------- rendering
def _ago(iso: str | None, now: datetime) -> str:
    d = _parse_dt(iso)
    if d is None:
        return "-"
    secs = int((now - d).total_seconds())
    from config.durations import format_duration

    return f"{iso[:19]}Z ({format_duration(timedelta(seconds=abs(secs)))} {'ago' if secs >= 0 else 'ahead'})"


def _traffic_text(t: dict[str, Any] | None) -> str:
    if not t:
        return "-"
    parts = [f"v{t['production']} {100 - t['candidate_percent']:g}%"] if t.get("production") else []
    if t.get("candidate"):
        parts.append(f"v{t['candidate']} {t['candidate_percent']:g}%")
    if t.get("shadow"):
        parts.append(f"shadow v{t['shadow']}")
    return " / ".join(parts) or "-"


def render_status(statuses: list[dict[str, Any]]) -> None:
    from rich.markup import escape as esc
    from rich.panel import Panel
    from rich.table import Table

    from config.durations import format_duration

    now = datetime.now(timezone.utc)
    for s in statuses:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        prod = s["production"]
        since = (prod or {}).get("since") or (prod or {}).get("created_at")
        grid.add_row("production", f"v{prod['version']} (since {_ago(since, now)})" if prod else "-")
        cand = s["candidate"]
        grid.add_row("candidate", f"v{cand['version']} ({esc(str(cand['status']))})" if cand else "-")
        r = s["rollout"]
        if r:
            style = {"rolled_back": "red", "aborted": "magenta", "paused": "yellow", "completed": "green"}.get(
                r["status"], "cyan")
            grid.add_row("rollout", f"[{style}]{esc(str(r['status']))}[/] phase {esc(str(r['phase']))} "
                                    f"(v{r['candidate']} vs v{r['production']}) - {esc(r.get('reason') or '')}")
            wait = r.get("insufficient_evidence")
            if wait:
                tail = ""
                if wait.get("then"):
                    limit = format_duration(timedelta(seconds=wait["max_wait_seconds"]))
                    tail = f", then {wait['then']} after {limit}"
                grid.add_row("waiting", f"[yellow]insufficient evidence since {_ago(wait['since'], now)}{tail}[/]: "
                                        + esc("; ".join(wait["reasons"])))
        else:
            grid.add_row("rollout", "-")
        grid.add_row("traffic", _traffic_text(s["traffic"]))
        d = s["last_decision"]
        grid.add_row("last decision", f"{esc(str(d['id']))} [bold]{d['action']}[/] {d['urgency']} at "
                                      f"{_ago(d['time'], now)}: {esc(str(d['reason']))}" if d else "-")
        p = s["in_flight"]
        if p:
            err = f" [red]{esc(p['error'])}[/]" if p.get("error") else ""
            grid.add_row("in flight", f"{esc(p['pipeline_id'])} {p['state']} {p['step'] or ''} (since "
                                      f"{_ago(p.get('since'), now)}){err}")
        else:
            grid.add_row("in flight", "-")
        console.print(Panel(grid, title=f"[bold]{esc(s['model'])}[/]", expand=True))
        if s["alerts"]:
            table = Table(title=f"recent alerts of {esc(s['model'])}", title_justify="left")
            for col in ("time", "severity", "title", "message"):
                table.add_column(col, overflow="fold")
            for a in s["alerts"]:
                color = {"critical": "red", "warning": "yellow"}.get(a.get("severity"), "white")
                table.add_row(str(a.get("time"))[:19], f"[{color}]{esc(str(a.get('severity')))}[/]",
                              esc(str(a.get("title"))), esc(str(a.get("message") or "")))
            console.print(table)


def render_history(result: dict[str, Any]) -> None:
    from rich.markup import escape as esc
    from rich.table import Table

    from workers.timeline import describe_event

    table = Table(title=f"{result['model']}: {result['count']} of {result['matched']} events", title_justify="left")
    for col in ("time (UTC)", "type", "what", "id"):
        table.add_column(col, overflow="fold")
    for e in result["events"]:
        t = e.get("type", "")
        color = ("red" if t in ("rollout.rolled_back", "gate.failed", "training.failed", "alert.raised")
                 else "green" if t in ("rollout.completed", "gate.passed", "training.succeeded")
                 else "cyan" if t.startswith(("retrain.", "rollout.")) else "white")
        table.add_row(str(e.get("time"))[:23], f"[{color}]{esc(t)}[/]", esc(describe_event(e)), esc(str(e.get("id"))))
    console.print(table)
    if result["truncated"]:
        console.print(f"[dim]{result['matched'] - result['count']} older matches not shown (use --limit)[/]")


def render_models(models: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="models", title_justify="left")
    for col in ("model", "production", "candidate", "previous", "versions", "by status", "rollout",
                "in flight", "last decision"):
        table.add_column(col, overflow="fold")
    for m in models:
        table.add_row(m["model"], *(f"v{m[k]}" if m[k] else "-" for k in ("production", "candidate", "previous")),
                      str(m["versions"]), ", ".join(f"{k} {v}" for k, v in m["status_counts"].items()) or "-",
                      m["rollout_status"] or "-", m["in_flight"] or "-",
                      (m["last_decision_time"] or "-")[:19])
    console.print(table)


# --------------------------------------------------------------------------- commands
def register(app: typer.Typer) -> None:
    from workers.cli._common import connect

    @app.command("status")
    def status(
        model: str = typer.Argument(None, help="One model (default: every model)."),
        alerts: int = typer.Option(RECENT_ALERTS, "--alerts", min=0, help="Recent alerts to show per model."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object {\"models\": [...]}."),
    ) -> None:
        """Per model: production, candidate, rollout phase and split, last decision, in-flight pipeline, alerts."""
        client, keys = connect()
        if model:
            require_model(client, keys, model)
            names = [model]
        else:
            names = known_models(client, keys)
        statuses = [model_status(client, keys, m, alerts=alerts) for m in names]
        if as_json:
            print_json({"models": statuses})
        elif not statuses:
            console.print("no models recorded yet")
        else:
            render_status(statuses)

    @app.command("history")
    def history(
        model: str = typer.Argument(..., help="Model name."),
        types: list[str] = typer.Option(None, "--type", "-t",
                                        help="Event type or glob (repeatable, comma-separated): drift.data, rollout.*"),
        since: str = typer.Option(None, "--since", help="Start: a duration ago ('2h') or an ISO time."),
        until: str = typer.Option(None, "--until", help="End: a duration ago or an ISO time."),
        limit: int = typer.Option(DEFAULT_HISTORY_LIMIT, "--limit", "-n", min=1, help="Newest matches to show."),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """The model's event log (signals and lifecycle), filtered by type and time, oldest first."""
        wanted = type_filter(types)
        lo, hi = time_bounds(since, until)
        client, keys = connect()
        require_model(client, keys, model)
        result = history_events(client, keys, model, types=wanted, since=lo, until=hi, limit=limit)
        if as_json:
            print_json(result)
        else:
            render_history(result)

    @app.command("models")
    def models(as_json: bool = typer.Option(False, "--json")) -> None:
        """Every model: production/candidate/previous versions, versions by status, rollout, last decision."""
        client, keys = connect()
        rows = [model_summary(client, keys, m) for m in known_models(client, keys)]
        if as_json:
            print_json({"models": rows})
        elif not rows:
            console.print("no models recorded yet")
        else:
            render_models(rows)
