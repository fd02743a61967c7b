"""Ops views on a recorded history in a real Redis: status, history, models, timeline (PNG and HTML)."""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from events.bus import EventBus
from events.envelope import new_event
from tests.support import ROOT
from workers.alerts import record_alert
from workers.decision.service import record_events
from workers.decision.state import DecisionStore
from workers.registry.store import ModelVersion, Registry
from workers.router.traffic import TrafficTable, write_traffic

RETRAIN = str(ROOT / ".venv" / "bin" / "retrain")
MODEL = "churn"
OTHER = "fraud"

POLICY = """
[model]
name = "churn"
task = "binary"
target = "y"

[rollout]
max_wait = "45m"
on_insufficient_evidence = "abort"
"""


def run(*args: str, env_extra: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([RETRAIN, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


@dataclass
class Recorded:
    """What was written, so each test can derive its expectations independently of the views."""

    t0: datetime
    events: list = field(default_factory=list)
    expected_markers: list = field(default_factory=list)
    """(kind, time) of every event that must be marked on the timeline."""
    expected_spans: list = field(default_factory=list)
    """(phase, start, end, outcome)."""
    decisions: dict = field(default_factory=dict)
    waiting_since: datetime | None = None


def _at(rec: Recorded, minutes: float) -> datetime:
    return rec.t0 + timedelta(minutes=minutes)


def build_history(redis_client, settings, keys) -> Recorded:
    """Record a churn model through three retrains (promoted, gate-blocked, rolled back) and a fourth in canary."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    rec = Recorded(t0=now - timedelta(hours=4))
    evs = rec.events

    def add(etype, minutes, data, mark=None, model=MODEL):
        e = new_event(etype, model, data, time=_at(rec, minutes))
        evs.append(e)
        if mark:
            rec.expected_markers.append((mark, e.time))
        return e

    # v1 in production; live accuracy slides while drift builds up.
    for i, acc in enumerate((0.91, 0.905, 0.90, 0.89, 0.87, 0.86)):
        add("performance.measured", i * 5, {"metric": "accuracy", "value": acc, "baseline": 0.91, "n_labeled": 500})
    add("drift.data", 3, {"drift_score": 0.05, "drifted_features": [], "dataset_drift": False})
    add("drift.data", 20, {"drift_score": 0.22, "drifted_features": ["age"], "dataset_drift": True}, "drift")
    # Retrain 1: decided, trained, gate passed, rolled out shadow -> canary -> 25% -> completed.
    add("retrain.decided", 26, {"decision_id": "d-1", "urgency": "medium", "triggers": ["data_drift"],
                                "pipeline_id": "p-1"}, "decision")
    add("training.started", 27, {"pipeline_id": "p-1", "step": "validate_data"}, "training_started")
    add("training.succeeded", 40, {"pipeline_id": "p-1", "step": "train"}, "training_succeeded")
    add("gate.passed", 41, {"pipeline_id": "p-1", "passed": True, "failed_checks": []}, "gate_passed")
    add("model.staged", 42, {"version": 2, "pipeline_id": "p-1"}, "staged")
    add("rollout.started", 43, {"version": 2, "candidate": "2", "phase": "shadow", "traffic": 0}, "rollout_started")
    add("rollout.advanced", 60, {"version": 2, "candidate": "2", "phase": "canary", "to_phase": "canary",
                                 "traffic": 5}, "rollout_advanced")
    add("rollout.advanced", 80, {"version": 2, "candidate": "2", "phase": "25%", "to_phase": "25%", "traffic": 25},
        "rollout_advanced")
    add("rollout.completed", 100, {"version": 2, "candidate": "2", "phase": "25%", "reason": "all checks passed"},
        "promoted")
    rec.expected_spans += [("shadow", _at(rec, 43), _at(rec, 60), "advanced"),
                           ("canary", _at(rec, 60), _at(rec, 80), "advanced"),
                           ("25%", _at(rec, 80), _at(rec, 100), "completed")]
    for i, acc in enumerate((0.90, 0.905, 0.91)):
        add("performance.measured", 105 + i * 5, {"metric": "accuracy", "value": acc, "baseline": 0.90,
                                                   "n_labeled": 400, "version": "2"})
    # Retrain 2: gate blocks v3 -> alert.
    add("retrain.decided", 130, {"decision_id": "d-2", "urgency": "low", "triggers": ["scheduled"],
                                 "pipeline_id": "p-2"}, "decision")
    add("training.started", 131, {"pipeline_id": "p-2", "step": "validate_data"}, "training_started")
    add("training.succeeded", 135, {"pipeline_id": "p-2", "step": "train"}, "training_succeeded")
    add("gate.failed", 136, {"pipeline_id": "p-2", "version": 3, "passed": False,
                             "failed_checks": ["no_regression"]}, "gate_failed")
    gate_alert = add("alert.raised", 136.5, {"severity": "warning", "title": "quality gate blocked a candidate",
                                             "message": "no_regression"}, "alert")
    # Retrain 3: v4 passes the gate, canary analysis rolls it back.
    add("retrain.decided", 150, {"decision_id": "d-3", "urgency": "high", "triggers": ["performance_drop"],
                                 "pipeline_id": "p-3"}, "decision")
    add("training.started", 151, {"pipeline_id": "p-3", "step": "validate_data"}, "training_started")
    add("training.succeeded", 155, {"pipeline_id": "p-3", "step": "train"}, "training_succeeded")
    add("gate.passed", 156, {"pipeline_id": "p-3", "version": 4, "passed": True, "failed_checks": []}, "gate_passed")
    add("rollout.started", 157, {"version": 4, "candidate": "4", "phase": "shadow", "traffic": 0}, "rollout_started")
    add("rollout.advanced", 160, {"version": 4, "candidate": "4", "phase": "canary", "to_phase": "canary",
                                  "traffic": 5}, "rollout_advanced")
    add("performance.measured", 163, {"metric": "accuracy", "value": 0.84, "n_labeled": 120, "version": "4"})
    add("rollout.rolled_back", 165, {"version": 4, "candidate": "4", "phase": "canary", "reason": "accuracy drop",
                                     "manual": False}, "rollback")
    rb_alert = add("alert.raised", 165.5, {"severity": "critical", "title": "churn v4 rolled_back: accuracy drop"},
                   "alert")
    rec.expected_spans += [("shadow", _at(rec, 157), _at(rec, 160), "advanced"),
                           ("canary", _at(rec, 160), _at(rec, 165), "rolled_back")]
    add("retrain.suppressed", 170, {"decision_id": "d-4", "reason": "cooldown", "triggers": ["data_drift"]},
        "suppressed")
    # Retrain 4: v5 now in canary, waiting for labels.
    add("retrain.decided", 175, {"decision_id": "d-5", "urgency": "medium", "triggers": ["data_drift"],
                                 "pipeline_id": "p-5"}, "decision")
    add("gate.passed", 178, {"pipeline_id": "p-5", "version": 5, "passed": True, "failed_checks": []}, "gate_passed")
    add("rollout.started", 179, {"version": 5, "candidate": "5", "phase": "shadow", "traffic": 0}, "rollout_started")
    add("rollout.advanced", 185, {"version": 5, "candidate": "5", "phase": "canary", "to_phase": "canary",
                                  "traffic": 5}, "rollout_advanced")
    add("performance.measured", 190, {"metric": "accuracy", "value": 0.905, "n_labeled": 30, "version": "5"})
    rec.expected_spans += [("shadow", _at(rec, 179), _at(rec, 185), "advanced"),
                           ("canary", _at(rec, 185), _at(rec, 190), "ongoing")]
    # Another model with a pipeline training right now.
    add("drift.data", 100, {"drift_score": 0.4, "drifted_features": ["amount"], "dataset_drift": True}, model=OTHER)
    add("retrain.decided", 101, {"decision_id": "d-9", "urgency": "high", "triggers": ["data_drift"],
                                 "pipeline_id": "p-9"}, model=OTHER)

    bus = EventBus.from_settings(redis_client, settings)
    bus.publish_many(evs)
    pipe = redis_client.pipeline(transaction=True)
    record_events(keys, evs, pipe)
    for alert in (gate_alert, rb_alert):
        record_alert(pipe, keys, alert)
    pipe.execute()

    registry = Registry(redis_client, keys)
    for v, status in ((1, "previous"), (2, "production"), (3, "rejected"), (4, "rolled_back"), (5, "canary")):
        registry.register(ModelVersion(model=MODEL, version=0, status=status, artifact_uri=f"/a/{v}.skops",
                                       sha256="0" * 64, pipeline_id=f"p-v{v}", metrics={"accuracy": 0.9}))
    registry.register(ModelVersion(model=OTHER, version=0, status="production", artifact_uri="/a/f1.skops",
                                   sha256="0" * 64, pipeline_id="p-f1"))
    for alias, version in (("previous", 1), ("production", 2), ("candidate", 5)):
        registry.set_alias(MODEL, alias, version, who="test")
    registry.set_alias(OTHER, "production", 1, who="test")

    store = DecisionStore(redis_client, keys)
    pipe = redis_client.pipeline(transaction=True)
    for did, minutes, action, reason, pid in (("d-1", 26, "start", "data drift 0.22 over 0.15", "p-1"),
                                              ("d-2", 130, "start", "scheduled retrain", "p-2"),
                                              ("d-3", 150, "start", "accuracy dropped", "p-3"),
                                              ("d-4", 170, "suppress", "cooldown until later", None),
                                              ("d-5", 175, "start", "data drift 0.2 over 0.15", "p-5")):
        when = _at(rec, minutes)
        record = {"id": did, "model": MODEL, "time": when.isoformat(), "timestamp": when.timestamp(),
                  "action": action, "urgency": "medium", "reason": reason, "pipeline_id": pid,
                  "triggers": [{"name": "data_drift", "triggered": True}, {"name": "scheduled", "triggered": False}]}
        store.write_record(pipe, record)
        rec.decisions[did] = record
    other = _at(rec, 101)
    store.write_record(pipe, {"id": "d-9", "model": OTHER, "time": other.isoformat(), "timestamp": other.timestamp(),
                              "action": "start", "urgency": "high", "reason": "drift", "pipeline_id": "p-9",
                              "triggers": [{"name": "data_drift", "triggered": True}]})
    # Slots: churn's held by the rolling-out p-5, fraud's by p-9 in training.
    pipe.hset(keys.guard(MODEL), mapping={"in_flight": "p-5", "in_flight_since": f"{_at(rec, 175).timestamp()}"})
    pipe.hset(keys.pipeline(MODEL, "p-5"), mapping={"status": "done:start_rollout", "decision_id": "d-5",
                                                     "train_seconds": "12.5", "gate_seconds": "3.0"})
    pipe.hset(keys.guard(OTHER), mapping={"in_flight": "p-9", "in_flight_since": f"{other.timestamp()}"})
    pipe.hset(keys.pipeline(OTHER, "p-9"), mapping={"status": "running:train", "decision_id": "d-9",
                                                     "validate_data_seconds": "0.8",
                                                     "train_started": f"{other.timestamp() + 60}"})
    pipe.execute()

    from workers.rollout.machine import RolloutState

    rec.waiting_since = _at(rec, 200)
    state = RolloutState(model=MODEL, candidate="5", production="2", previous="1", started_at=_at(rec, 179),
                         phase_started_at=_at(rec, 185), phase="canary", phase_index=1, status="canary", revision=3,
                         waiting_since=rec.waiting_since, reason="advanced from shadow to canary",
                         last_analysis={"verdict": "hold", "insufficient_evidence": True, "phase": "canary",
                                        "reasons": ["labels 30 of 100"]})
    redis_client.hset(keys.rollout(MODEL), mapping={"state": json.dumps(state.to_dict()), "revision": "3",
                                                    "outbox": "[]"})
    write_traffic(redis_client, keys, MODEL, TrafficTable(production="2", previous="1", candidate="5",
                                                          candidate_percent=5.0))
    write_traffic(redis_client, keys, OTHER, TrafficTable(production="1"))
    return rec


@pytest.fixture
def recorded(redis_client, settings, keys):
    return build_history(redis_client, settings, keys)


@pytest.fixture
def policy_env(tmp_path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "churn.toml").write_text(POLICY)
    return {"RETRAIN_POLICY_DIR": str(folder)}


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert needle in proc.stderr


class TestStatus:
    def test_the_evidence_wait_follows_the_phases_the_rollout_began_with(self, recorded, policy_env,
                                                                         redis_client, keys):
        """A rollout keeps the phases it started with: status reports that phase's max_wait, not the
        one the policy file says now."""
        from config.policy import Phase
        from workers.rollout.machine import RolloutState, phase_record

        raw = redis_client.hget(keys.rollout(MODEL), "state")
        state = RolloutState.from_dict(json.loads(raw))
        state.phases = [phase_record(Phase(name="shadow", traffic=0)),
                        phase_record(Phase(name="canary", traffic=5, max_wait=timedelta(minutes=20)))]
        redis_client.hset(keys.rollout(MODEL), "state", json.dumps(state.to_dict()))
        out = _json(run("status", MODEL, "--json", env_extra=policy_env))
        wait = out["models"][0]["rollout"]["insufficient_evidence"]
        assert wait["max_wait_seconds"] == 20 * 60 and wait["then"] == "abort"

    def test_status_json_shows_versions_rollout_wait_traffic_decision_pipeline_alerts(self, recorded, policy_env):
        """status MODEL --json reports production/candidate, the canary phase and split, the evidence wait, the
        last decision, the in-flight pipeline and the newest alerts first."""
        out = _json(run("status", MODEL, "--json", env_extra=policy_env))
        [s] = out["models"]
        assert s["model"] == MODEL
        assert s["production"]["version"] == 2 and s["production"]["status"] == "production"
        moved = datetime.fromisoformat(s["production"]["since"])  # when the alias moved, not when v2 was built
        assert abs((moved - (recorded.t0 + timedelta(hours=4))).total_seconds()) < 60
        assert s["previous"]["version"] == 1
        assert s["candidate"]["version"] == 5 and s["candidate"]["status"] == "canary"
        r = s["rollout"]
        assert (r["status"], r["phase"], r["phase_index"], r["candidate"], r["production"]) == \
            ("canary", "canary", 1, "5", "2")
        wait = r["insufficient_evidence"]
        assert datetime.fromisoformat(wait["since"]) == recorded.waiting_since
        assert wait["reasons"] == ["labels 30 of 100"]
        assert wait["max_wait_seconds"] == 45 * 60 and wait["then"] == "abort"
        assert datetime.fromisoformat(wait["deadline"]) == recorded.waiting_since + timedelta(minutes=45)
        t = s["traffic"]
        assert (t["production"], t["candidate"], t["candidate_percent"]) == ("2", "5", 5.0)
        d = s["last_decision"]
        assert (d["id"], d["action"], d["reason"]) == ("d-5", "start", recorded.decisions["d-5"]["reason"])
        assert d["triggers"] == ["data_drift"]
        p = s["in_flight"]
        assert p["pipeline_id"] == "p-5" and p["decision_id"] == "d-5" and p["state"] == "rolling out"
        assert [st["step"] for st in p["steps"]] == ["train", "gate"]
        assert [a["severity"] for a in s["alerts"]] == ["critical", "warning"]
        assert s["alerts"][0]["title"].startswith("churn v4 rolled_back")

    def test_status_of_every_model_and_a_training_pipeline_step(self, recorded):
        """status --json without a model lists every model; a pipeline mid-training shows its step as running."""
        out = _json(run("status", "--json"))
        by = {m["model"]: m for m in out["models"]}
        assert set(by) == {MODEL, OTHER}
        fraud = by[OTHER]
        assert fraud["production"]["version"] == 1 and fraud["candidate"] is None and fraud["rollout"] is None
        assert (fraud["in_flight"]["pipeline_id"], fraud["in_flight"]["step"], fraud["in_flight"]["state"]) == \
            ("p-9", "train", "running")
        assert fraud["last_decision"]["id"] == "d-9"
        assert by[MODEL]["rollout"]["insufficient_evidence"]["max_wait_seconds"] == 7200  # default policy

    def test_status_human_view_names_the_phase_and_unknown_model_is_one_line(self, recorded):
        """The rich view shows the model, its phase and split; an unknown model exits 2 with one line."""
        proc = run("status", MODEL)
        assert proc.returncode == 0, proc.stderr
        assert MODEL in proc.stdout and "v5 (canary)" in proc.stdout and "v5 5%" in proc.stdout
        assert "insufficient evidence" in proc.stdout and "d-5" in proc.stdout
        _one_line_error(run("status", "nosuch", "--json"), "unknown model 'nosuch'")


class TestHistory:
    def test_type_glob_selects_only_matching_events_in_order(self, recorded):
        """--type 'rollout.*' returns exactly the recorded rollout events, oldest first."""
        out = _json(run("history", MODEL, "--type", "rollout.*", "--json"))
        expected = [e.id for e in sorted(recorded.events, key=lambda e: e.time)
                    if e.subject == MODEL and e.type.startswith("rollout.")]
        assert [e["id"] for e in out["events"]] == expected
        assert out["matched"] == len(expected) and not out["truncated"]

    def test_several_types_and_a_time_window(self, recorded):
        """Repeated --type values combine, and --since/--until keep only events whose time is inside the window."""
        since, until = recorded.t0 + timedelta(minutes=25), recorded.t0 + timedelta(minutes=160)
        out = _json(run("history", MODEL, "--type", "gate.*", "--type", "drift.data,retrain.decided",
                        "--since", since.isoformat(), "--until", until.isoformat(), "--json"))
        expected = [e.id for e in sorted(recorded.events, key=lambda e: e.time)
                    if e.subject == MODEL and e.type in ("gate.passed", "gate.failed", "drift.data",
                                                         "retrain.decided") and since <= e.time <= until]
        assert [e["id"] for e in out["events"]] == expected and len(expected) == 6

    def test_relative_since_and_limit_keep_the_newest(self, recorded):
        """--since 2h drops older events and --limit 3 keeps the three newest of the matches."""
        out = _json(run("history", MODEL, "--since", "2h", "--limit", "3", "--json"))
        cutoff = datetime.now(timezone.utc) - timedelta(hours=2)
        newer = sorted((e for e in recorded.events if e.subject == MODEL and e.time >= cutoff), key=lambda e: e.time)
        assert out["matched"] == len(newer) and out["truncated"]
        assert [e["id"] for e in out["events"]] == [e.id for e in newer[-3:]]

    def test_bad_type_time_and_model_are_one_line_errors(self, recorded):
        """An unknown type pattern, an unreadable time or an unknown model exits 2 with one line."""
        _one_line_error(run("history", MODEL, "--type", "nope.*"), "matches no event type")
        _one_line_error(run("history", MODEL, "--since", "yesterday-ish"), "bad time")
        for since in ("0001-01-01", "999999999d"):  # before any event can be: all of them (an OverflowError before)
            assert _json(run("history", MODEL, "--since", since, "--json"))["matched"] > 0
        _one_line_error(run("history", "nosuch"), "unknown model")

    def test_human_view_lists_descriptions(self, recorded):
        """The rich table describes each event (gate failure with its failed check)."""
        proc = run("history", MODEL, "--type", "gate.failed")
        assert proc.returncode == 0, proc.stderr
        assert "gate.failed" in proc.stdout and "no_regression" in proc.stdout


class TestModels:
    def test_models_json_counts_statuses_and_last_decision(self, recorded):
        """models --json lists every model with aliases, versions by status and the last decision's time."""
        out = _json(run("models", "--json"))
        by = {m["model"]: m for m in out["models"]}
        churn = by[MODEL]
        assert (churn["production"], churn["candidate"], churn["previous"]) == (2, 5, 1)
        assert churn["status_counts"] == {"canary": 1, "previous": 1, "production": 1, "rejected": 1,
                                          "rolled_back": 1}
        assert churn["versions"] == 5 and churn["rollout_status"] == "canary" and churn["in_flight"] == "p-5"
        assert churn["last_decision_id"] == "d-5"
        assert datetime.fromisoformat(churn["last_decision_time"]) == datetime.fromisoformat(
            recorded.decisions["d-5"]["time"])
        assert by[OTHER]["production"] == 1 and by[OTHER]["candidate"] is None


def _close(a: datetime, b: datetime) -> bool:
    return abs((a - b).total_seconds()) < 0.01


class TestTimeline:
    def test_markers_and_spans_drawn_match_the_recorded_events(self, recorded, redis_client, keys, tmp_path):
        """Every drift detection, decision, training, gate outcome, rollout step, rollback and alert is drawn
        at its time (read back from the figure), and rollout phases are shaded from start to end."""
        from PIL import Image

        from workers.timeline import timeline_for_model

        result = timeline_for_model(redis_client, keys, MODEL, tmp_path / "t.png")
        drawn = sorted((m.kind, m.time) for m in result.markers)
        expected = sorted(recorded.expected_markers)
        assert len(drawn) == len(expected)
        for (dk, dt), (ek, et) in zip(drawn, expected):
            assert dk == ek and _close(dt, et), (dk, dt, ek, et)
        assert {m.kind for m in result.markers} >= {"drift", "decision", "training_succeeded", "gate_passed",
                                                    "gate_failed", "rollout_advanced", "promoted", "rollback"}
        spans = [(s.phase, s.start, s.end, s.outcome) for s in result.spans]
        assert len(spans) == len(recorded.expected_spans)
        for got, want in zip(spans, recorded.expected_spans):
            assert got[0] == want[0] and got[3] == want[3] and _close(got[1], want[1]) and _close(got[2], want[2])
        perf = [e for e in recorded.events if e.subject == MODEL and e.type == "performance.measured"]
        assert result.metric_points == len(perf) and result.drift_points == 2
        img = Image.open(tmp_path / "t.png")
        img.verify()
        assert img.format == "PNG" and img.size[0] > 1000 and (tmp_path / "t.png").stat().st_size > 30_000

    def test_cli_png_and_html_embed_the_picture(self, recorded, tmp_path):
        """timeline --out x.png prints the path of a valid PNG; .html embeds the PNG and lists the events."""
        from PIL import Image

        png = tmp_path / "churn.png"
        proc = run("timeline", MODEL, "--out", str(png))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == str(png)
        assert Image.open(png).format == "PNG"
        page = tmp_path / "churn.html"
        info = _json(run("timeline", MODEL, "--out", str(page), "--since", "3h", "--json"))
        text = page.read_text()
        [b64] = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
        assert Image.open(io.BytesIO(base64.b64decode(b64))).format == "PNG"
        cutoff = datetime.now(timezone.utc) - timedelta(hours=3)
        in_window = [e for e in recorded.events if e.subject == MODEL and e.time >= cutoff]
        assert info["events"] == len(in_window) and info["path"] == str(page)
        rollback = next(e for e in in_window if e.type == "rollout.rolled_back")
        assert rollback.id in text and "accuracy drop" in text
        assert all(datetime.fromisoformat(m["time"]) >= cutoff - timedelta(seconds=1) for m in info["markers"])

    def test_unknown_model_empty_window_and_bad_suffix_exit_2(self, recorded, tmp_path):
        """No such model, no events in the window, or an --out that is neither .png nor .html: one line, exit 2."""
        _one_line_error(run("timeline", "nosuch", "--out", str(tmp_path / "x.png")), "unknown model")
        _one_line_error(run("timeline", MODEL, "--out", str(tmp_path / "x.png"), "--since", "30m"), "no events")
        _one_line_error(run("timeline", MODEL, "--out", str(tmp_path / "x.svg")), ".png or .html")
        assert not (tmp_path / "x.png").exists()


class TestPureTimeline:
    def test_spans_close_at_the_end_and_undetected_drift_is_not_marked(self):
        """An open rollout phase ends at the window's end as 'ongoing'; drift without detection is not a marker."""
        from workers.timeline import marker_kind, rollout_spans

        t = datetime(2024, 5, 1, tzinfo=timezone.utc)
        evs = [new_event("rollout.started", MODEL, {"phase": "shadow"}, time=t),
               new_event("rollout.paused", MODEL, {"reason": "x"}, time=t + timedelta(minutes=5))]
        evs = [e.model_dump(mode="json") for e in evs]
        spans = rollout_spans(evs, t + timedelta(minutes=9))
        assert [(s.phase, s.outcome, s.end - s.start) for s in spans] == [
            ("shadow", "paused", timedelta(minutes=5)), ("paused", "ongoing", timedelta(minutes=4))]
        quiet = new_event("drift.data", MODEL, {"drift_score": 0.3, "drifted_features": ["a"], "dataset_drift": False})
        loud = new_event("drift.data", MODEL, {"drift_score": 0.3, "drifted_features": ["a"]})
        assert marker_kind(quiet.model_dump(mode="json")) is None
        assert marker_kind(loud.model_dump(mode="json")) == "drift"


class TestLocalSystemSecrets:
    """``retrain up`` keeps the Redis password and Flower's credentials away from other local users."""

    def test_the_redis_url_file_is_private(self, tmp_path):
        """<state_dir>/redis/url holds the external URL (password included) with mode 0600, even if it existed."""
        import stat

        from workers.supervisor import LocalSystem, url_file_for

        path = url_file_for(tmp_path)
        path.parent.mkdir(parents=True)
        path.write_text("stale")
        path.chmod(0o644)
        system = LocalSystem(tmp_path)
        system.start_redis(external_url="redis://:s3cret@127.0.0.1:1/0")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text() == "redis://:s3cret@127.0.0.1:1/0"
        path.unlink()
        system.start_redis(external_url="redis://:s3cret@127.0.0.1:1/0")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

    def test_the_childrens_logs_are_private(self, tmp_path):
        """<state_dir>/logs is 0700 and each child's log 0600, also when they existed with wider modes."""
        import stat
        import sys

        from workers.supervisor import LocalSystem

        (tmp_path / "logs").mkdir()
        (tmp_path / "logs").chmod(0o755)
        (tmp_path / "logs" / "echo.log").write_text("before\n")
        (tmp_path / "logs" / "echo.log").chmod(0o644)
        system = LocalSystem(tmp_path)
        for name in ("echo", "fresh"):
            system.spawn(name, [sys.executable, "-c", "print('hello')"]).proc.wait(30)
            assert stat.S_IMODE((tmp_path / "logs" / f"{name}.log").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "logs").stat().st_mode) == 0o700
        assert (tmp_path / "logs" / "echo.log").read_text() == "before\nhello\n"

    def test_a_log_whose_mode_cannot_be_set_is_left_with_a_warning(self, tmp_path, capsys):
        """Where chmod is refused (a teammate's file in a shared state folder, a file system without modes), the
        worker still starts: the mode is left as it is and a warning says so."""
        from workers.supervisor import _make_private

        _make_private(tmp_path / "gone.log", 0o600)  # chmod of a file that is not there: refused like a foreign one
        captured = capsys.readouterr()
        assert "supervisor.log_mode_unchanged" in captured.out + captured.err

    def test_flower_credentials_are_not_on_its_command_line_and_still_enforced(self, redis_server, tmp_path):
        """The running Flower's argv (what ``ps`` shows) has no password, and Flower still asks for it."""
        import socket
        import time
        import urllib.error
        import urllib.request

        from workers.supervisor import LocalSystem

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with LocalSystem(tmp_path) as system:
            system.start_redis(external_url=redis_server.url)
            child = system.start_flower(port, "admin:s3cret")
            argv = (Path("/proc") / str(child.proc.pid) / "cmdline").read_bytes()
            assert b"s3cret" not in argv and "s3cret" not in " ".join(child.cmd)
            url = f"http://127.0.0.1:{port}/workers"

            def status(auth: str | None) -> int:
                request = urllib.request.Request(url)
                if auth:
                    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
                try:
                    return urllib.request.urlopen(request, timeout=2).status
                except urllib.error.HTTPError as exc:
                    return exc.code

            deadline = time.monotonic() + 30
            while True:
                system.check_alive()
                try:
                    first = status(None)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            assert first == 401
            assert status("admin:s3cret") == 200
