"""The rollout control plane on a real Redis: live evidence from the router's logs decides."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

from config.policy import policy_from_dict
from tests.support import retrain_cli, wait_for
from workers.decision.state import DecisionStore
from workers.registry.store import ModelVersion, Registry
from workers.rollout.control import MANUAL_LOCK_WAIT_S, TICK_LOCK_MS, RolloutConflict, RolloutControl
from workers.rollout.machine import SetTraffic
from workers.router.traffic import read_traffic

MODEL = "churn"
PHASES = [
    {"name": "shadow", "traffic": 0, "min_duration": "0s", "min_requests": 100},
    {"name": "canary", "traffic": 10, "min_duration": "0s", "min_requests": 50, "min_labeled": 50},
    {"name": "50%", "traffic": 50, "min_duration": "0s", "min_requests": 50, "min_labeled": 50},
    {"name": "100%", "traffic": 100, "min_duration": "0s", "min_requests": 50, "min_labeled": 50},
]


class Policies:
    def __init__(self, **rollout):
        # A 5-point tolerance keeps the equal candidate out of the "hold until confident" band.
        self.policy = policy_from_dict({"model": {"name": MODEL},
                                        "rollout": {"phases": PHASES, "max_accuracy_drop": 0.05, **rollout}})

    def get(self, model):
        return self.policy


@pytest.fixture
def control(redis_client, keys):
    def _make(**rollout):
        return RolloutControl(redis_client, keys, policies=Policies(**rollout))
    return _make


@pytest.fixture
def versions(redis_client, keys):
    registry = Registry(redis_client, keys)
    for v, status in ((1, "production"), (2, "staged")):
        registry.register(ModelVersion(model=MODEL, version=0, status=status, artifact_uri=f"file:///x/{v}.skops",
                                       sha256="0" * 64, pipeline_id=f"p-{v}"))
    registry.set_alias(MODEL, "production", 1, who="test", why="setup")
    return registry


class Traffic:
    """Writes what the router logs (request and feedback streams) for a simulated phase."""

    def __init__(self, client, keys, seed=0):
        self.client, self.keys = client, keys
        self.rng = random.Random(seed)
        self.n = 0

    def serve(self, n, *, traffic, prod_acc=0.85, cand_acc=0.85, cand_latency=2.0, cand_error=0.0,
              shadow=False, labels=True):
        pipe = self.client.pipeline(transaction=False)
        for _ in range(n):
            self.n += 1
            rid = f"r{self.n}"
            label = self.rng.randint(0, 1)
            to_cand = (not shadow) and self.rng.uniform(0, 100) < traffic
            version, acc, lat, err = ("2", cand_acc, cand_latency, cand_error) if to_cand else ("1", prod_acc, 2.0, 0.0)
            pred = self._record(pipe, rid, version, label, acc, lat, err, shadow_of=None)
            if shadow:
                # An equally good candidate mostly agrees with production; a worse one where it errs.
                same = cand_acc >= prod_acc and self.rng.uniform(0, 1) < 0.97
                self._record(pipe, rid + "s", "2", label, cand_acc, cand_latency, cand_error, shadow_of=rid,
                             pred=pred if same else None)
            if labels:
                pipe.xadd(self.keys.feedback(MODEL), {"request_id": rid, "label": json.dumps(label), "ts": time.time()})
        pipe.execute()

    def _record(self, pipe, rid, version, label, acc, latency, error_rate, shadow_of, pred=None):
        error = self.rng.uniform(0, 1) < error_rate
        if pred is None:
            pred = label if self.rng.uniform(0, 1) < acc else 1 - label
        score = (0.75 if pred == 1 else 0.25) + self.rng.uniform(-0.1, 0.1)
        fields = {"request_id": rid, "version": version, "latency_ms": f"{latency + self.rng.uniform(0, 0.5):.3f}",
                  "prediction": "" if error else json.dumps(pred), "score": "" if error else f"{score:.4f}",
                  "error": "boom" if error else "", "shadow": "1" if shadow_of else "0", "ts": f"{time.time():.3f}"}
        if shadow_of:
            fields["shadow_of"] = shadow_of
        pipe.xadd(self.keys.requests(MODEL), fields)
        return pred


def drive(ctl, traffic, phase_kwargs=None, max_looks=40, per_look=200):
    """Serve traffic at the current phase's split and tick until the rollout ends."""
    state = None
    for _ in range(max_looks):
        state, _ = ctl.load(MODEL)
        if not state.active:
            return state
        pct = {"shadow": 0, "canary": 10, "50%": 50, "100%": 100}.get(state.phase, 0)
        traffic.serve(per_look, traffic=pct, shadow=state.status == "shadow", **(phase_kwargs or {}))
        time.sleep(0.002)
        ctl.tick(MODEL)
    return ctl.load(MODEL)[0]


