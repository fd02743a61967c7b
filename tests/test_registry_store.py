"""Registry writes under concurrency: notes are never dropped, alias history says what each move replaced."""

from __future__ import annotations

import threading

from workers.registry import store
from workers.registry.store import ModelVersion, Registry


def _register(registry: Registry, model: str = "m") -> ModelVersion:
    return registry.register(ModelVersion(model=model, version=0, status="staged", artifact_uri="file:///x.skops",
                                          sha256="0" * 64))


def _together(*fns) -> None:
    barrier = threading.Barrier(len(fns))

    def run(fn):
        barrier.wait()
        fn()

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    [t.start() for t in threads]
    [t.join() for t in threads]


class TestConcurrentWriters:
    def test_concurrent_notes_and_status_changes_keep_every_note(self, redis_client, keys):
        """Two writers adding 50 notes each (one of them through set_status) leave all 100 notes."""
        registry = Registry(redis_client, keys)
        _register(registry)

        def notes(who):
            for i in range(50):
                registry.add_note("m", 1, who=who, i=i)

        def statuses():
            for i in range(50):
                registry.set_status("m", 1, "staged" if i % 2 else "candidate", who="rollout", why=str(i))

        _together(lambda: notes("ana"), statuses)
        record = registry.get("m", 1)
        assert len(record.notes) == 100
        assert [n["i"] for n in record.notes if n.get("who") == "ana"] == list(range(50))

    def test_alias_history_records_what_each_concurrent_move_replaced(self, redis_client, keys):
        """Moves racing on one alias form a chain: each move's 'previous' is the version the one before it set."""
        registry = Registry(redis_client, keys)
        for _ in range(4):
            _register(registry)

        def mover(version):
            return lambda: [registry.set_alias("m", "production", version, who=f"w{version}") for _ in range(30)]

        _together(*(mover(v) for v in range(1, 5)))
        moves = registry.alias_history("m", "production")
        assert len(moves) == 120
        assert moves[0].previous is None
        assert all(later.previous == earlier.version for earlier, later in zip(moves, moves[1:]))
        assert registry.alias("m", "production") == moves[-1].version

    def test_alias_history_is_bounded(self, redis_client, keys, monkeypatch):
        """The alias history keeps about ALIAS_HISTORY_MAXLEN moves."""
        monkeypatch.setattr(store, "ALIAS_HISTORY_MAXLEN", 100)
        registry = Registry(redis_client, keys)
        _register(registry)
        for _ in range(1000):
            registry.set_alias("m", "candidate", 1)
        assert 100 <= redis_client.xlen(keys.alias_history("m")) < 300
