"""A Celery chain on a real worker, and the decision worker's bootstep consuming the stream."""

from __future__ import annotations

from celery import chain

from events.bus import EventBus
from events.envelope import new_event
from tests.support import wait_for
from workers.tasks import echo


class TestRealWorker:
    def test_chain_of_two_tasks_runs_on_a_real_worker(self, start_worker):
        """A two-task chain enqueued through the broker is executed by a worker process."""
        start_worker("all")
        result = chain(echo.s(1, "first"), echo.s("second")).apply_async(queue="decision")
        out = result.get(timeout=20)
        assert out == {"value": {"value": 1, "label": "first"}, "label": "second"}

    def test_decision_worker_consumes_published_events(self, start_worker, redis_client, settings, keys):
        """Events published to the stream land in the model's history via the bootstep consumer."""
        start_worker("decision")
        bus = EventBus.from_settings(redis_client, settings)
        events = [new_event("volume.accumulated", f"m{i % 3}", {"new_samples": i}) for i in range(30)]
        assert len(bus.publish_many(events).published) == 30
        def recorded():
            import json

            return sum(1 for i in range(3) for _, f in redis_client.xrange(keys.history(f"m{i}"))
                       if json.loads(f[b"e"])["type"] == "volume.accumulated")

        # (The models have no policy, so the worker also records a retrain.suppressed per model.)
        wait_for(lambda: recorded() == 30, message="30 events in the histories")