class TestRollout:
    def test_good_candidate_walks_every_phase_and_is_promoted(self, control, versions, redis_client, keys):
        """An equal candidate goes shadow -> canary -> 50% -> 100% -> completed; aliases, statuses, traffic follow."""
        ctl = control()
        ctl.begin(MODEL, 2, pipeline_id="p-2")
        redis_client.hset(keys.guard(MODEL), "in_flight", "p-2")
        assert read_traffic(redis_client, keys, MODEL).shadow == "2"
        state = drive(ctl, Traffic(redis_client, keys))
        assert state.status == "completed"
        assert versions.alias(MODEL, "production") == 2 and versions.alias(MODEL, "previous") == 1
        assert versions.get(MODEL, 2).status == "production" and versions.get(MODEL, 1).status == "previous"
        table = read_traffic(redis_client, keys, MODEL)
        assert table.production == "2" and not table.candidate and not table.shadow
        steps = [h.get("action") or h.get("verdict") for h in state.history]
        assert "advance" in json.dumps(state.history)
        assert not redis_client.hexists(keys.guard(MODEL), "in_flight")  # single-flight slot released
        types = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(keys.events_for(MODEL))]
        assert types.count("rollout.advanced") == 3 and "rollout.completed" in types
        assert steps

    def test_worse_accuracy_is_rolled_back(self, control, versions, redis_client, keys):
        """A candidate 25 points less accurate on delayed labels is rolled back; production serves again."""
        ctl = control()
        ctl.begin(MODEL, 2)
        state = drive(ctl, Traffic(redis_client, keys, seed=1), {"cand_acc": 0.6})
        assert state.status == "rolled_back" and "accuracy" in state.reason
        assert versions.get(MODEL, 2).status == "rolled_back" and versions.alias(MODEL, "production") == 1
        table = read_traffic(redis_client, keys, MODEL)
        assert table.production == "1" and not table.candidate and not table.shadow
        analysis = state.last_analysis
        assert analysis["verdict"] == "rollback" and analysis["sample_sizes"]["candidate_labeled_total"] > 0
        alerts = [json.loads(a) for a in redis_client.lrange(keys.alerts(MODEL), 0, -1)]
        assert alerts and alerts[0]["data"]["severity"] == "critical"

    def test_worse_latency_is_rolled_back(self, control, versions, redis_client, keys):
        """A candidate whose p99 latency is ten times production's is rolled back."""
        ctl = control()
        ctl.begin(MODEL, 2)
        state = drive(ctl, Traffic(redis_client, keys, seed=2), {"cand_latency": 25.0})
        assert state.status == "rolled_back" and "latency" in state.reason

    def test_rising_errors_are_rolled_back(self, control, versions, redis_client, keys):
        """A candidate failing 20 % of its requests is rolled back."""
        ctl = control()
        ctl.begin(MODEL, 2)
        state = drive(ctl, Traffic(redis_client, keys, seed=3), {"cand_error": 0.2})
        assert state.status == "rolled_back" and "error" in state.reason

    def test_insufficient_evidence_holds_then_pauses(self, control, versions, redis_client, keys):
        """Without labels the canary holds ('insufficient evidence'), then pauses after max_wait."""
        ctl = control(max_wait="1s")
        ctl.begin(MODEL, 2)
        traffic = Traffic(redis_client, keys, seed=4)
        traffic.serve(200, traffic=0, shadow=True, labels=False)
        ctl.tick(MODEL)
        state, _ = ctl.load(MODEL)
        assert state.phase == "canary"
        traffic.serve(200, traffic=10, labels=False)
        state = ctl.tick(MODEL)
        assert state.status == "canary" and state.insufficient_evidence
        time.sleep(1.1)
        ctl.tick(MODEL)
        state = ctl.tick(MODEL)
        assert state.status == "paused" and "insufficient evidence" in state.reason
        assert read_traffic(redis_client, keys, MODEL).candidate == "2"  # traffic stays while paused

    def test_rollback_flips_traffic_within_a_second_of_the_verdict(self, control, versions, redis_client, keys):
        """From the tick that reaches the rollback verdict to the traffic table change: well under 1 s."""
        ctl = control()
        ctl.begin(MODEL, 2)
        traffic = Traffic(redis_client, keys, seed=5)
        for _ in range(40):
            state, _ = ctl.load(MODEL)
            if not state.active:
                break
            pct = {"shadow": 0, "canary": 10, "50%": 50, "100%": 100}[state.phase]
            traffic.serve(200, traffic=pct, shadow=state.status == "shadow", cand_acc=0.55)
            before = read_traffic(redis_client, keys, MODEL).revision
            started = time.perf_counter()
            new = ctl.tick(MODEL)
            if new.status == "rolled_back":
                elapsed = time.perf_counter() - started
                assert read_traffic(redis_client, keys, MODEL).revision > before
                assert elapsed < 1.0
                break
        else:
            raise AssertionError("never rolled back")


