"""Per-model decision state in Redis: what the decision worker reads and writes around the policy.

Reading turns the stored latest signals, drift history, guard state and the production
version's record into the pure :class:`ModelSignals` and :class:`GuardState`. Writing records
the outcome (decision record, pending-signal bookkeeping, single-flight slot) atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic_core import from_json

from config.keys import Keys
from workers.decision.policy import GuardState
from workers.decision.triggers import ModelSignals, UpstreamChanges

TRAININGS_LOOKBACK_S = 86400 * 2
"""Training start times read for the budget (at least its 24 hours)."""
DRIFT_HISTORY_READ = 50
PENDING_READ = 100
"""Newest pending entries an evaluation reads (and its decision record lists): a model whose pipeline is in
flight keeps its signals pending for the follow-up, and each of its evaluations meanwhile must not
cost more as the list grows. The whole list's length and its first entry (the debounce window's
start) are read too."""
ONE_SHOT_SIGNALS = ("schedule.tick", "retrain.requested")
"""Signals consumed by the decision that saw them (the others are latest-value state)."""
STATE_SIGNALS = ("drift.data", "drift.concept", "performance.measured", "volume.accumulated")
"""Signals about the production model; cleared when a new model is promoted."""

# Ends a round's evaluations (one call for the round). Per model, by outcome:
#   finish     drop the consumed pending entries (up to the last one the evaluation read: by value,
#              so entries recorded meanwhile stay) and the one-shot signals it saw;
#   defer      a later due time (the debounce);   follow_up  wait for the in-flight pipeline;
#   retry      the evaluation failed: try again later.
# Then, only while the model still holds this round's lease (another worker may have taken an
# expired one over), its due score: a finished model with entries left is due now, else gone;
# a deferred or failed one whose pending list grew meanwhile (a manual request, say) is due now,
# else at its time; a follow-up waits (flag set, out of the due set) only if the pipeline it saw
# still holds the slot, else it is due now.
END_EVALUATIONS = """
-- KEYS: due, then (pending_events, signals, guard) per model
-- ARGV: lease, now, then per model: model, outcome, last pending entry read ('' none), due time
--   (defer, retry), in-flight pipeline seen (follow_up), n_one_shot, (field, value) * n_one_shot
local lease, now = tonumber(ARGV[1]), ARGV[2]
local function grew(key, last)
  local newest = redis.pcall('LINDEX', key, -1)  -- pcall: a failed model's key may be the corrupted one
  return type(newest) == 'string' and newest ~= last
end
local a = 3
for k = 2, #KEYS, 3 do
  local model, outcome, last, at, seen = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local shots = tonumber(ARGV[a + 5])
  a = a + 6
  if outcome == 'finish' then
    if last ~= '' then
      local i = redis.call('LPOS', KEYS[k], last)
      if i then redis.call('LTRIM', KEYS[k], i + 1, -1) end
    end
    for i = a, a + 2 * shots - 1, 2 do
      if redis.call('HGET', KEYS[k + 1], ARGV[i]) == ARGV[i + 1] then redis.call('HDEL', KEYS[k + 1], ARGV[i]) end
    end
  end
  a = a + 2 * shots
  if tonumber(redis.call('ZSCORE', KEYS[1], model)) == lease then
    if outcome == 'finish' then
      if redis.call('LLEN', KEYS[k]) > 0 then redis.call('ZADD', KEYS[1], now, model)
      else redis.call('ZREM', KEYS[1], model) end
    elseif grew(KEYS[k], last) then
      redis.call('ZADD', KEYS[1], now, model)
    elseif outcome == 'follow_up' then
      if redis.call('HGET', KEYS[k + 2], 'in_flight') == seen then
        redis.call('HSET', KEYS[k + 2], 'follow_up', '1')
        redis.call('ZREM', KEYS[1], model)
      else
        redis.call('ZADD', KEYS[1], now, model)
      end
    else
      redis.call('ZADD', KEYS[1], at, model)
    end
  end
