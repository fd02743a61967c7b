"""The Celery-task-per-event baseline: same effect as the bus handler, one task per event."""

from __future__ import annotations

import json
import os

import redis
from celery import Celery

from config.celery_config import celery_config
from config.keys import Keys
from config.settings import Settings

_url = os.environ["RETRAIN_REDIS_URL"]
app = Celery("bench")
app.conf.update(celery_config(Settings(), _url))
app.conf.update(task_queues=None, task_default_queue="bench", task_create_missing_queues=True,
                result_backend=None, task_ignore_result=True)
_keys = Keys()
_client = redis.Redis.from_url(_url)


@app.task(name="bench.handle_event", ignore_result=True)
def handle_event(payload: str) -> None:
    from events.envelope import parse_event

    e = parse_event(payload)
    pipe = _client.pipeline(transaction=True)
    pipe.hset(_keys.signals(e.subject), e.type, e.id)
    pipe.incr("bench:celery:done")
    pipe.execute()
