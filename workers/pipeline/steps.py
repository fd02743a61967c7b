"""What each pipeline step does: load state, call the pure training/gate code, persist outputs.

Each step takes the JSON context and returns it extended; its output is stored under
``keys.step_done(model, pipeline, step)`` so a re-delivered message (worker killed mid-step,
broker redelivery) returns the stored output instead of redoing the work. Files go under the
artifact root (``<root>/<model>/pipelines/<pipeline id>/``) with deterministic names, so a
step re-run after a crash overwrites its own partial files. The registry registers by
pipeline id, so exactly one version comes out of one pipeline.

A step whose worker process dies every time it runs it (OOM kill, segfault in a fit) would be
redelivered forever (the tasks ack late and are rejected back to the queue when their worker is
lost): ``run_step`` counts the starts that never came back and fails the pipeline once a step
has used up MAX_STEP_STARTS of them.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import redis
import structlog

from config.keys import Keys, keys_from_settings
from config.settings import get_settings
from events.bus import EventBus
from events.envelope import EVENT_TEXT_CHARS, new_event

log = structlog.get_logger(__name__)

SOURCE = "urn:retrain:pipeline"
STEP_OUTPUT_TTL_S = 14 * 86400
PIPELINE_RECORD_TTL_S = 30 * 86400
"""How long a pipeline's status hash (``keys.pipeline``: status, step timings, validation, gate,
error) is kept after its last update: a month for operators to look into a failed or slow run.
The model's versions, decisions and event history keep the lasting record."""


class PipelineStepFailed(Exception):
    """A step found a problem retrying cannot fix (bad data, failed gate); the message says what."""


class ValidationFailed(PipelineStepFailed):
    pass


class GateFailed(PipelineStepFailed):
    """The gate's verdict on a candidate (a failed check): the only failure reported as "blocked"."""


class PipelineSuperseded(PipelineStepFailed):
    """Another pipeline holds the model's single-flight slot (this one's was cleared as stale): stop here."""


class WorkerLostTooOften(PipelineStepFailed):
    """The step's worker process died in each of its last MAX_STEP_STARTS starts."""


MAX_STEP_STARTS = 3
"""How many times a step may start and never come back (its worker process died: OOM kill,
segfault) before the pipeline fails at that step instead of running it again. One lost worker
(a deploy, a node going away) is survived; a step that kills every worker it lands on costs
three starts, not a loop that holds the model's single-flight slot until it goes stale. Starts
that end in an exception (a transient error the task retries, a failure) do not count."""


class _Env:
    def __init__(self):
        from workers.connections import get_redis
        from workers.policies import policy_store
        from workers.registry.store import Registry

        self.settings = get_settings()
        self.redis = get_redis(self.settings)
        self.keys: Keys = keys_from_settings(self.settings)
        self.bus = EventBus.from_settings(self.redis, self.settings)
        self.registry = Registry(self.redis, self.keys)
        self.policies = policy_store(self.settings)

    def policy(self, model: str):
        policy = self.policies.get(model)
        if policy is None:
            raise PipelineStepFailed(f"no policy for model {model!r} in {self.settings.policy_dir}")
        return policy

    def workdir(self, ctx: dict[str, Any]) -> Path:
        d = Path(self.settings.artifact_dir) / ctx["model"] / "pipelines" / ctx["pipeline_id"]
        d.mkdir(parents=True, exist_ok=True)
        return d

    def emit(self, ctx: dict[str, Any], etype: str, **data: Any) -> None:
        base = {"pipeline_id": ctx["pipeline_id"]}
        if etype.startswith("training."):
            base["decision_id"] = ctx.get("decision_id")
        event = new_event(etype, ctx["model"], {**base, **data}, source=SOURCE, id=f"{ctx['pipeline_id']}:{etype}")
        self.bus.publish(event)

    def mark(self, ctx: dict[str, Any], **fields: Any) -> None:
        """Update the pipeline's status hash; it expires PIPELINE_RECORD_TTL_S after this update."""
        key = self.keys.pipeline(ctx["model"], ctx["pipeline_id"])
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in fields.items()})
        pipe.expire(key, PIPELINE_RECORD_TTL_S)
        pipe.execute()

    def production(self, model: str):
        version = self.registry.alias(model, "production")
        return self.registry.get(model, version) if version is not None else None