class TestManual:
    def test_manual_commands_are_recorded_with_who_and_why(self, control, versions, redis_client, keys):
        """pause, resume and an emergency rollback are applied at once and recorded with who/why."""
        ctl = control()
        ctl.begin(MODEL, 2)
        assert ctl.manual(MODEL, "pause", "ana", "investigating").status == "paused"
        assert ctl.manual(MODEL, "resume", "ana", "ok").status == "shadow"
        state = ctl.manual(MODEL, "rollback", "bob", "pager")
        assert state.status == "rolled_back"
        assert read_traffic(redis_client, keys, MODEL).shadow in (None, "")
        who = [(h.get("who"), h.get("why")) for h in state.history if h.get("who") in ("ana", "bob")]
        assert ("ana", "investigating") in who and ("bob", "pager") in who
        moves = versions.alias_history(MODEL, "candidate")
        assert moves[-1].version is None

    def test_promote_skips_the_remaining_phases(self, control, versions, redis_client, keys):
        """An operator promote completes the rollout now; the alias history says who and why."""
        ctl = control()
        ctl.begin(MODEL, 2)
        assert ctl.manual(MODEL, "promote", "ana", "hotfix").status == "completed"
        assert versions.alias(MODEL, "production") == 2
        move = versions.alias_history(MODEL, "production")[-1]
        assert move.who == "ana" and "hotfix" in move.why

    def test_the_completion_is_in_the_log_before_anyone_sees_the_new_production(self, control, versions,
                                                                              redis_client, keys, monkeypatch):
        """A monitor that sees v2 in production and reports drift at once: its signal lands after
        rollout.completed (written with the alias move), which is published once."""
        from events.bus import EventBus
        from events.envelope import new_event

        ctl = control()
        ctl.begin(MODEL, 2)
        bus, seen, status = EventBus(redis_client, keys), [], ctl._status

        def react(model, version, new_status, who, why):  # the first thing after the alias move
            if new_status == "production" and not seen:
                seen.append(versions.alias(MODEL, "production"))
                bus.publish(new_event("drift.data", MODEL, {"drift_score": 0.3, "drifted_features": ["a"]}))
            return status(model, version, new_status, who, why)

        monkeypatch.setattr(ctl, "_status", react)
        assert ctl.manual(MODEL, "promote", "ana", "now").status == "completed"
        types = [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(keys.events_for(MODEL))]
        assert seen == [2] and types.count("rollout.completed") == 1
        assert types.index("rollout.completed") < types.index("drift.data")

    def test_a_promotion_whose_reason_is_over_the_event_size_still_announces_it(self, control, versions,
                                                                              redis_client, keys):
        """An operator's 100 KB reason: the rollout completes, its history keeps the reason, and rollout.completed
        goes out with it cut (an event over the bus's limit was left out of the alias move and then skipped)."""
        ctl = control()
        ctl.begin(MODEL, 2)
        why = "because " * 12_500
        state = ctl.manual(MODEL, "promote", "ana", why)
        assert state.status == "completed" and versions.alias(MODEL, "production") == 2
        assert any(entry.get("why") == why for entry in state.history)
        [completed] = [e for e in (json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for(MODEL)))
                       if e["type"] == "rollout.completed"]
        assert why.startswith(completed["data"]["why"]) and len(completed["data"]["why"]) == 2000

    def test_cli_rollback_exit_codes(self, versions, redis_server, redis_client, keys):
        """`retrain rollback` with no rollout is one line and exit 2."""
        out = retrain_cli("rollback", MODEL, "--reason", "x", redis_url=redis_server.url)
        assert out.returncode == 2 and "no rollout" in out.stderr and out.stderr.count("\n") == 1


