"""Every Celery task module, imported so a worker of any role knows every task name."""

from __future__ import annotations

from workers.app import app


@app.task(name="retrain.echo", acks_late=True, reject_on_worker_lost=True)
def echo(value, label: str = ""):
    """Diagnostics: return the input (used by ``retrain worker --check`` and tests)."""
    return {"value": value, "label": label}
