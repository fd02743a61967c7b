"""Rollout tasks: periodic ticks (celery-redbeat) advance every active rollout against Redis state.

No task sleeps through a phase and no ETA is used: each tick is short and idempotent.
"""

from __future__ import annotations

from workers.app import app


@app.task(name="retrain.rollout.tick_all", acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def tick_all() -> dict[str, str]:
    from workers.rollout.control import RolloutControl

    return RolloutControl.from_settings().tick_all()


@app.task(name="retrain.rollout.tick", acks_late=True, reject_on_worker_lost=True)
def tick(model: str) -> str | None:
    from workers.rollout.control import RolloutControl

    state = RolloutControl.from_settings().tick(model)
    return state.status if state else None