class TestConcurrency:
    def test_two_controllers_never_double_advance(self, control, versions, redis_client, keys):
        """Two controllers ticking the same rollout concurrently: every revision is taken once."""
        a, b = control(), control()
        a.begin(MODEL, 2)
        traffic = Traffic(redis_client, keys, seed=6)
        conflicts = []
        for _ in range(30):
            state, _ = a.load(MODEL)
            if not state.active:
                break
            pct = {"shadow": 0, "canary": 10, "50%": 50, "100%": 100}[state.phase]
            traffic.serve(200, traffic=pct, shadow=state.status == "shadow")

            def tick(ctl):
                try:
                    ctl.tick(MODEL)
                except RolloutConflict:
                    conflicts.append(1)
            threads = [threading.Thread(target=tick, args=(c,)) for c in (a, b)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        state, _ = a.load(MODEL)
        assert state.status == "completed"
        # A controller may re-apply the other's outbox (at least once): the same event id can be
        # published twice, and the consumer de-duplicates it. Distinct transitions are what count.
        events = {e["id"]: e["type"] for e in
                  (json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for(MODEL)))}
        types = list(events.values())
        assert types.count("rollout.advanced") == 3  # never twice for one phase
        assert types.count("rollout.completed") == 1

    def test_a_crash_between_save_and_apply_is_repaired_by_the_next_tick(self, control, versions, redis_client, keys):
        """The outbox: actions saved with the state but not applied (worker died) are applied by the next tick."""
        ctl = control()
        ctl.begin(MODEL, 2)
        traffic = Traffic(redis_client, keys, seed=7)
        traffic.serve(200, traffic=0, shadow=True)

        class Died(Exception):
            pass

        original = ctl._apply_one
        ctl._apply_one = lambda *a, **k: (_ for _ in ()).throw(Died())
        with pytest.raises(Died):
            ctl.tick(MODEL)
        state, raw = ctl.load(MODEL)
        assert state.phase == "canary" and json.loads(raw["outbox"])  # saved, not applied
        assert read_traffic(redis_client, keys, MODEL).candidate_percent == 0
        ctl._apply_one = original
        other = control()
        other.tick(MODEL)
        assert read_traffic(redis_client, keys, MODEL).candidate_percent == 10
        assert json.loads(other.load(MODEL)[1]["outbox"]) == []


class Died(Exception):
    """The worker applying a transition's actions dies (SIGKILL, OOM) after the transition was saved."""


def die_applying_a_finished_rollout(ctl):
    """Make ``ctl`` die at the first action of a finished rollout's transition (rollback or completion)."""
    original = ctl._apply_one

    def apply_one(model, state, action, index):
        if not state.active:
            raise Died()
        return original(model, state, action, index)

    ctl._apply_one = apply_one


def rolled_back_by_a_dead_worker(control, redis_client, keys):
    """An automatic rollback saved by a worker that died before applying it (its pipeline holds the slot)."""
    ctl = control()
    ctl.begin(MODEL, 2, pipeline_id="p-2")
    redis_client.hset(keys.guard(MODEL), "in_flight", "p-2")
    die_applying_a_finished_rollout(ctl)
    with pytest.raises(Died):
        drive(ctl, Traffic(redis_client, keys, seed=15), {"cand_error": 0.4})
    state, raw = ctl.load(MODEL)
    assert state.status == "rolled_back" and json.loads(raw["outbox"])  # saved, not applied
    assert read_traffic(redis_client, keys, MODEL).candidate == "2"  # still serving the candidate
    return state


def event_types(redis_client, keys):
    return [json.loads(f[b"e"])["type"] for _, f in redis_client.xrange(keys.events_for(MODEL))]


