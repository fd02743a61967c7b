"""Scheduled retraining: celery-redbeat entries per model that publish ``schedule.tick``.

A policy's ``triggers.schedule`` is either a five-field cron expression (``"0 3 * * *"``, in
UTC, or an alias such as ``@daily``) or an interval (``"24h"``, parsed by
:func:`config.durations.parse_duration`). :func:`sync_schedules` makes the redbeat schedule in
Redis match the policies: one entry per scheduled model, created or updated in place (its
``last_run_at`` survives an update), and entries of models that lost their schedule deleted.

The beat process (``celery beat -S redbeat.RedBeatScheduler``) holds redbeat's Redis lock
(``redbeat_lock_timeout`` in the Celery configuration), so however many beat processes run,
one sends the ticks. Each tick is the Celery task :func:`schedule_tick`, which publishes the
event through the :class:`events.bus.EventBus`; its event id comes from the task id, so a
redelivered task message (``acks_late``) has no second effect.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.schedules import crontab, schedule as interval_schedule
from redis.exceptions import ConnectionError as RedisConnectionError, TimeoutError as RedisTimeoutError

from config.celery_config import QUEUE_DECISION
from config.durations import parse_duration
from config.keys import keys_from_settings
from events.envelope import new_event
from workers.app import app as celery_app

TASK_NAME = "retrain.schedule_tick"
ENTRY_PREFIX = "schedule-tick:"
"""Redbeat entry names are ``schedule-tick:<model>`` (keys: ``<redbeat prefix><name>``)."""
SOURCE = "urn:retrain:schedule"
MAX_TICK_EXPIRY_S = 3600
"""A tick not started within this long (or one interval, if shorter) is dropped, not piled up."""
MIN_INTERVAL = timedelta(seconds=1)
CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


class ScheduleError(ValueError):
    """A ``triggers.schedule`` value that is neither a cron expression nor an interval."""


def celery_schedule(spec: str) -> crontab | interval_schedule:
    """The Celery schedule of a policy's ``triggers.schedule``.

    >>> celery_schedule("0 3 * * *")
    <crontab: 0 3 * * * (m/h/dM/MY/d)>
    >>> celery_schedule("24h").run_every
    datetime.timedelta(days=1)
    """
    text = spec.strip()
    text = CRON_ALIASES.get(text.lower(), text)
    if len(text.split()) == 5:
        try:
            return crontab.from_string(text)
        except (ValueError, TypeError) as exc:
            raise ScheduleError(f"bad cron expression {spec!r}: {exc}") from None
    try:
        every = parse_duration(text)
    except ValueError as exc:
        raise ScheduleError(f"schedule {spec!r} is neither a cron expression ('0 3 * * *') nor an interval ('24h'): {exc}") from None
    if every < MIN_INTERVAL:
        raise ScheduleError(f"schedule interval {spec!r} is shorter than {MIN_INTERVAL.total_seconds():g}s")
    return interval_schedule(run_every=every)


def entry_name(model: str) -> str:
    return f"{ENTRY_PREFIX}{model}"


def _expiry_seconds(sched) -> int:
    if isinstance(sched, interval_schedule):
        return max(1, min(MAX_TICK_EXPIRY_S, int(sched.run_every.total_seconds())))
    return MAX_TICK_EXPIRY_S


def _policies(policies: Iterable[Any] | Mapping[str, Any]) -> list[Any]:
    return list(policies.values()) if isinstance(policies, Mapping) else list(policies)


def sync_schedules(app, policies: Iterable[Any] | Mapping[str, Any]) -> list[str]:
    """Make the redbeat entries in Redis match the policies' ``triggers.schedule``.

    Parameters
    ----------
    app
        The Celery app (its ``redbeat_*`` settings say where the schedule lives).
    policies
        :class:`config.policy.Policy` objects (or a mapping model -> policy).

    Returns
    -------
    list[str]
        The entry names now scheduled, sorted (``schedule-tick:<model>``).

    Raises
    ------
    ScheduleError
        When a policy's schedule cannot be parsed; nothing is changed then.
    """
    from redbeat import RedBeatSchedulerEntry
    from redbeat.schedulers import ensure_conf, get_redis

    wanted: dict[str, tuple[str, Any]] = {}
    for policy in _policies(policies):
        spec = policy.triggers.schedule.strip()
        if spec:
            wanted[policy.model.name] = (spec, celery_schedule(spec))  # parse all before writing

    conf = ensure_conf(app)
    ours = keys_from_settings().redbeat_entry(ENTRY_PREFIX)  # the prefix of our entries' keys
    for key in get_redis(app).zrange(conf.schedule_key, 0, -1):
        key = key.decode() if isinstance(key, bytes) else key
        if key.startswith(ours) and key[len(ours):] not in wanted:
            RedBeatSchedulerEntry.from_key(key, app=app).delete()

    for model, (spec, sched) in wanted.items():
        RedBeatSchedulerEntry(
            name=entry_name(model),
            task=TASK_NAME,
            schedule=sched,
            kwargs={"model": model, "schedule": spec},
            options={"queue": QUEUE_DECISION, "expires": _expiry_seconds(sched)},
            app=app,
        ).save()
    return sorted(entry_name(m) for m in wanted)


def sync_from_policy_dir(app=None, settings=None) -> list[str]:
    """:func:`sync_schedules` over every policy in ``settings.policy_dir``."""
    from workers.policies import policy_store

    return sync_schedules(app or celery_app, policy_store(settings).all())


def publish_tick(model: str, spec: str = "", *, bus=None, event_id: str | None = None,
                 now: datetime | None = None) -> str:
    """Publish one ``schedule.tick`` for ``model``; return the event id."""
    if bus is None:
        from config.settings import get_settings
        from events.bus import EventBus
        from workers.connections import get_redis

        settings = get_settings()
        bus = EventBus.from_settings(get_redis(settings), settings)
    at = now or datetime.now(timezone.utc)
    event = new_event("schedule.tick", model, {"schedule": spec, "fired_at": at.isoformat()},
                      source=SOURCE, id=event_id or f"tick-{uuid.uuid4().hex}", time=at)
    return bus.publish(event)


@celery_app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
                 autoretry_for=(RedisConnectionError, RedisTimeoutError), retry_backoff=True, max_retries=5)
def schedule_tick(self, model: str, schedule: str = "") -> str:
    """Celery task sent by redbeat: publish the ``schedule.tick`` event of ``model``."""
    task_id = getattr(self.request, "id", None)
    return publish_tick(model, schedule, event_id=f"tick-{task_id}" if task_id else None)
