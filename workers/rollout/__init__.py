"""Safe rollout: the pure per-phase analysis and the rollout state machine (no Celery, no Redis)."""
