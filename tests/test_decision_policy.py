"""The pure retraining decision policy, its guards, and the offline ``retrain decide`` command."""

from __future__ import annotations

import json
import random
import subprocess
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from config.policy import policy_from_dict
from workers.decision.policy import (
    GuardState,
    apply_guards,
    budget,
    cooldown,
    debounce,
    evaluate,
    queue_for,
    single_flight,
)
from workers.decision.triggers import TRIGGERS, ModelSignals, UpstreamChanges

RETRAIN = "/work/main/.venv/bin/retrain"
UTC = timezone.utc
NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
FRESH = NOW - timedelta(days=1)


def make_policy(data: dict | None = None, **triggers):
    """A policy for model ``m`` with the given ``[triggers]`` keys (and other sections)."""
    doc = {"model": {"name": "m"}, "triggers": triggers}
    doc.update(data or {})
    return policy_from_dict(doc)


def signals(**fields) -> ModelSignals:
    """Signals of a freshly trained model plus ``fields``."""
    fields.setdefault("last_training_date", FRESH)
    return ModelSignals(**fields)


def decide(policy=None, **fields):
    return evaluate(policy or make_policy(), signals(**fields), NOW)


# --- the seed's engine, copied from the article (only utcnow() is injected) -----------------------
@dataclass
class SeedTrigger:
    name: str
    triggered: bool
    urgency: str
    reason: str
    metadata: dict


class SeedEngine:
    def __init__(self, model_name: str, config: dict, now: datetime):
        self.model_name = model_name
        self.config = config
        self._now = now

    def evaluate_triggers(self, monitoring_data: dict) -> list[SeedTrigger]:
        triggers = []
        last_trained = monitoring_data["last_training_date"]
        max_age = self.config.get("max_model_age_days", 30)
        age_days = (self._now - last_trained).days
        triggers.append(SeedTrigger("scheduled", age_days >= max_age, "low", "", {"age_days": age_days}))
        drift_score = monitoring_data.get("drift_score", 0)
        drift_threshold = self.config.get("drift_threshold", 0.15)
        triggers.append(SeedTrigger(
            "data_drift", drift_score > drift_threshold,
            "medium" if drift_score < 0.3 else "high", "", {"drift_score": drift_score},
        ))
        current_accuracy = monitoring_data.get("current_accuracy", 1.0)
        baseline_accuracy = monitoring_data.get("baseline_accuracy", 1.0)
        perf_threshold = self.config.get("performance_drop_threshold", 0.03)
        drop = baseline_accuracy - current_accuracy
        triggers.append(SeedTrigger(
            "performance_drop", drop > perf_threshold,
            "high" if drop > perf_threshold * 2 else "medium", "", {"drop": drop},
        ))
        new_samples = monitoring_data.get("new_samples_since_training", 0)
        volume_threshold = self.config.get("new_data_threshold", 50000)
        triggers.append(SeedTrigger(
            "data_volume", new_samples >= volume_threshold, "low", "", {"new_samples": new_samples},
        ))
        return triggers

    def should_retrain(self, monitoring_data: dict):
        triggers = self.evaluate_triggers(monitoring_data)
        active = [t for t in triggers if t.triggered]
        return len(active) > 0, active


SEED_VALUE_KEY = {"scheduled": "age_days", "data_drift": "drift_score", "performance_drop": "drop",
                  "data_volume": "new_samples"}


def _iso(moment: datetime, rng: random.Random) -> str:
    """The same instant written as naive UTC, ``Z`` or a +05:30 offset."""
    style = rng.randrange(3)
    if style == 0:
        return moment.replace(tzinfo=None).isoformat()
    if style == 1:
        return moment.isoformat().replace("+00:00", "Z")
    return moment.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()


