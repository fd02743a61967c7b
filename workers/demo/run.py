"""The demo: a real local system, a served model with live traffic, and three scenarios.

1. **drift** -- live inputs drift; the drift monitor (the real check, against the production
   model's reference profile) publishes rising scores; the decision worker decides with
   reasons; the pipeline trains with a hyperparameter search; the gate passes; the rollout goes
   shadow -> canary -> 25 % -> 50 % -> 100 % on live evidence; the candidate is promoted.
2. **corrupted data** -- the next retrain reads training data whose labels were corrupted
   upstream; the gate blocks the candidate with named failed checks; an alert is raised;
   production is unchanged.
3. **worse live** -- training data recorded during a skewed period gives a candidate that
   passes the gate on its own holdout but is worse on real traffic; the canary's analysis on
   delayed labels rolls it back; the previous production serves again.

Time is compressed by the demo policy (phases in seconds). Every process started is stopped,
also on Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import structlog

from workers.simulate import CATEGORICAL, TARGET, TIME, write_days

log = structlog.get_logger(__name__)

MODEL = "churn"
RATE = 180.0
LABEL_DELAY_S = 3.0
DEMO_POLICY = """
[model]
name = "{model}"
task = "binary"
target = "{target}"

[data]
source = "{source}"
time_column = "{time}"
window = "30d"
categorical = {categorical}
min_rows = 300
holdout_fraction = 0.25

[triggers]
# The demo's performance monitor draws the live accuracy on the timeline; it is not what
# triggers the scenarios here, so its threshold is set out of reach.
performance_drop_threshold = 0.5
drift_threshold = 0.15
drift_persistence_k = 2
drift_persistence_n = 3
debounce_quiet = "0.5s"
debounce_max_wait = "4s"
cooldown = "10m"
max_trainings_per_day = 50
new_data_threshold = 100000000

[drift]
dataset_drift_share = 0.3

[training]
estimator = "sklearn.linear_model.LogisticRegression"
params = {{ max_iter = 300 }}

[training.search]
method = "halving"
n_candidates = 4
cv = 3
space = {{ C = [0.05, 0.2, 1.0, 5.0] }}

[gate]
min_accuracy = 0.65
max_regression = 0.03
min_prediction_correlation = 0.6
max_latency_p99_ms = 50
min_throughput_rows_per_s = 200
max_model_size_mb = 50

[rollout]
# A retrain after real drift moves the score distribution on purpose; the demo allows a large
# shift (the default is 0.25) so that labels, not the shift alone, judge the good candidate.
max_score_psi = 2.0
max_wait = "25s"
on_insufficient_evidence = "pause"
min_agreement = 0.75
max_accuracy_drop = 0.04
# The shadow answers in its own process on the same two cores as everything else here;
# its latency is noisy, so the demo tolerates a large ratio (the default is 1.5).
max_latency_p99_ratio = 10.0
max_error_rate_increase = 0.02

[[rollout.phases]]
name = "shadow"
traffic = 0
min_duration = "2s"
min_requests = 150

[[rollout.phases]]
name = "canary"
traffic = 15
min_duration = "4s"
min_requests = 60
min_labeled = 50

[[rollout.phases]]
name = "25%"
traffic = 25
min_duration = "2s"
min_requests = 60
min_labeled = 40

[[rollout.phases]]
name = "50%"
traffic = 50
min_duration = "2s"
min_requests = 80
min_labeled = 40

[[rollout.phases]]
name = "100%"
traffic = 100
min_duration = "2s"
min_requests = 80
min_labeled = 40
"""


class DemoFailed(RuntimeError):
    pass


MARKER = ".retrain-demo"
"""The file that marks a folder as the demo's own: only such a folder is ever emptied."""


class StateDirRefused(ValueError):
    """The demo was pointed at a folder it did not make (it would have to delete someone's files)."""


