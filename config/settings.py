"""Process settings from the environment (prefix ``RETRAIN_``), validated with pydantic-settings.

Secrets (the Redis password inside the URL, the ingest token, the alert webhook) are
``SecretStr`` so they never appear in a repr or a log line.
"""

from __future__ import annotations

import os
from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.durations import Duration, format_duration

DEFAULT_TRUSTED_PREFIXES = (
    "sklearn.",
    "numpy.",
    "scipy.sparse.",  # sparse matrices only: the rest of scipy is not part of a fitted model
    "collections.",
)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_MINIMUMS = {
    "bus_claim_idle": timedelta(seconds=1),  # below, live consumers' batches are taken from under them
    "dedup_retention": timedelta(minutes=1),
    "stream_retention": timedelta(minutes=1),
    "visibility_timeout": timedelta(seconds=10),  # task time limits sit below it (celery_config)
    "rollout_tick": timedelta(milliseconds=100),
    "housekeeping_interval": timedelta(seconds=1),
    "result_expires": timedelta(minutes=1),  # 0 s would store results without a TTL (and Redis is noeviction)
}


def local_path(uri: str | os.PathLike[str]) -> Path:
    """A local path or a ``file://`` URI (``file://localhost/...`` and %-escapes included) as a :class:`Path`:
    the artifact root and every artifact URI. ValueError for another host or another scheme (``s3://``...)."""
    from urllib.parse import unquote, urlparse

    text = os.fspath(uri)
    parsed = urlparse(text)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{text}: file URIs on another host are not supported")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter: a Windows drive
        raise ValueError(f"{text}: unsupported artifact URI scheme '{parsed.scheme}'")
    return Path(text)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRAIN_", extra="ignore", frozen=True)

    # Where things live.
    redis_url: SecretStr | None = None
    """External Redis (``redis://:pw@host:6379/0`` or ``rediss://``); unset = embedded server."""
    state_dir: Path = Path(".retrain")
    """Embedded Redis data (AOF), artifacts and the demo's files."""
    policy_dir: Path = Path("config/policies")
    """One ``*.toml`` policy per model."""
    default_policy: Path | None = None
    """Policy used for models without their own file (its model name is replaced)."""
    artifact_root: str = ""
    """Where model artifacts go (a path or ``file://`` URI); empty = ``<state_dir>/artifacts``."""
    key_prefix: str = Field("retrain", pattern=r"^[A-Za-z0-9_\-]+$")

    # Event bus.
    stream_shards: int = Field(4, ge=1, le=1024)
    bus_batch_size: int = Field(1000, ge=1)
    bus_block_ms: int = Field(500, ge=0)
    bus_max_deliveries: int = Field(5, ge=1)
    """An entry delivered this many times without an ack goes to the dead-letter stream."""
    bus_claim_idle: Duration = timedelta(seconds=30)
    """Entries pending this long on a consumer are reclaimed by another (XAUTOCLAIM)."""
    stream_maxlen: int = Field(1_000_000, ge=1000)
    """Approximate retention per shard stream (XADD MAXLEN ~)."""
    stream_retention: Duration = timedelta(days=7)
    """Entries older than this are trimmed (XTRIM MINID) by the periodic housekeeping."""
    dedup_retention: Duration = timedelta(days=7)
    """How long an event id is remembered so a re-delivery has no second effect."""
    max_event_bytes: int = Field(64 * 1024, ge=256)

    # Celery.
    visibility_timeout: Duration = timedelta(hours=2)
    """Broker visibility timeout; no task ETA may exceed it (rollouts advance on ticks)."""
    result_expires: Duration = timedelta(days=1)
    task_max_retries: int = Field(5, ge=0)
    rollout_tick: Duration = timedelta(seconds=5)
    """How often beat asks the rollout workers to look at every active rollout."""
    housekeeping_interval: Duration = timedelta(minutes=10)
    decision_retention: Duration = timedelta(days=90)
    """Decision records older than this are deleted by the periodic housekeeping."""
    decision_enqueue_relay: bool = True
    """A decision worker puts its pipelines on Celery from a separate relay process (see
    ``workers/decision/relay.py``), so a Celery publish never holds up the event stream."""

    # Security and integrations.
    ingest_token: SecretStr | None = None
    alert_webhook_url: SecretStr | None = None
    trusted_prefixes: tuple[str, ...] = DEFAULT_TRUSTED_PREFIXES
    """Module prefixes skops may load from an artifact; anything else is refused."""

    # Logging.
    log_level: str = "INFO"
    log_format: str = Field("auto", pattern="^(auto|json|console)$")

    @field_validator(*_MINIMUMS)
    @classmethod
    def _at_least(cls, value: timedelta, info) -> timedelta:
        """Floors below which the setting breaks a guarantee rather than tunes it (see the README's table)."""
        floor = _MINIMUMS[info.field_name]
        if value < floor:
            raise ValueError(f"must be at least {floor.total_seconds():g}s")
        return value

    @field_validator("artifact_root")
    @classmethod
    def _artifact_root(cls, value: str) -> str:
        if value:
            local_path(value)  # s3://bucket became a relative folder "s3:/bucket" under the working directory
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; use {', '.join(LOG_LEVELS)}")
        return value.upper()

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        # A redelivered entry is reclaimed after bus_claim_idle, up to bus_max_deliveries times:
        # its id must still be remembered then, or its effect happens twice.
        redelivery = self.bus_claim_idle * (self.bus_max_deliveries + 1)
        if self.dedup_retention < redelivery:
            raise ValueError(
                f"RETRAIN_DEDUP_RETENTION ({format_duration(self.dedup_retention)}) must cover an entry's "
                f"redeliveries: at least RETRAIN_BUS_CLAIM_IDLE x (RETRAIN_BUS_MAX_DELIVERIES + 1) = "
                f"{format_duration(redelivery)}")
        if self.rollout_tick >= self.visibility_timeout:
            raise ValueError(f"RETRAIN_ROLLOUT_TICK ({format_duration(self.rollout_tick)}) must be shorter than "
                             f"RETRAIN_VISIBILITY_TIMEOUT ({format_duration(self.visibility_timeout)})")
        return self

    @property
    def artifact_dir(self) -> Path:
        return local_path(self.artifact_root) if self.artifact_root else self.state_dir / "artifacts"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (after changing the environment, e.g. in tests)."""
    get_settings.cache_clear()