def _seed_cases(n: int, seed: int = 20240601):
    """Random configs and monitoring data concentrated on the seed's boundaries."""
    rng = random.Random(seed)
    for _ in range(n):
        config = {
            "max_model_age_days": rng.choice([0, 1, 7, 30, 30, 29.5, rng.uniform(0, 60)]),
            "drift_threshold": rng.choice([0, 0.1, 0.15, 0.15, 0.3, round(rng.uniform(0, 0.5), 3)]),
            "performance_drop_threshold": rng.choice([0, 0.01, 0.03, 0.03, 0.05, round(rng.uniform(0, 0.2), 4)]),
            "new_data_threshold": rng.choice([0, 1, 50000, 50000, rng.randrange(0, 200000)]),
        }
        now = NOW + timedelta(seconds=rng.randrange(0, 86400 * 30))
        age = rng.choice([
            timedelta(days=config["max_model_age_days"]),
            timedelta(days=int(config["max_model_age_days"])) - timedelta(seconds=1),
            timedelta(seconds=rng.uniform(-2 * 86400, 60 * 86400)),
            -timedelta(seconds=rng.randrange(1, 3600)),
        ])
        data: dict = {"last_training_date": (now - age).replace(microsecond=0)}
        if rng.random() < 0.8:
            data["drift_score"] = rng.choice([
                config["drift_threshold"], 0.3, 0.0, config["drift_threshold"] + 1e-9,
                round(rng.uniform(0, 0.6), 4),
            ])
        if rng.random() < 0.8:
            data["baseline_accuracy"] = rng.choice([0.9, 1.0, 0.75, round(rng.uniform(0.5, 1), 4)])
        if rng.random() < 0.8:
            base = data.get("baseline_accuracy", 1.0)
            thr = config["performance_drop_threshold"]
            data["current_accuracy"] = rng.choice([
                base - thr, base - 2 * thr, base, round(rng.uniform(0.4, 1), 4), base - 0.25,
            ])
        if rng.random() < 0.8:
            data["new_samples_since_training"] = rng.choice([
                config["new_data_threshold"], max(config["new_data_threshold"] - 1, 0), 0,
                rng.randrange(0, 200000),
            ])
        if rng.random() < 0.5:
            data["drifted_features"] = ["f1", "f2"][: rng.randrange(3)]
        yield config, now, data, rng


class TestSeedParity:
    def test_matches_the_seed_engine_on_generated_snapshots(self):
        """With persistence off and no extras, the first four triggers answer exactly as the seed."""
        checked = 0
        for config, now, data, rng in _seed_cases(1500):
            seed_naive = {k: (v.replace(tzinfo=None) if isinstance(v, datetime) else v) for k, v in data.items()}
            seed_triggers = SeedEngine("m", config, now.replace(tzinfo=None)).evaluate_triggers(seed_naive)
            seed_retrain, seed_active = SeedEngine("m", config, now.replace(tzinfo=None)).should_retrain(seed_naive)

            snapshot = {k: (_iso(v, rng) if isinstance(v, datetime) else v) for k, v in data.items()}
            snapshot["now"] = _iso(now, rng)
            ours = evaluate(make_policy(**config), ModelSignals.from_snapshot(snapshot))

            assert ours.retrain == seed_retrain, (config, snapshot)
            assert {t.name for t in ours.fired} == {t.name for t in seed_active}
            for expected in seed_triggers:
                got = ours.trigger(expected.name)
                assert (got.triggered, got.urgency) == (expected.triggered, expected.urgency), (
                    expected.name, config, snapshot)
                assert got.value == expected.metadata[SEED_VALUE_KEY[expected.name]]
            assert not ours.trigger("concept_drift").triggered
            assert not ours.trigger("upstream_change").triggered
            assert ours.suppressed == () and ours.alerts == ()
            checked += 1
        assert checked == 1500

    def test_decision_urgency_is_the_highest_seed_urgency_among_fired(self):
        """The decision's urgency is the max over the seed's active triggers (none when inactive)."""
        order = ["none", "low", "medium", "high", "critical"]
        for config, now, data, _ in _seed_cases(300, seed=7):
            naive = {k: (v.replace(tzinfo=None) if isinstance(v, datetime) else v) for k, v in data.items()}
            _, active = SeedEngine("m", config, now.replace(tzinfo=None)).should_retrain(naive)
            expected = max((t.urgency for t in active), key=order.index, default="none")
            assert evaluate(make_policy(**config), ModelSignals(**data), now).urgency == expected


