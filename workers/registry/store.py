"""The model registry in Redis: versions with lineage, statuses, aliases and their history.

Every version records what DESIGN.md asks (metrics, hyperparameters, training window and
fingerprint, the decision and events that caused it, parent version, artifact URI and
sha256). Aliases (``production``, ``previous``, ``candidate``, ...) move only through
:meth:`Registry.set_alias`, which appends to an append-only stream, so "what was in
production at time T, and why" has an answer. Registration is idempotent by pipeline id.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import redis

from config.keys import Keys

STATUSES = ("candidate", "rejected", "staged", "shadow", "canary", "production", "previous",
            "archived", "rolled_back")

_REGISTER = """
-- KEYS[1] versions hash, KEYS[2] counter, KEYS[3] models set
-- ARGV[1] pipeline id (idempotency key, may be empty), ARGV[2] record JSON (version = 0), ARGV[3] model
if ARGV[1] ~= '' then
  local existing = redis.call('HGET', KEYS[1], 'pipeline:' .. ARGV[1])
  if existing then return tonumber(existing) end
end
local v = redis.call('INCR', KEYS[2])
-- Fill the number in textually: a cjson round trip would turn empty lists into objects.
local rec = string.gsub(ARGV[2], '"version": 0,', '"version": ' .. v .. ',', 1)
redis.call('HSET', KEYS[1], tostring(v), rec)
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'pipeline:' .. ARGV[1], v) end
redis.call('SADD', KEYS[3], ARGV[3])
return v
"""


ALIAS_HISTORY_MAXLEN = 10_000
"""Alias moves kept per model (approximately): decades of daily promotions."""
SET_ALIAS = """
-- KEYS: aliases, alias history ; ARGV: alias, version ('' removes it), at, who, why, history maxlen
local previous = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if ARGV[2] == '' then redis.call('HDEL', KEYS[1], ARGV[1]) else redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'alias', ARGV[1], 'version', ARGV[2],
           'previous', previous, 'at', ARGV[3], 'who', ARGV[4], 'why', ARGV[5])
return previous
"""


class RegistryError(LookupError):
    pass


def utcnow_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


@dataclass
class ModelVersion:
    model: str
    version: int
    status: str
    artifact_uri: str
    sha256: str
    created_at: str = field(default_factory=utcnow_iso)
    size_bytes: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    estimator: str = ""
    task: str = ""
    data_window: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    training_schema: dict[str, Any] = field(default_factory=dict)
    reference_profile_uri: str = ""
    reference_profile_sha256: str = ""
    decision_id: str | None = None
    trigger_event_ids: list[str] = field(default_factory=list)
    """The ids of the signals the decision saw: the newest 100 of ``trigger_event_count``."""
    trigger_event_count: int = 0
    triggers: list[str] = field(default_factory=list)
    pipeline_id: str | None = None
    parent_version: int | None = None
    gate: dict[str, Any] | None = None
    feature_version: str | None = None
    schema_fingerprint: str | None = None
    source_schema: dict[str, str] = field(default_factory=dict)
    """Columns and dtypes of the data source at training time (for upstream-change checks)."""
    reference_scores: list[float] = field(default_factory=list)
    """A sample of the model's scores on its holdout (the reference for concept drift)."""
    notes: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelVersion":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class AliasMove:
    alias: str
    version: int | None
    previous: int | None
    at: float
    who: str
    why: str
    entry_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["time"] = datetime.fromtimestamp(self.at, timezone.utc).isoformat()
        return d


