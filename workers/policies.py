"""Find a model's policy: ``<policy_dir>/*.toml`` by ``[model] name``, re-read when files change."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import structlog

from config.policy import Policy, PolicyError, load_policy

log = structlog.get_logger(__name__)

RESCAN_SECONDS = 5.0


class PolicyStore:
    def __init__(self, policy_dir: str | Path, default_policy: str | Path | None = None):
        self.policy_dir = Path(policy_dir)
        self.default_path = Path(default_policy) if default_policy else None
        self._by_model: dict[str, Policy] = {}
        self._derived: dict[str, Policy] = {}
        """Copies of the default policy for models without a file (rebuilt after a rescan)."""
        self._errors: dict[str, str] = {}
        self._default: Policy | None = None
        self._stamp: tuple = ()
        self._last_scan = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> "PolicyStore":
        return cls(settings.policy_dir, settings.default_policy)

    def _files(self) -> list[Path]:
        return sorted(self.policy_dir.glob("*.toml")) if self.policy_dir.is_dir() else []

    def _scan(self, force: bool = False) -> None:
        import time

        now = time.monotonic()
        if not force and now - self._last_scan < RESCAN_SECONDS and self._stamp:
            return
        self._last_scan = now
        files = self._files()
        if self.default_path:
            files.append(self.default_path)
        stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files if f.exists())
        if stamp == self._stamp:
            return
        by_model: dict[str, Policy] = {}
        errors: dict[str, str] = {}
        for f in self._files():
            try:
                policy = load_policy(f)
            except PolicyError as exc:
                errors[str(f)] = str(exc)
                log.error("policy.invalid", file=str(f), error=str(exc))
                continue
            by_model[policy.name] = policy
        default = None
        if self.default_path:
            try:
                default = load_policy(self.default_path)
            except PolicyError as exc:
                errors[str(self.default_path)] = str(exc)
        self._by_model, self._errors, self._default, self._stamp = by_model, errors, default, stamp
        self._derived = {}

    def get(self, model: str) -> Policy | None:
        with self._lock:
            self._scan()
            policy = self._by_model.get(model) or self._derived.get(model)
            if policy is None and self._default is not None:
                policy = self._default.model_copy(update={"model": self._default.model.model_copy(update={"name": model})})
                self._derived[model] = policy
            return policy

    def all(self) -> dict[str, Policy]:
        """Every model that has its own policy file (not those served by the default policy)."""
        with self._lock:
            self._scan(force=True)
            return dict(self._by_model)

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)


_stores: dict[tuple, PolicyStore] = {}


def policy_store(settings=None) -> PolicyStore:
    from config.settings import get_settings

    s = settings or get_settings()
    key = (os.fspath(s.policy_dir), os.fspath(s.default_policy) if s.default_policy else None)
    if key not in _stores:
        _stores[key] = PolicyStore(*key)
    return _stores[key]