def check_state_dir(state_dir: Path) -> None:
    """Raise :class:`StateDirRefused` unless ``state_dir`` is missing, empty or marked as the demo's.

    The demo starts from an empty folder, so it deletes what a previous run left; a folder
    without the marker may hold anything (``--state-dir ~`` is one typo away) and is refused.
    """
    state_dir = Path(state_dir)
    if not state_dir.exists() and not state_dir.is_symlink():
        return
    if not state_dir.is_dir() or state_dir.is_symlink():
        raise StateDirRefused(f"{state_dir} is not a folder the demo can use: give a new or empty folder")
    if (state_dir / MARKER).is_file() or not any(state_dir.iterdir()):
        return
    raise StateDirRefused(f"{state_dir} is not empty and was not made by the demo (no {MARKER} file): "
                          "the demo clears its folder, so give a new or empty folder")


def reset_state_dir(state_dir: Path) -> None:
    """Empty the demo's folder (only one :func:`check_state_dir` accepts) and mark it as the demo's.

    The folder itself stays (its mode, or a mount point); a symlink inside goes, not its target.
    """
    state_dir = Path(state_dir)
    check_state_dir(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    for entry in state_dir.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (state_dir / MARKER).write_text("Made by 'retrain demo', which empties this folder on its next run.\n")


@dataclass
class Scenario:
    name: str
    expected: str
    outcome: str = "not run"
    ok: bool = False
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "expected": self.expected, "outcome": self.outcome, "ok": self.ok,
                "seconds": round(self.seconds, 1), **self.figures}


