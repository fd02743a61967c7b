"""Per-model decision state in Redis: what the decision worker reads and writes around the policy.

Reading turns the stored latest signals, drift history, guard state and the production
version's record into the pure :class:`ModelSignals` and :class:`GuardState`. Writing records
the outcome (decision record, pending-signal bookkeeping, single-flight slot) atomically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from config.keys import Keys
from workers.decision.policy import GuardState
from workers.decision.triggers import ModelSignals, UpstreamChanges

ONE_SHOT_SIGNALS = ("schedule.tick", "retrain.requested")
"""Signals consumed by the decision that saw them (the others are latest-value state)."""
STATE_SIGNALS = ("drift.data", "drift.concept", "performance.measured", "volume.accumulated")
"""Signals about the production model; cleared when a new model is promoted."""

# After an evaluation: drop the consumed pending ids, re-arm if newer ones arrived meanwhile,
# and delete one-shot signals only if they are still the ones the evaluation saw.
FINISH_EVALUATION = """
-- KEYS: pending_events, guard, due, signals
-- ARGV: n_consumed, last_pending_seen, model, now, then (field, value) pairs of one-shot signals
local n = tonumber(ARGV[1])
if n > 0 then redis.call('LTRIM', KEYS[1], n, -1) end
local remaining = redis.call('LLEN', KEYS[1])
if remaining > 0 then
  redis.call('HSET', KEYS[2], 'first_pending', ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
else
  local last = redis.call('HGET', KEYS[2], 'last_pending')
  if (not last) or last == ARGV[2] then
    redis.call('HDEL', KEYS[2], 'first_pending', 'last_pending')
  end
  redis.call('ZREM', KEYS[3], ARGV[3])
end
for i = 5, #ARGV, 2 do
  if redis.call('HGET', KEYS[4], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[4], ARGV[i]) end
end
return remaining
"""

RELEASE_PIPELINE = """
-- KEYS: guard, due ; ARGV: pipeline_id, model, now
if redis.call('HGET', KEYS[1], 'in_flight') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'in_flight', 'in_flight_since')
if redis.call('HGET', KEYS[1], 'follow_up') then
  redis.call('HDEL', KEYS[1], 'follow_up')
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  return 2
end
return 1
"""


def _ts(value: Any) -> datetime | None:
    if value in (None, b"", ""):
        return None
    return datetime.fromtimestamp(float(value), timezone.utc)


def _dt(value: str | None) -> datetime | None:
    if not value:
        return None
    d = datetime.fromisoformat(value)
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


@dataclass
class StoredState:
    """Everything about one model that one evaluation needs, as read from Redis."""

    model: str
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Event type -> the latest event of that type (the full envelope as a dict)."""
    drift_history: list[float] = field(default_factory=list)
    """Oldest first."""
    guard: dict[str, str] = field(default_factory=dict)
    trainings: list[tuple[str, float]] = field(default_factory=list)
    pending_ids: list[str] = field(default_factory=list)
    production: dict[str, Any] | None = None
    raw_signals: dict[str, bytes] = field(default_factory=dict)

    def guard_state(self) -> GuardState:
        return GuardState(
            last_training=_ts(self.guard.get("last_training")),
            recent_trainings=tuple(datetime.fromtimestamp(t, timezone.utc) for _, t in self.trainings),
            in_flight=self.guard.get("in_flight") or None,
            first_pending=_ts(self.guard.get("first_pending")),
            last_pending=_ts(self.guard.get("last_pending")),
        )

    def model_signals(self, now: datetime) -> ModelSignals:
        s = self.signals
        prod = self.production or {}
        kwargs: dict[str, Any] = {"now": now}
        trained_at = _dt(prod.get("created_at"))
        if trained_at is not None:
            kwargs["last_training_date"] = trained_at
            kwargs["trained_feature_version"] = prod.get("feature_version")
            kwargs["trained_schema_fingerprint"] = prod.get("schema_fingerprint")
        if "drift.data" in s:
            d = s["drift.data"]["data"]
            kwargs["drift_score"] = float(d["drift_score"])
            kwargs["drifted_features"] = tuple(d.get("drifted_features") or ())
            kwargs["drift_onset"] = _dt(d.get("onset"))
            if self.drift_history:
                kwargs["drift_history"] = tuple(self.drift_history)
        if "performance.measured" in s:
            d = s["performance.measured"]["data"]
            # For an error metric (RMSE, MAE: lower is better) the policy's "drop" is a rise:
            # negate, so baseline - current is still "how much worse" in the metric's units.
            sign = -1.0 if d.get("higher_is_better") is False else 1.0
            kwargs["current_accuracy"] = sign * float(d["value"])
            baseline = d.get("baseline")
            if baseline is None:
                baseline = (prod.get("metrics") or {}).get(d["metric"])
            if baseline is not None:
                kwargs["baseline_accuracy"] = sign * float(baseline)
            kwargs["n_labeled"] = int(d["n_labeled"])
            kwargs["metric"] = d["metric"]
            if d.get("ci_low") is not None and d.get("ci_high") is not None:
                ci = sorted((sign * float(d["ci_low"]), sign * float(d["ci_high"])))
                kwargs["accuracy_ci"] = (ci[0], ci[1])
        if "volume.accumulated" in s:
            kwargs["new_samples_since_training"] = int(s["volume.accumulated"]["data"]["new_samples"])
        if "drift.concept" in s:
            kwargs["concept_drift"] = float(s["drift.concept"]["data"]["value"])
        if "upstream.changed" in s:
            d = s["upstream.changed"]["data"]
            kwargs["current_feature_version"] = d.get("feature_version")
            kwargs["current_schema_fingerprint"] = d.get("schema_fingerprint")
            kwargs["upstream_breaking"] = bool(d.get("breaking"))
            kwargs["upstream_changes"] = UpstreamChanges(
                added=tuple(d.get("added") or ()), removed=tuple(d.get("removed") or ()),
                retyped=tuple(d.get("retyped") or ()),
            )
        if "schedule.tick" in s:
            kwargs["schedule_due"] = True
        if "retrain.requested" in s:
            d = s["retrain.requested"]["data"]
            kwargs["manual_reason"] = f"{d['reason']} (requested by {d.get('requested_by', 'operator')})"
        return ModelSignals(**kwargs)

    def one_shot_fields(self) -> list[tuple[str, str]]:
        return [(t, self.raw_signals[t]) for t in ONE_SHOT_SIGNALS if t in self.raw_signals]


