"""The decision worker's service: the stream consumer plus what it does with each batch.

Thin shell around the pure policy. For each batch it records every event into the model's
state and history (in the same transaction as the bus's de-duplication marks and acks); then
it evaluates the models that are due: touched by new signals, or whose debounce time or
follow-up came. An evaluation that fires or is suppressed writes a decision record and a
``retrain.decided`` / ``retrain.suppressed`` event; one that fires takes the model's
single-flight slot and enqueues the training pipeline on the urgency's queue.

Several decision workers may run (one consumer group): a model is evaluated under a lease (its
score in the due set, set to minus the lease's expiry, takes it out of every worker's due range
until the evaluation writes the score it leaves with), and the single-flight slot is taken with
a compare-and-set, so two workers never start two pipelines for one model.

Costs are per batch and per model, not per event: a batch is folded per model in Python and
recorded (and its models scheduled) by one script call inside the bus's transaction; a round
of evaluations leases its models and reads every model's state in one script call, and writes
its bookkeeping (which ends the leases) in one transaction.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import redis
import structlog

from config.keys import Keys, keys_from_settings
from config.policy import Policy
from config.settings import Settings, get_settings
from events.bus import EventBus, StreamConsumer, gc_paused
from events.envelope import EVENT_TEXT_CHARS, CloudEvent, new_event
from events.types import SIGNAL_TYPES
from workers.alerts import (alert_event, queue_webhook, record_alert, replay_webhooks, send_queued_webhook,
                            webhook_url_from_settings)
from workers.decision.policy import apply_guards, evaluate
from workers.decision.relay import RelayProcess, celery_enqueue, enqueue_recorded, run_rounds, warm_up_celery
from workers.decision.state import STATE_SIGNALS, DecisionStore, StoredState, model_keys, pending_entry
from workers.metrics import observe_events
from workers.policies import PolicyStore

log = structlog.get_logger(__name__)

HISTORY_MAXLEN = 10_000
DRIFT_HISTORY_LEN = 50
MAX_DUE_PER_ROUND = 500
ROUND_INTERVAL_S = 1.0
"""Longest the evaluator waits for the consumer's cue (debounce timers and the safety nets need rounds too)."""
LEASE_S = 30.0
"""How long a worker's claim on a model it evaluates lasts (longer than any round; it expires if the worker dies).
Measured on the Redis server's clock."""
OUTBOX_REPLAY_S = 10.0
"""How often a service looks for decided pipelines that never reached Celery."""
OUTBOX_GRACE_S = 30.0
"""A decision younger than this is still being enqueued by the worker that made it."""
EVALUATION_RETRY_S = 60.0
"""A model whose state could not be read or evaluated is retried after this long."""
STALE_IN_FLIGHT_S = 6 * 3600
"""A single-flight slot held this long by a model with no active rollout is considered lost."""
SOURCE = "urn:retrain:decision"


CLEARED_BY_PROMOTION = (*STATE_SIGNALS, "upstream.changed")
"""Signal types a ``rollout.completed`` deletes: they were measured against the previous production model."""

