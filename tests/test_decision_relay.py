"""The enqueue relay: a separate process puts decided pipelines on Celery; nothing is lost or doubled."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from config.settings import Settings
from tests.support import wait_for
from tests.test_decision_worker import drift, queued, records, running, step, write_policy
from workers.decision.relay import RESTART_AFTER_S, EnqueueRelay, RelayProcess, celery_enqueue
from workers.decision.service import OUTBOX_GRACE_S, DecisionService
from workers.decision.state import relay_queue_entry


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
        [rec] = wait_for(lambda: records(svc), message="the decision (the relay's own round may make it)")
        assert rec["action"] == "start"
        fields = wait_for(lambda: (f := pipeline_fields(redis_client, keys, rec)).get("enqueued_at") and f,
                          message="the relay to enqueue the pipeline")
        assert fields["enqueued_by"] == "worker-1:relay" and fields["status"] == "enqueued"
        assert queued(redis_client, "training.low") == 1
        assert svc.store.outbox() == {} and redis_client.llen(keys.enqueue_queue()) == 0
        [key] = [k for k in redis_client.keys("training.low*") if redis_client.type(k) == b"list"]
        assert json.loads(redis_client.lindex(key, 0))["headers"]["id"] == f"{rec['pipeline_id']}.validate_data"

    def test_with_a_ready_relay_run_leaves_the_rounds_to_the_relay_process(self, make_service, redis_client, keys):
        """run(): the service process only reads and records; the relay process evaluates (this process
        runs no round) and enqueues what it decides."""
        svc = make_service()
        svc.warm_up()
        rounds_here = []
        svc.evaluate_due = lambda now=None: rounds_here.append(now) or 0  # would count a round in this process
        with running(svc):
            svc.bus.publish(drift(score=0.2))
            rec = wait_for(lambda: (r := records(svc)) and r[0], timeout=30, message="the relay's decision")
            fields = wait_for(lambda: (f := pipeline_fields(redis_client, keys, rec)).get("enqueued_at") and f,
                              message="the relay to enqueue its decision")
            assert rec["action"] == "start" and fields["enqueued_by"] == "worker-1:relay"
            assert rounds_here == [] and queued(redis_client, "training.low") == 1

    def test_while_the_relay_is_down_run_evaluates_in_the_service(self, make_service, redis_client, keys):
        """The relay process is killed: the service's own evaluator thread decides and enqueues meanwhile."""
        svc = make_service()
        svc.warm_up()
        os.kill(svc.relay.pid, signal.SIGKILL)
        wait_for(lambda: not svc.relay.alive(), message="the relay to die")
        with running(svc):
            svc.bus.publish(drift(score=0.2))
            rec = wait_for(lambda: (r := records(svc)) and r[0], timeout=30, message="a decision without the relay")
            fields = wait_for(lambda: (f := pipeline_fields(redis_client, keys, rec)).get("enqueued_at") and f,
                              message="the service to enqueue")
            assert fields["enqueued_by"] == "worker-1"

    def test_a_cue_never_blocks_on_a_relay_that_does_not_read(self, make_service):
        """A stopped (SIGSTOP) relay never drains its cue pipe: cueing it stays instant, the pipe just stays full."""
        svc = make_service()
        svc.warm_up()
        os.kill(svc.relay.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            for _ in range(100_000):  # far more than a pipe holds
                svc.relay.cue()
            assert time.monotonic() - started < 10
        finally:
            os.kill(svc.relay.pid, signal.SIGKILL)

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
        wait_for(svc.relay.ready, timeout=120, message="the new relay to load Celery")
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = wait_for(lambda: records(svc), message="the decision (the relay's own round may make it)")
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


    def test_ctrl_c_leaves_the_relay_to_its_service_and_sigterm_stops_it_cleanly(self, make_service):
        """SIGINT (a terminal's Ctrl-C reaches the whole process group) does not kill the relay; SIGTERM ends its loop, exit code 0."""
        svc = make_service()
        svc.warm_up()
        proc = svc.relay._proc
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.is_alive()
        os.kill(proc.pid, signal.SIGTERM)
        proc.join(15)
        assert proc.exitcode == 0

    def test_a_stalled_relay_gets_no_work_and_a_stuck_one_is_replaced(self, make_service, redis_client, keys, monkeypatch):
        """A relay whose loop stops coming round (SIGSTOP): the loop enqueues by itself, then kills and restarts it."""
        import workers.decision.relay as relay_module

        svc = make_service()
        svc.warm_up()
        first = svc.relay.pid
        monkeypatch.setattr(relay_module, "STALLED_AFTER_S", 1.0)
        monkeypatch.setattr(relay_module, "STUCK_AFTER_S", 2.0)
        os.kill(first, signal.SIGSTOP)
        wait_for(lambda: not svc.relay.ready(), timeout=10, message="the relay to count as stalled")
        svc.bus.publish(drift(score=0.2))
        svc.consumer.poll(block_ms=10)
        svc.evaluate_due()
        [rec] = records(svc)
        assert pipeline_fields(redis_client, keys, rec)["enqueued_by"] == "worker-1"
        wait_for(lambda: svc.relay.stalled_for() > 2.0, timeout=10, message="the relay to count as stuck")
        svc.relay._started_at -= 10  # past the restart delay
        assert svc.relay.ensure_running() and svc.relay.pid != first
        wait_for(lambda: not os.path.exists(f"/proc/{first}") or open(f"/proc/{first}/stat").read().split()[2] == "Z",
                 timeout=10, message="the stuck relay to be killed")
        wait_for(svc.relay.ready, timeout=120, message="the new relay to be ready")

    def test_the_heartbeat_is_fresh_when_the_relay_says_ready(self, make_service):
        """A relay beats as it becomes ready (not only later in its loop): a slow start is never taken for a stall."""
        svc = make_service()
        relay = RelayProcess(svc.settings, "beat:relay")
        relay.start(wait=False)
        relay._stop.set()  # its loop ends before it would beat: only the beat at ready remains
        relay._proc.join(120)
        assert relay._ready.is_set() and relay._proc.exitcode == 0
        assert relay._beat.value - relay._started_at > 0.2  # stamped after loading Celery, not at the spawn

    def test_a_relay_that_never_comes_up_is_killed(self, make_service, monkeypatch):
        """Alive but not ready past the start timeout (hung while starting): killed, then restarted after the backoff."""
        import workers.decision.relay as relay_module

        svc = make_service()
        svc.relay.start(wait=False)
        proc = svc.relay._proc
        monkeypatch.setattr(relay_module, "START_TIMEOUT_S", 0.05)
        time.sleep(0.1)
        assert not svc.relay._ready.is_set()  # still importing Celery
        assert svc.relay.ensure_running() is False  # killed; the restart waits for the backoff
        assert not proc.is_alive()

    def test_a_relay_that_cannot_be_spawned_does_not_stop_the_loop(self, make_service, redis_client, keys, monkeypatch):
        """Spawning fails (no processes or file descriptors left): warm-up and rounds go on, the loop enqueues by itself."""
        svc = make_service()

        def no_process(*args, **kwargs):
            raise OSError(11, "Resource temporarily unavailable")

        monkeypatch.setattr(svc.relay._ctx, "Process", no_process)
        svc.warm_up()
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        assert pipeline_fields(redis_client, keys, rec)["enqueued_by"] == "worker-1"
        svc.relay._started_at -= 10
        assert svc.relay.ensure_running() is False and svc.relay.restarts == 1  # failed again: logged
        monkeypatch.undo()  # processes can be spawned again
        svc.relay._started_at -= 20  # past the doubled backoff
        assert svc.relay.ensure_running() is True and svc.relay.restarts == 2
        wait_for(svc.relay.ready, timeout=120, message="the relay to come up at last")

    def test_a_relay_that_dies_starting_is_noticed_and_restarted_with_backoff(self):
        """A relay that cannot start is reported at once (not after the start timeout), and restarts back off."""
        relay = RelayProcess(object(), "broken:relay")  # no settings: the child dies reading them
        began = time.monotonic()
        assert relay.start(wait=True) is False
        assert time.monotonic() - began < 60 and not relay.alive()
        try:
            relay._started_at -= RESTART_AFTER_S + 1
            assert relay.ensure_running() and relay.restarts == 1  # first restart after RESTART_AFTER_S
            wait_for(lambda: not relay.alive(), timeout=60, message="the restarted relay to die too")
            relay._started_at -= RESTART_AFTER_S + 1
            assert not relay.ensure_running()  # the second waits twice as long
            relay._started_at -= RESTART_AFTER_S
            assert relay.ensure_running() and relay.restarts == 2
        finally:
            relay.stop()


class TestRelayHandOver:
    def test_without_a_ready_relay_the_loop_enqueues_itself(self, make_service, redis_client, keys):
        """Relay configured but not running: the decision is enqueued by the loop at once, not left for the replay."""
        svc = make_service()  # warm_up() not called: no relay process
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        assert pipeline_fields(redis_client, keys, rec)["enqueued_by"] == "worker-1"
        assert queued(redis_client, "training.low") == 1 and redis_client.llen(keys.enqueue_queue()) == 0

    def test_an_entry_lost_with_its_relay_is_replayed_after_its_event(self, make_service, redis_client, keys):
        """The relay takes the entry and dies: retrain.decided is already out, and the replay enqueues the pipeline once."""
        svc = make_service()
        svc.warm_up()
        os.kill(svc.relay.pid, signal.SIGSTOP)  # hung (a BLPOP it had sent may still take the entry)
        try:
            svc.bus.publish(drift(score=0.2))
            step(svc)
            [rec] = records(svc)
            decided = [json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.history("churn"))]
            assert [e["data"]["pipeline_id"] for e in decided if e["type"] == "retrain.decided"] == [rec["pipeline_id"]]
            left = redis_client.lpop(keys.enqueue_queue())  # else the hung relay's pending BLPOP got it
            assert left is None or json.loads(left) == ["churn", rec["pipeline_id"]]
        finally:
            os.kill(svc.relay.pid, signal.SIGKILL)
        assert queued(redis_client, "training.low") == 0 and set(svc.store.outbox()) == {rec["pipeline_id"]}
        svc._last_replay = 0.0
        assert svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        assert queued(redis_client, "training.low") == 1 and svc.store.outbox() == {}
        step(svc)
        types = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(keys.history("churn"))]
        assert types.count("retrain.decided") == 1


    def test_a_decision_whose_event_failed_to_publish_is_not_handed_to_the_relay(self, make_service, redis_client, keys):
        """Publishing retrain.decided fails after the commit: nothing is queued for the relay; the replay publishes, then enqueues."""
        svc = make_service()
        svc.warm_up()
        publish_many = svc.bus.publish_many

        def broken(events):
            raise ConnectionError("Redis went away")

        os.kill(svc.relay.pid, signal.SIGSTOP)  # its own rounds (every ROUND_WAIT_S) must not make this decision
        try:
            svc.bus.publish(drift(score=0.2))
            svc.consumer.poll(block_ms=10)
            svc.bus.publish_many = broken
            with pytest.raises(ConnectionError):
                svc.after_batch()
            svc.bus.publish_many = publish_many
        finally:
            os.kill(svc.relay.pid, signal.SIGCONT)
        [rec] = records(svc)
        time.sleep(1.0)  # the relay is up: it would have enqueued by now
        assert redis_client.llen(keys.enqueue_queue()) == 0 and queued(redis_client, "training.low") == 0
        svc._last_replay = 0.0
        assert svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        step(svc)
        types = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(keys.history("churn"))]
        assert types.count("retrain.decided") == 1 and queued(redis_client, "training.low") == 1