class TestScheduled:
    def test_fires_at_exactly_max_age(self):
        """A model exactly ``max_model_age_days`` old fires (``>=``), low urgency."""
        result = decide(last_training_date=NOW - timedelta(days=30)).trigger("scheduled")
        assert (result.triggered, result.urgency, result.value, result.threshold) == (True, "low", 30, 30)

    def test_does_not_fire_one_second_before_in_whole_days(self):
        """Age counts whole days like the seed's ``.days``: 29 days 23:59:59 is 29, no fire."""
        result = decide(last_training_date=NOW - timedelta(days=30) + timedelta(seconds=1)).trigger("scheduled")
        assert (result.triggered, result.value) == (False, 29)

    def test_schedule_tick_fires_a_fresh_model(self):
        """A ``schedule.tick`` fires the trigger whatever the model's age."""
        result = decide(schedule_due=True).trigger("scheduled")
        assert result.triggered and "schedule tick" in result.reason

    def test_unknown_training_date_cannot_fire_on_age(self):
        """Without a training date the age rule stays silent rather than guessing."""
        result = evaluate(make_policy(max_model_age_days=0), ModelSignals(), NOW).trigger("scheduled")
        assert not result.triggered and result.value is None


class TestDataDrift:
    def test_at_threshold_does_not_fire(self):
        """A drift score equal to ``drift_threshold`` does not fire (``>``)."""
        assert not decide(drift_score=0.15).trigger("data_drift").triggered

    def test_above_threshold_fires_medium_below_0_3(self):
        """Just above the threshold fires with medium urgency while the score is below 0.3."""
        result = decide(drift_score=0.2999).trigger("data_drift")
        assert (result.triggered, result.urgency, result.threshold) == (True, "medium", 0.15)

    def test_at_0_3_is_high(self):
        """A score of exactly 0.3 is high urgency (the seed's ``< 0.3`` -> medium)."""
        assert decide(drift_score=0.3).trigger("data_drift").urgency == "high"

    def test_absent_score_is_zero(self):
        """No drift score means the seed's 0: the trigger cannot fire even at threshold 0."""
        result = decide(make_policy(drift_threshold=0)).trigger("data_drift")
        assert not result.triggered and result.value == 0


class TestPerformanceDrop:
    # Binary fractions so that baseline - current is exact.
    def test_at_threshold_does_not_fire(self):
        """A drop equal to the threshold does not fire (``>``)."""
        d = decide(make_policy(performance_drop_threshold=0.125), baseline_accuracy=1.0, current_accuracy=0.875)
        assert not d.trigger("performance_drop").triggered

    def test_above_threshold_fires_medium(self):
        """A drop above the threshold but at most twice it fires with medium urgency."""
        d = decide(make_policy(performance_drop_threshold=0.125), baseline_accuracy=1.0, current_accuracy=0.75)
        result = d.trigger("performance_drop")
        assert (result.triggered, result.urgency, result.value) == (True, "medium", 0.25)

    def test_more_than_twice_threshold_is_high(self):
        """A drop above twice the threshold is high urgency."""
        d = decide(make_policy(performance_drop_threshold=0.125), baseline_accuracy=1.0, current_accuracy=0.5)
        assert d.trigger("performance_drop").urgency == "high"

    def test_absent_accuracies_are_one(self):
        """Missing accuracies are the seed's 1.0 each: no drop, no fire."""
        result = decide(make_policy(performance_drop_threshold=0)).trigger("performance_drop")
        assert not result.triggered and result.value == 0

    def test_a_measurement_without_a_known_baseline_is_not_judged(self):
        """When the worker knows of no baseline (none in the event, none among the production model's metrics) the
        drop is not judged against the seed's default 1.0, and the reason says so."""
        result = decide(make_policy(performance_drop_threshold=0.05), current_accuracy=0.5,
                        baseline_unknown=True).trigger("performance_drop")
        assert not result.triggered and result.value is None and "no baseline" in result.reason


class TestDataVolume:
    def test_fires_at_exactly_threshold(self):
        """Exactly ``new_data_threshold`` new samples fires (``>=``), low urgency."""
        result = decide(new_samples_since_training=50000).trigger("data_volume")
        assert (result.triggered, result.urgency) == (True, "low")

    def test_one_below_does_not_fire(self):
        """One sample short of the threshold does not fire."""
        assert not decide(new_samples_since_training=49999).trigger("data_volume").triggered


