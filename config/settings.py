"""Process settings from the environment (prefix ``RETRAIN_``), validated with pydantic-settings.

Secrets (the Redis password inside the URL, the ingest token, the alert webhook) are
``SecretStr`` so they never appear in a repr or a log line.
"""

from __future__ import annotations

from datetime import timedelta
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.durations import Duration

DEFAULT_TRUSTED_PREFIXES = (
    "sklearn.",
    "numpy.",
    "scipy.",
    "collections.",
)


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

    @property
    def artifact_dir(self) -> Path:
        root = self.artifact_root.removeprefix("file://")
        return Path(root) if root else self.state_dir / "artifacts"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once from the environment)."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (after changing the environment, e.g. in tests)."""
    get_settings.cache_clear()