class TestRelaySafety:
    """The relay's rules, driven in-process against the real Redis and the real Celery enqueue."""

    def decide(self, make_service):
        """A start decision committed to the outbox whose enqueue failed (broker down): the relay's input."""
        svc = make_service(relay=False)

        def down(record):
            raise ConnectionError("broker unreachable")

        svc.enqueue = down
        svc.bus.publish(drift(score=0.2))
        step(svc)
        [rec] = records(svc)
        svc.enqueue = celery_enqueue
        assert set(svc.store.outbox()) == {rec["pipeline_id"]} and queued(svc.redis, "training.low") == 0
        return svc, rec, relay_queue_entry("churn", rec["pipeline_id"])

    def test_the_relay_enqueues_an_outbox_entry_once(self, make_service, redis_client, keys):
        """One claim, one Celery chain; the same entry again is a no-op."""
        svc, rec, entry = self.decide(make_service)
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(entry) is True and relay.relay(entry) is False
        assert queued(redis_client, "training.low") == 1 and svc.store.outbox() == {}
        assert pipeline_fields(redis_client, keys, rec)["enqueued_by"] == "relay-x"

    def test_an_entry_already_enqueued_is_not_enqueued_again(self, make_service, redis_client, keys):
        """A queue entry whose pipeline a replay enqueued meanwhile: the relay skips it."""
        svc, rec, entry = self.decide(make_service)
        svc._last_replay = 0.0
        assert svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(entry) is False
        assert queued(redis_client, "training.low") == 1

    def test_an_entry_whose_slot_was_released_is_dropped(self, make_service, redis_client, keys):
        """The pipeline no longer holds its model's slot (cleared by an operator): nothing to start, the outbox entry goes."""
        svc, rec, entry = self.decide(make_service)
        redis_client.hdel(keys.guard("churn"), "in_flight")
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(entry) is False
        assert queued(redis_client, "training.low") == 0 and svc.store.outbox() == {}

    def test_an_entry_another_enqueuer_holds_waits_for_it(self, make_service, redis_client, keys):
        """While another enqueuer holds the model's enqueue lock the relay leaves the entry; once released it enqueues it."""
        svc, rec, entry = self.decide(make_service)
        redis_client.set(keys.lock("churn", "enqueue"), "someone-else", px=60_000)
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(entry) is False and set(svc.store.outbox()) == {rec["pipeline_id"]}
        relay.store.release_enqueue("churn", relay.owner)  # not ours: stays
        assert redis_client.get(keys.lock("churn", "enqueue")) == b"someone-else"
        redis_client.delete(keys.lock("churn", "enqueue"))
        assert relay.relay(entry) is True
        assert queued(redis_client, "training.low") == 1 and not redis_client.exists(keys.lock("churn", "enqueue"))

    def test_a_broker_error_leaves_the_entry_for_the_replay(self, make_service, redis_client, keys):
        """The relay's enqueue fails: the outbox entry and the slot stay, the lock is released, and the replay enqueues it."""
        svc, rec, entry = self.decide(make_service)

        def down(record):
            raise ConnectionError("broker unreachable")

        relay = EnqueueRelay(redis_client, keys, "relay-x", enqueue=down)
        assert relay.relay(entry) is False
        assert set(svc.store.outbox()) == {rec["pipeline_id"]} and not redis_client.exists(keys.lock("churn", "enqueue"))
        svc._last_replay = 0.0
        assert svc.replay_outbox(time.time() + OUTBOX_GRACE_S + 1) == 1
        assert queued(redis_client, "training.low") == 1

    def test_the_queue_is_first_in_first_out(self, make_service, redis_client, keys):
        """Decisions reach the relay in the order they were made."""
        svc, rec, entry = self.decide(make_service)
        svc.store.queue_for_relay([{"model": "a", "pipeline_id": "p-1"}, {"model": "b", "pipeline_id": "p-2"}])
        svc.store.queue_for_relay([{"model": "c", "pipeline_id": "p-3"}])
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        seen = []
        relay.relay = lambda item: seen.append(json.loads(item)[1]) or len(seen) == 3 and relay_stop.append(1)
        relay_stop: list = []
        relay.run(lambda: bool(relay_stop))
        assert seen == ["p-1", "p-2", "p-3"]

    def test_garbage_on_the_queue_is_logged_and_skipped(self, redis_client, keys):
        """An entry that is not [model, pipeline id] does not stop the relay."""
        relay = EnqueueRelay(redis_client, keys, "relay-x")
        assert relay.relay(b"not json") is False and relay.relay(b'{"a": 1}') is False