class TestConceptDrift:
    def test_at_threshold_does_not_fire_and_above_is_high(self):
        """Concept drift fires above its threshold (not at it), with high urgency."""
        pol = make_policy(concept_drift_threshold=0.25)
        assert not decide(pol, concept_drift=0.25).trigger("concept_drift").triggered
        result = decide(pol, concept_drift=0.2501).trigger("concept_drift")
        assert (result.triggered, result.urgency) == (True, "high")

    def test_absent_measurement_does_not_fire(self):
        """Without a concept-drift value the trigger stays silent."""
        assert not decide(make_policy(concept_drift_threshold=0)).trigger("concept_drift").triggered

    def test_a_measurement_in_the_other_metric_is_not_judged(self):
        """A JS value is not compared with a PSI threshold (nor named PSI); the policy's own metric is judged."""
        pol = make_policy(concept_drift_threshold=0.2)
        result = decide(pol, concept_drift=0.25, concept_drift_metric="js").trigger("concept_drift")
        assert not result.triggered and "JS 0.250 not judged" in result.reason and "PSI" in result.reason
        assert decide(pol, concept_drift=0.25, concept_drift_metric="psi").trigger("concept_drift").triggered


class TestUpstreamChange:
    def test_same_versions_do_not_fire(self):
        """Matching feature version and fingerprint is no change."""
        d = decide(trained_feature_version="v3", current_feature_version="v3",
                   trained_schema_fingerprint="ab", current_schema_fingerprint="ab")
        assert not d.trigger("upstream_change").triggered

    def test_nothing_reported_answers_as_an_unchanged_report_does(self):
        """No upstream signal at all gives the verdict of a report that matches training (the fast path's parity)."""
        trained = {"trained_feature_version": "v3", "trained_schema_fingerprint": "ab"}
        quiet = decide(**trained).trigger("upstream_change").to_dict()
        reported = decide(**trained, current_feature_version="v3").trigger("upstream_change").to_dict()
        reported["metadata"]["current_feature_version"] = None
        assert quiet == reported
        assert quiet["triggered"] is False and quiet["value"] == [] and quiet["metadata"]["breaking"] is False

    def test_version_change_fires_medium(self):
        """A new feature-store version fires with medium urgency."""
        result = decide(trained_feature_version="v3", current_feature_version="v4").trigger("upstream_change")
        assert (result.triggered, result.urgency, result.value) == (True, "medium", ["feature_version"])

    def test_compatible_added_column_trains(self):
        """A fingerprint change that only adds a column is compatible: it fires and retrains."""
        d = decide(trained_schema_fingerprint="ab", current_schema_fingerprint="cd",
                   upstream_changes=UpstreamChanges(added=("new_col",)))
        assert d.retrain and d.trigger("upstream_change").triggered and d.alerts == ()

    def test_breaking_change_alerts_and_blocks_training(self):
        """A removed column raises an alert, trains nothing (even with drift firing) and says why."""
        d = decide(drift_score=0.5, trained_schema_fingerprint="ab", current_schema_fingerprint="cd",
                   upstream_changes=UpstreamChanges(removed=("age",)))
        assert not d.retrain and d.urgency == "none"
        assert [a.name for a in d.alerts] == ["upstream_breaking_change"]
        kinds = {s.trigger: s.kind for s in d.suppressed}
        assert kinds == {"upstream_change": "breaking_upstream_change", "data_drift": "blocked_by_upstream_change"}
        assert "removed age" in d.trigger("upstream_change").reason

    def test_retyped_column_and_producer_flag_are_breaking(self):
        """A retyped column or ``upstream_breaking`` from the producer is breaking."""
        assert decide(upstream_changes=UpstreamChanges(retyped=("x",))).alerts
        assert decide(upstream_breaking=True).alerts

    def test_removed_column_the_model_does_not_use_is_compatible(self):
        """With ``[data] features`` listed, removing another column is a compatible change."""
        pol = make_policy({"data": {"features": ["age", "income"]}})
        d = decide(pol, upstream_changes=UpstreamChanges(removed=("unused",)))
        assert d.retrain and not d.alerts
        assert decide(pol, upstream_changes=UpstreamChanges(removed=("age",))).alerts

    def test_manual_request_is_not_blocked(self):
        """An operator's manual request still trains despite a breaking change (alert kept)."""
        d = decide(upstream_breaking=True, manual_reason="schema fixed")
        assert d.retrain and d.urgency == "critical" and d.alerts

    def test_disabled_by_policy(self):
        """``upstream_change = false`` ignores upstream signals entirely."""
        d = decide(make_policy(upstream_change=False), upstream_breaking=True,
                   trained_feature_version="1", current_feature_version="2")
        assert not d.trigger("upstream_change").triggered and not d.alerts


