"""The rollout control plane: the pure state machine persisted in Redis and its actions applied.

Each model's rollout lives in one hash (``keys.rollout(model)``): the state JSON, its revision,
the pipeline that started it, and an *outbox* of actions not yet applied. A transition is
saved with a compare-and-set on the revision (two rollout workers, or a worker and an operator,
can never both advance the same revision), together with its actions; the actions are then
applied (traffic table, registry, events, alerts, single-flight release) and the outbox is
cleared. A worker killed in between leaves the outbox, and the next tick applies it again (a
model stays in the active-rollouts set, which the ticks visit, until its outbox is cleared, so
this holds for the last transition of a rollout too): every action is idempotent (traffic
writes are absolute, events have deterministic ids, registry moves check the current alias,
an alert is recorded and posted once per id).

Actions are applied only while their revision is still the saved one: traffic and alias writes
check it atomically (WATCH/MULTI on the rollout hash), so a worker that wakes up late with an
old transition can never undo a newer one (an operator's rollback); every committer applies a
pending outbox before it saves over it. Operator commands take the model's tick lock too, and
the lock is released only by its holder.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import redis
import structlog

from config.keys import Keys
from config.policy import RolloutSection
from events.bus import EventBus
from events.envelope import EVENT_TEXT_CHARS, new_event
from workers.alerts import notify_once, record_alert_once
from workers.registry.store import Registry
from workers.rollout import machine
from workers.rollout.analysis import shadow_pairs, summarize
from workers.rollout.evidence import PHASE_EVIDENCE
from workers.rollout.machine import Emit, Promote, Rollback, RolloutState, SetTraffic

log = structlog.get_logger(__name__)

SOURCE = "urn:retrain:rollout"
TICK_LOCK_MS = 20_000
MANUAL_LOCK_WAIT_S = 2.0
"""How long an operator command waits for a running tick of the model to finish (a tick takes well
under a second). After that it goes ahead anyway: an emergency rollback is never held up by a
stuck lock, and the revision checks on every applied action keep the two apart."""
LOCK_POLL_S = 0.01

_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_SAVE = """
-- KEYS[1] rollout hash, KEYS[2] active set ; ARGV: expected revision, new revision, state, outbox, model, active(1/0),
-- pipeline id, new rollout (1/0: a new rollout replaces the pipeline id, '' when an operator started it)
-- The model stays in the active set while its outbox holds actions, finished or not: only
-- _CLEAR_OUTBOX takes a finished rollout out, once its last actions are applied.
local cur = redis.call('HGET', KEYS[1], 'revision')
if (cur or '0') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'revision', ARGV[2], 'state', ARGV[3], 'outbox', ARGV[4])
if ARGV[8] == '1' or ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'pipeline_id', ARGV[7]) end
if ARGV[6] == '1' or ARGV[4] ~= '[]' then redis.call('SADD', KEYS[2], ARGV[5])
else redis.call('SREM', KEYS[2], ARGV[5]) end
return 1
"""

_CLEAR_OUTBOX = """
-- KEYS[1] rollout hash, KEYS[2] active set ; ARGV: revision applied, model, finished (1/0)
if redis.call('HGET', KEYS[1], 'revision') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'outbox', '[]')
if ARGV[3] == '1' then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
"""

REGISTRY_STATUS = {"shadow": "shadow", "canary": "canary", "progressive": "canary", "paused": None}


class RolloutConflict(RuntimeError):
    """Another worker or operator changed the rollout first; nothing was applied."""


class RolloutControl:
    def __init__(self, client, keys: Keys, *, policies=None, webhook_url: str | None = None):
        from workers.policies import policy_store

        self.redis = client
        self.keys = keys
        self.registry = Registry(client, keys)
        self.bus = EventBus(client, keys)
        self.policies = policies or policy_store()
        self.webhook_url = webhook_url
        self._save = client.register_script(_SAVE)
        self._clear = client.register_script(_CLEAR_OUTBOX)
        self._unlock = client.register_script(_UNLOCK)

    @classmethod
    def from_settings(cls, settings=None) -> "RolloutControl":
        from config.keys import keys_from_settings
        from config.settings import get_settings
        from workers.alerts import webhook_url_from_settings
        from workers.connections import get_redis
        from workers.policies import policy_store

        s = settings or get_settings()
        return cls(get_redis(s), keys_from_settings(s), policies=policy_store(s),
                   webhook_url=webhook_url_from_settings(s))

    def cfg(self, model: str) -> RolloutSection:
        policy = self.policies.get(model)
        return policy.rollout if policy is not None else RolloutSection()

    # --- persistence ---------------------------------------------------------------------
    def load(self, model: str) -> tuple[RolloutState | None, dict[str, Any]]:
        raw = {k.decode(): v.decode() for k, v in self.redis.hgetall(self.keys.rollout(model)).items()}
        if "state" not in raw:
            return None, raw
        return RolloutState.from_dict(json.loads(raw["state"])), raw

    def _commit(self, model: str, expected: int, state: RolloutState, actions: list, pipeline_id: str = "",
                *, new_rollout: bool = False) -> None:
        ok = self._save(keys=[self.keys.rollout(model), self.keys.active_rollouts()], args=[
            str(expected), str(state.revision), json.dumps(state.to_dict(), default=str),
            json.dumps([a.to_dict() for a in actions], default=str), model, "1" if state.active else "0",
            pipeline_id, "1" if new_rollout else "0",
        ])
        if not ok:
            raise RolloutConflict(f"rollout of {model} changed concurrently (expected revision {expected})")
        self._apply(model, state, actions)

    def _apply(self, model: str, state: RolloutState, actions: list) -> None:
        """Apply the actions saved with ``state``, as long as ``state`` is still the saved revision.

        A stale actor (its transition was followed by another one, e.g. an operator rollback that
        was committed and applied meanwhile) applies nothing: the later transition's committer
        applied the pending outbox before saving (tick, manual and begin all do), so nothing is
        lost, and the stale traffic write cannot undo the later one. Traffic and alias writes
        check the revision atomically (WATCH/MULTI), the rest just before.

        A finished rollout's single-flight slot is released before the outbox is cleared (a
        repeated release is harmless): clearing it takes the model out of the active set, after
        which no tick would come back to release the slot.
        """
        if not self._still_at(model, state.revision):
            log.info("rollout.stale_actions_skipped", model=model, revision=state.revision)
            return
        published: set[int] = set()  # completion events that went in with the promotion's alias move
        for i, action in enumerate(actions):
            if i in published:
                continue
            if isinstance(action, Promote):
                follows = [j for j in range(i + 1, len(actions))
                           if isinstance(actions[j], Emit) and actions[j].type == machine.EVENT_COMPLETED]
                if self._promote(model, action, state, [self._event(model, actions[j], state, j) for j in follows]):
                    published.update(follows)
                continue
            self._apply_one(model, state, action, i)
        if not state.active:
            pid = self.redis.hget(self.keys.rollout(model), "pipeline_id")
            if pid:
                from workers.decision.state import DecisionStore

                DecisionStore(self.redis, self.keys).release(model, pid.decode())
        self._clear_outbox(model, state)

    def _clear_outbox(self, model: str, state: RolloutState) -> bool:
        """Mark ``state``'s actions applied (if it still is the saved revision); a finished rollout
        then leaves the active set. Returns whether it was still the saved revision."""
        return bool(self._clear(keys=[self.keys.rollout(model), self.keys.active_rollouts()],
                                args=[str(state.revision), model, "0" if state.active else "1"]))

    def replay_outbox(self, model: str) -> int:
        """Apply actions a crashed worker saved but may not have applied (idempotent)."""
        state, raw = self.load(model)
        outbox = json.loads(raw.get("outbox") or "[]")
        if state is None or not outbox:
            return 0
        self._apply(model, state, [machine.action_from_dict(a) for a in outbox])
        return len(outbox)

    # --- applying actions ----------------------------------------------------------------
    def _still_at(self, model: str, revision: int) -> bool:
        return int(self.redis.hget(self.keys.rollout(model), "revision") or 0) == revision

    def _while_at(self, model: str, revision: int, queue, watch: tuple[str, ...] = ()) -> bool:
        """Run the writes ``queue(pipe)`` queues in one MULTI/EXEC only while the rollout is at ``revision``.

        The rollout hash (and ``watch``) is WATCHed from the revision check to EXEC: a transition
        committed in between aborts the transaction and the check runs again. ``queue`` may read
        (after the WATCH, so what it read is what EXEC writes against). Returns whether it ran.
        """
        key = self.keys.rollout(model)
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key, *watch)
                    if int(pipe.hget(key, "revision") or 0) != revision:
                        log.info("rollout.stale_action_skipped", model=model, revision=revision)
                        return False
                    pipe.multi()
                    queue(pipe)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def _apply_one(self, model: str, state: RolloutState, action, index: int) -> None:
        if isinstance(action, SetTraffic):
            if not self._set_traffic(model, action, state):
                return
            status = REGISTRY_STATUS.get(state.status)
            if status and action.candidate:
                self._status(model, int(action.candidate), status, "rollout", state.reason)
        elif isinstance(action, Rollback):
            self._rollback(model, action, state)
        elif isinstance(action, Emit):
            self._emit(model, action, state, index)

    def _set_traffic(self, model: str, action: SetTraffic, state: RolloutState) -> bool:
        """Write the traffic table if the rollout is still at ``state``'s revision; return whether written."""
        from workers.router.traffic import TrafficTable, write_traffic

        production = action.production or state.production
        table = TrafficTable(
            production=production,
            # At completion the outgoing production becomes the version routers keep for a rollback.
            previous=state.production if production != state.production else (state.previous or ""),
            candidate=action.candidate or "",
            candidate_percent=float(action.candidate_percent) if action.candidate else 0.0,
            shadow=(action.candidate or "") if action.shadow else "",
        )
        def queue(pipe) -> None:
            write_traffic(self.redis, self.keys, model, table, pipe=pipe)
            # The candidate alias moves with the rollout's first traffic write, in its transaction:
            # a rollout whose save lost its compare-and-set never points the alias anywhere.
            if action.candidate and state.active and self.registry.alias(model, "candidate") != int(action.candidate):
                self.registry.set_alias(model, "candidate", int(action.candidate), who=_last_who(state),
                                        why=state.reason or "rollout started", pipe=pipe)

        return self._while_at(model, state.revision, queue, watch=(self.keys.aliases(model),))

    def _status(self, model: str, version: int, status: str, who: str, why: str) -> None:
        try:
            if self.registry.get(model, version).status != status:
                self.registry.set_status(model, version, status, who=who, why=why)
        except LookupError:
            log.warning("rollout.unknown_version", model=model, version=version)

    def _promote(self, model: str, action: Promote, state: RolloutState, events: list | None = None) -> bool:
        """Move the aliases (atomically, only at ``state``'s revision), then the statuses; return
        whether ``events`` went out with the move.

        ``events`` (the completion the transition announces) are written in the alias move's
        transaction: whoever sees the new production and reacts (a monitor's drift signal, say)
        publishes after them, so the decision worker's reset of the signals measured against the
        old model never wipes a signal about the new one. When this run does not move the aliases
        (a replay finds them moved) the caller publishes them (same ids: consumers skip repeats).
        The statuses come after the aliases and are set again on a replay, so a run that died in
        between is completed; ``action.previous`` names the outgoing production for that case.
        """
        version = int(action.version)
        who, why = _last_who(state), state.reason
        replaced: list[int] = []
        sent: list[bool] = []  # whether ``events`` went in with the move

        def move(pipe) -> None:
            replaced.clear()  # run again after a WatchError
            sent.clear()
            current = self.registry.alias(model, "production")
            if current == version:
                return
            if current is not None:
                replaced.append(current)
                self.registry.set_alias(model, "previous", current, who=who, why=f"replaced by v{version}", pipe=pipe)
            self.registry.set_alias(model, "production", version, who=who, why=why, pipe=pipe)
            self.registry.set_alias(model, "candidate", None, who=who, why="promoted", pipe=pipe)
            if events and not self.bus.publish_in(pipe, events).rejected:
                sent.append(True)  # else the caller publishes them, and an event that cannot go out fails loudly

        if not self._while_at(model, state.revision, move, watch=(self.keys.aliases(model),)):
            return False
        if not self._still_at(model, state.revision):
            return bool(sent)
        self._status(model, version, "production", who, why)
        outgoing = replaced[0] if replaced else (int(action.previous) if action.previous else None)
        if outgoing is not None and outgoing != version:
            self._status(model, outgoing, "previous", who, f"replaced by v{version}")
        if replaced:
            log.info("rollout.promoted", model=model, version=version, previous=replaced[0])
        return bool(sent)

    def _rollback(self, model: str, action: Rollback, state: RolloutState) -> None:
        from workers.router.traffic import TrafficTable, write_traffic

        to_version = action.to_version or state.production
        who = _last_who(state)
        was_production: list[bool] = []

        def move(pipe) -> None:
            write_traffic(self.redis, self.keys, model, TrafficTable(
                production=to_version, previous=state.previous or "", candidate="", candidate_percent=0.0,
                shadow=""), pipe=pipe)
            was_production[:] = [self.registry.alias(model, "production") == int(action.version)]
            if was_production[0]:
                # Rolled back after completion: production returns to the version before it.
                self.registry.set_alias(model, "production", int(to_version), who=who, why=action.reason, pipe=pipe)
            self.registry.set_alias(model, "candidate", None, who=who, why=action.reason, pipe=pipe)

        if not self._while_at(model, state.revision, move, watch=(self.keys.aliases(model),)):
            return
        # Whenever production is to_version, not only when this run moved it: a replay after a worker
        # died between the move and this status finds the alias moved already.
        if was_production[0] or self.registry.alias(model, "production") == int(to_version):
            self._status(model, int(to_version), "production", who, action.reason)
        self._status(model, int(action.version), "archived" if action.aborted else "rolled_back", who, action.reason)
        log.warning("rollout.rolled_back", model=model, version=action.version, to_version=to_version,
                    reason=action.reason, manual=action.manual)

    @staticmethod
    def _event(model: str, action: Emit, state: RolloutState, index: int):
        data = dict(action.data)
        for field in ("why", "reason"):  # an operator's text can be any length; the event must fit the bus
            if isinstance(data.get(field), str):
                data[field] = data[field][:EVENT_TEXT_CHARS]
        if action.type == "alert.raised":
            data.setdefault("title", data.pop("summary", None) or f"rollout of {model}")
        else:
            data.setdefault("version", int(state.candidate))
        return new_event(action.type, model, data, source=SOURCE, id=f"{model}:rollout:{state.candidate}:{state.revision}:{index}")

    def _emit(self, model: str, action: Emit, state: RolloutState, index: int) -> None:
        event = self._event(model, action, state, index)
        self.bus.publish(event)
        # The id is fixed by the transition (model, candidate, revision, action index): a replay of
        # the same outbox finds the alert already recorded, and posts it only if no run sent it yet.
        if action.type == "alert.raised":
            record_alert_once(self.redis, self.keys, event)
            notify_once(self.redis, self.keys, event, self.webhook_url)

    # --- operations ----------------------------------------------------------------------
    def begin(self, model: str, candidate: int, *, pipeline_id: str = "", who: str = "system",
              why: str = "") -> RolloutState:
        """Start a rollout of ``candidate``; idempotent: the same candidate's active rollout is returned,
        and so is its finished one when ``pipeline_id`` started it (a re-run of the pipeline step).

        A finished rollout of the candidate started by anyone else (an operator rolling out again a
        version that was rolled back) starts a new rollout. Raises RolloutConflict when another
        rollout is active, there is no production, or the candidate already is production.
        """
        state, raw = self.load(model)
        if state is not None and state.candidate == str(candidate) and (
                state.active or (pipeline_id and raw.get("pipeline_id") == pipeline_id)):
            self.replay_outbox(model)
            return state
        if state is not None and state.active:
            raise RolloutConflict(f"a rollout of {model} v{state.candidate} is still {state.status}")
        production = self.registry.alias(model, "production")
        if production is None:
            raise RolloutConflict(f"{model} has no production version to roll out against")
        if production == int(candidate):
            raise RolloutConflict(f"v{candidate} already is the production version of {model}")
        if state is not None:
            self.replay_outbox(model)  # the finished rollout's last actions first: this commit replaces them
        previous = self.registry.alias(model, "previous")
        expected = int(raw.get("revision", 0))
        new, actions = machine.start(model, str(candidate), str(production), self.cfg(model), _now(),
                                     previous=None if previous is None else str(previous), who=who, why=why)
        new.revision = expected + 1
        self._commit(model, expected, new, actions, pipeline_id, new_rollout=True)  # its traffic action sets the candidate alias
        return new

    def started_by(self, model: str, candidate: int, pipeline_id: str) -> bool:
        """Whether the model's rollout (active or finished) is the one ``pipeline_id`` started for ``candidate``."""
        state, raw = self.load(model)
        return state is not None and state.candidate == str(candidate) and raw.get("pipeline_id") == pipeline_id

    def tick(self, model: str, now: datetime | None = None) -> RolloutState | None:
        """Look at the live evidence for the model's current phase and take one step."""
        state, raw = self.load(model)
        if state is None:
            return None
        if json.loads(raw.get("outbox") or "[]"):
            self.replay_outbox(model)  # a dead worker's actions first: traffic, events, the slot
        if not state.active:
            # Its actions are applied (above, or long ago): leave the active set, unless a new
            # rollout was saved meanwhile (then the revision moved on and this changes nothing).
            self._clear_outbox(model, state)
            PHASE_EVIDENCE.forget(self.redis, self.keys, model)
            return state
        now = now or _now()
        cfg = self.cfg(model)
        policy = self.policies.get(model)
        task = policy.model.task if policy else "binary"
        records = self.phase_records(model, state)
        arms = summarize(records, task)
        prod = arms.get(state.production) or _empty(state.production, task)
        cand = arms.get(state.candidate) or _empty(state.candidate, task)
        pairs = shadow_pairs(records, state.production, state.candidate, task)
        analysis = machine.analyze(state, cfg, prod, cand, pairs, now)
        new, actions = machine.step(state, analysis, now, cfg)
        if new.revision == state.revision:
            return state
        self._commit(model, state.revision, new, actions)
        return new

    def manual(self, model: str, op: str, who: str, why: str = "") -> RolloutState:
        """promote | rollback | abort | pause | resume, recorded with who and why.

        Takes the model's tick lock (waiting up to MANUAL_LOCK_WAIT_S for a running tick), and
        applies the pending outbox of the transition before, ahead of checking whether ``op`` is
        allowed: its actions would be replaced, and a refused ``rollback`` of a rollout that a
        dead worker rolled back must still get the traffic back to production.
        """
        with self._tick_lock(model, wait_s=MANUAL_LOCK_WAIT_S) as held:
            if not held:
                log.warning("rollout.manual_without_lock", model=model, op=op)
            state, raw = self.load(model)
            if state is None:
                raise machine.TransitionError(f"{model} has no rollout")
            fn = {"promote": machine.promote, "rollback": machine.rollback, "abort": machine.abort,
                  "pause": machine.pause, "resume": machine.resume}[op]
            if json.loads(raw.get("outbox") or "[]"):
                self.replay_outbox(model)
            new, actions = fn(state, who, why, _now())
            self._commit(model, state.revision, new, actions)
            return new

    @contextmanager
    def _tick_lock(self, model: str, wait_s: float = 0.0):
        """Hold the model's tick lock (a random token, TICK_LOCK_MS); yields whether it is held.

        Released only while it still holds our token (compare-and-delete): a lock that expired
        and was taken by another worker is left to that worker.
        """
        key = self.keys.lock(model, "rollout-tick")
        token = uuid.uuid4().hex
        deadline = time.monotonic() + wait_s
        held = bool(self.redis.set(key, token, nx=True, px=TICK_LOCK_MS))
        while not held and time.monotonic() < deadline:
            time.sleep(LOCK_POLL_S)
            held = bool(self.redis.set(key, token, nx=True, px=TICK_LOCK_MS))
        try:
            yield held
        finally:
            if held:
                self._unlock(keys=[key], args=[token])

    def tick_all(self) -> dict[str, str]:
        """Tick every active rollout this worker can lock (several rollout workers may run)."""
        out = {}
        for raw in self.redis.smembers(self.keys.active_rollouts()):
            model = raw.decode()
            with self._tick_lock(model) as held:
                if not held:
                    continue
                try:
                    state = self.tick(model)
                    out[model] = state.status if state else "none"
                except RolloutConflict:
                    out[model] = "conflict"
                except Exception:  # noqa: BLE001 - one model's trouble must not stop the others
                    log.exception("rollout.tick_failed", model=model)
                    out[model] = "error"
        return out

    # --- evidence ------------------------------------------------------------------------
    def phase_records(self, model: str, state: RolloutState) -> list[dict[str, Any]]:
        """The router's request records served after the phase started, with delayed labels joined.

        Never a record of the phase before: the previous phase's traffic (shadow mirrors, a lower
        split) is no evidence for this one. Read incrementally: this process keeps the phase's
        records between ticks and reads only what was written since (``workers.rollout.evidence``).
        """
        return PHASE_EVIDENCE.records(self.redis, self.keys, model, int(state.started_at.timestamp() * 1000),
                                      state.phase_started_at.timestamp())


def _empty(version: str, task: str):
    from workers.rollout.analysis import ArmStats

    return ArmStats(version=version, task=task)


def _now() -> datetime:
    return datetime.fromtimestamp(time.time(), timezone.utc)


def _last_who(state: RolloutState) -> str:
    for entry in reversed(state.history):
        if entry.get("who"):
            return entry["who"]
    return "system"
