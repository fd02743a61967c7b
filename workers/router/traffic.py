"""The traffic table in Redis: which model versions serve, and how traffic splits between them.

One hash per model at ``keys.traffic(model)`` with the fields

``production``         the version answering the requests not sent to the candidate;
``previous``           the production before it (kept loaded by routers for an instant rollback);
``candidate``          the version under rollout (empty when none);
``candidate_percent``  share of requests (0-100, sticky by request id) answered by the candidate;
``shadow``             a version every request is mirrored to, off the request path (empty = none);
``revision``           incremented on every write, so a router can tell a stale copy cheaply.

:func:`write_traffic` is the only writer (the rollout worker calls it). It applies the whole table,
bumps the revision and PUBLISHes the model name on ``keys.traffic_channel()`` in one server-side
script, which Redis runs atomically (like MULTI/EXEC, and it may itself be queued inside the
caller's MULTI pipeline): a rollback flips production, candidate and shadow together, and no
router ever sees half a table. Routers read it with :func:`read_traffic` once per change, never
per request.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import redis

from config.keys import Keys

FIELDS = ("production", "previous", "candidate", "candidate_percent", "shadow", "revision")

_WRITE = """
-- KEYS[1] traffic hash
-- ARGV: production, previous, candidate, candidate_percent, shadow, auto_previous ('1'|'0'),
--       channel, model
local prev = ARGV[2]
if ARGV[6] == '1' then
  local old = redis.call('HGET', KEYS[1], 'production')
  if old and old ~= '' and old ~= ARGV[1] then
    prev = old
  else
    prev = redis.call('HGET', KEYS[1], 'previous') or ''
  end
end
redis.call('HSET', KEYS[1], 'production', ARGV[1], 'previous', prev, 'candidate', ARGV[3],
           'candidate_percent', ARGV[4], 'shadow', ARGV[5])
local rev = redis.call('HINCRBY', KEYS[1], 'revision', 1)
redis.call('PUBLISH', ARGV[7], ARGV[8])
return rev
"""


class TrafficError(ValueError):
    """A traffic table that cannot be served (one-line message)."""


def _version(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    text = str(value).strip()
    return text or None


@dataclass(frozen=True)
class TrafficTable:
    """What the router serves for one model.

    ``previous=None`` on a table handed to :func:`write_traffic` means "work it out": when
    production changes, the outgoing production becomes ``previous``; otherwise the stored
    ``previous`` is kept. ``revision`` is set by Redis; the value passed to a write is ignored.
    """

    production: str | None = None
    previous: str | None = None
    candidate: str | None = None
    candidate_percent: float = 0.0
    shadow: str | None = None
    revision: int = 0

    def __post_init__(self) -> None:
        for name in ("production", "previous", "candidate", "shadow"):
            object.__setattr__(self, name, _version(getattr(self, name)))
        try:
            percent = float(self.candidate_percent or 0.0)
        except (TypeError, ValueError):
            raise TrafficError(f"candidate_percent must be a number, got {self.candidate_percent!r}") from None
        if not math.isfinite(percent) or not 0.0 <= percent <= 100.0:
            raise TrafficError(f"candidate_percent must be within 0..100, got {percent}")
        if percent > 0 and self.candidate is None:
            raise TrafficError("candidate_percent > 0 needs a candidate version")
        object.__setattr__(self, "candidate_percent", percent)
        object.__setattr__(self, "revision", int(self.revision or 0))

    @property
    def candidate_buckets(self) -> int:
        """How many of the 10,000 request-id buckets go to the candidate (percent with 0.01 steps)."""
        return round(self.candidate_percent * 100) if self.candidate else 0

    def versions(self) -> set[str]:
        """Every version the table names (the ones a router keeps loaded)."""
        return {v for v in (self.production, self.previous, self.candidate, self.shadow) if v}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, table: Any) -> TrafficTable:
        """A :class:`TrafficTable` from this class, a mapping, or any object with the same attributes
        (such as ``workers.rollout.machine.TrafficTable``, which has no ``previous``)."""
        if isinstance(table, cls):
            return table
        if isinstance(table, Mapping):
            get = table.get
        else:
            def get(name, default=None):
                return getattr(table, name, default)
        shadow = get("shadow")
        if shadow is True:  # "mirror to the candidate"
            shadow = get("candidate")
        elif shadow is False:
            shadow = None
        return cls(production=get("production"), previous=get("previous"), candidate=get("candidate"),
                   candidate_percent=get("candidate_percent", 0.0) or 0.0, shadow=shadow,
                   revision=get("revision", 0) or 0)

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> TrafficTable:
        """Parse the Redis hash (bytes or str keys); an empty hash is an empty table (revision 0)."""
        d = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in raw.items()}
        return cls(production=d.get("production"), previous=d.get("previous"), candidate=d.get("candidate"),
                   candidate_percent=float(d.get("candidate_percent") or 0.0), shadow=d.get("shadow"),
                   revision=int(d.get("revision") or 0))


def write_traffic(client: redis.Redis, keys: Keys, model: str, table: Any, pipe=None) -> int | None:
    """Replace the model's traffic table atomically, bump its revision and announce the change.

    Parameters
    ----------
    client : redis.Redis
        The connection (also used to register the script when ``pipe`` is given).
    keys : Keys
        The key schema.
    model : str
        Model name.
    table : TrafficTable, mapping or object with the same attributes
        The new table. ``previous=None`` keeps the outgoing production as ``previous``.
    pipe : redis pipeline, optional
        Queue the write into this (transactional) pipeline instead of running it now, so it
        commits together with the caller's own state change; the caller executes it.

    Returns
    -------
    int or None
        The new revision, or None when queued into ``pipe``.

    Examples
    --------
    >>> write_traffic(r, keys, "churn", TrafficTable(production="3", candidate="4",
    ...                                              candidate_percent=5))  # doctest: +SKIP
    1
    """
    t = TrafficTable.coerce(table)
    args = [
        t.production or "", t.previous or "", t.candidate or "", repr(t.candidate_percent), t.shadow or "",
        "1" if t.previous is None else "0", keys.traffic_channel(), model,
    ]
    script = client.register_script(_WRITE)
    if pipe is not None:
        script(keys=[keys.traffic(model)], args=args, client=pipe)
        return None
    return int(script(keys=[keys.traffic(model)], args=args))


def read_traffic(client: redis.Redis, keys: Keys, model: str) -> TrafficTable:
    """The model's current traffic table (an empty table with revision 0 when none was written)."""
    return TrafficTable.from_hash(client.hgetall(keys.traffic(model)))


def read_revision(client: redis.Redis, keys: Keys, model: str) -> int:
    """Only the table's revision: the cheap check routers run to catch a missed announcement."""
    raw = client.hget(keys.traffic(model), "revision")
    return int(raw) if raw else 0