class TestFinishedByADeadWorker:
    def test_a_tick_applies_a_rollback_whose_worker_died(self, control, versions, redis_client, keys):
        """A rollback saved but never applied: the next tick_all returns traffic to production, marks
        v2 rolled back, emits the rollback event and alert, frees the slot and drops the model."""
        rolled_back_by_a_dead_worker(control, redis_client, keys)
        assert control().tick_all() == {MODEL: "rolled_back"}
        table = read_traffic(redis_client, keys, MODEL)
        assert (table.production, table.candidate, table.candidate_percent, table.shadow) == ("1", None, 0.0, None)
        assert versions.get(MODEL, 2).status == "rolled_back" and versions.alias(MODEL, "candidate") is None
        assert "rollout.rolled_back" in event_types(redis_client, keys)
        alerts = [json.loads(a) for a in redis_client.lrange(keys.alerts(MODEL), 0, -1)]
        assert [a["data"]["severity"] for a in alerts] == ["critical"]
        assert not redis_client.hexists(keys.guard(MODEL), "in_flight")  # single-flight slot released
        assert json.loads(control().load(MODEL)[1]["outbox"]) == []
        assert not redis_client.sismember(keys.active_rollouts(), MODEL)
        assert control().tick_all() == {}  # a finished, applied rollout is no longer visited

    def test_a_tick_applies_a_completion_whose_worker_died(self, control, versions, redis_client, keys):
        """An operator promote saved but never applied: the next tick_all promotes v2 and frees the slot."""
        ctl = control()
        ctl.begin(MODEL, 2, pipeline_id="p-2")
        redis_client.hset(keys.guard(MODEL), "in_flight", "p-2")
        die_applying_a_finished_rollout(ctl)
        with pytest.raises(Died):
            ctl.manual(MODEL, "promote", "ana", "hotfix")
        assert versions.alias(MODEL, "production") == 1
        assert control().tick_all() == {MODEL: "completed"}
        assert versions.alias(MODEL, "production") == 2 and versions.get(MODEL, 2).status == "production"
        assert read_traffic(redis_client, keys, MODEL).production == "2"
        assert "rollout.completed" in event_types(redis_client, keys)
        assert not redis_client.hexists(keys.guard(MODEL), "in_flight")
        assert not redis_client.sismember(keys.active_rollouts(), MODEL)

    def test_an_operator_rollback_applies_a_rollback_whose_worker_died(self, control, versions, redis_client,
                                                                       keys):
        """`retrain rollback` on a rollout a dead worker rolled back: refused as already rolled back,
        but the saved rollback is applied first (traffic, registry, event, slot)."""
        from workers.rollout.machine import TransitionError

        rolled_back_by_a_dead_worker(control, redis_client, keys)
        with pytest.raises(TransitionError, match="already rolled_back"):
            control().manual(MODEL, "rollback", "bob", "pager")
        table = read_traffic(redis_client, keys, MODEL)
        assert (table.production, table.candidate, table.shadow) == ("1", None, None)
        assert versions.get(MODEL, 2).status == "rolled_back"
        assert "rollout.rolled_back" in event_types(redis_client, keys)
        assert not redis_client.hexists(keys.guard(MODEL), "in_flight")
        assert not redis_client.sismember(keys.active_rollouts(), MODEL)


class TestThirdVersion:
    """Production v2 with v1 before it; v3 rolls out."""

    @pytest.fixture
    def three(self, versions):
        versions.register(ModelVersion(model=MODEL, version=0, status="staged", artifact_uri="file:///x/3.skops",
                                       sha256="0" * 64, pipeline_id="p-3"))
        versions.set_status(MODEL, 1, "previous", who="test", why="setup")
        versions.set_status(MODEL, 2, "production", who="test", why="setup")
        versions.set_alias(MODEL, "production", 2, who="test", why="setup")
        versions.set_alias(MODEL, "previous", 1, who="test", why="setup")
        return versions

    def test_completion_keeps_the_outgoing_production_loaded_for_a_rollback(self, control, three, redis_client, keys):
        """After v3 completes the traffic table names v2 (the registry's previous) as the version routers keep
        loaded, not v1 (production's own predecessor)."""
        ctl = control()
        ctl.begin(MODEL, 3, who="op")
        ctl.manual(MODEL, "promote", "op", "ship it")
        table = read_traffic(redis_client, keys, MODEL)
        assert (table.production, table.previous) == ("3", "2")
        assert three.alias(MODEL, "previous") == 2

    def test_a_rollback_after_completion_replayed_after_a_crash_restores_the_production_status(
            self, control, three, redis_client, keys):
        """A worker dies after a post-completion rollback moved the aliases but before the registry statuses:
        the replay finds production moved already and still marks v2 production again (and v3 rolled back)."""
        ctl = control()
        ctl.begin(MODEL, 3, who="op")
        ctl.manual(MODEL, "promote", "op", "ship it")
        dying = control()

        def die(*args, **kwargs):
            raise Died("worker killed")

        dying._status = die
        with pytest.raises(Died):
            dying.manual(MODEL, "rollback", "oncall", "v3 is bad")
        assert three.alias(MODEL, "production") == 2 and three.get(MODEL, 2).status == "previous"
        control().tick_all()
        assert three.alias(MODEL, "production") == 2 and three.get(MODEL, 2).status == "production"
        assert three.get(MODEL, 3).status == "rolled_back"


