"""A live terminal view of the demo: events, decisions, pipeline steps and the traffic split."""

from __future__ import annotations

import json
import threading
import time

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from workers.cli._common import console

SHOWN_EVENTS = 14
STYLE = {"retrain.decided": "bold cyan", "gate.failed": "bold red", "gate.passed": "green",
         "rollout.rolled_back": "bold red", "rollout.completed": "bold green", "alert.raised": "red",
         "model.staged": "green", "drift.data": "yellow"}


def _summary(event: dict) -> str:
    d = event.get("data", {})
    t = event["type"]
    if t == "drift.data":
        return f"score {d.get('drift_score', 0):.2f} {', '.join(d.get('drifted_features', [])[:3])}"
    if t == "retrain.decided":
        return f"{d.get('urgency')} {', '.join(d.get('triggers', []))} -> {d.get('queue')}"
    if t == "retrain.suppressed":
        return d.get("reason", "")[:60]
    if t.startswith("gate."):
        return ", ".join(d.get("failed_checks", [])) or "all checks passed"
    if t.startswith("rollout."):
        return f"v{d.get('version')} {d.get('phase') or ''} {d.get('traffic') if d.get('traffic') is not None else ''}% {d.get('reason', '')[:50]}"
    if t == "alert.raised":
        return d.get("title", "")
    if t == "model.staged":
        return f"v{d.get('version')}"
    return d.get("step") or d.get("reason") or ""


class LiveView:
    def __init__(self, demo):
        self.demo = demo
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "LiveView":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=3)

    def render(self):
        d = self.demo
        events = Table(title="events (newest last)", expand=True)
        for col, width in (("time", 8), ("type", 22), ("detail", None)):
            events.add_column(col, width=width, overflow="ellipsis", no_wrap=True)
        try:
            entries = d.redis.xrevrange(d.keys.history("churn"), count=SHOWN_EVENTS)
        except Exception:  # noqa: BLE001
            entries = []
        for _, fields in reversed(entries):
            e = json.loads(fields[b"e"])
            events.add_row(e["time"][11:19], e["type"], _summary(e), style=STYLE.get(e["type"], ""))
        split = Table(title="serving", expand=True)
        for col in ("production", "candidate", "shadow", "live share"):
            split.add_column(col)
        try:
            from workers.router.traffic import read_traffic

            t = read_traffic(d.redis, d.keys, "churn")
            share = d.traffic.serving_share() if d.traffic else {}
            split.add_row(f"v{t.production}" if t.production else "-",
                          f"v{t.candidate} {t.candidate_percent:g}%" if t.candidate else "-",
                          f"v{t.shadow}" if t.shadow else "-",
                          " ".join(f"v{v}:{s:.0%}" for v, s in sorted(share.items())))
        except Exception:  # noqa: BLE001
            split.add_row("-", "-", "-", "-")
        guard = {}
        try:
            guard = {k.decode(): v.decode() for k, v in d.redis.hgetall(d.keys.guard("churn")).items()}
        except Exception:  # noqa: BLE001
            pass
        status = f"[bold]{d.status_line}[/]\nin flight: {guard.get('in_flight', '-')}   " \
                 f"elapsed {time.monotonic() - d.started:4.0f}s"
        return Group(Panel(status, title="retrain demo"), split, events)

    def _run(self) -> None:
        with Live(self.render(), console=console, refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(0.25):
                live.update(self.render())