class TestManualAndUrgency:
    def test_manual_is_critical_and_listed_only_when_asked(self):
        """``manual_reason`` adds a critical ``manual`` trigger; without it there is none."""
        d = decide(manual_reason="incident 42")
        assert (d.retrain, d.urgency, d.trigger("manual").value) == (True, "critical", "incident 42")
        assert "manual" not in [t.name for t in decide().triggers]

    def test_decision_urgency_is_max_of_fired_only(self):
        """Low volume plus high drift is high; an unfired high trigger does not count."""
        assert decide(drift_score=0.5, new_samples_since_training=10**6).urgency == "high"
        d = decide(make_policy(drift_threshold=0.9), drift_score=0.5, new_samples_since_training=10**6)
        assert d.trigger("data_drift").urgency == "high" and d.urgency == "low"
        assert decide().urgency == "none" and not decide().retrain

    def test_registry_lists_every_trigger_in_report_order(self):
        """The registry holds the six seed-table triggers plus manual, in report order."""
        assert list(TRIGGERS) == ["scheduled", "data_drift", "performance_drop", "data_volume",
                                  "concept_drift", "upstream_change", "manual"]
        assert [t.name for t in decide().triggers] == list(TRIGGERS)[:6]


class TestPersistence:
    POLICY = make_policy(drift_persistence_k=2, drift_persistence_n=3)

    def test_fires_when_k_of_last_n_exceed(self):
        """Drift above threshold in 2 of the last 3 observations (current included) fires."""
        result = decide(self.POLICY, drift_history=(0.5, 0.2, 0.1, 0.2)).trigger("data_drift")
        assert result.triggered and result.metadata["persistence"]["held"] == 2

    def test_single_noisy_window_is_suppressed_and_said(self):
        """One window above threshold out of three does not fire and is listed as not persistent."""
        d = decide(self.POLICY, drift_score=0.4, drift_history=(0.1, 0.1, 0.4))
        assert not d.retrain
        assert [(s.trigger, s.kind) for s in d.suppressed] == [("data_drift", "not_persistent")]

    def test_old_exceedances_outside_window_do_not_count(self):
        """Exceedances older than the last n observations are forgotten."""
        assert not decide(self.POLICY, drift_history=(0.9, 0.9, 0.1, 0.1, 0.2)).trigger("data_drift").triggered

    def test_current_score_must_exceed(self):
        """Drift that held before but is gone now does not fire."""
        assert not decide(self.POLICY, drift_history=(0.2, 0.2, 0.1)).trigger("data_drift").triggered

    def test_a_window_longer_than_the_kept_history_is_refused(self):
        """The decision worker keeps the last 50 drift scores: a policy asking for more could never fire."""
        from config.policy import PolicyError

        with pytest.raises((PolicyError, ValueError), match="drift_persistence_n"):
            make_policy(drift_persistence_k=60, drift_persistence_n=100)
        assert make_policy(drift_persistence_k=50, drift_persistence_n=50).triggers.drift_persistence_n == 50

    def test_history_must_end_with_current_score(self):
        """A history whose newest entry is not the current score is rejected."""
        with pytest.raises(ValueError, match="newest entry"):
            ModelSignals(drift_score=0.3, drift_history=(0.1, 0.2))


class TestPerformanceSuppression:
    DROP = {"baseline_accuracy": 0.9, "current_accuracy": 0.8}

    def test_insufficient_labels_suppress(self):
        """A drop measured on fewer than ``min_labeled_samples`` labels is ignored, and said so."""
        pol = make_policy(min_labeled_samples=200, use_confidence_interval=False)
        d = decide(pol, n_labeled=199, **self.DROP)
        assert not d.retrain
        assert [(s.trigger, s.kind) for s in d.suppressed] == [("performance_drop", "insufficient_labels")]
        assert "199 labeled samples" in d.suppressed[0].reason
        assert decide(pol, n_labeled=200, **self.DROP).retrain

    def test_drop_within_given_interval_is_suppressed(self):
        """A baseline inside ``accuracy_ci`` is no significant drop; outside it fires."""
        d = decide(accuracy_ci=(0.7, 0.92), **self.DROP)
        assert not d.retrain and d.suppressed[0].kind == "within_confidence_interval"
        assert decide(accuracy_ci=(0.75, 0.85), **self.DROP).retrain

    def test_interval_from_standard_error(self):
        """``accuracy_stderr`` builds a 95% interval: 0.06 covers the baseline, 0.04 does not."""
        assert not decide(accuracy_stderr=0.06, **self.DROP).retrain
        assert decide(accuracy_stderr=0.04, **self.DROP).retrain

    def test_wilson_interval_from_label_count(self):
        """With only ``n_labeled``, accuracy gets a Wilson interval: 100 labels are too few, 10k are not."""
        drop = {"baseline_accuracy": 0.9, "current_accuracy": 0.85}
        assert decide(n_labeled=100, **drop).suppressed[0].kind == "within_confidence_interval"
        assert decide(n_labeled=10_000, **drop).retrain

    def test_interval_check_can_be_turned_off(self):
        """``use_confidence_interval = false`` lets a drop inside the interval fire."""
        assert decide(make_policy(use_confidence_interval=False), accuracy_ci=(0.7, 0.92), **self.DROP).retrain


