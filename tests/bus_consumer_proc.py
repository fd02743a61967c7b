"""A stream consumer in its own process, for crash tests: ``python tests/bus_consumer_proc.py MODE NAME``.

MODE ``hang``: read a batch, then hang inside the handler (to be SIGKILLed before anything commits).
MODE ``crash-after-commit``: commit the batch's effect, then die by SIGKILL before XACK.
MODE ``run``: consume normally until SIGTERM.
The effect of an event is ``HINCRBY retrain:test:effects <event id> 1``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import redis

from config.keys import keys_from_settings
from config.settings import get_settings
from events.bus import StreamConsumer

EFFECTS = "retrain:test:effects"


def handler(events, pipe):
    for e in events:
        pipe.hincrby(EFFECTS, e.id, 1)
    if MODE == "hang":
        open(os.environ["READY_FILE"], "w").write("read")
        time.sleep(3600)


class CrashAfterCommit(StreamConsumer):
    def _commit(self, fresh, dupes=(), **kw):
        super()._commit(fresh, dupes, **kw)
        open(os.environ["READY_FILE"], "w").write("committed")
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    MODE, NAME = sys.argv[1], sys.argv[2]
    s = get_settings()
    client = redis.Redis.from_url(s.redis_url.get_secret_value())
    cls = CrashAfterCommit if MODE == "crash-after-commit" else StreamConsumer
    consumer = cls(client, keys_from_settings(s), "g", NAME, handler, batch_size=int(os.environ.get("BATCH", "100")),
                   block_ms=200, claim_idle_ms=int(os.environ.get("CLAIM_IDLE_MS", "500")))
    signal.signal(signal.SIGTERM, lambda *a: consumer.stop())
    consumer.run()