end
return (#KEYS - 1) / 3
"""

# Read everything one evaluation needs, for many models in one round trip. With a lease time,
# first claim each model: only one that is due (0 <= score <= now) or whose previous lease
# expired is claimed, by setting its score in the due set to the lease, -(expiry): a leased model
# is out of every worker's due range [-now, now] until its evaluation rewrites its score (due
# again, later, or gone: END_EVALUATIONS) or the lease expires (its evaluator died). Lease
# expiries are on the Redis server's clock, so workers whose clocks differ cannot take a live one.
LOAD_STATES = """
-- KEYS: due, evaluation errors, then per model (signals, drift_history, guard, trainings, pending_events,
--   aliases, versions)
-- ARGV: lease seconds ('' = no claim, no due check), trainings since (score), drift entries to read,
--   pending entries to read, now, then the model names (in KEYS order)
-- Returns {lease, states}: the lease score taken ('' without a claim), then per model
-- Each model reads as {signals, drift, guard, trainings, pending, production, failing, pending count,
-- first pending entry} where pending holds the newest entries (at most the number asked for, oldest
-- first) and failing is 1 when its last evaluation failed; a model with a key of the wrong type reads
-- as {'error', message, failing, newest pending entry}: the others still load. A model not claimed
-- reads as false.
-- (Reads go through pcall, so the check costs nothing when the keys are sound.)
local out = {}
local ttl, since, ndrift, npending, now = ARGV[1], ARGV[2], tonumber(ARGV[3]) - 1, -tonumber(ARGV[4]), tonumber(ARGV[5])
local lease, server_now = '', 0
if ttl ~= '' then
  local t = redis.call('TIME')
  server_now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  lease = string.format('%.6f', -(server_now + tonumber(ttl)))
end
local err
local any_failing = redis.call('HLEN', KEYS[2]) > 0  -- usually none: then no per-model lookup
local function read(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then
    err = err or (key .. ': ' .. r.err)
    return {}
  end
  return r
end
local m = 5
for k = 3, #KEYS, 7 do
  m = m + 1
  local model = ARGV[m]
  local claimed = true
  if lease ~= '' then
    local score = tonumber(redis.call('ZSCORE', KEYS[1], model))
    if score and ((score >= 0 and score <= now) or (score < 0 and -score <= server_now)) then
      redis.call('ZADD', KEYS[1], lease, model)
    else
      claimed = false
    end
  end
  if not claimed then
    out[#out + 1] = false
  else
    err = nil
    local failing = any_failing and redis.call('HEXISTS', KEYS[2], model) or 0
    local prod = read('HGET', KEYS[k + 5], 'production')
    if type(prod) == 'string' then prod = read('HGET', KEYS[k + 6], prod) else prod = false end
    if type(prod) ~= 'string' then prod = false end
    local signals = read('HGETALL', KEYS[k])
    local drift = {}  -- the drift history only counts with a drift signal (model_signals)
    for i = 1, #signals, 2 do
      if signals[i] == 'drift.data' then drift = read('LRANGE', KEYS[k + 1], 0, ndrift) end
    end
    local pending = read('LRANGE', KEYS[k + 4], npending, -1)
    local count = #pending
    local first = pending[1] or ''
    if count == -npending then  -- maybe more: the list's length and its first entry (the window's start)
      count = read('LLEN', KEYS[k + 4])
      if type(count) ~= 'number' then count = #pending end
      if count > #pending then first = read('LINDEX', KEYS[k + 4], 0) end
    end
    local state = {
      signals,
      drift,
      read('HGETALL', KEYS[k + 2]),
      read('ZRANGEBYSCORE', KEYS[k + 3], since, '+inf', 'WITHSCORES'),
      pending,
      prod,
      failing,
      count,
      first,
    }
    if err then
      local newest = redis.pcall('LINDEX', KEYS[k + 4], -1)  -- what END_EVALUATIONS compares with
      out[#out + 1] = {'error', err, failing, type(newest) == 'string' and newest or ''}
    else
      out[#out + 1] = state
    end
  end
end
return {lease, out}
"""

RELEASE_LEASES = """
-- KEYS: due ; ARGV: lease, now, then model names. Each model still holding this lease is due again now.
local n = 0
for i = 3, #ARGV do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[1]) then
    redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i]); n = n + 1
  end
end
return n
"""

UNLOCK_MANY = """
-- KEYS: lock keys ; ARGV: token. Delete each lock still held by this token.
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]); n = n + 1 end
end
return n
"""

TAKE_SLOT = """
-- KEYS: guard, trainings, enqueue outbox ; ARGV: pipeline_id, now, trainings kept since, decision record
-- Takes the single-flight slot unless another pipeline holds it (a worker whose evaluation lock
-- expired mid-round): then nothing is written and the caller does not start its pipeline.
local held = redis.call('HGET', KEYS[1], 'in_flight')
if held and held ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'in_flight', ARGV[1], 'in_flight_since', ARGV[2], 'last_training', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 1
"""

CLAIM_ENQUEUE = """
-- KEYS: enqueue outbox, enqueue lock, guard ; ARGV: pipeline_id, lock owner, lock ttl ms
-- The outbox entry of a pipeline that still holds its model's slot, with the model's enqueue lock
-- taken; false when there is nothing to enqueue (already enqueued, or the slot moved on: then the
-- entry is dropped) or another enqueuer holds the lock (it is enqueuing this entry).
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return false end
if redis.call('HGET', KEYS[3], 'in_flight') ~= ARGV[1] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return false
end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return false end
return record
"""

RELEASE_PIPELINE = """
-- KEYS: guard, due ; ARGV: pipeline_id, model, now
-- A follow-up makes the model due now, unless an evaluation holds a live lease on it: that
-- evaluation ends seeing the slot free (END_EVALUATIONS), and its lease must not be broken.
if redis.call('HGET', KEYS[1], 'in_flight') ~= ARGV[1] then return 0 end
redis.call('HDEL', KEYS[1], 'in_flight', 'in_flight_since')
if redis.call('HGET', KEYS[1], 'follow_up') then
  redis.call('HDEL', KEYS[1], 'follow_up')
  local score = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[2]))
  local t = redis.call('TIME')
  if not (score and score < 0 and -score > tonumber(t[1]) + tonumber(t[2]) / 1000000) then
    redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  end
  return 2