# The whole batch's state updates in one call. Per model, in this order: make it due, register it, append
# the events to the model's history, delete the signals a promotion cleared, set the latest
# signal of each type, extend the drift history, append the pending entries (each stamped with
# the time it was recorded: the debounce window). Python folds the batch so that the end state
# equals applying the events one by one.
RECORD_BATCH = """
-- KEYS: due, models, then per model (history, signals, drift_history, pending_events)
-- ARGV: now, history maxlen, drift history length, then per model:
--   model, schedule           0 no, 1 due now unless already due (ZADD NX), 2 due now (a manual
--                             request: overrides a later debounce time, not an evaluation's lease)
--   n, payload * n            history entries, in order
--   n, type * n               signal fields to delete (a promotion happened)
--   0|1                       delete the drift history first
--   n, (type, i) * n          latest signal per type: the i-th (0-based) of this model's payloads
--   n, score * n              drift scores, oldest first
--   n, entry * n              pending entries ("<recorded at> <event id>"), in order
-- All or nothing: every key's type is checked before the first write (Redis does not roll a
-- script back), so a corrupted key fails the batch with nothing of it applied.
local expected = {'stream', 'hash', 'list', 'list'}
local function check(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= kind then
    return redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', expected a ' .. kind)
  end
end
local bad = check(KEYS[1], 'zset') or check(KEYS[2], 'set')
if bad then return bad end
for k = 3, #KEYS do
  bad = check(KEYS[k], expected[(k - 3) % 4 + 1])
  if bad then return bad end
end
local now, maxlen, driftlen = ARGV[1], ARGV[2], tonumber(ARGV[3])
local function each(cmd, key, first, last)
  for i = first, last, 1000 do redis.call(cmd, key, unpack(ARGV, i, math.min(i + 999, last))) end
end
-- The models set and the due set take one variadic command per batch (after the loop), not one per model.
local models, due_nx, due_now = {}, {}, {}
local a = 4
for k = 3, #KEYS, 4 do
  local model, schedule = ARGV[a], ARGV[a + 1]
  models[#models + 1] = model
  if schedule == '1' then due_nx[#due_nx + 1] = now; due_nx[#due_nx + 1] = model
  elseif schedule == '2' then
    -- Unless under a live lease (being evaluated; expiries are on this server's clock): that
    -- evaluation ends seeing the new pending entry and makes the model due now (END_EVALUATIONS).
    local score = tonumber(redis.call('ZSCORE', KEYS[1], model))
    local leased = false
    if score and score < 0 then
      local t = redis.call('TIME')
      leased = -score > tonumber(t[1]) + tonumber(t[2]) / 1000000
    end
    if not leased then due_now[#due_now + 1] = now; due_now[#due_now + 1] = model end
  end
  local n = tonumber(ARGV[a + 2])
  local first = a + 3
  for i = first, first + n - 1 do
    redis.call('XADD', KEYS[k], 'MAXLEN', '~', maxlen, '*', 'e', ARGV[i])
  end
  a = first + n
  n = tonumber(ARGV[a])
  each('HDEL', KEYS[k + 1], a + 1, a + n)
  a = a + n + 1
  if ARGV[a] == '1' then redis.call('DEL', KEYS[k + 2]) end
  a = a + 1
  n = tonumber(ARGV[a])
  if n > 0 then
    local fields = {}
    for i = a + 1, a + 2 * n, 2 do
      fields[#fields + 1] = ARGV[i]
      fields[#fields + 1] = ARGV[first + tonumber(ARGV[i + 1])]
    end
    redis.call('HSET', KEYS[k + 1], unpack(fields))
  end
  a = a + 2 * n + 1
  n = tonumber(ARGV[a])
  if n > 0 then
    local len = 0
    for i = a + 1, a + n, 1000 do len = redis.call('LPUSH', KEYS[k + 2], unpack(ARGV, i, math.min(i + 999, a + n))) end
    if len > driftlen then redis.call('LTRIM', KEYS[k + 2], 0, driftlen - 1) end
  end
  a = a + n + 1
  n = tonumber(ARGV[a])
  if n > 0 then each('RPUSH', KEYS[k + 3], a + 1, a + n) end
  a = a + n + 1
end
for i = 1, #models, 1000 do redis.call('SADD', KEYS[2], unpack(models, i, math.min(i + 999, #models))) end
for i = 1, #due_nx, 1000 do redis.call('ZADD', KEYS[1], 'NX', unpack(due_nx, i, math.min(i + 999, #due_nx))) end
for i = 1, #due_now, 1000 do redis.call('ZADD', KEYS[1], unpack(due_now, i, math.min(i + 999, #due_now))) end
return (#KEYS - 2) / 4
"""


def _drift_entries(policies: dict[str, Any]) -> int:
    """How many drift scores a round must read: the largest persistence window among its models' policies."""
    n = max((p.triggers.drift_persistence_n for p in policies.values() if isinstance(p, Policy)), default=1)
    return min(n, DRIFT_HISTORY_LEN)