class Demo:
    def __init__(self, state_dir: Path, *, live: bool = True, say: Callable[[str], None] = print):
        self.state_dir = Path(state_dir)
        self.live = live
        self.say = say
        self.scenarios = [
            Scenario("drift", "retrain with search, gate passes, shadow -> canary -> 25/50/100 %, promoted"),
            Scenario("corrupted data", "gate blocks the candidate with named failed checks, alert, production unchanged"),
            Scenario("worse live", "gate passes; live analysis (shadow score shift or canary accuracy on delayed "
                                   "labels) rolls it back before full traffic; previous production serves"),
        ]
        self.started = time.monotonic()
        self.system = None
        self.traffic = None
        self.router = None
        self.view = None
        self.status_line = "starting"

    # --- setup ------------------------------------------------------------------------------
    def prepare(self) -> None:
        reset_state_dir(self.state_dir)
        self.data_dir = self.state_dir / "data"
        self.policy_dir = self.state_dir / "policies"
        self.policy_dir.mkdir(parents=True)
        write_days(self.data_dir, days=6, rows_per_day=500, seed=1)
        (self.policy_dir / f"{MODEL}.toml").write_text(DEMO_POLICY.format(
            model=MODEL, target=TARGET, time=TIME, source=f"{self.data_dir}/**/*.parquet",
            categorical=json.dumps(CATEGORICAL)))

    def start_system(self) -> None:
        from workers.supervisor import ROLES, LocalSystem

        self.system = LocalSystem(self.state_dir, env={
            "RETRAIN_POLICY_DIR": str(self.policy_dir),
            "RETRAIN_ARTIFACT_ROOT": str(self.state_dir / "artifacts"),
            "RETRAIN_ROLLOUT_TICK": "0.5s",
            "RETRAIN_BUS_BLOCK_MS": "100",
            "RETRAIN_BUS_CLAIM_IDLE": "10s",
            "RETRAIN_LOG_LEVEL": "INFO",
        })
        url = self.system.start_redis()
        for k, v in {**self.system.env, "RETRAIN_REDIS_URL": url, "RETRAIN_STATE_DIR": str(self.state_dir)}.items():
            os.environ[k] = v
        from config.settings import get_settings, reset_settings
        from workers.app import _configure, app
        from workers.connections import get_redis, reset_clients

        reset_settings()
        reset_clients()
        _configure(app)
        self.system.start_workers(ROLES)
        self.system.start_beat()
        from config.keys import keys_from_settings
        from events.bus import EventBus
        from workers.registry.store import Registry

        self.settings = get_settings()
        self.redis = get_redis()
        self.keys = keys_from_settings(self.settings)
        self.bus = EventBus.from_settings(self.redis, self.settings)
        self.registry = Registry(self.redis, self.keys)
        self.system.wait_for_workers(app, [f"{r}@{os.uname().nodename}" for r in ROLES], timeout=90)

    # --- helpers -----------------------------------------------------------------------------
    def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.system.check_alive()
            value = predicate()
            if value:
                return value
            time.sleep(0.2)
        raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")

    def note(self, text: str) -> None:
        self.status_line = text
        if not self.live:
            self.say(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    def history_types(self, since_ms: int = 0) -> list[dict]:
        out = []
        for _, fields in self.redis.xrange(self.keys.history(MODEL), min=f"{since_ms}-0"):
            out.append(json.loads(fields[b"e"]))
        return out

    def request_retrain(self, reason: str) -> None:
        from events.envelope import new_event

        self.bus.publish(new_event("retrain.requested", MODEL, {"reason": reason, "requested_by": "demo"}))

    def production(self) -> int | None:
        return self.registry.alias(MODEL, "production")

    def latest_version(self):
        versions = self.registry.versions(MODEL)
        return versions[-1] if versions else None

    def rollout(self) -> dict | None:
        raw = self.redis.hget(self.keys.rollout(MODEL), "state")
        return json.loads(raw) if raw else None

    def _finished_rollout(self, version: int) -> dict | None:
        state = self.rollout()
        if state and state["candidate"] == str(version) and state["status"] in ("completed", "rolled_back", "aborted"):
            return state
        return None

    # --- the scenarios ----------------------------------------------------------------------
    def bootstrap(self) -> None:
        self.note("training the first model (v1) from the data source")
        self.request_retrain("initial model")
        self.wait(lambda: self.production() == 1, 60, "the first model to be promoted")
        from workers.demo.traffic import TrafficSimulator
        from workers.router.router import Router

        self.router = Router(MODEL, self.redis, self.keys, self.registry)
        self.traffic = TrafficSimulator(self.router, rate=RATE, label_delay=LABEL_DELAY_S).start()
        self.wait(lambda: self.traffic.sent > 100, 20, "live traffic on v1")
        import threading

        self._perf_stop = threading.Event()
        self._perf_thread = threading.Thread(target=self._performance_monitor, daemon=True)
        self._perf_thread.start()
        self.note("v1 serves live traffic; labels arrive 3 s after each answer")

    def _performance_monitor(self) -> None:
        """Every 2 s: the production version's live accuracy on the last 10 s of labeled answers."""
        from events.producers.performance import measure_performance, performance_event, read_request_log

        while not self._perf_stop.wait(2.0):
            try:
                version = self.production()
                since = int((time.time() - 10) * 1000)
                predictions, labels = read_request_log(self.redis, self.keys, MODEL, since)
                m = measure_performance(predictions, labels, "binary", version=str(version), min_labeled=50)
                if m.value is not None:
                    self.bus.publish(performance_event(MODEL, m, version=version, source="urn:retrain:demo-monitor"))
            except Exception as exc:  # noqa: BLE001 - the picture is a bonus; never stop the demo
                log.warning("demo.performance_monitor", error=str(exc))

    def scenario_drift(self, sc: Scenario) -> None:
        from config.policy import load_policy
        from events.envelope import new_event
        from events.monitors.drift import ReferenceProfile, check_drift

        policy = load_policy(self.policy_dir / f"{MODEL}.toml")
        v1 = self.registry.get(MODEL, self.production())
        profile = ReferenceProfile.load(v1.reference_profile_uri)
        # Fresh production data lands in the source with the new distribution.
        write_days(self.data_dir, days=2, rows_per_day=700, seed=11, shift=1.0)
        t0 = int(time.time() * 1000)
        scores = []
        for shift in (0.2, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0):
            self.traffic.shift = shift
            time.sleep(0.8)
            report = check_drift(profile, self.traffic.recent_frame(), policy.drift)
            event = new_event("drift.data", MODEL, {"drift_score": report.drift_score,
                                                    "drifted_features": report.drifted_features,
                                                    "dataset_drift": report.dataset_drift},
                              source="urn:retrain:demo-monitor")
            self.bus.publish(event)
            scores.append(round(report.drift_score, 2))
            self.note(f"drift monitor: score {report.drift_score:.2f} ({', '.join(report.drifted_features) or 'none'})")
            if self.redis.hget(self.keys.guard(MODEL), "in_flight"):
                break
        decided = self.wait(lambda: [e for e in self.history_types(t0) if e["type"] == "retrain.decided"], 20,
                            "the drift decision")[0]
        self.note(f"decision {decided['data']['decision_id']}: {decided['data']['urgency']} urgency, "
                  f"triggers {', '.join(decided['data']['triggers'])}")
        staged = self.wait(lambda: self.registry.alias(MODEL, "candidate"), 45, "a staged candidate")
        self.note(f"v{staged} passed the gate and is in its rollout")
        final = self.wait(lambda: self._finished_rollout(staged), 60, "the rollout to finish")
        phases = [e["data"].get("phase") for e in self.history_types(t0) if e["type"] in ("rollout.started", "rollout.advanced")]
        version = self.registry.get(MODEL, staged)
        sc.figures = {"drift_scores": scores, "decision": decided["data"]["decision_id"],
                      "urgency": decided["data"]["urgency"], "version": staged, "phases": phases,
                      "search_best_params": version.params, "gate_checks_passed": sum(
                          1 for c in (version.gate or {}).get("checks", []) if c.get("passed"))}
        sc.ok = final["status"] == "completed" and self.production() == staged
        sc.outcome = (f"v{staged} promoted through {' -> '.join(p for p in phases if p)}" if sc.ok
                      else f"rollout ended {final['status']}: {final.get('reason')}")

    def scenario_corrupted(self, sc: Scenario) -> None:
        before = self.production()
        t0 = int(time.time() * 1000)
        backups = self._corrupt_labels()
        try:
            self.request_retrain("nightly refresh (upstream job corrupted the labels)")
            failed = self.wait(lambda: [e for e in self.history_types(t0) if e["type"] == "gate.failed"], 60,
                               "the gate's verdict")[0]
            alert = self.wait(lambda: [e for e in self.history_types(t0) if e["type"] == "alert.raised"], 10,
                              "the alert")[0]
            self.wait(lambda: not self.redis.hexists(self.keys.guard(MODEL), "in_flight"), 10, "the pipeline to end")
        finally:
            for path, original in backups:
                original.to_parquet(path, index=False)
        checks = failed["data"].get("failed_checks", [])
        served = self.traffic.serving_share()
        sc.figures = {"rejected_version": failed["data"].get("version"), "failed_checks": checks,
                      "alert": alert["data"]["title"], "production": self.production()}
        sc.ok = bool(checks) and self.production() == before and served.get(str(before), 0) > 0.95
        sc.outcome = (f"v{failed['data'].get('version')} rejected ({', '.join(checks)}); alert raised; "
                      f"v{before} still serves" if sc.ok else "unexpected: production changed or no failed checks")

    def _corrupt_labels(self) -> list[tuple[Path, pd.DataFrame]]:
        """Flip most labels in the older files (the newest slice, the holdout, stays clean)."""
        import numpy as np

        files = sorted(self.data_dir.rglob("*.parquet"))
        backups = []
        rng = np.random.default_rng(5)
        for path in files[:-2]:
            frame = pd.read_parquet(path)
            backups.append((path, frame.copy()))
            flip = rng.uniform(size=len(frame)) < 0.75
            frame[TARGET] = np.where(flip, 1 - frame[TARGET], frame[TARGET])
            frame.to_parquet(path, index=False)
        return backups

    def scenario_worse_live(self, sc: Scenario) -> None:
        before = self.production()
        t0 = int(time.time() * 1000)
        # Two days recorded during a skewed period (a promotion changed who churns): the newest data.
        write_days(self.data_dir / "skewed", days=2, rows_per_day=1200, seed=21, shift=1.0, concept=0.8)
        self.request_retrain("weekly retrain on the latest data")
        staged = self.wait(lambda: (c := self.registry.alias(MODEL, "candidate")) and c != before and c, 60,
                           "a candidate past the gate")
        self.note(f"v{staged} passed the gate on its holdout; rollout starts")
        final = self.wait(lambda: self._finished_rollout(staged), 60, "the rollout's verdict")
        rolled = []
        if final["status"] == "rolled_back":
            rolled = self.wait(lambda: [e for e in self.history_types(t0) if e["type"] == "rollout.rolled_back"], 10,
                               "the rollback event")
            self.wait(lambda: self.registry.get(MODEL, staged).status == "rolled_back", 10, "the registry update")
            self.wait(lambda: self.traffic.serving_share().get(str(before), 0) > 0.99, 10,
                      f"v{before} to serve all traffic again")
        phase = rolled[0]["data"].get("phase") if rolled else None
        served = self.traffic.serving_share()
        metrics = (rolled[0]["data"].get("metrics") if rolled else {}) or {}
        sc.figures = {"version": staged, "rolled_back_in": phase,
                      "reason": (rolled[0]["data"].get("reason") if rolled else final.get("reason")),
                      "candidate_accuracy": metrics.get("accuracy_candidate"),
                      "production_accuracy": metrics.get("accuracy_production"),
                      "serving_now": max(served, key=served.get) if served else None}
        sc.ok = (final["status"] == "rolled_back" and self.production() == before and phase != "100%"
                 and served.get(str(before), 0) > 0.99 and self.registry.get(MODEL, staged).status == "rolled_back")
        sc.outcome = (f"v{staged} rolled back in {phase} ({sc.figures['reason']}); v{before} serves again" if sc.ok
                      else f"rollout ended {final['status']}: {final.get('reason')}")

    # --- run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        runners = [self.scenario_drift, self.scenario_corrupted, self.scenario_worse_live]
        error = None
        try:
            self.prepare()
            self.note("starting Redis, 4 workers (decision, training, gate, rollout) and beat")
            self.start_system()
            if self.live:
                from workers.demo.view import LiveView

                self.view = LiveView(self).start()
            self.bootstrap()
            for sc, runner in zip(self.scenarios, runners):
                self.note(f"scenario: {sc.name}")
                t = time.monotonic()
                try:
                    runner(sc)
                except DemoFailed as exc:
                    sc.outcome, sc.ok = str(exc), False
                sc.seconds = time.monotonic() - t
                self.note(f"{sc.name}: {'ok' if sc.ok else 'NOT AS EXPECTED'} - {sc.outcome}")
        except RuntimeError as exc:  # DemoFailed, or a process of the system died (check_alive)
            error = self._failure(exc)
        finally:
            timeline = self.finish()
        result = {"ok": error is None and all(s.ok for s in self.scenarios),
                  "scenarios": [s.to_dict() for s in self.scenarios],
                  "seconds": round(time.monotonic() - self.started, 1),
                  "model": MODEL, "timeline": timeline, "state_dir": str(self.state_dir)}
        if error:
            result["error"] = error
        return result

    def _failure(self, exc: RuntimeError) -> str:
        """One line for the result: a dead child's own last log line, else the error's first line."""
        if self.system is not None and not isinstance(exc, DemoFailed):
            from workers.cli.exits import exited_child

            line = exited_child(self.system)
            if line:
                return line
        return (str(exc).splitlines() or [type(exc).__name__])[0]

    def finish(self) -> str | None:
        timeline = None
        try:
            if self.view is not None:
                self.view.stop()
            if getattr(self, "_perf_stop", None) is not None:
                self._perf_stop.set()
            if self.traffic is not None:
                self.traffic.stop()
            if self.router is not None:
                self.router.close()
            if self.system is not None and self.system.redis is not None:
                timeline = self._timeline()
        finally:
            if self.system is not None:
                self.system.stop()
        return timeline

    def _timeline(self) -> str | None:
        from workers.timeline import timeline_for_model

        out = self.state_dir / "timeline.png"
        try:
            timeline_for_model(self.redis, self.keys, MODEL, out)
            return str(out)
        except Exception as exc:  # noqa: BLE001 - the picture is a bonus, not a verdict
            log.warning("demo.timeline_failed", error=str(exc))
            return None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()