end
return 1
"""


ENQUEUE_LOCK_TTL_MS = 20_000
"""How long a claimed outbox entry is reserved for its enqueuer (below the 30 s outbox replay grace)."""


def pending_entry(recorded_at: str, event_id: str) -> str:
    """A model's pending-list entry: when the signal was recorded (Unix seconds, as text), a space, its event id.

    The list is the debounce window too: its first and last entries' times are when the pending
    burst began and when it was last extended, so recording a signal writes one entry and nothing else.
    """
    return f"{recorded_at} {event_id}"


MAX_RECORDED_AT = 1e11
"""Pending times beyond this (year 5138) are not times: such an entry is read as an id (see :func:`parse_pending_entry`)."""


def parse_pending_entry(raw: Any) -> tuple[str, float | None]:
    """One pending-list entry -> (event id, recorded at); see :func:`pending_entry`.

    An entry not written by :func:`pending_entry` (no ``"<time> "`` prefix: an older layout held
    bare ids) is an id whose time is unknown (``None``).
    """
    entry = _str(raw)
    stamp, sep, event_id = entry.partition(" ")
    try:
        recorded_at = float(stamp) if sep and event_id else math.nan
    except ValueError:
        recorded_at = math.nan
    if 0 <= recorded_at < MAX_RECORDED_AT:  # NaN (no time) fails this too
        return event_id, recorded_at
    return entry, None


def pending_window(first: Any, newest: list[Any]) -> tuple[float | None, float | None]:
    """The debounce window of a pending list from its first entry and its newest ones (oldest first): when
    the burst began and when it was last extended.

    Entries are appended as they are recorded, so these are the first and the newest entries' times,
    parsed alone (an evaluation does not parse the whole list). Each entry carries the clock of the
    decision worker that recorded it: with several workers whose clocks differ, the window is off by
    at most their skew. A first entry without a time was written before entries carried one, so
    before every timed entry: its burst began long enough ago (0.0) for any maximum wait. A list of
    such entries alone has no window (``None, None``), as before.
    """
    if not newest:
        return None, None
    since, until = parse_pending_entry(first)[1], parse_pending_entry(newest[-1])[1]
    if until is None:  # the newest untimed: every entry is (timed ones come after untimed ones)
        return None, None
    return (0.0 if since is None else since), until


def relay_queue_entry(model: str, pipeline_id: str) -> str:
    """The enqueue relay's queue entry for a pipeline (see :meth:`DecisionStore.queue_for_relay`)."""
    return json.dumps([model, pipeline_id])


MAX_PARSED_SIGNALS = 200_000
"""Bound of the parsed-signal cache (entries: one per model and signal type)."""


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ts(value: Any) -> datetime | None:
    if value is None or value == b"" or value == "":
        return None
    return datetime.fromtimestamp(float(value), timezone.utc)


def _dt(value: str | None) -> datetime | None:
    if not value:
        return None
    d = datetime.fromisoformat(value)
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """The keys of one model that the decision worker touches (each built by :class:`Keys`)."""

    history: str
    signals: str
    drift_history: str
    pending_events: str
    guard: str
    trainings: str
    aliases: str
    versions: str


