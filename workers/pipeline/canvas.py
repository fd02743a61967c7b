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
    # argsrepr: what Flower and the worker logs show for the first step; without it Celery
    # builds a repr of the whole context on every enqueue.
    shown = f"(model={ctx['model']!r}, pipeline_id={pid!r}, decision_id={ctx['decision_id']!r})"
    # ignore_result: a step's outcome lives in the pipeline's own record (and its events), not
    # in the result backend; sent with the message, it also spares the sender a result-channel
    # SUBSCRIBE per enqueue (and an UNSUBSCRIBE per step result it will never read). Failures
    # are still stored (the tasks' store_errors_even_if_ignored) and link_error still runs.
    quiet = {"priority": priority, "ignore_result": True}
    canvas = chain(
        tasks.validate_data.si(ctx).set(queue=queue, task_id=f"{pid}.validate_data", argsrepr=shown,
                                        kwargsrepr="{}", **quiet),
        tasks.train.s().set(queue=queue, task_id=f"{pid}.train", **quiet),
        tasks.gate.s().set(queue=QUEUE_GATE, task_id=f"{pid}.gate", **quiet),
        tasks.stage.s().set(queue=QUEUE_GATE, task_id=f"{pid}.stage", **quiet),
        tasks.start_rollout.s().set(queue=QUEUE_ROLLOUT, task_id=f"{pid}.start_rollout", **quiet),
    )
    return canvas.on_error(tasks.pipeline_failed.s(ctx))


def warm_up() -> None:
    """Pay what the first enqueue would: load the tasks, open the broker connection, declare the queues.

    Without it the first decision a fresh decision worker starts waits tens of milliseconds
    for imports, the connection and the queue declarations.
    """
    from kombu.common import maybe_declare

    from workers.app import app

    build_pipeline(pipeline_context({"model": "warm-up", "pipeline_id": "p-warm-up", "id": "d-warm-up"}))
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        for queue in app.amqp.queues.values():
            maybe_declare(queue, producer.channel)  # remembered per connection: the first send skips it


def start_pipeline(record: dict[str, Any]):
    """Enqueue the pipeline for a decision record that took the model's single-flight slot."""
    return build_pipeline(pipeline_context(record)).apply_async()