class TestPolicyEditedMidRollout:
    def test_inserting_a_phase_mid_rollout_keeps_automatic_rollback(self, control, versions, redis_client, keys):
        """The rollout at 25 %, an operator inserts a 10 % phase into the policy: the rollout keeps the
        phases it began with, and a candidate failing 40 % of its requests is still rolled back."""
        def phase(name, traffic):
            return {"name": name, "traffic": traffic, "min_duration": "0s", "min_requests": 50, "min_labeled": 50}

        shadow = {"name": "shadow", "traffic": 0, "min_duration": "0s", "min_requests": 100}
        ctl = control(phases=[shadow, phase("25%", 25), phase("100%", 100)])
        ctl.begin(MODEL, 2)
        traffic = Traffic(redis_client, keys, seed=16)
        traffic.serve(200, traffic=0, shadow=True)
        assert ctl.tick(MODEL).phase == "25%"
        ctl.policies.policy = policy_from_dict({"model": {"name": MODEL}, "rollout": {
            "phases": [shadow, phase("10%", 10), phase("25%", 25), phase("100%", 100)],
            "max_accuracy_drop": 0.05}})
        for _ in range(10):
            traffic.serve(200, traffic=25, cand_error=0.4)
            time.sleep(0.002)
            state = ctl.tick(MODEL)
            if not state.active:
                break
        assert state.status == "rolled_back" and "error" in state.reason
        assert read_traffic(redis_client, keys, MODEL).candidate is None


class TestEvidenceWindow:
    def test_records_from_before_the_phase_start_are_no_evidence(self, control, versions, redis_client, keys):
        """Records written in the phase's first millisecond before it started, or served before it
        and logged late, are not counted for the phase; records served after it are."""
        import dataclasses
        from datetime import datetime, timezone

        ctl = control()
        ctl.begin(MODEL, 2)
        Traffic(redis_client, keys, seed=13).serve(50, traffic=0, shadow=True)
        [(last_id, _)] = redis_client.xrevrange(keys.requests(MODEL), count=1)
        last_ms = int(last_id.decode().split("-")[0])
        started = last_ms / 1000 + 0.0009  # the same millisecond as the last shadow record, after it
        state = dataclasses.replace(ctl.load(MODEL)[0],
                                    phase_started_at=datetime.fromtimestamp(started, timezone.utc))
        assert ctl.phase_records(MODEL, state) == []
        time.sleep(0.005)
        base = {"version": "2", "latency_ms": "2.0", "prediction": "1", "score": "0.7", "error": "", "shadow": "0"}
        redis_client.xadd(keys.requests(MODEL), {**base, "request_id": "late", "ts": f"{started - 0.1:.6f}"})
        redis_client.xadd(keys.requests(MODEL), {**base, "request_id": "new", "ts": f"{time.time():.6f}"})
        assert [r["request_id"] for r in ctl.phase_records(MODEL, state)] == ["new"]


class TestStaleActors:
    def test_a_stale_traffic_write_never_undoes_a_later_manual_rollback(self, control, versions, redis_client,
                                                                         keys):
        """A tick saves r2 (canary at 10 %) but applies it only after an operator rollback (r3) was
        saved and applied: the stale apply changes nothing, traffic stays rolled back."""
        ctl = control()
        ctl.begin(MODEL, 2)
        Traffic(redis_client, keys, seed=14).serve(200, traffic=0, shadow=True)
        stale, held = control(), []
        stale._apply = lambda model, state, actions: held.append((state, actions))  # saved, not yet applied
        stale.tick(MODEL)
        [(saved, actions)] = held
        assert saved.phase == "canary" and any(isinstance(a, SetTraffic) and a.candidate_percent == 10
                                               for a in actions)
        assert control().manual(MODEL, "rollback", "bob", "pager").status == "rolled_back"
        RolloutControl._apply(stale, MODEL, saved, actions)  # the stale worker wakes up
        table = read_traffic(redis_client, keys, MODEL)
        assert (table.production, table.candidate, table.candidate_percent, table.shadow) == ("1", None, 0.0, None)
        assert versions.get(MODEL, 2).status == "rolled_back"
        assert ctl.load(MODEL)[0].status == "rolled_back"

    def test_a_stale_promote_never_undoes_a_later_manual_rollback(self, control, versions, redis_client, keys):
        """An operator promote saved (r2) but applied only after a rollback of the completed rollout
        (r3): production stays on v1."""
        ctl = control()
        ctl.begin(MODEL, 2)
        stale, held = control(), []
        stale._apply = lambda model, state, actions: held.append((state, actions))
        assert stale.manual(MODEL, "promote", "ana", "hotfix").status == "completed"
        assert control().manual(MODEL, "rollback", "bob", "v2 is bad").status == "rolled_back"
        [(saved, actions)] = held
        RolloutControl._apply(stale, MODEL, saved, actions)
        assert versions.alias(MODEL, "production") == 1
        assert versions.get(MODEL, 2).status == "rolled_back" and versions.get(MODEL, 1).status == "production"
        assert read_traffic(redis_client, keys, MODEL).production == "1"

    def test_tick_all_releases_only_its_own_lock(self, control, versions, redis_client, keys):
        """A tick outliving its lock, which another worker then took, leaves that worker's lock alone."""
        ctl = control()
        ctl.begin(MODEL, 2)
        lock = keys.lock(MODEL, "rollout-tick")

        def long_tick(model, now=None):
            redis_client.set(lock, "other-worker", px=60_000)  # ours expired; another worker took it
            return None

        ctl.tick = long_tick
        assert ctl.tick_all() == {MODEL: "none"}
        assert redis_client.get(lock) == b"other-worker"

    def test_manual_waits_for_a_running_tick_but_never_for_a_stuck_one(self, control, versions, redis_client,
                                                                       keys):
        """An operator command waits for the tick holding the lock, then runs and frees its own lock;
        a lock nobody releases delays it at most MANUAL_LOCK_WAIT_S."""
        ctl = control()
        ctl.begin(MODEL, 2)
        lock = keys.lock(MODEL, "rollout-tick")
        redis_client.set(lock, "ticking-worker", px=10_000)
        timer = threading.Timer(0.3, lambda: redis_client.delete(lock))
        timer.start()
        started = time.monotonic()
        assert ctl.manual(MODEL, "pause", "ana", "look").status == "paused"
        assert time.monotonic() - started >= 0.25
        timer.join()
        assert redis_client.get(lock) is None
        redis_client.set(lock, "stuck-worker", px=60_000)
        started = time.monotonic()
        assert ctl.manual(MODEL, "rollback", "bob", "pager").status == "rolled_back"
        assert MANUAL_LOCK_WAIT_S - 0.1 <= time.monotonic() - started < MANUAL_LOCK_WAIT_S + 2
        assert redis_client.get(lock) == b"stuck-worker"