def _children(pid: int) -> list[int]:
    """Live (not zombie) child processes of ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _relay_of(worker) -> int:
    def find():
        for child in _children(worker.proc.pid):
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"multiprocessing" in f.read():
                    return child
        return None
    return wait_for(find, timeout=60, message=f"the relay process of {worker.name}")


@pytest.mark.slow
class TestRelayInACeleryWorker:
    def test_a_stopping_worker_takes_its_relay_with_it(self, start_worker, tmp_path):
        """SIGTERM to a decision worker (as a service manager sends it) leaves no relay process behind."""
        worker = start_worker("decision", env={"RETRAIN_POLICY_DIR": str(write_policy(tmp_path / "policies"))})
        relay = _relay_of(worker)
        worker.stop()
        wait_for(lambda: _gone(relay), timeout=15, message="the relay to exit with its worker")

    def test_a_relay_whose_worker_was_killed_exits(self, start_worker, tmp_path):
        """SIGKILL of the worker's main process alone: its relay notices the parent is gone and exits."""
        worker = start_worker("decision", env={"RETRAIN_POLICY_DIR": str(write_policy(tmp_path / "policies"))})
        relay = _relay_of(worker)
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(15)
        wait_for(lambda: _gone(relay), timeout=15, message="the orphaned relay to exit")


