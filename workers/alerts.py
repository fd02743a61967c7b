"""Alerts: a log line, an ``alert.raised`` event in the model's log, and an optional webhook.

The webhook body is JSON with a Slack-compatible ``text`` field plus the structured alert.
Its URL comes from ``RETRAIN_ALERT_WEBHOOK_URL`` (a secret: never logged).

An alert with a deterministic id (``event_id``: what a re-run of the same task or a replay of the
same outbox would raise again) is recorded once: the second time the id is found among the
model's recent alerts and the list push is not repeated (the event is published again with the
same id, which the bus consumers de-duplicate). Its webhook is sent at least once and, short of
a crash mid-post, once: a run claims the sending, marks it sent after the POST succeeded, and
drops the claim when it failed, so a re-run after a failure (before or during the POST) sends it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from config.keys import Keys
from events.envelope import EVENT_TEXT_CHARS, new_event

log = structlog.get_logger(__name__)

ALERTS_KEPT = 100
WEBHOOK_TIMEOUT_S = 3.0
SENDING_CLAIM_S = 60
"""A run's claim to post an alert's webhook; a run that died mid-post leaves it to expire."""
WEBHOOK_REPLAYS_PER_CALL = 10
"""Most webhooks one outbox replay posts (each on a thread of its own, up to ``WEBHOOK_TIMEOUT_S``)."""
SENT_KEPT_S = 30 * 86400
"""How long an alert id is remembered as sent."""


def alert_event(model: str, severity: str, title: str, message: str = "", *, event_id: str | None = None,
                **context: Any):
    """The ``alert.raised`` event; ``event_id`` makes its id deterministic (random when None).

    Title and message are cut to ``EVENT_TEXT_CHARS`` (an exception's text can be any length; the
    event must fit the bus's size limit)."""
    title, message = title[:EVENT_TEXT_CHARS], message[:EVENT_TEXT_CHARS]
    return new_event("alert.raised", model, {"severity": severity, "title": title, "message": message, **context},
                     source="urn:retrain:alerts", id=event_id)


def record_alert(pipe, keys: Keys, event) -> None:
    """Queue the alert into the model's recent-alerts list (for ``retrain status``)."""
    pipe.lpush(keys.alerts(event.subject), event.to_json())
    pipe.ltrim(keys.alerts(event.subject), 0, ALERTS_KEPT - 1)


_RECORD_ONCE = """
-- KEYS[1] the model's alert list; ARGV: alert id, alert JSON, how many alerts are kept
for _, raw in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local ok, alert = pcall(cjson.decode, raw)
  if ok and type(alert) == 'table' and alert['id'] == ARGV[1] then return 0 end
end
redis.call('LPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[3]) - 1)
return 1
"""


def record_alert_once(client, keys: Keys, event) -> bool:
    """Record the alert unless one with the same id is among the model's recent alerts.

    Atomic (one server-side script): of two workers recording the same alert id, one records it.
    Returns True when recorded now, False for a repeat. An id older than the ``ALERTS_KEPT`` most
    recent alerts is no longer found, so a replay that late records it again.
    """
    script = client.register_script(_RECORD_ONCE)
    return bool(script(keys=[keys.alerts(event.subject)], args=[event.id, event.to_json(), ALERTS_KEPT]))


def notify_webhook(event, url: str | None, *, background: bool = True,
                   on_done: Callable[[bool], None] | None = None) -> None:
    """POST the alert to the webhook (Slack-compatible ``text``); failures are logged, not raised.

    ``on_done(sent)`` is called after the attempt, with whether the webhook accepted it.
    """
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

        sent = False
        try:
            httpx.post(url, json=body, timeout=WEBHOOK_TIMEOUT_S).raise_for_status()
            sent = True
        except Exception as exc:  # noqa: BLE001 - an alert channel outage must not stop the system
            log.warning("alert.webhook_failed", model=event.subject, error=type(exc).__name__)
        if on_done is not None:
            on_done(sent)

    if background:
        threading.Thread(target=_post, daemon=True).start()
    else:
        _post()


def notify_once(client, keys: Keys, event, url: str | None, *, background: bool = True,
                after: Callable[[], None] | None = None) -> bool:
    """Send the alert's webhook unless it was sent, or is being sent, already; return whether this call sends it.

    See the module docstring: the claim becomes "sent" after a successful POST and is dropped after
    a failed one, so a later run with the same alert id tries again. ``after()`` runs once the
    attempt is over and its claim updated.
    """
    if not url:
        return False
    key = keys.alert_sent(event.id)
    if not client.set(key, "sending", nx=True, ex=SENDING_CLAIM_S):
        return False

    def done(sent: bool) -> None:
        try:
            if sent:
                client.set(key, "sent", ex=SENT_KEPT_S)
            else:
                client.delete(key)
            if after is not None:
                after()
        except redis.RedisError as exc:  # the claim expires: a later run may send it again
            log.warning("alert.webhook_mark_failed", model=event.subject, error=type(exc).__name__)

    notify_webhook(event, url, background=background, on_done=done)
    return True


# --- the webhook outbox: alerts committed with a decision ---------------------------------------
# The decision worker records its alerts and their events in the transaction that commits the
# decision; the webhook can only be posted after it. A worker that dies in between would lose the
# post, so the alert also goes into the webhook outbox in that transaction and leaves it once the
# post was attempted (sent, or failed and logged: a failed post is not retried, as anywhere else).
# The decision service's outbox replay posts what a dead worker left (:func:`replay_webhooks`).


def queue_webhook(pipe, keys: Keys, event) -> None:
    """Put the alert into the webhook outbox, in the caller's transaction."""
    pipe.hset(keys.alert_webhook_outbox(), event.id, event.to_json())


def send_queued_webhook(client, keys: Keys, event, url: str | None, *, background: bool = True) -> None:
    """Post an outbox alert's webhook (at most once per id, :func:`notify_once`), then take it out of the outbox.

    Left in the outbox while another run is posting it (the claim is "sending"): that run takes it
    out, or, if it died, the claim expires and a later replay posts it.
    """
    outbox = keys.alert_webhook_outbox()

    def taken_out() -> None:
        client.hdel(outbox, event.id)

    if notify_once(client, keys, event, url, background=background, after=taken_out):
        return
    if not url:
        log.warning("alert.webhook_not_configured", model=event.subject, alert_id=event.id)
        taken_out()
    elif client.get(keys.alert_sent(event.id)) == b"sent":
        taken_out()


def replay_webhooks(client, keys: Keys, url: str | None, older_than_s: float, now: float | None = None,
                    limit: int = WEBHOOK_REPLAYS_PER_CALL, *, background: bool = True) -> int:
    """Post the webhooks of outbox alerts raised more than ``older_than_s`` ago (their worker died
    before posting), at most ``limit`` of them; return how many were started. Each post runs on a
    thread of its own (up to ``WEBHOOK_TIMEOUT_S``), so a slow endpoint never holds up the caller's
    rounds; an alert leaves the outbox when its post is over."""
    from events.envelope import parse_event

    now = time.time() if now is None else now
    attempted = 0
    for alert_id, raw in client.hgetall(keys.alert_webhook_outbox()).items():
        try:
            event = parse_event(raw)
        except Exception as exc:  # noqa: BLE001 - an unreadable entry is dropped with a reason, never retried forever
            log.error("alert.webhook_outbox_unreadable", alert_id=alert_id.decode(errors="replace"), error=str(exc)[:200])
            client.hdel(keys.alert_webhook_outbox(), alert_id)
            continue
        if now - event.time.timestamp() < older_than_s:
            continue  # its own worker is posting it
        if attempted >= limit:
            break  # the rest at the next replay
        log.warning("alert.webhook_replayed", model=event.subject, alert_id=event.id)
        send_queued_webhook(client, keys, event, url, background=background)
        attempted += 1
    return attempted


def raise_alert(client, keys: Keys, bus, model: str, severity: str, title: str, message: str = "",
                *, webhook_url: str | None = None, event_id: str | None = None, **context: Any):
    """Log, record, publish and (optionally) send one alert; return the event.

    With ``event_id`` (a key the caller derives from what it alerts about, e.g. pipeline id and
    step) raising the same alert again records nothing and posts the webhook only if no run has
    sent it yet (:func:`notify_once`); the event is published again under the same id (consumers
    de-duplicate it), so a run that died between recording and publishing still gets it out.
    """
    event = alert_event(model, severity, title, message, event_id=event_id, **context)
    first = record_alert_once(client, keys, event)
    if first:
        log.warning("alert.raised", model=model, severity=severity, title=title, alert_message=message)
    else:
        log.info("alert.already_raised", model=model, alert_id=event.id, title=title)
    bus.publish(event)
    notify_once(client, keys, event, webhook_url)
    return event


def webhook_url_from_settings(settings) -> str | None:
    return settings.alert_webhook_url.get_secret_value() if settings.alert_webhook_url else None


def recent_alerts(client, keys: Keys, model: str, limit: int = 10) -> list[dict[str, Any]]:
    out = []
    for raw in client.lrange(keys.alerts(model), 0, limit - 1):
        e = json.loads(raw)
        out.append({"time": e["time"], "id": e["id"], **e["data"]})
    return out


