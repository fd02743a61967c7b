"""Live traffic for the demo: requests through the real router, ground truth arriving later.

Rows come from :mod:`workers.simulate` with the current input shift and concept; every answer
is logged by the router, and the true label is sent as feedback ``label_delay`` seconds later
(delayed labels, as in production). Recent rows are kept for the demo's drift monitor.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter, deque
from datetime import datetime, timedelta, timezone

import pandas as pd
import structlog

from workers.simulate import FEATURES, TARGET, make_frame

log = structlog.get_logger(__name__)


class TrafficSimulator:
    def __init__(self, router, *, rate: float = 150.0, label_delay: float = 3.0, keep: int = 600, seed: int = 7):
        self.router = router
        self.rate = rate
        self.label_delay = label_delay
        self.shift = 0.0
        self.concept = 0.0
        self.recent: deque = deque(maxlen=keep)
        self.served: Counter = Counter()
        self.recent_served: deque = deque(maxlen=200)
        self.errors = 0
        self.sent = 0
        self._labels: list = []
        self._seq = itertools.count()
        self._seed = itertools.count(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> "TrafficSimulator":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def recent_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.recent))

    def _batch(self) -> pd.DataFrame:
        now = datetime.now(timezone.utc)
        return make_frame(int(self.rate), start=now - timedelta(seconds=1), end=now, shift=self.shift,
                          concept=self.concept, seed=next(self._seed))

    def _run(self) -> None:
        interval = 1.0 / self.rate
        while not self._stop.is_set():
            batch = self._batch()
            rows = batch[FEATURES].to_dict("records")
            labels = batch[TARGET].tolist()
            start = time.monotonic()
            for i, (row, label) in enumerate(zip(rows, labels)):
                if self._stop.is_set():
                    return
                self._send(row, int(label))
                self._deliver_labels()
                delay = start + (i + 1) * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)

    def _send(self, row: dict, label: int) -> None:
        request_id = f"r{next(self._seq)}"
        try:
            answer = self.router.predict(row, request_id)
        except Exception as exc:  # noqa: BLE001 - no production model yet, or a bad answer
            self.errors += 1
            if self.errors % 200 == 1:
                log.warning("demo.predict_failed", error=str(exc))
            return
        self.sent += 1
        self.served[answer.version] += 1
        self.recent_served.append(answer.version)
        self.recent.append(row)
        heapq.heappush(self._labels, (time.monotonic() + self.label_delay, request_id, label))

    def _deliver_labels(self) -> None:
        now = time.monotonic()
        while self._labels and self._labels[0][0] <= now:
            _, request_id, label = heapq.heappop(self._labels)
            try:
                self.router.feedback(request_id, label)
            except Exception:  # noqa: BLE001
                self.errors += 1

    def serving_share(self) -> dict[str, float]:
        recent = Counter(self.recent_served)
        total = sum(recent.values()) or 1
        return {v: n / total for v, n in recent.items()}