class TestRolloutAgain:
    def test_a_begin_that_loses_its_save_leaves_no_candidate_alias(self, control, versions, redis_client, keys):
        """Another actor saves the rollout between begin()'s read and its compare-and-set: begin is refused,
        and the candidate alias (set with the rollout's first traffic write) points nowhere."""
        ctl = control()
        save = ctl._save

        def raced(keys=None, args=None):
            redis_client.hset(ctl.keys.rollout(MODEL), "revision", "7")  # someone else's transition, first
            return save(keys=keys, args=args)

        ctl._save = raced
        with pytest.raises(RolloutConflict, match="changed concurrently"):
            ctl.begin(MODEL, 2)
        assert versions.alias(MODEL, "candidate") is None and versions.get(MODEL, 2).status == "staged"
        assert versions.alias_history(MODEL, "candidate") == []

    def test_begin_after_a_rollback_starts_a_new_rollout(self, control, versions, redis_client, keys):
        """begin() of a rolled-back candidate starts a new rollout; of the running one returns it;
        of the production version is refused."""
        ctl = control()
        first = ctl.begin(MODEL, 2)
        assert ctl.begin(MODEL, 2).revision == first.revision  # the active rollout, not a second one
        done = ctl.manual(MODEL, "rollback", "bob", "pager")
        again = ctl.begin(MODEL, 2, who="ana", why="fixed the feature")
        assert again.status == "shadow" and again.revision == done.revision + 1
        assert read_traffic(redis_client, keys, MODEL).shadow == "2"
        assert versions.get(MODEL, 2).status == "shadow" and versions.alias(MODEL, "candidate") == 2
        ctl.manual(MODEL, "abort", "ana", "not today")
        with pytest.raises(RolloutConflict, match="already is the production"):
            ctl.begin(MODEL, 1)

    def test_cli_promote_of_a_rolled_back_version_starts_its_rollout_again(self, control, versions, redis_server,
                                                                           redis_client, keys):
        """`retrain promote --version N` after N was rolled back starts a new rollout (exit 0)."""
        ctl = control()
        ctl.begin(MODEL, 2)
        done = ctl.manual(MODEL, "rollback", "bob", "pager")
        out = retrain_cli("promote", MODEL, "--version", "2", "--who", "ana", "--reason", "retry", "--json",
                          redis_url=redis_server.url)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["status"] == "shadow" and shown["revision"] == done.revision + 1
        assert ctl.load(MODEL)[0].active and read_traffic(redis_client, keys, MODEL).shadow == "2"


