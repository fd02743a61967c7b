"""Every Redis key the system uses is built here, and only here.

Keys start with the configured prefix. Per-model keys carry the model name as a Redis
Cluster hash tag (``{churn}``) so all of one model's keys live in one slot and can be
changed together in one MULTI/EXEC. Stream shards carry their own tag.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
"""A model name: in every key and every event subject of the model (policies, events, the CLI)."""


class StreamLayoutError(ValueError):
    """The Redis holds event streams written with another shard count than this process uses."""


@dataclass(frozen=True)
class Keys:
    prefix: str = "retrain"
    shards: int = 4

    # --- the event log ------------------------------------------------------------------
    def shard_of(self, model: str) -> int:
        return zlib.crc32(model.encode()) % self.shards

    def events(self, shard: int) -> str:
        """One shard of the event stream (every model's signals and lifecycle events)."""
        return f"{self.prefix}:events:{{s{shard}}}"

    def events_for(self, model: str) -> str:
        return self.events(self.shard_of(model))

    def all_event_streams(self) -> list[str]:
        return [self.events(i) for i in range(self.shards)]

    def seen(self, shard: int) -> str:
        """Sorted set of handled event ids of one shard (score = time), for de-duplication.

        Kept per shard, beside the stream it guards, so one ZMSCORE/ZADD covers a whole batch. A
        negative score is a claim (minus the time a consumer took the id to handle it), not a mark.
        """
        return f"{self.prefix}:seen:{{s{shard}}}"

    def stream_layout(self) -> str:
        """String: the number of event stream shards the data in this Redis was written with."""
        return f"{self.prefix}:events:shards"

    def dead_letters(self) -> str:
        return f"{self.prefix}:deadletter:{{dlq}}"

    def last_error(self, group: str, stream: str, entry_id: str) -> str:
        """String (with a TTL): the last error handling one stream entry raised in a consumer group, for its dead letter."""
        return f"{self.prefix}:deadletter:lasterror:{group}:{stream}:{entry_id}"

    # --- per model -----------------------------------------------------------------------
    def _model(self, model: str, what: str) -> str:
        return f"{self.prefix}:model:{{{model}}}:{what}"

    def signals(self, model: str) -> str:
        """Hash: latest value of every signal for the model."""
        return self._model(model, "signals")

    def drift_history(self, model: str) -> str:
        return self._model(model, "drift_history")

    def guard(self, model: str) -> str:
        """Hash: last training, pending signals window, in-flight pipeline."""
        return self._model(model, "guard")

    def trainings(self, model: str) -> str:
        """Sorted set of training start times (for the daily budget)."""
        return self._model(model, "trainings")

    def pending_events(self, model: str) -> str:
        """List of event ids that contributed to the next decision."""
        return self._model(model, "pending_events")

    def decisions(self, model: str) -> str:
        """Sorted set of the model's decision ids by time."""
        return self._model(model, "decisions")

    def decision(self, model: str, decision_id: str) -> str:
        return self._model(model, f"decision:{decision_id}")

    def pipeline(self, model: str, pipeline_id: str) -> str:
        return self._model(model, f"pipeline:{pipeline_id}")

    def step_done(self, model: str, pipeline_id: str, step: str) -> str:
        return self._model(model, f"pipeline:{pipeline_id}:{step}")

    def step_lease(self, model: str, pipeline_id: str, step: str) -> str:
        """String (with a TTL, renewed): the run of a pipeline step that holds it ("host:pid:nonce")."""
        return self._model(model, f"pipeline:{pipeline_id}:{step}:lease")

    def step_deliveries(self, model: str, pipeline_id: str, step: str) -> str:
        """Counter: starts of a pipeline step that never came back (a lost worker); deleted when the step succeeds."""
        return self._model(model, f"pipeline:{pipeline_id}:{step}:deliveries")

    def versions(self, model: str) -> str:
        """Hash: version number -> version record (JSON)."""
        return self._model(model, "versions")

    def version_counter(self, model: str) -> str:
        return self._model(model, "version_counter")

    def aliases(self, model: str) -> str:
        """Hash: alias (production, previous, candidate, ...) -> version."""
        return self._model(model, "aliases")

    def alias_history(self, model: str) -> str:
        """Stream: append-only log of alias moves (who, why, when)."""
        return self._model(model, "alias_history")

    def rollout(self, model: str) -> str:
        """The rollout state machine (JSON with a revision for optimistic concurrency)."""
        return self._model(model, "rollout")

    def traffic(self, model: str) -> str:
        """Hash: the traffic table the router serves (with a version number)."""
        return self._model(model, "traffic")

    def requests(self, model: str) -> str:
        """Stream: per-request log written by the router."""
        return self._model(model, "requests")

    def feedback(self, model: str) -> str:
        """Stream: delayed ground-truth labels by request id."""
        return self._model(model, "feedback")

    def history(self, model: str) -> str:
        """Stream: the model's own event log (for ``retrain history``)."""
        return self._model(model, "history")

    def alerts(self, model: str) -> str:
        return self._model(model, "alerts")

    def alert_sent(self, alert_id: str) -> str:
        """String (with a TTL): an alert's webhook is being sent or was sent ("sending" / "sent")."""
        return f"{self.prefix}:alert:sent:{alert_id}"

    def alert_webhook_outbox(self) -> str:
        """Hash: alert id -> alert event committed by a decision whose webhook post has not been attempted yet."""
        return f"{self.prefix}:alert:webhook_outbox"

    def lock(self, model: str, name: str) -> str:
        return self._model(model, f"lock:{name}")

    # --- global --------------------------------------------------------------------------
    def models(self) -> str:
        """Set of every model name the system has seen."""
        return f"{self.prefix}:models"

    def enqueue_outbox(self) -> str:
        """Hash: pipeline id -> decision record whose pipeline is decided but not yet enqueued on Celery."""
        return f"{self.prefix}:decision:enqueue_outbox"

    def enqueue_queue(self) -> str:
        """List: pipeline ids of outbox entries for the enqueue relay to put on Celery, oldest first."""
        return f"{self.prefix}:decision:enqueue_queue"

    def evaluation_errors(self) -> str:
        """Hash: model -> why its last decision evaluation failed (cleared when one succeeds)."""
        return f"{self.prefix}:decision:evaluation_errors"

    def traffic_channel(self) -> str:
        """Pub/sub channel announcing traffic-table changes."""
        return f"{self.prefix}:traffic-changed"

    def active_rollouts(self) -> str:
        """Set of models whose rollout is not finished, or finished with actions not yet applied (what the ticks visit)."""
        return f"{self.prefix}:rollouts-active"

    def monitor_runs(self) -> str:
        """Hash: model -> time its monitors last ran (the periodic monitor task's clock)."""
        return f"{self.prefix}:monitor-runs"

    def due(self) -> str:
        """Sorted set: model -> time its next decision is due (debounce, follow-ups)."""
        return f"{self.prefix}:decision-due"

    def decision_index(self) -> str:
        """Hash: decision id -> model name (so ``explain ID`` needs no model)."""
        return f"{self.prefix}:decision-index"

    def pattern(self) -> str:
        """Glob matching every key this module builds."""
        return f"{self.prefix}:*"

    # --- keys our libraries write (named here so nothing else spells them) ---------------------
    def redbeat_prefix(self) -> str:
        """Prefix of every celery-redbeat key (the ``redbeat_key_prefix`` setting)."""
        return f"{self.prefix}:redbeat:"

    def redbeat_entry(self, name: str) -> str:
        """Key of the redbeat schedule entry ``name`` (redbeat writes it as its prefix + name); an
        entry-name prefix gives the prefix of those entries' keys."""
        return self.redbeat_prefix() + name

    def celery_queue(self, name: str, priority: int = 0) -> str:
        """List of a Celery queue's messages at one priority step, as kombu's Redis transport names
        it: ``name`` for step 0, ``name\\x06\\x16<step>`` for the others. Not prefixed: the broker's
        ``global_keyprefix`` is empty."""
        return f"{name}\x06\x16{priority}" if priority else name


def keys_from_settings(settings=None) -> Keys:
    from config.settings import get_settings

    s = settings or get_settings()
    return Keys(prefix=s.key_prefix, shards=s.stream_shards)
