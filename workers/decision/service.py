"""The decision worker's service: the stream consumer plus what it does with each batch.

Thin shell around the pure policy. For each batch it records every event into the model's
state and history (in the same transaction as the bus's de-duplication marks and acks); then
it evaluates the models that are due: touched by new signals, or whose debounce time or
follow-up came. An evaluation that fires or is suppressed writes a decision record and a
``retrain.decided`` / ``retrain.suppressed`` event; one that fires takes the model's
single-flight slot and enqueues the training pipeline on the urgency's queue.

Several decision workers may run (one consumer group): a per-model lock serialises
evaluations, and the single-flight slot is taken under it, so two workers never start two
pipelines for one model.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from typing import Any

import redis
import structlog

from config.keys import Keys, keys_from_settings
from config.settings import Settings, get_settings
from events.bus import PAYLOAD_FIELD, EventBus, StreamConsumer
from events.envelope import CloudEvent, new_event
from events.types import SIGNAL_TYPES
from workers.alerts import alert_event, notify_webhook, record_alert, webhook_url_from_settings
from workers.decision.policy import apply_guards, evaluate
from workers.decision.state import DecisionStore, StoredState, clear_production_signals
from workers.policies import PolicyStore

log = structlog.get_logger(__name__)

HISTORY_MAXLEN = 10_000
DRIFT_HISTORY_LEN = 50
MAX_DUE_PER_ROUND = 500
LOCK_TTL_MS = 30_000
STALE_IN_FLIGHT_S = 6 * 3600
"""A single-flight slot older than this with no pipeline activity is considered lost."""
SOURCE = "urn:retrain:decision"


def record_events(keys: Keys, events: list[CloudEvent], pipe) -> tuple[set[str], set[str]]:
    """Queue the state updates for a batch into ``pipe``.

    Returns (models with new signals, models with an urgent manual request).
    """
    touched: set[str] = set()
    urgent: set[str] = set()
    models: set[str] = set()
    now = f"{time.time():.6f}"
    for event in events:
        model = event.subject
        models.add(model)
        payload = event.to_json()
        pipe.xadd(keys.history(model), {PAYLOAD_FIELD: payload}, maxlen=HISTORY_MAXLEN, approximate=True)
        etype = event.type
        if etype in SIGNAL_TYPES:
            touched.add(model)
            pipe.hset(keys.signals(model), etype, payload)
            if etype == "drift.data":
                pipe.lpush(keys.drift_history(model), event.data["drift_score"])
                pipe.ltrim(keys.drift_history(model), 0, DRIFT_HISTORY_LEN - 1)
            elif etype == "retrain.requested":
                urgent.add(model)
            pipe.rpush(keys.pending_events(model), event.id)
            pipe.hsetnx(keys.guard(model), "first_pending", now)
            pipe.hset(keys.guard(model), "last_pending", now)
        elif etype == "rollout.completed":
            clear_production_signals(pipe, keys, model)
    if models:
        pipe.sadd(keys.models(), *models)
    return touched, urgent


class DecisionService:
    def __init__(self, client: redis.Redis, settings: Settings, consumer_name: str,
                 policies: PolicyStore | None = None, enqueue=None):
        self.redis = client
        self.settings = settings
        self.keys = keys_from_settings(settings)
        self.store = DecisionStore(client, self.keys)
        self.bus = EventBus.from_settings(client, settings)
        self.policies = policies or PolicyStore.from_settings(settings)
        self.consumer_name = consumer_name
        self.enqueue = enqueue or _enqueue_pipeline
        self.touched: set[str] = set()
        self.urgent: set[str] = set()
        self.consumer = StreamConsumer.from_settings(client, settings, "decision", consumer_name, self._handle)
        self.decisions_made = 0

    @classmethod
    def from_settings(cls, consumer_name: str, settings: Settings | None = None) -> "DecisionService":
        from workers.connections import get_redis

        s = settings or get_settings()
        return cls(get_redis(s), s, consumer_name)

    # --- the loop -----------------------------------------------------------------------
    def _handle(self, events: list[CloudEvent], pipe) -> None:
        touched, urgent = record_events(self.keys, events, pipe)
        self.touched |= touched
        self.urgent |= urgent

    def run(self) -> None:
        self.consumer.run(idle_callback=self.after_batch)

    def stop(self) -> None:
        self.consumer.stop()

    def after_batch(self) -> None:
        """Schedule the models the batch touched, then evaluate every model that is due."""
        now = time.time()
        if self.touched or self.urgent:
            pipe = self.redis.pipeline(transaction=False)
            if self.touched:
                pipe.zadd(self.keys.due(), {m: now for m in self.touched}, nx=True)
            if self.urgent:
                pipe.zadd(self.keys.due(), {m: now for m in self.urgent})
            pipe.execute()
            self.touched, self.urgent = set(), set()
        self.evaluate_due(now)

    def evaluate_due(self, now: float | None = None) -> int:
        now = now or time.time()
        due = [m.decode() for m in self.redis.zrangebyscore(self.keys.due(), "-inf", now, start=0,
                                                               num=MAX_DUE_PER_ROUND)]
        if not due:
            return 0
        token = f"{self.consumer_name}:{uuid.uuid4().hex[:8]}"
        pipe = self.redis.pipeline(transaction=False)
        for m in due:
            pipe.set(self.keys.lock(m, "decide"), token, nx=True, px=LOCK_TTL_MS)
        mine = [m for m, ok in zip(due, pipe.execute()) if ok]
        if not mine:
            return 0
        try:
            states = self.store.load(mine, now)
            return self._evaluate(states, now)
        finally:
            pipe = self.redis.pipeline(transaction=False)
            for m in mine:
                pipe.delete(self.keys.lock(m, "decide"))
            pipe.execute()

    # --- one round of evaluations --------------------------------------------------------
    def _evaluate(self, states: dict[str, StoredState], now: float) -> int:
        when = datetime.fromtimestamp(now, timezone.utc)
        pipe = self.redis.pipeline(transaction=True)
        events: list[CloudEvent] = []
        alerts: list[CloudEvent] = []
        to_start: list[dict[str, Any]] = []
        made = 0
        for model, state in states.items():
            policy = self.policies.get(model)
            if policy is None:
                record = self._record(model, state, now, action="suppress",
                                      reason=f"no policy for model {model!r} in {self.settings.policy_dir}")
                self.store.write_record(pipe, record)
                self.store.finish(pipe, state, now)
                events.append(self._event("retrain.suppressed", record))
                made += 1
                continue
            self._clear_stale_slot(pipe, state, now)
            decision = evaluate(policy, state.model_signals(when), when)
            guarded = apply_guards(decision, state.guard_state(), policy, when)
            if guarded.action == "defer":
                if guarded.follow_up:
                    pipe.hset(self.keys.guard(model), "follow_up", "1")
                    pipe.zrem(self.keys.due(), model)
                else:
                    pipe.zadd(self.keys.due(), {model: guarded.until.timestamp()})
                continue
            self.store.finish(pipe, state, now)
            for a in decision.alerts:
                ev = alert_event(model, a.severity, a.name.replace("_", " "), a.message, trigger=a.trigger)
                record_alert(pipe, self.keys, ev)
                alerts.append(ev)
            if guarded.action == "none":
                continue
            made += 1
            pipeline_id = None
            if guarded.action == "start":
                pipeline_id = f"p-{uuid.uuid4().hex[:16]}"
                self.store.take_slot(pipe, model, pipeline_id, now)
            record = self._record(model, state, now, action=guarded.action, reason=guarded.reason,
                                  guarded=guarded.to_dict(), pipeline_id=pipeline_id, policy=policy)
            self.store.write_record(pipe, record)
            if guarded.action == "start":
                events.append(self._event("retrain.decided", record))
                to_start.append(record)
            else:
                events.append(self._event("retrain.suppressed", record))
        pipe.execute()
        if events or alerts:
            self.bus.publish_many(events + alerts)
        webhook = webhook_url_from_settings(self.settings)
        for ev in alerts:
            log.warning("alert.raised", model=ev.subject, title=ev.data["title"])
            notify_webhook(ev, webhook)
        for record in to_start:
            self._start(record)
        self.decisions_made += made
        return made

    def _clear_stale_slot(self, pipe, state: StoredState, now: float) -> None:
        since = state.guard.get("in_flight_since")
        if state.guard.get("in_flight") and since and now - float(since) > STALE_IN_FLIGHT_S:
            log.warning("decision.stale_slot_cleared", model=state.model, pipeline_id=state.guard["in_flight"])
            pipe.hdel(self.keys.guard(state.model), "in_flight", "in_flight_since")
            state.guard.pop("in_flight", None)

    def _record(self, model: str, state: StoredState, now: float, *, action: str, reason: str,
                guarded: dict | None = None, pipeline_id: str | None = None, policy=None) -> dict[str, Any]:
        decision = (guarded or {}).get("decision") or {}
        event_times = [s.get("time") for s in state.signals.values() if s.get("id") in set(state.pending_ids)]
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
            "event_ids": list(state.pending_ids),
            "latest_event_time": max((t for t in event_times if t), default=None),
            "pipeline_id": pipeline_id,
            "production_version": (state.production or {}).get("version"),
            "decided_by": self.consumer_name,
        }

    def _event(self, etype: str, record: dict[str, Any]) -> CloudEvent:
        fired = [t["name"] for t in record["triggers"] if t.get("triggered")]
        if etype == "retrain.decided":
            data = {"decision_id": record["id"], "urgency": record["urgency"], "triggers": fired,
                    "pipeline_id": record["pipeline_id"], "queue": record["queue"]}
        else:
            data = {"decision_id": record["id"], "reason": record["reason"], "triggers": fired}
        return new_event(etype, record["model"], data, source=SOURCE, id=f"{record['id']}:{etype}")

    def _start(self, record: dict[str, Any]) -> None:
        try:
            self.enqueue(record)
            self.redis.hset(self.keys.pipeline(record["model"], record["pipeline_id"]), mapping={
                "decision_id": record["id"], "enqueued_at": f"{time.time():.6f}", "status": "enqueued"})
            log.info("decision.pipeline_enqueued", model=record["model"], decision_id=record["id"],
                     pipeline_id=record["pipeline_id"], queue=record["queue"], urgency=record["urgency"])
        except Exception as exc:  # noqa: BLE001 - broker trouble: free the slot, say so
            log.exception("decision.enqueue_failed", model=record["model"], decision_id=record["id"])
            self.store.release(record["model"], record["pipeline_id"])
            raise exc


def _enqueue_pipeline(record: dict[str, Any]) -> None:
    from workers.pipeline.canvas import start_pipeline

    start_pipeline(record)
