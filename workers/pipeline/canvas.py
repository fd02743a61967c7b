"""Build and enqueue the pipeline canvas for a decision.

``chain(validate_data, train, gate, stage, start_rollout)`` with ``link_error`` to the failure
handler. Only JSON travels between steps (ids and URIs, never frames or models). Each task
id is deterministic (``<pipeline id>.<step>``), so a re-sent message is recognisable, and every
step is idempotent by pipeline id + step.
"""

from __future__ import annotations

from typing import Any

from celery import chain

from config.celery_config import QUEUE_GATE, QUEUE_ROLLOUT

STEPS = ("validate_data", "train", "gate", "stage", "start_rollout")
PRIORITY = {"critical": 9, "high": 7, "medium": 4, "low": 1, "none": 0}


def pipeline_context(record: dict[str, Any]) -> dict[str, Any]:
    """The JSON context that flows through the chain, from a decision record."""
    return {
        "model": record["model"],
        "pipeline_id": record["pipeline_id"],
        "decision_id": record["id"],
        "urgency": record.get("urgency", "low"),
        "queue": record.get("queue") or "training.low",
        "triggers": [t["name"] for t in record.get("triggers", []) if t.get("triggered")],
        "event_ids": record.get("event_ids", []),
        "drift_onset": record.get("drift_onset"),
        "production_version": record.get("production_version"),
        "force": bool(record.get("force", False)),
    }


def build_pipeline(ctx: dict[str, Any]):
    from workers.pipeline import tasks

    pid, queue = ctx["pipeline_id"], ctx["queue"]
    priority = PRIORITY.get(ctx.get("urgency", "low"), 1)
    canvas = chain(
        tasks.validate_data.si(ctx).set(queue=queue, task_id=f"{pid}.validate_data", priority=priority),
        tasks.train.s().set(queue=queue, task_id=f"{pid}.train", priority=priority),
        tasks.gate.s().set(queue=QUEUE_GATE, task_id=f"{pid}.gate", priority=priority),
        tasks.stage.s().set(queue=QUEUE_GATE, task_id=f"{pid}.stage", priority=priority),
        tasks.start_rollout.s().set(queue=QUEUE_ROLLOUT, task_id=f"{pid}.start_rollout", priority=priority),
    )
    return canvas.on_error(tasks.pipeline_failed.s(ctx))


def start_pipeline(record: dict[str, Any]):
    """Enqueue the pipeline for a decision record that took the model's single-flight slot."""
    return build_pipeline(pipeline_context(record)).apply_async()