T0 = datetime(2024, 6, 1, 0, 0, tzinfo=UTC)


def _retraining(urgency_drift: float = 0.2):
    """A decision that retrains: medium (0.2) or high (0.5) data drift."""
    return evaluate(make_policy(), signals(drift_score=urgency_drift), T0)


class TestDebounce:
    POLICY = make_policy(debounce_quiet="30s", debounce_max_wait="5m", cooldown="0s", max_trainings_per_day=100)

    def _simulate(self, signal_times, until):
        """Tick a worker each second; return the times it decided (non-defer)."""
        state, decided = GuardState(), []
        signal_set = set(signal_times)
        t = T0
        while t <= until:
            if t in signal_set:
                state = replace(state, first_pending=state.first_pending or t, last_pending=t)
            if state.first_pending is not None:
                if apply_guards(_retraining(), state, self.POLICY, t).action != "defer":
                    decided.append(t)
                    state = replace(state, first_pending=None, last_pending=None)
            t += timedelta(seconds=1)
        return decided

    def test_burst_becomes_one_decision_after_the_quiet_period(self):
        """Fifteen signals two seconds apart yield one decision, 30 s after the last one."""
        burst = [T0 + timedelta(seconds=2 * i) for i in range(15)]
        assert self._simulate(burst, T0 + timedelta(minutes=3)) == [burst[-1] + timedelta(seconds=30)]

    def test_max_wait_caps_an_endless_stream(self):
        """A signal every 10 s is decided at most 5 min after the first pending one."""
        stream = [T0 + timedelta(seconds=10 * i) for i in range(72)]
        assert self._simulate(stream, T0 + timedelta(minutes=15)) == [
            T0 + timedelta(seconds=300), T0 + timedelta(seconds=610), T0 + timedelta(seconds=740)]

    def test_waits_until_the_earlier_deadline(self):
        """While waiting, ``until`` is the earlier of quiet time and maximum wait."""
        state = GuardState(first_pending=T0, last_pending=T0 + timedelta(seconds=290))
        result = debounce(state, self.POLICY, T0 + timedelta(seconds=295))
        assert not result.passed and result.until == T0 + timedelta(minutes=5)
        assert debounce(state, self.POLICY, T0 + timedelta(seconds=300)).passed

    def test_critical_does_not_wait(self):
        """A critical (manual) decision skips the quiet period."""
        state = GuardState(first_pending=T0, last_pending=T0)
        assert debounce(state, self.POLICY, T0, "critical").passed
        assert not debounce(state, self.POLICY, T0, "high").passed


class TestCooldown:
    POLICY = make_policy(cooldown="6h")
    STATE = GuardState(last_training=T0)

    def test_medium_is_suppressed_until_cooldown_ends(self):
        """A medium decision 1 h after a training is suppressed until the cooldown ends."""
        g = apply_guards(_retraining(0.2), self.STATE, self.POLICY, T0 + timedelta(hours=1))
        assert (g.action, g.guard, g.until) == ("suppress", "cooldown", T0 + timedelta(hours=6))

    def test_passes_exactly_at_the_end(self):
        """At exactly ``cooldown`` after the last training the cooldown no longer holds."""
        assert cooldown(self.STATE, self.POLICY, T0 + timedelta(hours=6), "low").passed
        assert not cooldown(self.STATE, self.POLICY, T0 + timedelta(hours=6) - timedelta(seconds=1), "low").passed

    def test_high_and_critical_override(self):
        """High and critical urgency start a training inside the cooldown."""
        g = apply_guards(_retraining(0.5), self.STATE, self.POLICY, T0 + timedelta(hours=1))
        assert (g.action, g.queue) == ("start", "training.high")
        assert cooldown(self.STATE, self.POLICY, T0 + timedelta(hours=1), "critical").passed


