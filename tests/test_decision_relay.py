"""The enqueue relay: a separate process puts decided pipelines on Celery; nothing is lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from config.settings import Settings
from tests.support import wait_for
from tests.test_decision_worker import drift, queued, records, step, write_policy
from workers.decision.relay import EnqueueRelay, celery_enqueue
from workers.decision.service import OUTBOX_GRACE_S, DecisionService


@pytest.fixture
def make_service(redis_client, redis_server, tmp_path):
    made = []

    def _make(name="worker-1", relay=True):
        folder = write_policy(tmp_path / "policies")
        s = Settings(redis_url=redis_server.url, policy_dir=folder, state_dir=tmp_path / "state")
        svc = DecisionService(redis_client, s, name, relay=relay)
        svc.consumer.ensure_group()
        made.append(svc)
        return svc

    yield _make
    for svc in made:
        if svc.relay is not None:
            svc.relay.stop()


def pipeline_fields(client, keys, rec):
    return {k.decode(): v.decode() for k, v in client.hgetall(keys.pipeline(rec["model"], rec["pipeline_id"])).items()}


class TestRelayProcess:
    def test_the_relay_process_enqueues_what_the_loop_decides(self, make_service, redis_client, keys):
        """With the relay on, the decision loop only commits; the relay process puts the chain on Celery and marks it enqueued."""
        svc = make_service()
        svc.warm_up()
        assert svc.relay.alive() and svc.relay.pid != os.getpid()
        assert svc.relay.start_cpu_seconds() > 0  # loading Celery, reported apart from the relaying
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        assert rec["action"] == "start"
        fields = wait_for(lambda: (f := pipeline_fields(redis_client, keys, rec)).get("enqueued_at") and f,
                          message="the relay to enqueue the pipeline")
        assert fields["enqueued_by"] == "worker-1:relay" and fields["status"] == "enqueued"
        assert queued(redis_client, "training.low") == 1
        assert svc.store.outbox() == {} and redis_client.llen(keys.enqueue_queue()) == 0
        [key] = [k for k in redis_client.keys("training.low*") if redis_client.type(k) == b"list"]
        assert json.loads(redis_client.lindex(key, 0))["headers"]["id"] == f"{rec['pipeline_id']}.validate_data"

    def test_a_killed_relay_is_restarted_by_the_loop(self, make_service, redis_client, keys):
        """SIGKILL the relay: the next round starts a new one, which enqueues the next decision."""
        svc = make_service()
        svc.warm_up()
        first = svc.relay.pid
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not svc.relay.alive(), message="the relay to die")
        svc.relay._started_at -= 10  # as if it had run past the restart delay
        svc.after_batch()
        assert svc.relay.restarts == 1 and svc.relay.alive() and svc.relay.pid != first
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        wait_for(lambda: pipeline_fields(redis_client, keys, rec).get("enqueued_by") == "worker-1:relay",
                 timeout=120, message="the new relay to enqueue")
        assert queued(redis_client, "training.low") == 1

    def test_the_relay_stops_with_its_service(self, make_service):
        """Stopping the service's loop stops its relay process."""
        svc = make_service()
        svc.warm_up()
        proc = svc.relay._proc
        svc.stop()
        svc.run()  # returns at once (stopped), and stops the relay on the way out
        assert not proc.is_alive() and proc.exitcode == 0


class TestRelaySafety:
    """The relay's rules, driven in-process against the real Redis and the real Celery enqueue."""

    def decide(self, svc):
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        return rec

    def test_an_entry_popped_by_a_relay_that_died_is_replayed_by_the_loop(self, make_service, redis_client, keys):
        """The relay popped the entry and died before enqueueing: the outbox keeps it and the loop's replay enqueues it once."""
        svc = make_service()  # relay process not started: nothing pops the queue but us
        rec = self.decide(svc)
        assert redis_client.rpop(keys.enqueue_queue()) is not None  # popped, then the relay "died"
        assert queued(redis_client, "training.low") == 0 and set(svc.store.outbox()) == {rec["pipeline_id"]}
        assert svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        assert queued(redis_client, "training.low") == 1 and svc.store.outbox() == {}
        assert pipeline_fields(redis_client, keys, rec)["enqueued_by"] == "worker-1"

    def test_an_entry_already_enqueued_is_not_enqueued_again(self, make_service, redis_client, keys):
        """A queue entry whose pipeline a replay enqueued meanwhile: the relay skips it."""
        svc = make_service()
        rec = self.decide(svc)
        svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1)
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(redis_client.rpop(keys.enqueue_queue())) is False
        assert queued(redis_client, "training.low") == 1

    def test_an_entry_whose_slot_was_released_is_dropped(self, make_service, redis_client, keys):
        """The pipeline no longer holds its model's slot (cleared by an operator): nothing to start, the outbox entry goes."""
        svc = make_service()
        rec = self.decide(svc)
        redis_client.hdel(keys.guard("churn"), "in_flight")
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(redis_client.rpop(keys.enqueue_queue())) is False
        assert queued(redis_client, "training.low") == 0 and svc.store.outbox() == {}
        assert rec["pipeline_id"]

    def test_an_entry_another_enqueuer_holds_waits_for_it(self, make_service, redis_client, keys):
        """While another enqueuer holds the model's enqueue lock the relay leaves the entry; once released it enqueues it."""
        svc = make_service()
        rec = self.decide(svc)
        entry = redis_client.rpop(keys.enqueue_queue())
        redis_client.set(keys.lock("churn", "enqueue"), "someone-else", px=60_000)
        relay = EnqueueRelay(redis_client, keys, "relay-x", enqueue=celery_enqueue)
        assert relay.relay(entry) is False and set(svc.store.outbox()) == {rec["pipeline_id"]}
        redis_client.delete(keys.lock("churn", "enqueue"))
        assert relay.relay(entry) is True and relay.relay(entry) is False
        assert queued(redis_client, "training.low") == 1 and not redis_client.exists(keys.lock("churn", "enqueue"))

    def test_a_broker_error_leaves_the_entry_for_the_replay(self, make_service, redis_client, keys):
        """The relay's enqueue fails: the outbox entry and the slot stay, the lock is released, and the replay enqueues it."""
        svc = make_service()
        rec = self.decide(svc)

        def down(record):
            raise ConnectionError("broker unreachable")

        relay = EnqueueRelay(redis_client, keys, "relay-x", enqueue=down)
        assert relay.relay(redis_client.rpop(keys.enqueue_queue())) is False
        assert set(svc.store.outbox()) == {rec["pipeline_id"]} and not redis_client.exists(keys.lock("churn", "enqueue"))
        assert svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        assert queued(redis_client, "training.low") == 1

    def test_garbage_on_the_queue_is_logged_and_skipped(self, redis_client, keys):
        """An entry that is not [model, pipeline id] does not stop the relay."""
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(b"not json") is False and relay.relay(b'{"a": 1}') is False
