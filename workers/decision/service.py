"""The decision worker's service: the stream consumer plus what it does with each batch.

Thin shell: it records every event into the model's state and history (in the same
transaction as the bus's de-duplication marks), then asks the decision logic about the models
that are due. The decisions themselves are pure functions in ``workers.decision.policy``.
"""

from __future__ import annotations

import time

import redis
import structlog

from config.keys import Keys, keys_from_settings
from config.settings import Settings, get_settings
from events.bus import PAYLOAD_FIELD, StreamConsumer
from events.envelope import CloudEvent
from events.types import SIGNAL_TYPES

log = structlog.get_logger(__name__)

HISTORY_MAXLEN = 10_000
DRIFT_HISTORY_LEN = 50


def record_events(keys: Keys, events: list[CloudEvent], pipe) -> set[str]:
    """Queue the state updates for a batch into ``pipe``; return the models with new signals."""
    touched: set[str] = set()
    now = time.time()
    models: set[str] = set()
    for event in events:
        model = event.subject
        models.add(model)
        payload = event.to_json()
        pipe.xadd(keys.history(model), {PAYLOAD_FIELD: payload}, maxlen=HISTORY_MAXLEN, approximate=True)
        if event.type in SIGNAL_TYPES:
            touched.add(model)
            pipe.hset(keys.signals(model), event.type, payload)
            if event.type == "drift.data":
                pipe.lpush(keys.drift_history(model), event.data["drift_score"])
                pipe.ltrim(keys.drift_history(model), 0, DRIFT_HISTORY_LEN - 1)
            pipe.rpush(keys.pending_events(model), event.id)
            pipe.hsetnx(keys.guard(model), "first_pending", now)
            pipe.hset(keys.guard(model), "last_pending", now)
    if models:
        pipe.sadd(keys.models(), *models)
    return touched


class DecisionService:
    def __init__(self, client: redis.Redis, settings: Settings, consumer_name: str):
        self.redis = client
        self.settings = settings
        self.keys = keys_from_settings(settings)
        self.touched: set[str] = set()
        self.consumer = StreamConsumer.from_settings(client, settings, "decision", consumer_name, self._handle)

    @classmethod
    def from_settings(cls, consumer_name: str, settings: Settings | None = None) -> "DecisionService":
        from workers.connections import get_redis

        s = settings or get_settings()
        return cls(get_redis(s), s, consumer_name)

    def _handle(self, events: list[CloudEvent], pipe) -> None:
        self.touched |= record_events(self.keys, events, pipe)

    def after_batch(self) -> None:
        """Hook for the decision logic: evaluate the models that are due."""
        self.touched.clear()

    def run(self) -> None:
        self.consumer.run(idle_callback=self.after_batch)

    def stop(self) -> None:
        self.consumer.stop()