class TestBudget:
    POLICY = make_policy(max_trainings_per_day=2, cooldown="0s")

    def test_exhausted_budget_suppresses_even_high(self):
        """Two trainings in the last 24 h exhaust a budget of two, whatever the urgency."""
        state = GuardState(recent_trainings=(T0 - timedelta(hours=20), T0 - timedelta(hours=2)))
        g = apply_guards(_retraining(0.5), state, self.POLICY, T0)
        assert (g.action, g.guard, g.until) == ("suppress", "budget", T0 + timedelta(hours=4))

    def test_training_exactly_a_day_old_no_longer_counts(self):
        """The rolling day excludes a training exactly 24 h old."""
        state = GuardState(recent_trainings=(T0 - timedelta(hours=24), T0 - timedelta(hours=2)))
        assert budget(state, self.POLICY, T0).passed
        assert not budget(state, self.POLICY, T0 - timedelta(seconds=1)).passed

    def test_zero_budget_never_trains(self):
        """``max_trainings_per_day = 0`` forbids training, with no retry time."""
        result = budget(GuardState(), make_policy(max_trainings_per_day=0), T0)
        assert not result.passed and result.until is None


class TestSingleFlight:
    POLICY = make_policy(cooldown="0s", debounce_quiet="0s")

    def test_triggers_during_a_pipeline_coalesce_into_one_follow_up(self):
        """Five decisions while a pipeline runs all defer; its end brings exactly one start."""
        state = GuardState(in_flight="pipe-1", last_training=T0)
        outcomes = []
        for i in range(5):
            t = T0 + timedelta(minutes=i)
            state = replace(state, first_pending=state.first_pending or t, last_pending=t)
            outcomes.append(apply_guards(_retraining(0.5), state, self.POLICY, t))
        assert {(g.action, g.guard, g.follow_up) for g in outcomes} == {("defer", "single_flight", True)}
        state = replace(state, in_flight=None)  # pipe-1 ended: the worker re-decides once
        follow_up = apply_guards(_retraining(0.5), state, self.POLICY, T0 + timedelta(minutes=9))
        assert follow_up.action == "start"

    def test_free_model_passes(self):
        """With no pipeline in flight the guard passes."""
        assert single_flight(GuardState()).passed and not single_flight(GuardState(in_flight="p")).passed


class TestApplyGuards:
    def test_queue_by_urgency(self):
        """High and critical use ``training.high``; low and medium ``training.low``."""
        assert [queue_for(u) for u in ("low", "medium", "high", "critical")] == [
            "training.low", "training.low", "training.high", "training.high"]

    def test_start_low_urgency_on_low_queue(self):
        """A clean medium decision starts on ``training.low`` and records every check."""
        g = apply_guards(_retraining(0.2), GuardState(), make_policy(), T0)
        assert (g.action, g.queue) == ("start", "training.low")
        assert [c.guard for c in g.checks] == ["debounce", "single_flight", "budget", "cooldown"]

    def test_nothing_fired_is_none_and_suppressed_only_is_suppress(self):
        """No trigger means ``none``; a policy suppression means ``suppress`` with its reason."""
        assert apply_guards(decide(), GuardState(), make_policy(), NOW).action == "none"
        g = apply_guards(decide(upstream_breaking=True), GuardState(), make_policy(), NOW)
        assert g.action == "suppress" and "breaking upstream change" in g.reason


class TestSnapshot:
    def test_times_normalised_to_utc_and_null_means_absent(self):
        """Naive, ``Z`` and offset times are the same UTC instant; ``null`` is an absent field."""
        s = ModelSignals.from_snapshot({"last_training_date": "2024-01-01T05:30:00+05:30",
                                        "now": "2024-01-02T00:00:00", "drift_score": None})
        assert s.last_training_date == datetime(2024, 1, 1, tzinfo=UTC)
        assert s.now == datetime(2024, 1, 2, tzinfo=UTC) and s.drift_score is None

    def test_bad_fields_are_named_in_one_line(self):
        """Unknown, missing and mistyped fields are each named in one ValueError line."""
        with pytest.raises(ValueError) as err:
            ModelSignals.from_snapshot({"drift_scroe": 0.2, "new_samples_since_training": -1})
        message = str(err.value)
        assert "\n" not in message
        for part in ("unknown field 'drift_scroe'", "missing field 'last_training_date'",
                     "new_samples_since_training"):
            assert part in message

    def test_round_trip(self):
        """``to_snapshot`` output parses back to equal signals."""
        s = signals(drift_history=(0.1, 0.3), upstream_changes=UpstreamChanges(removed=("a",)),
                    accuracy_ci=(0.7, 0.8), drifted_features=("a",), now=NOW)
        assert ModelSignals.from_snapshot(json.loads(json.dumps(s.to_snapshot()))) == s


