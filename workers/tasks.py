"""Every Celery task module, imported so a worker of any role knows every task name."""

from __future__ import annotations

from workers.app import app


@app.task(name="retrain.echo", acks_late=True, reject_on_worker_lost=True)
def echo(value, label: str = ""):
    """Diagnostics: return the input (used by ``retrain worker --check`` and tests)."""
    return {"value": value, "label": label}


@app.task(name="retrain.housekeeping", ignore_result=True)
def housekeeping() -> dict:
    """Trim the event streams by their retention (MINID, beside MAXLEN~ on every add) and old decision records."""
    import time

    from config.keys import keys_from_settings
    from config.settings import get_settings
    from events.bus import EventBus
    from workers.connections import get_redis
    from workers.decision.state import DecisionStore

    s = get_settings()
    client = get_redis(s)
    trimmed = EventBus.from_settings(client, s).trim_older_than(s.stream_retention.total_seconds())
    records = DecisionStore(client, keys_from_settings(s)).trim_records(
        time.time() - s.decision_retention.total_seconds())
    return {"trimmed": trimmed, "decision_records_deleted": records}


@app.task(name="retrain.monitor_all", ignore_result=True, acks_late=True)
def monitor_all() -> dict:
    """Run each model's monitors when its policy's ``monitor_interval`` has elapsed."""
    from config.keys import keys_from_settings
    from config.settings import get_settings
    from workers.connections import get_redis
    from workers.monitor import monitor_due_models
    from workers.policies import policy_store

    s = get_settings()
    return {m: r.get("published", r.get("error")) for m, r in
            monitor_due_models(get_redis(s), keys_from_settings(s), policy_store(s)).items()}
