"""The event-stream consumer as a Celery worker bootstep.

Celery's documented extension point for custom consumers: the consumer starts and stops with
the worker, so the decision role shows in Flower, answers ``celery inspect ping``, scales by
starting more workers (each a member of the consumer group) and shuts down cleanly.
"""

from __future__ import annotations

import socket
import threading

import structlog
from celery import bootsteps

log = structlog.get_logger(__name__)

CONSUMER_GROUP = "decision"


class EventConsumerStep(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Pool"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.thread: threading.Thread | None = None
        self.service = None

    def start(self, worker) -> None:
        from workers.decision.service import DecisionService

        name = f"{worker.hostname or socket.gethostname()}"
        self.service = DecisionService.from_settings(consumer_name=name)
        # Here, not in the thread: a worker whose shard count disagrees with the data must not start.
        self.service.consumer.ensure_group()
        from workers.metrics import track_consumer

        track_consumer(self.service.consumer)
        self.thread = threading.Thread(target=self._run, name="event-consumer", daemon=True)
        self.thread.start()
        log.info("decision.consumer_started", consumer=name)

    def _run(self) -> None:
        try:
            self.service.run()
        except Exception:  # noqa: BLE001 - logged; the worker stays up for ops to see
            log.exception("decision.consumer_crashed")

    def stop(self, worker) -> None:
        if self.service is not None:
            self.service.stop()
        if self.thread is not None:
            self.thread.join(timeout=10)
        log.info("decision.consumer_stopped")

    shutdown = stop