def record_events(keys: Keys, events: list[CloudEvent], pipe, *, schedule: bool = False) -> tuple[set[str], set[str]]:
    """Queue the state updates for a batch into ``pipe`` (one script call, whatever the batch size).

    Every event goes to its model's history; signals update the latest value per type, the
    drift history and the pending ids and window; ``rollout.completed`` clears the signals
    measured against the previous production model (:data:`CLEARED_BY_PROMOTION`).
    With ``schedule``, the same call makes the models with new signals due now (unless they
    are due already; a manual request makes its model due now regardless), so recording and
    scheduling commit together.

    Returns (models with new signals, models with an urgent manual request).
    """
    touched: set[str] = set()
    urgent: set[str] = set()
    # model -> [history payloads, latest by type (index into the payloads), drift scores, pending ids, promoted]
    batches: dict[str, list] = {}
    signal_types = SIGNAL_TYPES
    for event in events:
        model = event.subject
        b = batches.get(model)
        if b is None:
            b = batches[model] = [[], {}, [], [], False]
        b[0].append(event.to_json())
        etype = event.type
        if etype in signal_types:
            b[1][etype] = len(b[0]) - 1
            if etype == "drift.data":
                b[2].append(event.data["drift_score"])
            elif etype == "retrain.requested":
                urgent.add(model)
            b[3].append(event.id)
            touched.add(model)
        elif etype == "rollout.completed":
            b[4] = True
            for t in CLEARED_BY_PROMOTION:
                b[1].pop(t, None)
            b[2].clear()
    if not batches:
        return touched, urgent
    now = f"{time.time():.6f}"
    script_keys: list[str] = [keys.due(), keys.models()]
    args: list[Any] = [now, HISTORY_MAXLEN, DRIFT_HISTORY_LEN]
    for model, (history, latest, drift, pending, promoted) in batches.items():
        mk = model_keys(keys, model)
        script_keys += (mk.history, mk.signals, mk.drift_history, mk.pending_events)
        args += (model, (2 if model in urgent else 1) if schedule and pending else 0, len(history))
        args += history
        if promoted:
            gone = [t for t in CLEARED_BY_PROMOTION if t not in latest]
            args.append(len(gone))
            args += gone
            args.append(1)
        else:
            args += (0, 0)
        args.append(len(latest))
        for item in latest.items():
            args += item
        drift = drift[-DRIFT_HISTORY_LEN:]  # only the newest survive the trim
        args.append(len(drift))
        args += drift
        args.append(len(pending))
        args += [pending_entry(now, event_id) for event_id in pending]
    # EVAL (not EVALSHA): inside MULTI a NOSCRIPT error would fail this command alone and let
    # the rest of the transaction (seen marks, acks) commit without the state it records.
    pipe.eval(RECORD_BATCH, len(script_keys), *script_keys, *args)
    return touched, urgent