class Registry:
    def __init__(self, client: redis.Redis, keys: Keys):
        self.redis = client
        self.keys = keys
        self._register = client.register_script(_REGISTER)

    # --- versions ---------------------------------------------------------------------
    def register(self, record: ModelVersion) -> ModelVersion:
        """Store a new version (its number assigned here); same pipeline id -> same version."""
        data = {"model": record.model, "version": 0, **{k: v for k, v in record.to_dict().items()
                                                       if k not in ("model", "version")}}
        version = int(self._register(
            keys=[self.keys.versions(record.model), self.keys.version_counter(record.model), self.keys.models()],
            args=[record.pipeline_id or "", json.dumps(data), record.model],
        ))
        return self.get(record.model, version)

    def get(self, model: str, version: int | str) -> ModelVersion:
        raw = self.redis.hget(self.keys.versions(model), str(version))
        if raw is None:
            raise RegistryError(f"model {model!r} has no version {version}")
        return ModelVersion.from_dict(json.loads(raw))

    def find_by_pipeline(self, model: str, pipeline_id: str) -> ModelVersion | None:
        v = self.redis.hget(self.keys.versions(model), f"pipeline:{pipeline_id}")
        return self.get(model, int(v)) if v is not None else None

    def versions(self, model: str) -> list[ModelVersion]:
        raw = self.redis.hgetall(self.keys.versions(model))
        out = [ModelVersion.from_dict(json.loads(v)) for k, v in raw.items() if not k.startswith(b"pipeline:")]
        return sorted(out, key=lambda mv: mv.version)

    def models(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(self.keys.models()))

    def update(self, model: str, version: int, *, note: dict[str, Any] | None = None, **changes: Any) -> ModelVersion:
        """Change fields of a version record atomically (WATCH/MULTI); ``note`` is appended to its notes.

        The note is appended to the notes read inside the transaction, so concurrent writers
        never drop each other's notes.
        """
        key = self.keys.versions(model)
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.hget(key, str(version))
                    if raw is None:
                        raise RegistryError(f"model {model!r} has no version {version}")
                    data = json.loads(raw)
                    data.update(changes)
                    if note is not None:
                        data["notes"] = [*(data.get("notes") or []), {"at": utcnow_iso(), **note}]
                    pipe.multi()
                    pipe.hset(key, str(version), json.dumps(data))
                    pipe.execute()
                    return ModelVersion.from_dict(data)
                except redis.WatchError:
                    continue

    def set_status(self, model: str, version: int, status: str, *, who: str = "system", why: str = "") -> ModelVersion:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        return self.update(model, version, status=status, note={"status": status, "who": who, "why": why})

    def add_note(self, model: str, version: int, **note: Any) -> ModelVersion:
        return self.update(model, version, note=note)

    # --- aliases -----------------------------------------------------------------------
    def alias(self, model: str, alias: str) -> int | None:
        v = self.redis.hget(self.keys.aliases(model), alias)
        return int(v) if v is not None and v != b"" else None

    def aliases(self, model: str) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(self.keys.aliases(model)).items() if v != b""}

    def set_alias(self, model: str, alias: str, version: int | None, *, who: str = "system", why: str = "",
                  pipe=None) -> None:
        """Point an alias at a version (None removes it) and append the move to the history.

        One script: the history's ``previous`` is the value the move replaced, even with
        concurrent movers. The history keeps about ``ALIAS_HISTORY_MAXLEN`` moves per model.
        """
        args = (alias, "" if version is None else str(version), f"{time.time():.6f}", who, why, ALIAS_HISTORY_MAXLEN)
        # EVAL (not EVALSHA): it may be queued into the caller's transaction (see decision.service).
        (pipe or self.redis).eval(SET_ALIAS, 2, self.keys.aliases(model), self.keys.alias_history(model), *args)

    def alias_history(self, model: str, alias: str | None = None) -> list[AliasMove]:
        out = []
        for entry_id, f in self.redis.xrange(self.keys.alias_history(model)):
            d = {k.decode(): v.decode() for k, v in f.items()}
            if alias and d["alias"] != alias:
                continue
            out.append(AliasMove(d["alias"], int(d["version"]) if d["version"] else None,
                                 int(d["previous"]) if d["previous"] else None, float(d["at"]),
                                 d["who"], d["why"], entry_id.decode()))
        return out

    def alias_at(self, model: str, alias: str, at: datetime | float) -> AliasMove | None:
        """The move that set ``alias`` as it stood at time ``at`` (None if unset then)."""
        ts = at.timestamp() if isinstance(at, datetime) else float(at)
        last = None
        for move in self.alias_history(model, alias):
            if move.at <= ts:
                last = move
            else:
                break
        return last if last and last.version is not None else None

    # --- artifacts ---------------------------------------------------------------------
    def load(self, model: str, version: int, trusted_prefixes=None):
        """Load a version's estimator, verifying its sha256 first (raises ArtifactTampered)."""
        from workers.registry.artifacts import load_artifact

        mv = self.get(model, version)
        return load_artifact(mv.artifact_uri, mv.sha256, trusted_prefixes)