class DecisionStore:
    def __init__(self, client, keys: Keys):
        self.redis = client
        self.keys = keys
        self._finish = client.register_script(FINISH_EVALUATION)
        self._release = client.register_script(RELEASE_PIPELINE)

    def load(self, models: list[str], now: float | None = None) -> dict[str, StoredState]:
        """Read the state of many models in two pipelined round trips."""
        now = now or time.time()
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        for m in models:
            pipe.hgetall(k.signals(m))
            pipe.lrange(k.drift_history(m), 0, 49)
            pipe.hgetall(k.guard(m))
            pipe.zrangebyscore(k.trainings(m), now - 86400 * 2, "+inf", withscores=True)
            pipe.lrange(k.pending_events(m), 0, -1)
            pipe.hget(k.aliases(m), "production")
        replies = pipe.execute()
        out: dict[str, StoredState] = {}
        prod_pipe = self.redis.pipeline(transaction=False)
        with_prod = []
        for i, m in enumerate(models):
            sig, drift, guard, trainings, pending, prod_version = replies[i * 6:(i + 1) * 6]
            state = StoredState(
                model=m,
                signals={t.decode(): json.loads(v) for t, v in sig.items()},
                drift_history=[float(x) for x in reversed(drift)],
                guard={a.decode(): b.decode() for a, b in guard.items()},
                trainings=[(p.decode(), float(t)) for p, t in trainings],
                pending_ids=[p.decode() for p in pending],
                raw_signals={t.decode(): v for t, v in sig.items()},
            )
            out[m] = state
            if prod_version:
                prod_pipe.hget(k.versions(m), prod_version)
                with_prod.append(m)
        if with_prod:
            for m, raw in zip(with_prod, prod_pipe.execute()):
                out[m].production = json.loads(raw) if raw else None
        return out

    def finish(self, pipe, state: StoredState, now: float) -> None:
        """Queue the post-evaluation bookkeeping (consumed pending ids, one-shot signals)."""
        args: list[Any] = [len(state.pending_ids), state.guard.get("last_pending", ""), state.model, f"{now:.6f}"]
        for field_name, value in state.one_shot_fields():
            args += [field_name, value]
        k = self.keys
        self._finish(keys=[k.pending_events(state.model), k.guard(state.model), k.due(), k.signals(state.model)],
                     args=args, client=pipe)

    def take_slot(self, pipe, model: str, pipeline_id: str, now: float) -> None:
        """Queue: mark a pipeline in flight and count it against the budget and cooldown."""
        k = self.keys
        pipe.hset(k.guard(model), mapping={"in_flight": pipeline_id, "in_flight_since": f"{now:.6f}",
                                           "last_training": f"{now:.6f}"})
        pipe.zadd(k.trainings(model), {pipeline_id: now})
        pipe.zremrangebyscore(k.trainings(model), "-inf", now - 86400 * 7)

    def release(self, model: str, pipeline_id: str, now: float | None = None) -> int:
        """Free the model's single-flight slot if ``pipeline_id`` holds it; re-arm a follow-up.

        Returns 0 if the slot was not held by this pipeline (a repeated release is harmless),
        1 when released, 2 when released and a follow-up decision was scheduled.
        """
        return int(self._release(keys=[self.keys.guard(model), self.keys.due()],
                                 args=[pipeline_id, model, f"{(now or time.time()):.6f}"]))

    def write_record(self, pipe, record: dict[str, Any]) -> None:
        k = self.keys
        model, did = record["model"], record["id"]
        pipe.set(k.decision(model, did), json.dumps(record, default=str))
        pipe.zadd(k.decisions(model), {did: record["timestamp"]})
        pipe.hset(k.decision_index(), did, model)

    def get_record(self, decision_id: str) -> dict[str, Any] | None:
        model = self.redis.hget(self.keys.decision_index(), decision_id)
        if model is None:
            return None
        raw = self.redis.get(self.keys.decision(model.decode(), decision_id))
        return json.loads(raw) if raw else None

    def recent_records(self, model: str, limit: int = 20) -> list[dict[str, Any]]:
        ids = self.redis.zrevrange(self.keys.decisions(model), 0, limit - 1)
        if not ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for did in ids:
            pipe.get(self.keys.decision(model, did.decode()))
        return [json.loads(r) for r in pipe.execute() if r]


def clear_production_signals(pipe, keys: Keys, model: str) -> None:
    """After a new production model: signals measured against the old one no longer apply."""
    pipe.hdel(keys.signals(model), *STATE_SIGNALS, "upstream.changed")
    pipe.delete(keys.drift_history(model))


__all__ = ["DecisionStore", "StoredState", "clear_production_signals", "timedelta"]