def _wait_on(flag) -> None:
    flag.wait(600)


class TestSharedFlag:
    def test_setting_a_flag_whose_waiter_was_killed_returns(self):
        """A process killed while it waits on the flag (a decision worker SIGKILLed while its relay starts)
        does not leave the setter blocked (a multiprocessing.Event's set() waits for its sleepers forever)."""
        import multiprocessing as mp
        import threading

        from workers.decision.relay import SharedFlag

        ctx = mp.get_context("spawn")
        flag = SharedFlag(ctx)
        waiter = ctx.Process(target=_wait_on, args=(flag,), daemon=True)
        waiter.start()
        time.sleep(1.5)  # started and waiting
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.join(10)
        setter = threading.Thread(target=flag.set, daemon=True)
        setter.start()
        setter.join(5)
        assert not setter.is_alive() and flag.is_set() and flag.wait(0)


class TestEvaluatorThreads:
    def test_a_cue_during_one_threads_round_starts_the_other_threads_round(self, monkeypatch):
        """Two evaluator threads take cues in turn: while one's round is held (waiting on Redis, say), the next
        cue starts a round on the other thread, and a cue starts one round, not one per thread."""
        import threading

        from workers.decision import relay
        from workers.decision.relay import evaluate_rounds

        monkeypatch.setattr(relay, "ROUND_WAIT_S", 5.0)  # no idle-timeout round within the test's waits

        held, running_rounds, lock = threading.Event(), [], threading.Lock()
        rounds = {"started": 0, "max_running": 0}

        class Rounds:  # the service side of the rounds: counts them; the first one holds until released
            def evaluate_due(self):
                with lock:
                    rounds["started"] += 1
                    first = rounds["started"] == 1
                    running_rounds.append(1)
                    rounds["max_running"] = max(rounds["max_running"], len(running_rounds))
                if first:
                    held.wait(10)
                with lock:
                    running_rounds.pop()

        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        stop = threading.Event()
        turn = threading.Lock()
        threads = [threading.Thread(target=evaluate_rounds, args=(Rounds(), read_fd, stop.is_set, lambda: None, turn),
                                    daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            os.write(write_fd, b"x")
            wait_for(lambda: rounds["started"] == 1, timeout=5, message="the first round")
            os.write(write_fd, b"x")
            wait_for(lambda: rounds["max_running"] == 2, timeout=5, message="a second round beside the held one")
            started = rounds["started"]
            time.sleep(0.5)
            assert rounds["started"] == started == 2  # one round per cue
        finally:
            held.set()
            stop.set()
            os.write(write_fd, b"xx")  # wake the waiting thread to see the stop
            for t in threads:
                t.join(5)
            os.close(read_fd)
            os.close(write_fd)

    def test_the_shared_beat_is_the_oldest_threads(self):
        """One evaluator thread that stops coming round shows as a stall even while the other keeps beating."""
        from multiprocessing import Value

        from workers.decision.relay import OldestBeat

        shared = Value("d", 0.0, lock=False)
        beats = OldestBeat(shared, 2)
        beats.beat(0)
        beats.beat(1)
        stuck_since = shared.value
        for _ in range(3):
            time.sleep(0.05)
            beats.beat(1)
        assert shared.value == stuck_since
        beats.beat(0)
        assert shared.value > stuck_since