def _run(*args, cwd: Path):
    return subprocess.run([RETRAIN, "decide", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


class TestCli:
    @pytest.fixture
    def files(self, tmp_path):
        (tmp_path / "p.toml").write_text('[model]\nname = "churn"\n[triggers]\ndrift_threshold = 0.2\n')
        snap = {"last_training_date": "2024-05-01T00:00:00Z", "now": "2024-06-01T00:00:00Z",
                "drift_score": 0.35, "drifted_features": ["age"], "current_accuracy": 0.9,
                "baseline_accuracy": 0.91, "new_samples_since_training": 100}
        (tmp_path / "s.json").write_text(json.dumps(snap))
        return tmp_path

    def test_json_shape(self, files):
        """``--json`` prints one object with retrain, urgency and the six named triggers."""
        out = _run("--policy", "p.toml", "--snapshot", "s.json", "--json", cwd=files)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert (doc["retrain"], doc["urgency"]) == (True, "high")
        assert [t["name"] for t in doc["triggers"]] == [
            "scheduled", "data_drift", "performance_drop", "data_volume", "concept_drift", "upstream_change"]
        for t in doc["triggers"]:
            assert {"name", "triggered", "urgency", "reason", "value", "threshold"} <= t.keys()
        drift = doc["triggers"][1]
        assert (drift["triggered"], drift["value"], drift["threshold"]) == (True, 0.35, 0.2)
        assert doc["triggers"][0]["value"] == 31

    def test_table_without_json(self, files):
        """Without ``--json`` a table names the verdict and the triggers."""
        out = _run("--policy", "p.toml", "--snapshot", "s.json", cwd=files)
        assert out.returncode == 0 and "retrain" in out.stdout and "data_drift" in out.stdout

    @pytest.mark.parametrize("case", ["bad_snapshot", "typo_policy", "missing_snapshot", "missing_policy",
                                      "year_one"])
    def test_unusable_input_exits_2_with_one_line(self, files, case):
        """Bad snapshot, typo'd policy key or a missing file: exit 2, one line on stderr, no stdout."""
        policy, snapshot = "p.toml", "s.json"
        if case == "bad_snapshot":
            (files / "s.json").write_text('{"last_training_date": "yesterday", "drift_score": "high"}')
        elif case == "typo_policy":
            (files / "p.toml").write_text('[model]\nname = "churn"\n[triggers]\ndrift_treshold = 0.2\n')
        elif case == "year_one":  # before year 1 in UTC: an OverflowError, exit 1, before
            (files / "s.json").write_text('{"last_training_date": "0001-01-01T00:00:00+05:00"}')
        elif case == "missing_snapshot":
            snapshot = "nope.json"
        else:
            policy = "nope.toml"
        out = _run("--policy", policy, "--snapshot", snapshot, "--json", cwd=files)
        assert out.returncode == 2 and out.stdout == ""
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in out.stderr
        expected = {"bad_snapshot": "drift_score", "typo_policy": "drift_treshold",
                    "missing_snapshot": "nope.json", "missing_policy": "nope.toml",
                    "year_one": "last_training_date"}[case]
        assert expected in lines[0]


class TestWilsonInterval:
    @pytest.mark.parametrize("correct, n", [(0, 10), (3, 10), (10, 10), (450, 500), (87, 1000), (9999, 10000)])
    def test_closed_form_matches_scipy(self, correct, n):
        """The closed-form Wilson interval equals scipy's binomtest Wilson interval."""
        from scipy.stats import binomtest

        from workers.decision.triggers import wilson_interval

        ci = binomtest(correct, n).proportion_ci(0.95, method="wilson")
        low, high = wilson_interval(correct, n, 0.95)
        assert low == pytest.approx(ci.low, abs=1e-12)
        assert high == pytest.approx(ci.high, abs=1e-12)
