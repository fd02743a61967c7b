"""The training pipeline: one Celery canvas per decision (validate -> train -> gate -> stage -> rollout)."""
