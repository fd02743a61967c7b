"""The pipeline's Celery tasks: thin shells over ``workers.pipeline.steps``.

Every task: JSON in and out, ``acks_late`` + ``reject_on_worker_lost`` (a worker killed
mid-step gives the message back; after ``steps.MAX_STEP_STARTS`` lost starts the step fails
instead), retries with exponential backoff for transient errors
(Redis connection, I/O), idempotent by pipeline id + step (a finished step's output is stored
and returned again on a re-run, and the registry registers by pipeline id).
"""

from __future__ import annotations

from typing import Any

import redis
import structlog
from kombu.exceptions import OperationalError

from config.celery_config import PIPELINE_TASK_OPTIONS
from workers.app import app

log = structlog.get_logger(__name__)

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OperationalError)
"""Retried with backoff. ``OperationalError``: the broker refused a publish (the first step sending the rest)."""
STEP_BUSY_RETRY_S = 10
"""A delivery that finds its step running elsewhere retries after this long (without a retry limit)."""
STEP_OPTIONS: dict[str, Any] = {
    **PIPELINE_TASK_OPTIONS,
    "autoretry_for": TRANSIENT,
    "retry_backoff": 2,
    "retry_backoff_max": 120,
    "retry_jitter": True,
    "max_retries": 5,
    "bind": True,
    "store_errors_even_if_ignored": True,  # results are ignored (see canvas._options), failures kept
}


def _run(task, step: str, ctx: dict[str, Any]) -> dict[str, Any]:
    from workers.pipeline.steps import run_step

    structlog.contextvars.bind_contextvars(model=ctx["model"], pipeline_id=ctx["pipeline_id"],
                                           decision_id=ctx.get("decision_id"), task_id=task.request.id, step=step)
    from workers.pipeline.lease import StepBusy

    try:
        return run_step(step, ctx)
    except StepBusy as busy:  # another delivery is running this step: look again later, as often as it takes
        log.info("pipeline.step_busy", step=step, retry_in_s=STEP_BUSY_RETRY_S)
        raise task.retry(exc=busy, countdown=STEP_BUSY_RETRY_S, max_retries=None) from None
    finally:
        structlog.contextvars.clear_contextvars()


@app.task(name="retrain.pipeline.validate_data", **STEP_OPTIONS)
def validate_data(self, ctx: dict[str, Any]) -> dict[str, Any]:
    """The first step; it sends the rest of the pipeline (see ``workers.pipeline.canvas``), unless its
    message carries the rest itself (one sent as a whole chain, by an earlier release): then Celery does."""
    from workers.pipeline.canvas import continue_pipeline

    out = _run(self, "validate_data", ctx)
    if not self.request.chain:
        continue_pipeline(ctx, out)
    return out


@app.task(name="retrain.pipeline.train", **STEP_OPTIONS)
def train(self, ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(self, "train", ctx)


@app.task(name="retrain.pipeline.gate", **STEP_OPTIONS)
def gate(self, ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(self, "gate", ctx)


@app.task(name="retrain.pipeline.stage", **STEP_OPTIONS)
def stage(self, ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(self, "stage", ctx)


@app.task(name="retrain.pipeline.start_rollout", **STEP_OPTIONS)
def start_rollout(self, ctx: dict[str, Any]) -> dict[str, Any]:
    return _run(self, "start_rollout", ctx)


@app.task(name="retrain.pipeline.failed", acks_late=True)
def pipeline_failed(request, exc, traceback, ctx: dict[str, Any]) -> None:
    """link_error handler: record the failure, emit training.failed/gate.failed, alert, free the slot."""
    from workers.pipeline.steps import handle_failure

    step = (getattr(request, "task", "") or "").rsplit(".", 1)[-1]
    handle_failure(ctx, step, exc)
