"""The Celery application shared by every role.

``retrain worker --role decision|training|gate|rollout`` starts a worker that consumes the
role's queues; the decision role also runs the event-stream consumer as a bootstep.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import beat_init, setup_logging, worker_init, worker_process_init

from config.celery_config import celery_config
from config.settings import get_settings

TASK_MODULES = ["workers.tasks", "workers.pipeline.tasks", "workers.rollout.tasks", "events.producers.schedule"]

app = Celery("retrain", include=TASK_MODULES)


def _configure(application: Celery) -> None:
    from workers.connections import NoRedisConfigured, redis_url

    settings = get_settings()
    try:
        url = redis_url(settings)
    except NoRedisConfigured:
        url = "redis://127.0.0.1:6379/0"  # only for imports/introspection; workers need a real URL
    application.conf.update(celery_config(settings, url))


_configure(app)


@setup_logging.connect
def _logging(**_kwargs) -> None:
    from config.logs import configure_logging

    s = get_settings()
    configure_logging(s.log_level, s.log_format)


@worker_init.connect
def _metrics_server(**_kwargs) -> None:
    """Expose Prometheus metrics when RETRAIN_METRICS_PORT is set (prefork children aggregate
    through PROMETHEUS_MULTIPROC_DIR, which ``retrain worker`` sets up)."""
    from workers.metrics import start_metrics_server_from_env

    start_metrics_server_from_env()


@worker_process_init.connect
def _fresh_clients(**_kwargs) -> None:
    # Forked pool children must not share the parent's sockets.
    from workers.connections import reset_clients

    reset_clients()


@beat_init.connect
def _sync_schedules(sender=None, **_kwargs) -> None:
    """At beat start, write one redbeat entry per model schedule in the policies."""
    from events.producers.schedule import sync_from_policy_dir

    try:
        sync_from_policy_dir(app, get_settings())
    except Exception:  # noqa: BLE001 - a bad policy file must not stop the rollout ticks
        import structlog

        structlog.get_logger(__name__).exception("beat.schedule_sync_failed")


if os.environ.get("RETRAIN_ROLE") in ("decision", "all") or os.environ.get("RETRAIN_EVENT_CONSUMER") == "1":
    from workers.decision.bootstep import EventConsumerStep

    app.steps["worker"].add(EventConsumerStep)