class _Hook:
    """A local webhook receiver counting the alerts posted to it."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, HTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class TestAlertsOnce:
    def test_replaying_an_applied_outbox_raises_its_alert_once(self, versions, redis_client, keys):
        """A worker that applied every action but died before clearing the outbox: the replays
        publish the same alert id and record and post the alert once."""
        hook = _Hook()
        try:
            ctl = RolloutControl(redis_client, keys, policies=Policies(), webhook_url=hook.url)
            ctl.begin(MODEL, 2)
            ctl._clear = lambda **kwargs: 0  # died before clearing the outbox
            ctl.manual(MODEL, "rollback", "bob", "pager")
            assert json.loads(ctl.load(MODEL)[1]["outbox"])
            other = RolloutControl(redis_client, keys, policies=Policies(), webhook_url=hook.url)
            assert other.replay_outbox(MODEL) and other.replay_outbox(MODEL) == 0
            ctl.replay_outbox(MODEL)
            wait_for(lambda: hook.received, timeout=5, message="the webhook call")
            time.sleep(0.3)
        finally:
            hook.server.shutdown()
        alerts = [json.loads(a) for a in redis_client.lrange(keys.alerts(MODEL), 0, -1)]
        assert len(alerts) == 1 and alerts[0]["data"]["severity"] == "critical"
        assert len(hook.received) == 1
        published = [json.loads(f[b"e"]) for _, f in redis_client.xrange(keys.events_for(MODEL))]
        assert {e["id"] for e in published if e["type"] == "alert.raised"} == {alerts[0]["id"]}


class TestRealWorker:
    @pytest.mark.slow
    def test_rollout_worker_killed_mid_rollout_loses_nothing(self, start_worker, versions, redis_client, keys,
                                                              celery_app, tmp_path):
        """A rollout worker SIGKILLed mid-rollout: another worker picks the rollout up and finishes it."""
        policy = tmp_path / "policies"
        policy.mkdir()
        phases = "\n".join(f'[[rollout.phases]]\nname = "{p["name"]}"\ntraffic = {p["traffic"]}\n'
                           f'min_duration = "0s"\nmin_requests = {p["min_requests"]}\n'
                           f'min_labeled = {p.get("min_labeled", 0)}\n' for p in PHASES)
        (policy / "churn.toml").write_text(f'[model]\nname = "churn"\n[rollout]\nmax_accuracy_drop = 0.05\n{phases}')
        env = {"RETRAIN_POLICY_DIR": str(policy)}
        ctl = RolloutControl(redis_client, keys, policies=Policies())
        ctl.begin(MODEL, 2)
        traffic = Traffic(redis_client, keys, seed=8)
        worker = start_worker("rollout", env=env)
        from workers.rollout.tasks import tick_all

        traffic.serve(200, traffic=0, shadow=True)
        tick_all.apply_async(queue="rollout")  # what beat sends every RETRAIN_ROLLOUT_TICK
        wait_for(lambda: ctl.load(MODEL)[0].phase == "canary", timeout=20, message="the canary phase")
        worker.kill()
        start_worker("rollout", env=env)
        for _ in range(30):
            state, _ = ctl.load(MODEL)
            if not state.active:
                break
            pct = {"shadow": 0, "canary": 10, "50%": 50, "100%": 100}[state.phase]
            traffic.serve(200, traffic=pct)
            revision = state.revision
            # A tick every 2 s, as beat sends them: the killed worker may have died inside a tick,
            # holding the model's tick lock until it expires, and the ticks meanwhile skip the model.
            deadline = time.monotonic() + 20 + TICK_LOCK_MS / 1000
            while ctl.load(MODEL)[0].revision == revision:
                assert time.monotonic() < deadline, "no tick advanced the rollout"
                tick_all.apply_async(queue="rollout")
                end = time.monotonic() + 2
                while time.monotonic() < end and ctl.load(MODEL)[0].revision == revision:
                    time.sleep(0.05)
        final = ctl.load(MODEL)[0]
        assert final.status == "completed", final.last_analysis
        assert versions.alias(MODEL, "production") == 2


class TestExplainRollout:
    def test_explain_rollout_lists_every_look(self, control, versions, redis_client, keys, redis_server):
        """`retrain explain rollout:MODEL --json` shows each analysis record with metrics, thresholds and sample sizes."""
        ctl = control()
        ctl.begin(MODEL, 2)
        drive(ctl, Traffic(redis_client, keys, seed=11), {"cand_acc": 0.55})
        out = retrain_cli("explain", f"rollout:{MODEL}", "--json", redis_url=redis_server.url)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["status"] == "rolled_back"
        looks = [h for h in shown["history"] if h.get("verdict")]
        assert looks and all({"metrics", "thresholds", "sample_sizes"} <= set(h) for h in looks)
        assert shown["last_analysis"]["verdict"] == "rollback"