def run_step(step: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Run one step, or return its stored output if it already ran.

    Two deliveries of one step never run it at once: the second raises
    :class:`workers.pipeline.lease.StepBusy` (its task retries later). A step whose last
    MAX_STEP_STARTS starts all died with their process raises WorkerLostTooOften instead of running
    again: the task fails (and is acked), so the chain's failure handler records the pipeline as
    failed, emits ``training.failed``, alerts and frees the slot.
    """
    from workers.pipeline.lease import StepLease

    env = _Env()
    done_key = env.keys.step_done(ctx["model"], ctx["pipeline_id"], step)
    stored = env.redis.get(done_key)
    if stored is None:
        # One run at a time (StepBusy: another delivery is running it); looked up again under the lease,
        # in case that run finished in between.
        with StepLease(env.redis, env.keys.step_lease(ctx["model"], ctx["pipeline_id"], step)):
            stored = env.redis.get(done_key)
            if stored is None:
                _check_slot(env, step, ctx)
                return _run_once(env, step, ctx, done_key)
    log.info("pipeline.step_already_done", step=step)
    return json.loads(stored)


def _check_slot(env: "_Env", step: str, ctx: dict[str, Any]) -> None:
    """Refuse to run a step of a pipeline whose model's slot another pipeline holds now: the decision worker
    cleared this one's as stale (held for hours, e.g. queued behind training.high) and started another,
    and two pipelines must not run for one model. A free slot (released: a re-run) is no objection."""
    holder = env.redis.hget(env.keys.guard(ctx["model"]), "in_flight")
    if holder is not None and holder.decode() != ctx["pipeline_id"]:
        raise PipelineSuperseded(f"pipeline {holder.decode()} holds the single-flight slot of {ctx['model']} now "
                                 f"(this pipeline's was cleared as stale); {step} not run")


def _run_once(env: "_Env", step: str, ctx: dict[str, Any], done_key: str) -> dict[str, Any]:
    """Run the step (holding its lease), store its output, count the start (see run_step)."""
    starts_key = env.keys.step_deliveries(ctx["model"], ctx["pipeline_id"], step)
    pipe = env.redis.pipeline(transaction=True)
    pipe.incr(starts_key)
    pipe.expire(starts_key, STEP_OUTPUT_TTL_S)
    starts = int(pipe.execute()[0])
    if starts > MAX_STEP_STARTS:
        raise WorkerLostTooOften(f"worker lost {MAX_STEP_STARTS} times while running {step}")
    if starts > 1:
        log.warning("pipeline.step_restarted", step=step, start=starts, max_starts=MAX_STEP_STARTS)
    started = time.perf_counter()
    try:
        env.mark(ctx, status=f"running:{step}", **{f"{step}_started": f"{time.time():.3f}"})
        out = STEPS[step](env, ctx)
    except BaseException:
        _uncount_start(env, starts_key)
        raise
    seconds = time.perf_counter() - started
    out.setdefault("timings", {})[step] = round(seconds, 4)
    pipe = env.redis.pipeline(transaction=True)
    pipe.set(done_key, json.dumps(out, default=str), ex=STEP_OUTPUT_TTL_S)
    pipe.delete(starts_key)
    pipe.execute()
    env.mark(ctx, status=f"done:{step}", **{f"{step}_seconds": f"{seconds:.4f}"})
    _observe(step, seconds)
    log.info("pipeline.step_done", step=step, seconds=round(seconds, 3))
    return out


def _uncount_start(env: _Env, starts_key: str) -> None:
    """Take back a start that ended in an exception: its process came back, so it was no lost worker."""
    try:
        env.redis.decr(starts_key)
    except redis.RedisError as exc:  # Redis is what failed: the start stays counted, the task retries
        log.warning("pipeline.step_start_not_uncounted", error=str(exc))


def _observe(step: str, seconds: float) -> None:
    try:
        from workers.metrics import PIPELINE_STEP_SECONDS

        PIPELINE_STEP_SECONDS.labels(step=step).observe(seconds)
    except ImportError:  # metrics module optional in offline use
        pass


# --- the steps -------------------------------------------------------------------------------
def validate_data(env: _Env, ctx: dict[str, Any]) -> dict[str, Any]:
    from workers.training.data import DataError, load_window, time_holdout
    from workers.training.validate import validate_for_policy

    model = ctx["model"]
    policy = env.policy(model)
    env.emit(ctx, "training.started", step="validate_data")
    if not policy.data.source:
        raise PipelineStepFailed(f"policy of {model} has no [data] source")
    since = ctx.get("drift_onset") if policy.data.window_from_drift_onset else None
    try:
        window = load_window(policy.data.source, policy.data.time_column, policy.data.window, since=since,
                             query=policy.data.query)
    except DataError as exc:
        raise ValidationFailed(f"cannot read training data: {exc}") from None
    production = env.production(model)
    schema = production.training_schema if production and production.training_schema else None
    result = validate_for_policy(window.frame, policy, schema)
    env.mark(ctx, validation=result.to_dict(), data_window=window.to_dict())
    if not result.passed:
        raise ValidationFailed(result.summary())
    split = time_holdout(window.frame, policy.data.time_column, policy.data.holdout_fraction)
    work = env.workdir(ctx)
    split.train.to_parquet(work / "train.parquet", index=False)
    split.test.to_parquet(work / "holdout.parquet", index=False)
    from events.producers.upstream import schema_fingerprint, schema_of_frame, schema_of_source

    # Read as the upstream monitor reads the source later (Arrow types): pandas dtypes differ for dates,
    # decimals and booleans with blanks, and every later look reported an unchanged source as a breaking change.
    try:
        source_schema = schema_of_source(policy.data.source)
    except Exception as exc:  # noqa: BLE001 - the frame's own types, as before, rather than no schema
        log.warning("pipeline.source_schema_from_frame", error=f"{type(exc).__name__}: {exc}")
        source_schema = schema_of_frame(window.frame)
    return {**ctx, "train_uri": str(work / "train.parquet"), "holdout_uri": str(work / "holdout.parquet"),
            "source_schema": source_schema, "schema_fingerprint": schema_fingerprint(source_schema),
            "data_window": window.to_dict(), "holdout_cutoff": split.cutoff.isoformat() if split.cutoff else None,
            "validation": result.to_dict(), "n_train": len(split.train), "n_holdout": len(split.test)}


def train(env: _Env, ctx: dict[str, Any]) -> dict[str, Any]:
    from events.monitors.drift import build_profile
    from workers.registry.artifacts import save_artifact, sha256_hex
    from workers.training.fit import train_candidate

    model = ctx["model"]
    policy = env.policy(model)
    frame = pd.read_parquet(ctx["train_uri"])
    production = env.production(model)
    fit = train_candidate(frame, policy, production_hyperparams=production.params if production else None)
    work = env.workdir(ctx)
    ref = save_artifact(fit.pipeline, work / "candidate.skops")
    exclude = [policy.model.target, policy.data.time_column]
    profile = build_profile(frame, categorical=policy.data.categorical, exclude=exclude)
    profile_path = work / "reference_profile.json"
    profile.save(profile_path)
    summary = fit.to_dict()
    env.emit(ctx, "training.succeeded", step="train")
    return {**ctx, "artifact_uri": ref.uri, "sha256": ref.sha256, "size_bytes": ref.size_bytes,
            "fit": {k: summary[k] for k in ("best_params", "cv_score", "scoring", "estimator", "search",
                                            "seeded_with", "n_train", "fit_seconds")},
            "training_schema": summary["schema"],
            "reference_profile_uri": str(profile_path),
            "reference_profile_sha256": sha256_hex(profile_path.read_bytes())}


def gate(env: _Env, ctx: dict[str, Any]) -> dict[str, Any]:
    from workers.gate.checks import run_gate
    from workers.registry.artifacts import load_artifact

    model = ctx["model"]
    rejected = _rejected_version(env, ctx)
    if rejected is not None:
        _reject(env, ctx, rejected, rejected.gate or {})  # a re-run: the first verdict stands
    policy = env.policy(model)
    candidate = load_artifact(ctx["artifact_uri"], ctx["sha256"], env.settings.trusted_prefixes)
    production_record = env.production(model)
    production = None
    if production_record is not None:
        production = env.registry.load(model, production_record.version, env.settings.trusted_prefixes)
    holdout = pd.read_parquet(ctx["holdout_uri"])
    report = run_gate(candidate, production, holdout, policy, validation=ctx.get("validation"),
                      candidate_size_bytes=ctx.get("size_bytes"))
    result = report.to_dict()
    env.mark(ctx, gate=result)
    if not report.passed and not ctx.get("force"):
        _reject(env, ctx, _register(env, ctx, status="rejected", gate=result), result)
    env.emit(ctx, "gate.passed", passed=True, failed_checks=report.failed, checks=_check_summary(result))
    return {**ctx, "gate": result, "reference_scores": reference_scores(candidate, holdout, policy)}


def _rejected_version(env: _Env, ctx: dict[str, Any]):
    """The version this pipeline registered as ``rejected`` (None if none, or the pipeline is forced)."""
    if ctx.get("force"):
        return None
    version = env.registry.find_by_pipeline(ctx["model"], ctx["pipeline_id"])
    return version if version is not None and version.status == "rejected" else None


def _reject(env: _Env, ctx: dict[str, Any], version, result: dict[str, Any]) -> None:
    """Emit ``gate.failed`` for ``version`` and raise GateFailed, built from the stored gate report only.

    The first rejection registers the version as ``rejected`` with its report; a re-run (the emit
    failed and the task retried, or the message was redelivered) comes here again with the stored
    report, so it emits the same event (same id) and fails with the same message, whatever a
    timing-based check would say on a second look.
    """
    env.emit(ctx, "gate.failed", version=version.version, passed=False, failed_checks=result.get("failed", []),
             checks=_check_summary(result))
    raise GateFailed(f"gate failed for v{version.version}: " + ", ".join(
        f"{c['name']} ({c.get('detail') or c.get('value')})" for c in result.get("checks", [])
        if not c["passed"] and not c.get("skipped")))


def stage(env: _Env, ctx: dict[str, Any]) -> dict[str, Any]:
    """Register the version as ``staged`` and point ``candidate`` at it; never a version the gate
    rejected (unless the pipeline is forced): that fails again with the gate's GateFailed."""
    rejected = _rejected_version(env, ctx)
    if rejected is not None:
        _reject(env, ctx, rejected, rejected.gate or {})
    version = _register(env, ctx, status="staged", gate=ctx.get("gate"))
    if version.status == "rejected" and ctx.get("force"):
        version = env.registry.set_status(ctx["model"], version.version, "staged", who="operator",
                                          why="forced past the gate")
    env.registry.set_alias(ctx["model"], "candidate", version.version, who="pipeline",
                           why=f"staged by {ctx['pipeline_id']}")
    env.emit(ctx, "model.staged", version=version.version, artifact_uri=version.artifact_uri)
    return {**ctx, "version": version.version}


FIRST_MODEL_PROMOTED = "first model: promoted directly"


def start_rollout(env: _Env, ctx: dict[str, Any]) -> dict[str, Any]:
    """Promote a model's first version directly, or start the rollout of the staged version.

    Idempotent: a re-run after a crash (before this step's output was stored) finds the rollout
    this pipeline started (active or finished) or the first model already in production, and
    returns the same result without starting anything again. A version that is no longer
    ``staged`` otherwise (a re-run so late that the version has moved on) is left alone.
    """
    from workers.rollout.control import RolloutControl

    model, version = ctx["model"], int(ctx["version"])
    control = RolloutControl(env.redis, env.keys, policies=env.policies)
    production = env.registry.alias(model, "production")
    started = control.started_by(model, version, ctx["pipeline_id"])
    if not started and production in (None, version):
        promote_first(env, model, version, why=f"first model of {model} (pipeline {ctx['pipeline_id']})")
        _release(env, ctx)
        return {**ctx, "rollout": FIRST_MODEL_PROMOTED}
    status = env.registry.get(model, version).status
    if not started and status != "staged":
        log.warning("pipeline.rollout_step_rerun_skipped", version=version, status=status)
        _release(env, ctx)
        return {**ctx, "rollout": f"not started: v{version} is already {status}"}
    state = control.begin(model, version, pipeline_id=ctx["pipeline_id"], who="pipeline",
                          why=f"decision {ctx.get('decision_id')}")
    env.mark(ctx, status="rollout", rollout_status=state.status)
    return {**ctx, "rollout": state.status}


STEPS = {"validate_data": validate_data, "train": train, "gate": gate, "stage": stage,
         "start_rollout": start_rollout}


REFERENCE_SCORES_KEPT = 2000


def reference_scores(model, holdout: pd.DataFrame, policy) -> list[float]:
    """The model's scores on its holdout (positive-class probability, top-class probability or
    the prediction), sampled to at most REFERENCE_SCORES_KEPT values: the concept-drift reference."""
    import numpy as np

    from celery.exceptions import SoftTimeLimitExceeded

    X = holdout.drop(columns=[policy.model.target, policy.data.time_column], errors="ignore")
    try:
        if policy.model.task == "regression" or not hasattr(model, "predict_proba"):
            scores = np.asarray(model.predict(X), dtype=float)
        else:
            proba = np.asarray(model.predict_proba(X), dtype=float)
            scores = proba[:, 1] if proba.shape[1] == 2 else proba.max(axis=1)
    except SoftTimeLimitExceeded:
        raise  # the task's time is up: stop, do not carry on without a reference
    except Exception as exc:  # noqa: BLE001 - no reference, no concept-drift check; say so
        log.warning("pipeline.reference_scores_failed", error=str(exc))
        return []
    if len(scores) > REFERENCE_SCORES_KEPT:
        scores = np.random.default_rng(0).choice(scores, REFERENCE_SCORES_KEPT, replace=False)
    return [round(float(s), 6) for s in scores]


def _check_summary(report: dict) -> list[dict]:
    return [{"name": c["name"], "passed": c["passed"], "skipped": bool(c.get("skipped"))}
            for c in report.get("checks", [])]


# --- helpers ----------------------------------------------------------------------------------
def _register(env: _Env, ctx: dict[str, Any], *, status: str, gate: dict | None):
    from workers.registry.store import ModelVersion

    existing = env.registry.find_by_pipeline(ctx["model"], ctx["pipeline_id"])
    if existing is not None:
        return existing
    policy = env.policy(ctx["model"])
    production = env.production(ctx["model"])
    decision = _decision(env, ctx)
    fit = ctx.get("fit", {})
    return env.registry.register(ModelVersion(
        model=ctx["model"], version=0, status=status,
        artifact_uri=ctx["artifact_uri"], sha256=ctx["sha256"], size_bytes=ctx.get("size_bytes", 0),
        metrics=_metrics(gate), params=fit.get("best_params", {}), estimator=fit.get("estimator", ""),
        task=policy.model.task, data_window=ctx.get("data_window", {}),
        data_fingerprint=(ctx.get("data_window") or {}).get("fingerprint", ""),
        training_schema=ctx.get("training_schema") or {},
        reference_profile_uri=ctx.get("reference_profile_uri", ""),
        reference_profile_sha256=ctx.get("reference_profile_sha256", ""),
        decision_id=ctx.get("decision_id"), trigger_event_ids=ctx.get("event_ids", []),
        trigger_event_count=ctx.get("event_count", len(ctx.get("event_ids", []))),
        triggers=ctx.get("triggers", []), pipeline_id=ctx["pipeline_id"],
        parent_version=production.version if production else None, gate=gate,
        feature_version=(decision or {}).get("feature_version"),
        schema_fingerprint=ctx.get("schema_fingerprint"), source_schema=ctx.get("source_schema") or {},
        reference_scores=ctx.get("reference_scores") or [],
    ))


def _metrics(gate: dict | None) -> dict[str, Any]:
    out = {}
    for c in (gate or {}).get("checks", []):
        if c["name"] == "minimum_performance" and c.get("value") is not None:
            out[c.get("metric") or "primary"] = c["value"]
            out["primary"] = c["value"]
    return out


def _decision(env: _Env, ctx: dict[str, Any]) -> dict | None:
    from workers.decision.state import DecisionStore

    if not ctx.get("decision_id"):
        return None
    return DecisionStore(env.redis, env.keys).get_record(ctx["decision_id"])


def promote_first(env: _Env, model: str, version: int, why: str) -> None:
    """The first model of a name has nothing to roll out against: it becomes production.

    Idempotent: a re-run completes what a crashed run left undone and repeats nothing else (no
    second alias move; the traffic table is written only while it names no production, so a
    late re-run never overwrites a table a later rollout wrote; the event has a fixed id).
    """
    from workers.router.traffic import TrafficTable, read_traffic, write_traffic

    completed = new_event("rollout.completed", model, {"version": version, "traffic": 100, "reason": why},
                          source=SOURCE, id=f"{model}:first:{version}")
    if env.registry.get(model, version).status != "production":
        env.registry.set_status(model, version, "production", who="pipeline", why=why)
    if env.registry.alias(model, "production") != version:
        # The event goes in with the alias: whoever sees the new production and reacts (a monitor's
        # drift signal, say) publishes after it, so the decision worker's reset of the signals
        # measured against the old model never wipes a signal about the new one.
        pipe = env.redis.pipeline(transaction=True)
        env.registry.set_alias(model, "production", version, who="pipeline", why=why, pipe=pipe)
        env.registry.set_alias(model, "candidate", None, who="pipeline", why=why, pipe=pipe)
        left_out = env.bus.publish_in(pipe, [completed]).rejected
        pipe.execute()
        if left_out:  # over the size limit: published on its own, which fails loudly
            env.bus.publish(completed)
    else:  # a re-run: the move (and its event) happened; published again under its id, which consumers skip
        env.bus.publish(completed)
    if not read_traffic(env.redis, env.keys, model).production:
        write_traffic(env.redis, env.keys, model, TrafficTable(production=str(version), previous="", candidate="",
                                                              candidate_percent=0.0, shadow=""))


def _release(env: _Env, ctx: dict[str, Any]) -> None:
    from workers.decision.state import DecisionStore

    DecisionStore(env.redis, env.keys).release(ctx["model"], ctx["pipeline_id"])


def handle_failure(ctx: dict[str, Any], step: str, exc: BaseException) -> None:
    """link_error: record, emit training.failed / gate.failed, alert, free the single-flight slot.

    Safe to run twice (a redelivered task fails again and calls it again): the events and the
    alert have ids made of the pipeline id and the step, so the alert is recorded and sent once.
    """
    from workers.alerts import raise_alert, webhook_url_from_settings

    env = _Env()
    reason = str(exc) or type(exc).__name__
    # Only the gate's verdict is "blocked"; anything else from the gate (a tampered production
    # artifact, a bad policy, a lost worker) is a breakdown like in any other step.
    blocked = isinstance(exc, GateFailed)
    superseded = isinstance(exc, PipelineSuperseded)
    env.mark(ctx, status=f"failed:{step}", failed_step=step, error=reason,
             failed_at=datetime.now(timezone.utc).isoformat())
    if not blocked:
        env.emit(ctx, "training.failed", step=step, error=reason[:EVENT_TEXT_CHARS])
    title = ("quality gate blocked a candidate" if blocked else "training pipeline superseded" if superseded
             else f"training pipeline failed at {step}")
    raise_alert(env.redis, env.keys, env.bus, ctx["model"], "warning" if blocked or superseded else "critical",
                title, reason[:EVENT_TEXT_CHARS], webhook_url=webhook_url_from_settings(env.settings),
                event_id=f"{ctx['pipeline_id']}:alert.raised:{step}", pipeline_id=ctx["pipeline_id"])
    _release(env, ctx)
    log.warning("pipeline.failed", model=ctx["model"], step=step, error=reason)
