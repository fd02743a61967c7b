"""Build and enqueue the pipeline canvas for a decision.

The pipeline is ``validate_data -> train -> gate -> stage -> start_rollout`` with ``link_error`` to
the failure handler on every step. The decision worker sends one message, the first step
(:func:`start_pipeline`); once that step has run, it sends the rest as a Celery chain
(:func:`rest_of_pipeline`, from the training worker). So a decision costs the decision worker one
small publish, and the canvas is built where there is time for it. Only JSON travels between
steps (ids and URIs, never frames or models). Each task id is deterministic
(``<pipeline id>.<step>``), so a re-sent message is recognisable, and every step is idempotent by
pipeline id + step (a first step that runs again sends the rest again; its steps return their
stored outputs).
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
        "event_count": record.get("event_count", len(record.get("event_ids", []))),
        "drift_onset": record.get("drift_onset"),
        "production_version": record.get("production_version"),
        "force": bool(record.get("force", False)),
    }


def _options(ctx: dict[str, Any], step: str, queue: str) -> dict[str, Any]:
    # ignore_result: a step's outcome lives in the pipeline's own record (and its events), not
    # in the result backend; sent with the message, it also spares the sender a result-channel
    # SUBSCRIBE per enqueue (and an UNSUBSCRIBE per result it will never read). Failures are
    # still stored (the tasks' store_errors_even_if_ignored) and link_error still runs.
    return {"queue": queue, "task_id": f"{ctx['pipeline_id']}.{step}",
            "priority": PRIORITY.get(ctx.get("urgency", "low"), 1), "ignore_result": True}


def first_step(ctx: dict[str, Any]):
    """The pipeline's first step, on the urgency's training queue, with the failure handler."""
    from workers.pipeline import tasks

    # argsrepr: what Flower and the worker logs show; without it Celery builds a repr of the
    # whole context on every enqueue.
    shown = f"(model={ctx['model']!r}, pipeline_id={ctx['pipeline_id']!r}, decision_id={ctx['decision_id']!r})"
    return tasks.validate_data.si(ctx).set(argsrepr=shown, kwargsrepr="{}", link_error=[tasks.pipeline_failed.s(ctx)],
                                           **_options(ctx, "validate_data", ctx["queue"]))


def rest_of_pipeline(ctx: dict[str, Any]):
    """The steps after the first, as one chain (each takes the previous step's output), with the failure handler."""
    from workers.pipeline import tasks

    canvas = chain(
        tasks.train.s().set(**_options(ctx, "train", ctx["queue"])),
        tasks.gate.s().set(**_options(ctx, "gate", QUEUE_GATE)),
        tasks.stage.s().set(**_options(ctx, "stage", QUEUE_GATE)),
        tasks.start_rollout.s().set(**_options(ctx, "start_rollout", QUEUE_ROLLOUT)),
    )
    return canvas.on_error(tasks.pipeline_failed.s(ctx))


def warm_up() -> None:
    """Pay what the first enqueue would: load the tasks, open the broker connection, declare the queues.

    Without it the first decision a fresh decision worker starts waits tens of milliseconds
    for imports, the connection and the queue declarations.
    """
    from kombu.common import maybe_declare

    from workers.app import app

    first_step(pipeline_context({"model": "warm-up", "pipeline_id": "p-warm-up", "id": "d-warm-up"}))
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=3)
        for queue in app.amqp.queues.values():
            maybe_declare(queue, producer.channel)  # remembered per connection: the first send skips it


def start_pipeline(record: dict[str, Any]):
    """Enqueue the pipeline for a decision record that took the model's single-flight slot (its first step)."""
    return first_step(pipeline_context(record)).apply_async()


def continue_pipeline(ctx: dict[str, Any], output: dict[str, Any]):
    """Send the steps after the first, the first step's ``output`` as the next step's input (see the module docstring)."""
    return rest_of_pipeline(ctx).apply_async((output,))
