"""A step's lease: one run of a pipeline step at a time, however many deliveries of its task arrive.

A task may be delivered twice at once (a replayed enqueue, a redelivery while the first run is
still going); two runs of one step would write the same files and race for the stored output.
The run that takes the lease runs the step; while it runs, a thread renews the lease, so a run
that dies leaves a lease that expires within ``LEASE_S``. A run that finds the lease taken
retries later (see ``workers.pipeline.tasks``), and then finds the step done or the lease free.
A holder on this host whose process is gone (a pool process killed mid-step) is taken over at
once instead of waiting for the expiry.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid

import redis
import structlog

log = structlog.get_logger(__name__)

LEASE_S = 30.0
"""A lease not renewed for this long is free (its holder died); it is renewed every third of that."""

# KEYS[1] lease ; ARGV: token, ttl ms, holder to take over ('' = none)
_TAKE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StepBusy(Exception):
    """Another run of this step holds its lease: retry later."""


def _holder_is_gone(holder: str) -> bool:
    """Whether ``holder`` ("host:pid:nonce") is a process of this host that no longer exists."""
    owner, sep, _nonce = holder.rpartition(":")
    host, sep_pid, pid = owner.rpartition(":")
    if not (sep and sep_pid) or host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


class StepLease:
    """``with StepLease(client, key):`` runs the block holding the lease (renewed), or raises :class:`StepBusy`."""

    def __init__(self, client: redis.Redis, key: str, lease_s: float = LEASE_S):
        self.redis = client
        self.key = key
        self.lease_ms = int(lease_s * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> "StepLease":
        take = self.redis.register_script(_TAKE)
        if not take(keys=[self.key], args=[self.token, self.lease_ms, ""]):
            holder = self.redis.get(self.key)
            holder = holder.decode() if isinstance(holder, bytes) else (holder or "")
            if not (holder and _holder_is_gone(holder) and take(keys=[self.key], args=[self.token, self.lease_ms, holder])):
                raise StepBusy(f"another run holds {self.key} ({holder or 'just released'})")
            log.warning("pipeline.step_lease_taken_over", key=self.key, dead_holder=holder)
        self._renewer = threading.Thread(target=self._renew, name="step-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        renew = self.redis.register_script(_RENEW)
        while not self._stop.wait(self.lease_ms / 3000):
            try:
                if not renew(keys=[self.key], args=[self.token, self.lease_ms]):
                    log.warning("pipeline.step_lease_lost", key=self.key)
                    return
            except redis.RedisError as exc:  # tried again next time; the lease outlives two misses
                log.warning("pipeline.step_lease_renew_failed", key=self.key, error=str(exc))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(5)
        try:
            self.redis.register_script(_RELEASE)(keys=[self.key], args=[self.token])
        except redis.RedisError as exc:  # it expires after LEASE_S
            log.warning("pipeline.step_lease_release_failed", key=self.key, error=str(exc))
