"""Alerts: a log line, an ``alert.raised`` event in the model's log, and an optional webhook.

The webhook body is JSON with a Slack-compatible ``text`` field plus the structured alert.
Its URL comes from ``RETRAIN_ALERT_WEBHOOK_URL`` (a secret: never logged).
"""

from __future__ import annotations

import json
import threading
from typing import Any

import structlog

from config.keys import Keys
from events.envelope import new_event

log = structlog.get_logger(__name__)

ALERTS_KEPT = 100
WEBHOOK_TIMEOUT_S = 3.0


def alert_event(model: str, severity: str, title: str, message: str = "", **context: Any):
    return new_event("alert.raised", model, {"severity": severity, "title": title, "message": message, **context},
                     source="urn:retrain:alerts")


def record_alert(pipe, keys: Keys, event) -> None:
    """Queue the alert into the model's recent-alerts list (for ``retrain status``)."""
    pipe.lpush(keys.alerts(event.subject), event.to_json())
    pipe.ltrim(keys.alerts(event.subject), 0, ALERTS_KEPT - 1)


def notify_webhook(event, url: str | None, *, background: bool = True) -> None:
    """POST the alert to the webhook (Slack-compatible ``text``); failures are logged, not raised."""
    if not url:
        return
    data = event.data
    body = {
        "text": f"[{data.get('severity', 'warning').upper()}] {event.subject}: {data.get('title')}"
                + (f" - {data.get('message')}" if data.get("message") else ""),
        "alert": json.loads(event.to_json()),
    }

    def _post() -> None:
        import httpx

        try:
            httpx.post(url, json=body, timeout=WEBHOOK_TIMEOUT_S).raise_for_status()
        except Exception as exc:  # noqa: BLE001 - an alert channel outage must not stop the system
            log.warning("alert.webhook_failed", model=event.subject, error=type(exc).__name__)

    if background:
        threading.Thread(target=_post, daemon=True).start()
    else:
        _post()


def raise_alert(client, keys: Keys, bus, model: str, severity: str, title: str, message: str = "",
                *, webhook_url: str | None = None, **context: Any):
    """Log, record, publish and (optionally) send one alert; return the event."""
    event = alert_event(model, severity, title, message, **context)
    log.warning("alert.raised", model=model, severity=severity, title=title, alert_message=message)
    pipe = client.pipeline(transaction=True)
    record_alert(pipe, keys, event)
    pipe.execute()
    bus.publish(event)
    notify_webhook(event, webhook_url)
    return event


def webhook_url_from_settings(settings) -> str | None:
    return settings.alert_webhook_url.get_secret_value() if settings.alert_webhook_url else None


def recent_alerts(client, keys: Keys, model: str, limit: int = 10) -> list[dict[str, Any]]:
    out = []
    for raw in client.lrange(keys.alerts(model), 0, limit - 1):
        e = json.loads(raw)
        out.append({"time": e["time"], "id": e["id"], **e["data"]})
    return out


