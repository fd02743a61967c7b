"""Where the Redis server is, and shared clients to it.

``RETRAIN_REDIS_URL`` wins. Without it, a local system started by ``retrain up`` or
``retrain demo`` is found through the URL file it writes under the state folder.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import redis

from config.settings import Settings, get_settings

URL_FILE = "redis/url"


class NoRedisConfigured(RuntimeError):
    pass


def url_file(settings: Settings) -> Path:
    return Path(settings.state_dir) / URL_FILE


def redis_url(settings: Settings | None = None) -> str:
    s = settings or get_settings()
    if s.redis_url is not None:
        return s.redis_url.get_secret_value()
    path = url_file(s)
    if path.exists():
        return path.read_text().strip()
    raise NoRedisConfigured(
        "no Redis configured: set RETRAIN_REDIS_URL, or start a local system with 'retrain up'"
    )


def new_redis(settings: Settings | None = None, *, socket_timeout: float | None = None) -> redis.Redis:
    """A client of its own (not shared), with the connection options every client here uses."""
    return _new(redis_url(settings), socket_timeout)


def _new(url: str, socket_timeout: float | None = None) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True, socket_timeout=socket_timeout)


@lru_cache(maxsize=8)
def _client(url: str) -> redis.Redis:
    return _new(url)


def get_redis(settings: Settings | None = None) -> redis.Redis:
    return _client(redis_url(settings))


def reset_clients() -> None:
    _client.cache_clear()
