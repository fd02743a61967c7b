"""The retraining decision: pure policy code (no Celery, no Redis).

:mod:`.triggers` holds the model's signals and one small callable per trigger; :mod:`.policy`
combines them into a :class:`~.policy.Decision` and applies the guards (debounce, cooldown,
budget, single flight) that the decision worker persists state for.
"""

from workers.decision.policy import (
    Decision,
    GuardedDecision,
    GuardResult,
    GuardState,
    apply_guards,
    budget,
    cooldown,
    debounce,
    evaluate,
    queue_for,
    single_flight,
)
from workers.decision.triggers import (
    TRIGGERS,
    Alert,
    ModelSignals,
    Suppression,
    TriggerResult,
    UpstreamChanges,
)

__all__ = [
    "TRIGGERS",
    "Alert",
    "Decision",
    "GuardResult",
    "GuardState",
    "GuardedDecision",
    "ModelSignals",
    "Suppression",
    "TriggerResult",
    "UpstreamChanges",
    "apply_guards",
    "budget",
    "cooldown",
    "debounce",
    "evaluate",
    "queue_for",
    "single_flight",
]