class DecisionService:
    """The decision loop; with ``relay``, its pipelines go to Celery through an :class:`EnqueueRelay` process."""

    def __init__(self, client: redis.Redis, settings: Settings, consumer_name: str,
                 policies: PolicyStore | None = None, enqueue=None, relay: bool = False):
        self.redis = client
        self.settings = settings
        self.keys = keys_from_settings(settings)
        self.store = DecisionStore(client, self.keys)
        self.bus = EventBus.from_settings(client, settings)
        self.policies = policies or PolicyStore.from_settings(settings)
        self.consumer_name = consumer_name
        self.enqueue = enqueue or celery_enqueue
        self._warm_up = warm_up_celery if enqueue is None else None  # a custom enqueue has nothing to load
        self.relay = RelayProcess(settings, f"{consumer_name}:relay") if relay else None
        self._owner = f"{consumer_name}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        """Holder of the enqueue locks the outbox replay takes (unique per service)."""
        self.consumer = StreamConsumer.from_settings(client, settings, "decision", consumer_name, self._handle,
                                                     on_committed=observe_events)
        self.decisions_made = 0
        self._warmed = False
        self._last_replay = 0.0
        self._stopping = False
        self._round_wanted = threading.Event()
        """Set by the consumer after each poll: the evaluator thread's cue for a round."""

    @classmethod
    def from_settings(cls, consumer_name: str, settings: Settings | None = None) -> "DecisionService":
        from workers.connections import get_redis

        s = settings or get_settings()
        return cls(get_redis(s), s, consumer_name, relay=s.decision_enqueue_relay)

    # --- the loop -----------------------------------------------------------------------
    def _handle(self, events: list[CloudEvent], pipe) -> None:
        # Recording also schedules the touched models (due now), in the bus's transaction.
        record_events(self.keys, events, pipe, schedule=True)

    def run(self) -> None:
        """Consume the stream on this thread and evaluate the due models on a second one, until :meth:`stop`.

        The consumer cues a round after each poll (``after_batch`` runs once per cue, as when
        both ran on one thread), so a batch is read and recorded while the previous one's models
        are evaluated. With a ready relay process the round runs there, on another core (this
        process is GIL-bound otherwise); else here. What they touch in Redis is already safe for
        several decision workers at once (the bus's commit, per-model evaluation leases in the due
        set).
        """
        if not self._warmed:
            self.warm_up()
        self._stopping = False
        evaluator = threading.Thread(target=self._evaluate_rounds, name="decision-evaluator", daemon=True)
        evaluator.start()
        try:
            self.consumer.run(idle_callback=self._round_wanted.set)
        finally:
            self._stopping = True
            self._round_wanted.set()
            evaluator.join(60)
            if self.relay is not None:
                self.relay.stop()

    def _evaluate_rounds(self) -> None:
        """The evaluator thread: a round per cue (or every ``ROUND_INTERVAL_S`` without one); errors are logged, never fatal.

        While the relay process is ready the round is its to run (on another core: see
        ``workers/decision/relay.py``); this thread passes the cue on and keeps the safety nets.
        """
        def next_cue() -> None:
            self._round_wanted.wait(ROUND_INTERVAL_S)
            self._round_wanted.clear()

        run_rounds(next_cue, lambda: self._stopping, self._round, "decision.round", pause_s=1.0)

    def _round(self) -> None:
        """One cue's work: the relay's round to run if it is ready (this thread keeps the safety nets), else ours."""
        if self.relay is not None and self.relay.ready():
            self.relay.cue()
            self._safety_nets(time.time())
            return
        self.after_batch()

    def warm_up(self) -> None:
        """Get ready before the first event: what the first enqueue would load, then freeze the heap.

        With a relay, start its process and wait until it has loaded Celery (the loop itself then
        enqueues only while the relay is down or on an outbox replay, and loads Celery then); if
        the relay does not come up, load Celery here. ``gc.freeze()`` moves every
        object alive now (Celery, the tasks, scikit-learn and pandas imported by them) out of
        the collector's reach: a full collection then walks only what the service allocated
        since, instead of stalling a round for ~30 ms.
        """
        relay_ready = False
        if self.relay is not None:
            try:
                relay_ready = self.relay.alive() or self.relay.start(wait=True)
            except Exception as exc:  # noqa: BLE001 - cannot spawn: the loop enqueues, the rounds retry
                log.error("decision.relay_start_failed", relay=self.relay.name, error=f"{type(exc).__name__}: {exc}")
        if self.relay is not None and not relay_ready:
            log.warning("decision.relay_not_ready", relay=self.relay.name)  # the loop enqueues meanwhile
        if not relay_ready and self._warm_up is not None:
            try:
                self._warm_up()
            except Exception as exc:  # noqa: BLE001 - the broker may come later; the first enqueue retries
                log.warning("decision.warm_up_failed", error=str(exc))
        gc.collect()
        gc.freeze()
        self._warmed = True

    def stop(self) -> None:
        self._stopping = True
        self.consumer.stop()
        self._round_wanted.set()

    def after_batch(self) -> None:
        """Evaluate every model that is due (the batch's models were made due when it was recorded)."""
        now = time.time()
        try:
            self.evaluate_due(now)
        finally:  # a round that fails must not stop the safety nets
            self._safety_nets(now)

    def _safety_nets(self, now: float) -> None:
        """The outbox replay, then (whatever it raised) the relay's restart check."""
        try:
            self.replay_outbox(now)
        finally:
            if self.relay is not None:
                self.relay.ensure_running()

    def evaluate_due(self, now: float | None = None) -> int:
        """Evaluate (up to ``MAX_DUE_PER_ROUND``) due models; return the number of decisions made."""
        now = now or time.time()
        with gc_paused():  # a round allocates per model; reference counting frees it (see gc_paused)
            # Due (0 <= score <= now) or leased by an evaluation that did not finish in time (see claim_and_load).
            due = [m.decode() for m in self.redis.zrangebyscore(self.keys.due(), -now, now, start=0,
                                                                   num=MAX_DUE_PER_ROUND)]
            return self._evaluate_models(due, now) if due else 0

    def _evaluate_models(self, due: list[str], now: float) -> int:
        policies = self._policies(due)  # looked up once: the state read depends on them (drift window)
        # A failed call leased nothing (a script is all or nothing) or lost its reply: then the
        # leases expire after LEASE_S and another round takes the models over.
        lease, states = self.store.claim_and_load(due, LEASE_S, now, _drift_entries(policies))
        if not states:
            return 0
        try:
            return self._evaluate(states, now, policies, lease)
        except BaseException:
            self.store.release_leases(list(states), lease)  # those whose transaction did not run
            raise

    def _policies(self, models: list[str]) -> dict[str, Any]:
        """Each model's policy: a :class:`Policy`, ``None`` (no policy) or the exception reading it raised."""
        out: dict[str, Any] = {}
        for model in models:
            try:
                out[model] = self.policies.get(model)
            except Exception as exc:  # noqa: BLE001 - an unreadable policy file stops that model only
                out[model] = exc
        return out

    # --- one round of evaluations --------------------------------------------------------
    def _evaluate(self, states: dict[str, StoredState], now: float, policies: dict[str, Any] | None = None,
                  lease: str = "") -> int:
        """Evaluate loaded models (leased with ``lease``) and commit the outcomes in one transaction.

        Every outcome ends the model's lease with its score in the due set (finished: due again
        now if newer signals wait, else gone; deferred: its later time, or gone for a follow-up;
        failed: the retry time; see END_EVALUATIONS), unless another worker took the lease over.
        """
        when = datetime.fromtimestamp(now, timezone.utc)
        if policies is None:
            policies = self._policies(list(states))
        pipe = self.redis.pipeline(transaction=True)
        events: list[CloudEvent] = []
        alerts: list[CloudEvent] = []
        slots: list[tuple[dict[str, Any], int]] = []  # start records and their take-slot command's index
        outcomes: list[tuple[StoredState, str, float | None]] = []  # how each evaluation ends (end_evaluations)
        made = 0
        for model, state in states.items():
            policy = policies[model]
            if isinstance(policy, Exception):  # an unreadable policy file stops this model only
                outcomes.append(self._evaluation_failed(pipe, state, policy, now, alerts))
                continue
            if policy is None:
                record = self._record(model, state, now, action="suppress",
                                      reason=f"no policy for model {model!r} in {self.settings.policy_dir}")
                self.store.write_record(pipe, record)
                outcomes.append((state, "finish", None))
                events.append(self._event("retrain.suppressed", record))
                made += 1
                continue
            try:
                if state.error:
                    raise ValueError(state.error)
                stale = self._stale_slot(state, now)
                decision = evaluate(policy, state.model_signals(when), when)
                guarded = apply_guards(decision, state.guard_state(), policy, when)
            except Exception as exc:  # noqa: BLE001 - one model's bad state or a bug must not stop the others
                outcomes.append(self._evaluation_failed(pipe, state, exc, now, alerts))
                continue
            if stale:
                pipe.hdel(self.keys.guard(model), "in_flight", "in_flight_since")
            if state.failing:
                pipe.hdel(self.keys.evaluation_errors(), model)
            if guarded.action == "defer":
                if guarded.follow_up:
                    outcomes.append((state, "follow_up", None))
                else:
                    outcomes.append((state, "defer", guarded.until.timestamp()))
                continue
            outcomes.append((state, "finish", None))
            for a in decision.alerts:
                ev = alert_event(model, a.severity, a.name.replace("_", " "), a.message, trigger=a.trigger)
                record_alert(pipe, self.keys, ev)
                alerts.append(ev)
            if guarded.action == "none":
                continue
            made += 1
            pipeline_id = f"p-{uuid.uuid4().hex[:16]}" if guarded.action == "start" else None
            record = self._record(model, state, now, action=guarded.action, reason=guarded.reason,
                                  guarded=guarded.to_dict(), pipeline_id=pipeline_id, policy=policy)
            self.store.write_record(pipe, record)
            if guarded.action == "start":
                slots.append((record, self.store.take_slot(pipe, record, now)))
            else:
                events.append(self._event("retrain.suppressed", record))
        # The suppressions' and alerts' events are written with their records (or not at all); an
        # alert's webhook can only be posted after the commit, so it is also put in the webhook
        # outbox, which the replay posts from if this worker dies first.
        self.bus.publish_in(pipe, events + alerts)
        webhook = webhook_url_from_settings(self.settings)
        if webhook:
            for ev in alerts:
                queue_webhook(pipe, self.keys, ev)
        # How every evaluation ends, in one call, last: it reads the guard's in-flight slot (a
        # follow-up waits only for the pipeline it saw), which the commands above may have changed.
        self.store.end_evaluations(pipe, outcomes, lease, now)
        results = pipe.execute()
        for ev in alerts:
            log.warning("alert.raised", model=ev.subject, title=ev.data["title"])
        # retrain.decided only once the slot is known to be taken (the take-slot command's result).
        decided: list[CloudEvent] = []
        to_start: list[dict[str, Any]] = []
        for record, index in slots:
            if results[index]:
                to_start.append(record)
                decided.append(self._event("retrain.decided", record))
            else:
                decided.append(self._event("retrain.suppressed", self._slot_lost(record)))
        if decided:
            self.bus.publish_many(decided)
        # After retrain.decided is out (a crash before this point leaves the outbox to the replay,
        # which publishes it first): to the relay if it is up, else enqueued here.
        if to_start and self.relay is not None and self.relay.ready():
            self.store.queue_for_relay(to_start)
        else:
            for record in to_start:
                self._start(record)
        for ev in alerts:  # after the starts: a failure here leaves the post to the replay, not a start
            send_queued_webhook(self.redis, self.keys, ev, webhook)
        self.decisions_made += made
        return made

    def _slot_lost(self, record: dict[str, Any]) -> dict[str, Any]:
        """Rewrite a start whose slot another worker took meanwhile (our lease had expired) as a suppression."""
        log.warning("decision.slot_taken_meanwhile", model=record["model"], decision_id=record["id"])
        record.update(action="suppress", retrain=False, pipeline_id=None, queue=None,
                      reason="single flight: another decision worker started a pipeline for this model meanwhile")
        pipe = self.redis.pipeline(transaction=True)
        self.store.write_record(pipe, record)
        pipe.execute()
        return record

    def _stale_slot(self, state: StoredState, now: float) -> bool:
        """Whether the model's single-flight slot is stale (then dropped from ``state``: the pipeline is lost).

        Stale: held longer than ``STALE_IN_FLIGHT_S`` while the model has no active rollout (a
        rollout, paused ones included, holds the slot for as long as it lasts).
        """
        since = state.guard.get("in_flight_since")
        if (state.guard.get("in_flight") and since and now - float(since) > STALE_IN_FLIGHT_S
                and not self.redis.sismember(self.keys.active_rollouts(), state.model)):
            log.warning("decision.stale_slot_cleared", model=state.model, pipeline_id=state.guard["in_flight"])
            state.guard.pop("in_flight", None)
            return True
        return False

    def _evaluation_failed(self, pipe, state: StoredState, exc: Exception, now: float,
                           alerts: list[CloudEvent]) -> tuple[StoredState, str, float]:
        """Log and note the failure and alert once until an evaluation succeeds; return the outcome that
        retries the model later, its signals left pending (for end_evaluations).

        Written outside the model's own keys (one of which may be the corrupted one).
        """
        model, error = state.model, f"{type(exc).__name__}: {exc}"
        log.error("decision.evaluation_failed", model=model, error=error, retry_in_s=EVALUATION_RETRY_S)
        pipe.hset(self.keys.evaluation_errors(), model, error[:500])
        if not state.failing:  # alerted when it began failing
            ev = alert_event(model, "warning", "decision evaluation failed",
                             f"{model}: {error}; its signals stay pending and it is retried every "
                             f"{EVALUATION_RETRY_S:.0f} s")
            record_alert(pipe, self.keys, ev)
            alerts.append(ev)
        return state, "retry", now + EVALUATION_RETRY_S

    def _record(self, model: str, state: StoredState, now: float, *, action: str, reason: str,
                guarded: dict | None = None, pipeline_id: str | None = None, policy=None) -> dict[str, Any]:
        decision = (guarded or {}).get("decision") or {}
        event_ids = state.pending_ids  # the newest PENDING_READ of event_count
        listed = set(event_ids)
        event_times = [s.get("time") for s in state.signals.values() if s.get("id") in listed]
        return {
            "id": f"d-{uuid.uuid4().hex[:16]}",
            "model": model,
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(),
            "timestamp": now,
            "action": action,
            "retrain": action == "start",
            "urgency": decision.get("urgency", "none"),
            "reason": reason,
            "guard": (guarded or {}).get("guard"),
            "until": (guarded or {}).get("until"),
            "queue": (guarded or {}).get("queue"),
            "checks": (guarded or {}).get("checks", []),
            "triggers": decision.get("triggers", []),
            "suppressed": decision.get("suppressed", []),
            "alerts": decision.get("alerts", []),
            "drift_onset": decision.get("drift_onset"),
            "event_ids": event_ids,
            "event_count": max(state.pending_count, len(event_ids)),
            "latest_event_time": max((t for t in event_times if t), default=None),
            "pipeline_id": pipeline_id,
            "production_version": (state.production or {}).get("version"),
            # The feature-store version the pipeline will train on (the registry keeps it with the model
            # version, and upstream_change compares the next one with it): the latest announced, else
            # the production model's.
            "feature_version": (((state.signals.get("upstream.changed") or {}).get("data") or {}).get("feature_version")
                                or (state.production or {}).get("feature_version")),
            "decided_by": self.consumer_name,
        }

    def _event(self, etype: str, record: dict[str, Any]) -> CloudEvent:
        fired = [t["name"] for t in record["triggers"] if t.get("triggered")]
        if etype == "retrain.decided":
            data = {"decision_id": record["id"], "urgency": record["urgency"], "triggers": fired,
                    "pipeline_id": record["pipeline_id"], "queue": record["queue"]}
        else:
            data = {"decision_id": record["id"], "reason": record["reason"][:EVENT_TEXT_CHARS], "triggers": fired}
        return new_event(etype, record["model"], data, source=SOURCE, id=f"{record['id']}:{etype}")

    def _start(self, record: dict[str, Any]) -> bool:
        """Enqueue the record's pipeline; on failure it stays in the outbox (slot kept) for :meth:`replay_outbox`."""
        return enqueue_recorded(self.store, self.enqueue, record, by=self.consumer_name)

    def replay_outbox(self, now: float | None = None) -> int:
        """Enqueue the decided pipelines that never reached Celery (broker error, or a worker died in between),
        then post the webhooks of decision alerts whose worker died before posting them.

        Runs at most every ``OUTBOX_REPLAY_S`` per service and looks only at decisions older than
        ``OUTBOX_GRACE_S`` (younger ones are being enqueued by the worker that made them). A
        per-model lock keeps two services from replaying one entry at once; if a replay still
        doubles an enqueue, the steps' own idempotency (pipeline id + step) makes that harmless.
        Returns the number enqueued.
        """
        now = now or time.time()
        if now - self._last_replay < OUTBOX_REPLAY_S:
            return 0
        self._last_replay = now
        started = 0
        for pipeline_id, record in self.store.outbox().items():
            if now - float(record["timestamp"]) < OUTBOX_GRACE_S:
                continue
            model = record["model"]
            # None: enqueued meanwhile, released or cleared since (the entry is dropped), or another
            # worker or the relay is enqueuing it right now.
            claimed = self.store.claim_enqueue(model, pipeline_id, self._owner)
            if claimed is None:
                continue
            try:
                self.bus.publish(self._event("retrain.decided", claimed))  # same id: a no-op if it went out
                started += self._start(claimed)
            finally:
                self.store.release_enqueue(model, self._owner)
        # Then the webhooks of alerts whose worker died before posting them (each on a thread of its own).
        replay_webhooks(self.redis, self.keys, webhook_url_from_settings(self.settings), OUTBOX_GRACE_S, now)
        return started