_MODEL_KEYS: dict[str, dict[str, ModelKeys]] = {}
MAX_CACHED_MODEL_KEYS = 100_000


def model_keys(keys: Keys, model: str) -> ModelKeys:
    """The model's keys, built once per model by ``keys`` and then reused (a batch needs them per event)."""
    by_model = _MODEL_KEYS.get(keys.prefix)  # per-model keys depend on the prefix only
    if by_model is None:
        by_model = _MODEL_KEYS[keys.prefix] = {}
    cached = by_model.get(model)
    if cached is None:
        if len(by_model) >= MAX_CACHED_MODEL_KEYS:
            by_model.clear()
        cached = by_model[model] = ModelKeys(
            history=keys.history(model), signals=keys.signals(model), drift_history=keys.drift_history(model),
            pending_events=keys.pending_events(model), guard=keys.guard(model), trainings=keys.trainings(model),
            aliases=keys.aliases(model), versions=keys.versions(model),
        )
    return cached


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
    pending_entries: list[Any] = field(default_factory=list)
    """The newest (up to ``PENDING_READ``) entries of the model's pending list, oldest first, as stored:
    the signals recorded since its last evaluation (see :func:`pending_entry`). Parsed only when a
    decision record lists them (:attr:`pending_ids`)."""
    pending_count: int = 0
    """How many signals are pending in all (the list may be longer than what was read)."""
    pending_since: float | None = None
    """When the first of them was recorded (Unix seconds) ..."""
    pending_until: float | None = None
    """... and the last: the debounce window (see :func:`pending_entry`)."""
    last_pending_entry: str = ""
    """The newest pending entry as stored: the evaluation consumes the list up to it (END_EVALUATIONS)."""
    production: dict[str, Any] | None = None
    raw_signals: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    """Why the state could not be read (a corrupted key, bad JSON); the model is not evaluated."""
    failing: bool = False
    """Its last evaluation failed (an alert was raised then; the next success clears it)."""

    @property
    def pending_ids(self) -> list[str]:
        """The ids of the newest pending signals (up to ``PENDING_READ``), oldest first."""
        return [parse_pending_entry(raw)[0] for raw in self.pending_entries]

    def guard_state(self) -> GuardState:
        g = self.guard
        return GuardState(
            last_training=_ts(g.get("last_training")),
            recent_trainings=tuple([datetime.fromtimestamp(t, timezone.utc) for _, t in self.trainings]),
            in_flight=g.get("in_flight") or None,
            first_pending=_ts(self.pending_since),
            last_pending=_ts(self.pending_until),
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
            else:  # not the seed's default of 1.0: an error metric (rmse) would read as a huge drop
                kwargs["baseline_unknown"] = True
            kwargs["n_labeled"] = int(d["n_labeled"])
            kwargs["metric"] = d["metric"]
            if d.get("ci_low") is not None and d.get("ci_high") is not None:
                ci = sorted((sign * float(d["ci_low"]), sign * float(d["ci_high"])))
                kwargs["accuracy_ci"] = (ci[0], ci[1])
        if "volume.accumulated" in s:
            kwargs["new_samples_since_training"] = int(s["volume.accumulated"]["data"]["new_samples"])
        if "drift.concept" in s:
            kwargs["concept_drift"] = float(s["drift.concept"]["data"]["value"])
            kwargs["concept_drift_metric"] = s["drift.concept"]["data"].get("metric")
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
        self._load = client.register_script(LOAD_STATES)
        self._release = client.register_script(RELEASE_PIPELINE)
        self._parsed: dict[tuple[str, str], tuple[bytes, dict[str, Any]]] = {}
        """(model, signal type) -> (stored payload, parsed): see :meth:`_signal`."""

    def load(self, models: list[str], now: float | None = None,
             drift_entries: int = DRIFT_HISTORY_READ) -> dict[str, StoredState]:
        """Read the state of many models (one script call, plus nothing else).

        ``drift_entries``: how many of the newest drift scores to read (persistence looks at the
        last ``n`` only).
        """
        return self._load_states(models, "", now or time.time(), drift_entries)[1]

    def claim_and_load(self, models: list[str], lease_s: float, now: float | None = None,
                       drift_entries: int = DRIFT_HISTORY_READ) -> tuple[str, dict[str, StoredState]]:
        """Lease each model that is due at ``now`` for ``lease_s`` seconds and read the state of those leased.

        One round trip. Returns (the lease, the states). The lease, minus its expiry on the Redis
        server's clock, replaces the model's score in the due set, which takes the model out of
        every worker's due range until its evaluation ends (:meth:`end_evaluations`) or
        :meth:`release_leases` puts it back. Models not due (another worker evaluated or leased
        one meanwhile, a debounce moved it later) are left out of the result.
        ``drift_entries`` as in :meth:`load`.
        """
        return self._load_states(models, repr(float(lease_s)), now or time.time(), drift_entries)

    def release_leases(self, models: list[str], lease: str, now: float | None = None) -> int:
        """Make the ``models`` that still hold ``lease`` due again now (their evaluation did not finish)."""
        if not models or not lease:
            return 0
        return int(self.redis.eval(RELEASE_LEASES, 1, self.keys.due(), lease, repr(now or time.time()), *models))

    def _load_states(self, models: list[str], lease_s: str, now: float,
                     drift_entries: int) -> tuple[str, dict[str, StoredState]]:
        if not models:
            return "", {}
        script_keys: list[str] = [self.keys.due(), self.keys.evaluation_errors()]
        for m in models:
            mk = model_keys(self.keys, m)
            script_keys += (mk.signals, mk.drift_history, mk.guard, mk.trainings, mk.pending_events,
                            mk.aliases, mk.versions)
        lease, replies = self._load(keys=script_keys, args=[lease_s, repr(now - TRAININGS_LOOKBACK_S),
                                                            max(1, drift_entries), PENDING_READ, repr(now), *models])
        out: dict[str, StoredState] = {}
        signal = self._signal
        for m, reply in zip(models, replies):
            if not reply:
                continue
            if len(reply) == 4:  # {'error', message, failing, newest pending entry}: a key of the wrong type
                out[m] = StoredState(model=m, error=f"unreadable state: {_str(reply[1])}", failing=bool(reply[2]),
                                     last_pending_entry=_str(reply[3]))
                continue
            sig, drift, guard, trainings, pending, production, failing, pending_count, first_pending = reply
            try:
                raw_signals = {_str(t): v for t, v in zip(sig[::2], sig[1::2])}
                pending_since, pending_until = pending_window(first_pending, pending)
                out[m] = StoredState(
                    model=m,
                    signals={t: signal(m, t, v) for t, v in raw_signals.items()},
                    drift_history=[float(x) for x in reversed(drift)],
                    guard={_str(a): _str(b) for a, b in zip(guard[::2], guard[1::2])},
                    trainings=[(_str(p), float(t)) for p, t in zip(trainings[::2], trainings[1::2])],
                    pending_entries=pending,
                    pending_count=int(pending_count),
                    pending_since=pending_since,
                    pending_until=pending_until,
                    last_pending_entry=_str(pending[-1]) if pending else "",
                    production=json.loads(production) if production else None,
                    raw_signals=raw_signals,
                    failing=bool(failing),
                )
            except (ValueError, TypeError, KeyError) as exc:  # bad JSON, a non-number where one belongs
                out[m] = StoredState(model=m, error=f"unreadable state: {type(exc).__name__}: {exc}",
                                     guard={_str(a): _str(b) for a, b in zip(guard[::2], guard[1::2])},
                                     failing=bool(failing), last_pending_entry=_str(pending[-1]) if pending else "")
        return _str(lease), out

    def _signal(self, model: str, etype: str, raw: bytes) -> dict[str, Any]:
        """The stored signal event as a dict, parsed once per stored value.

        The latest signals of a model change one at a time, so most evaluations find most of
        them unchanged since the last one. The dicts are shared: treat them as read-only.
        """
        key = (model, etype)
        cached = self._parsed.get(key)
        if cached is not None and cached[0] == raw:
            return cached[1]
        parsed = from_json(raw)
        if len(self._parsed) >= MAX_PARSED_SIGNALS:
            self._parsed.clear()
        self._parsed[key] = (raw, parsed)
        return parsed

    def end_evaluations(self, pipe, outcomes: list[tuple[StoredState, str, float | None]], lease: str,
                        now: float) -> None:
        """Queue the end of a round's evaluations as one script call (see END_EVALUATIONS).

        ``outcomes``: (state, outcome, due time) with outcome ``finish``, ``defer`` (due time: the
        debounce's), ``follow_up`` or ``retry`` (due time: the retry's).
        """
        if not outcomes:
            return
        script_keys: list[str] = [self.keys.due()]
        args: list[Any] = [lease, f"{now:.6f}"]
        for state, outcome, due_at in outcomes:
            m = state.model
            mk = model_keys(self.keys, m)
            script_keys += (mk.pending_events, mk.signals, mk.guard)
            shots = state.one_shot_fields() if outcome == "finish" else []
            args += (m, outcome, state.last_pending_entry, "" if due_at is None else f"{due_at:.6f}",
                     state.guard.get("in_flight", ""), len(shots))
            for field_name, value in shots:
                args += (field_name, value)
        # EVAL (not EVALSHA) inside transactions: see service.RECORD_BATCH.
        pipe.eval(END_EVALUATIONS, len(script_keys), *script_keys, *args)

    def take_slot(self, pipe, record: dict[str, Any], now: float) -> int:
        """Queue: take the model's single-flight slot for the record's pipeline, unless another holds it.

        Taking it counts the training against the budget and cooldown and puts the record in
        the enqueue outbox (see :meth:`outbox`), all in the caller's transaction. Returns the
        command's index in ``pipe``: its result is 1 when taken, 0 when another pipeline holds it.
        """
        k, model, pipeline_id = self.keys, record["model"], record["pipeline_id"]
        index = len(pipe)
        pipe.eval(TAKE_SLOT, 3, k.guard(model), k.trainings(model), k.enqueue_outbox(), pipeline_id,
                  f"{now:.6f}", f"{now - 86400 * 7:.6f}", json.dumps(record, default=str))
        return index

    def queue_for_relay(self, records: list[dict[str, Any]]) -> None:
        """Hand decided pipelines (already in the outbox) to the enqueue relay, oldest first."""
        if records:
            self.redis.rpush(self.keys.enqueue_queue(),
                             *[relay_queue_entry(r["model"], r["pipeline_id"]) for r in records])

    def claim_enqueue(self, model: str, pipeline_id: str, owner: str, ttl_ms: int = ENQUEUE_LOCK_TTL_MS) -> dict[str, Any] | None:
        """The outbox record to enqueue, with the model's enqueue lock taken by ``owner``; else ``None``.

        ``None`` when the pipeline was enqueued already, no longer holds its model's slot (its
        entry is dropped) or another enqueuer holds the lock. Release the lock with
        :meth:`release_enqueue` once the enqueue is done (or failed).
        """
        raw = self.redis.eval(CLAIM_ENQUEUE, 3, self.keys.enqueue_outbox(), self.keys.lock(model, "enqueue"),
                              self.keys.guard(model), pipeline_id, owner, ttl_ms)
        return json.loads(raw) if raw else None

    def release_enqueue(self, model: str, owner: str) -> None:
        """Release the model's enqueue lock if ``owner`` still holds it."""
        self.redis.eval(UNLOCK_MANY, 1, self.keys.lock(model, "enqueue"), owner)

    def outbox(self) -> dict[str, dict[str, Any]]:
        """Decided pipelines not yet confirmed enqueued on Celery: pipeline id -> decision record."""
        return {_str(pid): json.loads(raw) for pid, raw in self.redis.hgetall(self.keys.enqueue_outbox()).items()}

    def enqueued(self, record: dict[str, Any], when: float, by: str = "") -> None:
        """The record's pipeline is on Celery: note it on the pipeline (status only if no step wrote one;
        ``by``: who enqueued it) and clear the outbox."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=True)
        key = k.pipeline(record["model"], record["pipeline_id"])
        pipe.hset(key, mapping={"decision_id": record["id"], "enqueued_at": f"{when:.6f}", "enqueued_by": by})
        pipe.hsetnx(key, "status", "enqueued")
        pipe.hdel(k.enqueue_outbox(), record["pipeline_id"])
        pipe.execute()

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

    def trim_records(self, older_than: float, batch: int = 1000) -> int:
        """Delete decision records (record, per-model index entry, global id entry) decided before ``older_than``.

        Visits every known model; at most ``batch`` records per model per call, so one
        housekeeping run stays short and the next one continues. Returns how many were deleted.
        """
        k, deleted = self.keys, 0
        for raw in self.redis.smembers(k.models()):
            model = _str(raw)
            ids = [_str(d) for d in self.redis.zrangebyscore(k.decisions(model), "-inf", f"({older_than}",
                                                              start=0, num=batch)]
            if not ids:
                continue
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(*[k.decision(model, d) for d in ids])
            pipe.zrem(k.decisions(model), *ids)
            pipe.hdel(k.decision_index(), *ids)
            pipe.execute()
            deleted += len(ids)
        return deleted

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


__all__ = ["DecisionStore", "ModelKeys", "StoredState", "model_keys", "parse_pending_entry",
           "pending_entry", "pending_window"]
