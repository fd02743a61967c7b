"""The Celery configuration, derived from the settings.

JSON only on the broker (never pickle). Pipeline tasks ack late and are re-queued when a
worker dies; prefetch is 1 so a long fit never holds other tasks hostage. The broker
visibility timeout is one setting used everywhere, and no task ETA may exceed it: rollouts
advance on periodic ticks (celery-redbeat), never on a sleeping task.
"""

from __future__ import annotations

from typing import Any

from kombu import Queue

from config.keys import keys_from_settings

QUEUE_TRAINING_HIGH = "training.high"
QUEUE_TRAINING_LOW = "training.low"
QUEUE_GATE = "gate"
QUEUE_ROLLOUT = "rollout"
QUEUE_DECISION = "decision"

ROLE_QUEUES: dict[str, tuple[str, ...]] = {
    "decision": (QUEUE_DECISION,),
    "training": (QUEUE_TRAINING_HIGH, QUEUE_TRAINING_LOW),
    "gate": (QUEUE_GATE,),
    "rollout": (QUEUE_ROLLOUT,),
}
ROLE_QUEUES["all"] = tuple(q for qs in ROLE_QUEUES.values() for q in qs)

PIPELINE_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
}

HARD_TIME_LIMIT_SHARE = 0.9
SOFT_TIME_LIMIT_SHARE = 0.85
"""A task still running at 85% of the broker visibility timeout gets ``SoftTimeLimitExceeded`` (it
fails, its pipeline's failure handler runs); at 90% its pool process is killed and the task fails.
Either way its message is acked: a task never outlives the visibility timeout, after which the
broker would hand the same message to a second worker and a training would run twice. (Enforced
by the prefork pool, which the training and gate roles use.)"""


def task_time_limits(settings) -> tuple[int, int]:
    """``(soft, hard)`` time limits in seconds, both below the broker visibility timeout."""
    visibility = settings.visibility_timeout.total_seconds()
    hard = max(2, int(visibility * HARD_TIME_LIMIT_SHARE))
    soft = min(hard - 1, max(1, int(visibility * SOFT_TIME_LIMIT_SHARE)))
    return soft, hard


def celery_config(settings, broker_url: str) -> dict[str, Any]:
    """Celery settings (lower-case names) for a broker/backend URL."""
    visibility = int(settings.visibility_timeout.total_seconds())
    soft_limit, hard_limit = task_time_limits(settings)
    transport = {
        "visibility_timeout": visibility,
        "queue_order_strategy": "priority",  # training.high is always drained before training.low
        "global_keyprefix": "",
    }
    return {
        "broker_url": broker_url,
        "result_backend": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "task_soft_time_limit": soft_limit,
        "task_time_limit": hard_limit,
        "worker_prefetch_multiplier": 1,
        "task_track_started": True,
        # No ``task-sent`` event: it is a second broker publish per task message (a third of a
        # pipeline enqueue's cost in the decision worker), and every enqueue is already in the
        # event log (``retrain.decided`` with pipeline id and queue) and on the pipeline record
        # (``enqueued``). Flower shows a task from the moment a worker receives it.
        "task_send_sent_event": False,
        "worker_send_task_events": True,
        "result_expires": int(settings.result_expires.total_seconds()),
        "task_default_queue": QUEUE_DECISION,
        "task_queues": [Queue(q, routing_key=q) for q in ROLE_QUEUES["all"]],
        "task_create_missing_queues": False,
        "timezone": "UTC",
        "enable_utc": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "redbeat_redis_url": broker_url,
        "redbeat_redis_options": {"retry_period": 60},
        "redbeat_key_prefix": keys_from_settings(settings).redbeat_prefix(),
        "redbeat_lock_timeout": 30,
        "beat_max_loop_interval": 1,
        "beat_schedule": {
            "rollout-tick": {
                "task": "retrain.rollout.tick_all",
                "schedule": settings.rollout_tick.total_seconds(),
                "options": {"queue": QUEUE_ROLLOUT, "expires": settings.rollout_tick.total_seconds() * 2},
            },
            "monitors": {
                "task": "retrain.monitor_all",
                "schedule": 60.0,
                "options": {"queue": QUEUE_DECISION, "expires": 120},
            },
            "housekeeping": {
                "task": "retrain.housekeeping",
                "schedule": settings.housekeeping_interval.total_seconds(),
                "options": {"queue": QUEUE_DECISION},
            },
        },
    }
