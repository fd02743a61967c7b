"""The pure rollout analysis (workers.rollout.analysis) and state machine (workers.rollout.machine)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from config.policy import Phase, RolloutSection
from workers.rollout.analysis import (
    Analysis,
    ArmStats,
    PairStats,
    accuracy_difference_interval,
    analyze_phase,
    anytime_interval,
    shadow_pairs,
    summarize,
)
from workers.rollout.machine import (
    Emit,
    Promote,
    Rollback,
    RolloutState,
    SetTraffic,
    StaleRevision,
    TransitionError,
    abort,
    action_from_dict,
    analyze,
    check_revision,
    pause,
    promote,
    resume,
    rollback,
    start,
    step,
    traffic_for,
)

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
CFG = RolloutSection()
SHADOW, CANARY, P25, P50, P100 = CFG.phases


def arm(version: str, n: int = 2000, errors: int = 2, labeled: int = 0, accuracy: float = 0.85,
        p99: float = 20.0, scores: list[float] | None = None, seed: int = 0) -> ArmStats:
    """An arm with ``n`` requests, latency samples around ``p99`` and ``labeled`` labels."""
    rng = np.random.default_rng(seed)
    latency = (rng.gamma(4.0, 1.0, n) / np.quantile(rng.gamma(4.0, 1.0, 20000), 0.99) * p99).tolist()
    return ArmStats(version=version, requests=n, errors=errors, latency_ms=latency, labeled=labeled,
                    correct=round(labeled * accuracy), scores=scores if scores is not None else [])


def good_pair(n: int = 2000) -> tuple[ArmStats, ArmStats]:
    return arm("1", n, labeled=n // 2, seed=1), arm("2", n, labeled=n // 2, seed=2)


def pairs(n: int = 1000, agreement: float = 0.95) -> PairStats:
    return PairStats(n=n, agree=round(n * agreement))


def names(actions: list) -> list[str]:
    return [a.type if isinstance(a, Emit) else a.kind for a in actions]


class TestSummarize:
    def test_counts_requests_errors_labels_per_version(self):
        """summarize aggregates the router's records per version; an errored request is never labeled."""
        keys = ("version", "latency_ms", "error", "prediction", "score", "label")
        rows = [("1", 2.0, False, 1, 0.9, 1), ("1", 3.0, False, 0, 0.2, 1), ("1", 9.0, True, None, None, 1),
                (2, 4.0, False, 1, 0.8, None)]
        records = [{**dict(zip(keys, row)), "shadow_of": None} for row in rows]
        arms = summarize(records)
        assert (arms["1"].requests, arms["1"].errors, arms["1"].labeled, arms["1"].correct) == (3, 1, 2, 1)
        assert arms["1"].scores == [0.9, 0.2] and arms["1"].latency_ms == [2.0, 3.0, 9.0]
        assert (arms["2"].requests, arms["2"].labeled, arms["2"].accuracy) == (1, 0, None)

    def test_regression_sums_squared_errors(self):
        """For regression a label contributes its squared error (and its square) instead of a match."""
        records = [{"version": "1", "latency_ms": 1, "error": False, "prediction": p, "label": y, "shadow_of": None}
                   for p, y in ((1.0, 2.0), (3.0, 1.0))]
        a = summarize(records, task="regression")["1"]
        assert (a.labeled, a.sq_err_sum, a.sq_err_sq_sum, a.mse) == (2, 5.0, 17.0, 2.5)
        assert a.scores == [1.0, 3.0]

    def test_a_regression_label_that_is_not_a_number_is_counted_not_raised(self):
        """One bad feedback entry ("n/a", NaN, a boolean) must not stop every later look at the rollout: it is counted
        as unusable, and the good labels still make the squared error."""
        rows = ((1.0, 2.0), (3.0, "n/a"), (2.0, float("nan")), (2.0, True), (3.0, "1.0"))
        records = [{"version": "1", "latency_ms": 1, "error": False, "prediction": p, "label": y, "shadow_of": None}
                   for p, y in rows]
        a = summarize(records, task="regression")["1"]
        assert (a.labeled, a.unusable_labels, a.sq_err_sum) == (2, 3, 5.0)

    def test_shadow_pairs_join_by_request_id(self):
        """Each mirrored answer is paired with production's answer to the same request id."""
        records = []
        for i in range(10):
            records.append({"request_id": f"r{i}", "version": "1", "latency_ms": 1, "error": False,
                            "prediction": 1, "score": 0.6, "label": None, "shadow_of": None})
            records.append({"request_id": f"s{i}", "version": "2", "latency_ms": 1, "error": i == 9,
                            "prediction": 1 if i < 7 else 0, "score": 0.5, "label": None, "shadow_of": f"r{i}"})
        p = shadow_pairs(records, production="1", candidate="2")
        assert (p.n, p.agree) == (9, 7)
        assert len(p.production_scores) == len(p.candidate_scores) == 9


class TestSequentialTest:
    @staticmethod
    def _paths(rng, p_c: float, p_p: float, seeds: int, schedule: list[tuple[int, float]]):
        """Cumulative labeled counts at each look for ``seeds`` runs; schedule = (looks, candidate share)."""
        per_look = 40
        n_c, x_c, n_p, x_p = [np.zeros(seeds)], [np.zeros(seeds)], [np.zeros(seeds)], [np.zeros(seeds)]
        for looks, share in schedule:
            for _ in range(looks):
                k_c = rng.binomial(per_look, share, seeds)
                k_p = per_look - k_c
                n_c.append(n_c[-1] + k_c)
                x_c.append(x_c[-1] + rng.binomial(k_c, p_c))
                n_p.append(n_p[-1] + k_p)
                x_p.append(x_p[-1] + rng.binomial(k_p, p_p))
        return (np.array(a[1:]) for a in (x_c, n_c, x_p, n_p))

    def _rollback_rate(self, p_c, p_p, delta, alpha=0.05, seeds=2000, schedule=((60, 0.05), (60, 0.25), (120, 0.5))):
        rng = np.random.default_rng(12345)
        x_c, n_c, x_p, n_p = self._paths(rng, p_c, p_p, seeds, list(schedule))
        ok = (n_c >= 30) & (n_p >= 30)
        _, _, high = accuracy_difference_interval(x_c, n_c, x_p, n_p, alpha, 1.5 * max(delta, 0.01))
        return float(np.any(ok & (high < -delta), axis=0).mean())

    def test_false_rollback_rate_at_least_favourable_null_within_alpha(self):
        """A candidate exactly max_accuracy_drop worse (the edge of H0) is rolled back in at most
        alpha of runs, although it is looked at 240 times while the traffic share changes."""
        rate = self._rollback_rate(p_c=0.83, p_p=0.85, delta=0.02)
        assert rate <= 0.05

    def test_false_rollback_rate_equal_accuracy_zero_tolerance_within_alpha(self):
        """With no tolerated drop, an equal candidate is still rolled back in at most alpha of runs."""
        assert self._rollback_rate(p_c=0.85, p_p=0.85, delta=0.0, schedule=((240, 0.5),)) <= 0.05

    def test_naive_repeated_threshold_exceeds_alpha(self):
        """The fixed-threshold rule at every look would roll back far more than alpha at the edge of H0
        (the reason for a sequential bound)."""
        rng = np.random.default_rng(7)
        x_c, n_c, x_p, n_p = self._paths(rng, 0.83, 0.85, 2000, [(60, 0.05), (60, 0.25), (120, 0.5)])
        ok = (n_c >= 30) & (n_p >= 30)
        naive = np.any(ok & (x_p / np.maximum(n_p, 1) - x_c / np.maximum(n_c, 1) > 0.02), axis=0).mean()
        assert naive > 0.3

    def test_power_against_a_five_point_drop(self):
        """A candidate 5 points worse is detected (bound below -max_accuracy_drop) in nearly every run
        once about 8,000 of its answers are labeled."""
        schedule = ((60, 0.05), (60, 0.25), (400, 0.5))
        assert self._rollback_rate(p_c=0.80, p_p=0.85, delta=0.02, seeds=500, schedule=schedule) >= 0.99

    def test_interval_shrinks_with_evidence(self):
        """The always-valid interval contains the estimate and narrows as the variance falls."""
        widths = [np.subtract(*anytime_interval(0.1, v, 0.05, 0.03)[::-1]) for v in (1e-2, 1e-3, 1e-4, 1e-5)]
        assert all(a > b > 0 for a, b in zip(widths, widths[1:]))
        lo, hi = anytime_interval(0.1, 1e-4, 0.05, 0.03)
        assert lo < 0.1 < hi


class TestVerdicts:
    def test_advance_when_evidence_met_and_checks_pass(self):
        """An equal candidate with the phase's minimum duration, requests and labels advances."""
        prod, cand = good_pair()
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=CANARY.min_duration)
        assert a.verdict == "advance" and not a.insufficient_evidence
        assert a.sample_sizes["candidate_labeled"] == 1000
        assert {c.name: c.status for c in a.checks}["accuracy"] == "pass"

    def test_hold_before_min_duration(self):
        """Before the minimum duration a healthy phase holds with insufficient evidence."""
        prod, cand = good_pair()
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=CANARY.min_duration - timedelta(seconds=1))
        assert (a.verdict, a.insufficient_evidence) == ("hold", True)
        assert any("minimum duration" in r for r in a.reasons)

    def test_hold_without_enough_requests_or_labels(self):
        """Too few candidate requests and labels hold the phase, naming each shortfall."""
        a = analyze_phase(P25, CFG, arm("1", 3000, labeled=800), arm("2", 120, labeled=40), elapsed=P25.min_duration)
        assert (a.verdict, a.insufficient_evidence) == ("hold", True)
        assert any("candidate requests" in r for r in a.reasons)
        assert any("labeled candidate requests" in r for r in a.reasons)

    def test_rollback_on_worse_accuracy(self):
        """A candidate confidently worse by more than max_accuracy_drop is rolled back, even before the
        minimum duration."""
        prod = arm("1", 4000, labeled=3000, accuracy=0.85)
        cand = arm("2", 2000, labeled=1500, accuracy=0.75)
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=timedelta(minutes=1))
        assert a.verdict == "rollback"
        assert any(r.startswith("accuracy") for r in a.reasons)
        assert a.metrics["accuracy_diff_high"] < -CFG.max_accuracy_drop

    def test_noisy_accuracy_drop_holds_instead_of_rolling_back(self):
        """An observed drop beyond the tolerance on few labels holds for more evidence, not a rollback."""
        prod = arm("1", 4000, labeled=2000, accuracy=0.85)
        cand = arm("2", 300, labeled=100, accuracy=0.79)
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=CANARY.min_duration)
        assert (a.verdict, a.insufficient_evidence) == ("hold", True)
        assert {c.name: c.status for c in a.checks}["accuracy"] == "undecided"

    def test_rollback_on_worse_latency(self):
        """A candidate whose p99 latency is well above max_latency_p99_ratio times production's is rolled back."""
        prod, cand = arm("1", 2000, labeled=1000, p99=20, seed=1), arm("2", 2000, labeled=1000, p99=60, seed=2)
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=CANARY.min_duration)
        assert a.verdict == "rollback" and any(r.startswith("latency_p99") for r in a.reasons)
        assert a.metrics["latency_p99_ratio"] == pytest.approx(3.0, rel=0.2)

    def test_shadow_latency_is_shown_but_not_judged(self):
        """In shadow the candidate answers mirrored requests at idle CPU priority, so its p99 is not comparable with
        production's: three times production's p99 is reported, does not roll back, and the phase still advances."""
        prod, cand = arm("1", 2000, labeled=1000, p99=20, seed=1), arm("2", 2000, labeled=1000, p99=60, seed=2)
        a = analyze_phase(SHADOW, CFG, prod, cand, pairs(2000, 0.95), elapsed=SHADOW.min_duration)
        latency = {c.name: c for c in a.checks}["latency_p99"]
        assert latency.status == "skipped" and "not judged in shadow" in latency.reason
        assert a.metrics["latency_p99_ratio"] == pytest.approx(3.0, rel=0.2) and a.verdict == "advance"

    def test_rollback_on_rising_errors(self):
        """A candidate erroring on 10 % of requests against production's 0.1 % is rolled back."""
        prod = arm("1", 4000, errors=4, labeled=2000)
        cand = arm("2", 500, errors=50, labeled=250)
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=timedelta(minutes=5))
        assert a.verdict == "rollback" and any(r.startswith("error_rate") for r in a.reasons)

    def test_handful_of_errors_at_small_n_does_not_roll_back(self):
        """Two errors in 40 requests (5 %, beyond the 1 % allowance) hold rather than roll back."""
        prod = arm("1", 4000, errors=4, labeled=2000)
        cand = arm("2", 40, errors=2, labeled=0)
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=timedelta(minutes=5))
        assert a.verdict == "hold"
        assert {c.name: c.status for c in a.checks}["error_rate"] == "undecided"

    def test_rollback_on_shadow_disagreement(self):
        """In shadow, a candidate agreeing with production on only 70 % of requests is rolled back."""
        prod, cand = good_pair()
        a = analyze_phase(SHADOW, CFG, prod, cand, pairs(2000, 0.70), elapsed=SHADOW.min_duration)
        assert a.verdict == "rollback" and any(r.startswith("agreement") for r in a.reasons)

    def test_shadow_advances_with_agreement(self):
        """In shadow, enough agreeing pairs and time advance; without pairs the shadow phase holds."""
        prod, cand = good_pair()
        agreeing = analyze_phase(SHADOW, CFG, prod, cand, pairs(2000, 0.95), elapsed=SHADOW.min_duration)
        assert agreeing.verdict == "advance"
        held = analyze_phase(SHADOW, CFG, prod, cand, None, elapsed=SHADOW.min_duration)
        assert (held.verdict, held.insufficient_evidence) == ("hold", True)

    def test_rollback_on_score_distribution_shift(self):
        """A candidate whose scores moved far from production's (PSI above max_score_psi) is rolled back."""
        rng = np.random.default_rng(3)
        prod = arm("1", 2000, labeled=1000, scores=rng.beta(2, 5, 2000).tolist())
        cand = arm("2", 2000, labeled=1000, scores=rng.beta(5, 2, 2000).tolist())
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=CANARY.min_duration)
        assert a.verdict == "rollback" and a.metrics["score_psi"] > CFG.max_score_psi
        same = arm("2", 2000, labeled=1000, scores=rng.beta(2, 5, 2000).tolist())
        assert analyze_phase(CANARY, CFG, prod, same, elapsed=CANARY.min_duration).verdict == "advance"

    def test_regression_mse_increase_rolls_back(self):
        """For regression, a candidate with a confidently doubled MSE is rolled back; an equal one advances."""
        rng = np.random.default_rng(4)

        def reg(version, scale):
            e2 = (rng.normal(0, scale, 1500)) ** 2
            return ArmStats(version, requests=2000, errors=0, latency_ms=arm(version).latency_ms, labeled=1500,
                            sq_err_sum=float(e2.sum()), sq_err_sq_sum=float((e2**2).sum()), task="regression")

        prod = reg("1", 1.0)
        assert analyze_phase(CANARY, CFG, prod, reg("2", 1.5), elapsed=CANARY.min_duration).verdict == "rollback"
        assert analyze_phase(CANARY, CFG, prod, reg("2", 1.0), elapsed=CANARY.min_duration).verdict == "advance"

    def test_carried_labels_join_the_accuracy_test(self):
        """Labels from earlier phases count: a drop invisible in this window alone is confident overall."""
        prod, cand = arm("1", 600, labeled=300, accuracy=0.85), arm("2", 600, labeled=300, accuracy=0.77)
        alone = analyze_phase(P25, CFG, prod, cand, elapsed=P25.min_duration)
        carried = (arm("1", 0, labeled=6000, accuracy=0.85).totals(), arm("2", 0, labeled=3000, accuracy=0.77).totals())
        joined = analyze_phase(P25, CFG, prod, cand, elapsed=P25.min_duration, carried=carried)
        assert alone.verdict == "hold" and joined.verdict == "rollback"
        assert joined.sample_sizes["candidate_labeled_total"] == 3300

    def test_full_traffic_phase_uses_carried_production_baseline(self):
        """At 100 % (no production traffic) errors and latency are compared with production's earlier phases."""
        carried = (arm("1", 5000, errors=5, labeled=3000).totals(), arm("2", 1000, labeled=500).totals())
        cand = arm("2", 2000, errors=200, labeled=1000)
        a = analyze_phase(P100, CFG, ArmStats("1"), cand, elapsed=P100.min_duration, carried=carried)
        assert a.verdict == "rollback" and any(r.startswith("error_rate") for r in a.reasons)
        ok = analyze_phase(P100, CFG, ArmStats("1"), arm("2", 2000, labeled=1000), elapsed=P100.min_duration,
                           carried=carried)
        assert ok.verdict == "advance"

    def test_analysis_round_trips_json(self):
        """An analysis survives JSON and keeps its verdict, checks and numbers."""
        prod, cand = good_pair()
        a = analyze_phase(CANARY, CFG, prod, cand, elapsed=CANARY.min_duration)
        b = Analysis.from_dict(json.loads(json.dumps(a.to_dict(), allow_nan=False)))
        assert b == a


# --------------------------------------------------------------------------- the state machine


def healthy(state: RolloutState, now: datetime, seed: int = 0):
    """A good candidate's window for the state's phase, analysed."""
    traffic = CFG.phases[state.phase_index].traffic
    n = 4000
    n_c = n if traffic == 0 else max(int(n * traffic / 100), 600)
    prod = arm("1", n if traffic < 100 else 0, labeled=(n // 2) if traffic < 100 else 0, seed=seed)
    cand = arm("2", n_c, labeled=n_c // 2, seed=seed + 1)
    return analyze(state, CFG, prod, cand, pairs(n, 0.95), now)


def starved(state: RolloutState, now: datetime):
    """A window with too few candidate requests."""
    return analyze(state, CFG, arm("1", 4000, labeled=2000), arm("2", 10, labeled=0), pairs(50, 0.95), now)


class TestStateMachine:
    def test_full_walk_to_completion(self):
        """A good candidate walks shadow -> canary -> 25 -> 50 -> 100 -> completed with matching traffic."""
        state, actions = start("churn", "2", "1", CFG, T0)
        assert names(actions) == ["set_traffic", "rollout.started"]
        assert traffic_for(state, CFG).shadow == "2" and state.status == "shadow"
        now, seen = T0, []
        for phase in CFG.phases:
            now += phase.min_duration
            rev = state.revision
            state, actions = step(state, healthy(state, now), now, CFG)
            assert state.revision == rev + 1
            seen.append((state.status, traffic_for(state, CFG).candidate_percent))
        assert seen == [("canary", 5), ("progressive", 25), ("progressive", 50), ("progressive", 100), ("completed", 0)]
        assert names(actions) == ["set_traffic", "promote", "rollout.completed"]
        assert actions[1] == Promote("2", previous="1")
        assert traffic_for(state, CFG).production == "2" and traffic_for(state, CFG).candidate is None
        advances = [h["to_phase"] for h in state.history if h.get("action") == "advance"]
        assert advances == ["canary", "25%", "50%", "100%"]

    def test_labels_are_carried_across_phases(self):
        """Advancing adds the finished phase's labeled counts to the state's carried totals."""
        state, _ = start("churn", "2", "1", CFG, T0)
        now = T0 + SHADOW.min_duration
        first = healthy(state, now)
        state, _ = step(state, first, now, CFG)
        now += CANARY.min_duration
        second = healthy(state, now)
        state, _ = step(state, second, now, CFG)
        expected = first.window["candidate"]["labeled"] + second.window["candidate"]["labeled"]
        assert state.carried["candidate"]["labeled"] == expected
        assert state.carried_arms()[1].labeled == expected

    def test_rollback_verdict_returns_traffic(self):
        """A rollback verdict ends the rollout: production only, Rollback action, event and alert."""
        state, _ = start("churn", "2", "1", CFG, T0)
        now = T0 + timedelta(minutes=5)
        bad = analyze(state, CFG, arm("1", 4000), arm("2", 4000), pairs(4000, 0.5), now)
        state, actions = step(state, bad, now, CFG)
        assert state.status == "rolled_back"
        assert names(actions) == ["set_traffic", "rollback", "rollout.rolled_back", "alert.raised"]
        assert actions[0] == SetTraffic(0.0, False, production="1", candidate=None)
        assert isinstance(actions[1], Rollback) and "agreement" in actions[1].reason
        assert traffic_for(state, CFG).candidate is None

    def test_insufficient_evidence_holds_then_pauses(self):
        """Without evidence the phase holds, starts waiting after min_duration and pauses after max_wait."""
        state, _ = start("churn", "2", "1", CFG, T0)
        now = T0 + timedelta(minutes=10)
        state, actions = step(state, starved(state, now), now, CFG)
        assert (state.status, state.waiting_since, actions) == ("shadow", None, [])
        assert state.insufficient_evidence
        now = T0 + SHADOW.min_duration
        state, _ = step(state, starved(state, now), now, CFG)
        assert state.waiting_since == now
        now += CFG.max_wait - timedelta(seconds=1)
        state, actions = step(state, starved(state, now), now, CFG)
        assert state.status == "shadow" and actions == []
        now += timedelta(seconds=1)
        state, actions = step(state, starved(state, now), now, CFG)
        assert state.status == "paused" and state.paused
        assert names(actions) == ["rollout.paused", "alert.raised"]
        assert traffic_for(state, CFG).shadow == "2"  # pausing keeps the traffic

    def test_insufficient_evidence_aborts_when_configured(self):
        """With on_insufficient_evidence = abort and a phase max_wait, the wait ends in an abort."""
        phases = [Phase(name="canary", traffic=5, min_duration=timedelta(minutes=1), min_requests=500,
                        max_wait=timedelta(minutes=10))]
        cfg = RolloutSection(phases=phases, on_insufficient_evidence="abort")
        state, _ = start("churn", "2", "1", cfg, T0)
        for minutes in (1, 11):
            now = T0 + timedelta(minutes=minutes)
            a = analyze(state, cfg, arm("1", 4000), arm("2", 10), None, now)
            state, actions = step(state, a, now, cfg)
        assert state.status == "aborted"
        assert names(actions)[:3] == ["set_traffic", "rollback", "rollout.aborted"]
        assert actions[1].aborted and traffic_for(state, cfg).candidate is None

    def test_paused_rollout_still_rolls_back_but_does_not_advance(self):
        """A paused rollout ignores advance verdicts but still rolls back on a rollback verdict."""
        state, _ = start("churn", "2", "1", CFG, T0)
        state, _ = pause(state, "ana", "investigating", T0)
        now = T0 + SHADOW.min_duration
        state, actions = step(state, healthy(state, now), now, CFG)
        assert (state.status, state.phase, actions) == ("paused", "shadow", [])
        bad = analyze(state, CFG, arm("1", 4000), arm("2", 4000), pairs(4000, 0.5), now)
        state, _ = step(state, bad, now, CFG)
        assert state.status == "rolled_back"

    def test_stale_or_terminal_steps_change_nothing(self):
        """An analysis of another phase, or any step on a finished rollout, is ignored (same revision)."""
        state, _ = start("churn", "2", "1", CFG, T0)
        now = T0 + SHADOW.min_duration
        old = healthy(state, now)
        state, _ = step(state, old, now, CFG)
        again, actions = step(state, old, now, CFG)
        assert again is state and actions == []
        done, _ = abort(state, "ana", "no", now)
        assert step(done, healthy(done, now), now, CFG) == (done, [])

    def test_a_rollout_keeps_the_phases_it_began_with(self):
        """Phases inserted into the policy mid-rollout change nothing for the running rollout: its
        current phase is still analysed, it advances along its own phases (sub-second durations kept)."""
        quick = RolloutSection(phases=[Phase(name="shadow", traffic=0, min_duration=timedelta(milliseconds=500)),
                                       *CFG.phases[1:]])
        state, _ = start("churn", "2", "1", quick, T0)
        state = RolloutState.from_dict(json.loads(json.dumps(state.to_dict())))
        now = T0 + timedelta(seconds=1)
        state, _ = step(state, healthy(state, now), now, quick)
        assert (state.phase, traffic_for(state, quick).candidate_percent) == ("canary", 5)
        edited = RolloutSection(phases=[CFG.phases[0], Phase(name="1%", traffic=1), *CFG.phases[1:]])
        now += CANARY.min_duration
        look = analyze(state, edited, *good_pair(4000), None, now)
        assert look.phase == "canary" and look.verdict == "advance"
        state, actions = step(state, look, now, edited)
        assert (state.phase, state.status, actions[0].candidate_percent) == ("25%", "progressive", 25)
        assert traffic_for(state, edited).candidate_percent == 25

    def test_a_state_saved_without_phases_follows_the_policy(self):
        """A state from before the rollout kept its phases reads the policy's current phases."""
        state, _ = start("churn", "2", "1", CFG, T0)
        data = state.to_dict()
        del data["phases"]
        old = RolloutState.from_dict(data)
        assert old.phases is None
        now = T0 + SHADOW.min_duration
        old, _ = step(old, healthy(old, now), now, CFG)
        assert (old.phase, traffic_for(old, CFG).candidate_percent) == ("canary", 5)

    def test_a_rollback_verdict_is_acted_on_whatever_its_phase(self):
        """An old state whose phase no longer matches the edited policy still rolls back on a bad look."""
        state, _ = start("churn", "2", "1", CFG, T0)
        state.phases = None
        now = T0 + SHADOW.min_duration
        state, _ = step(state, healthy(state, now), now, CFG)
        edited = RolloutSection(phases=[CFG.phases[0], Phase(name="1%", traffic=1), *CFG.phases[1:]])
        bad = analyze(state, edited, arm("1", 4000), arm("2", 4000, errors=1600), None, now)
        assert bad.phase == "1%" != state.phase and bad.verdict == "rollback"
        state, actions = step(state, bad, now, edited)
        assert state.status == "rolled_back" and "rollout.rolled_back" in names(actions)

    def test_revision_increments_and_stale_revision_is_refused(self):
        """Every transition increments the revision; a writer holding an older revision is refused."""
        state, _ = start("churn", "2", "1", CFG, T0)
        revisions = [state.revision]
        for op in (lambda s: pause(s, "ana", "", T0), lambda s: resume(s, "ana", "", T0),
                   lambda s: step(s, healthy(s, T0), T0, CFG), lambda s: promote(s, "ana", "", T0)):
            state, _ = op(state)
            revisions.append(state.revision)
        assert revisions == [1, 2, 3, 4, 5]
        check_revision(state, 5)
        with pytest.raises(StaleRevision):
            check_revision(state, 4)

    def test_state_round_trips_json(self):
        """A rollout state with history, carried totals and a last analysis survives JSON unchanged."""
        state, _ = start("churn", "2", "1", CFG, T0, previous="0")
        now = T0 + SHADOW.min_duration
        state, _ = step(state, healthy(state, now), now, CFG)
        state, _ = step(state, starved(state, now), now, CFG)
        state, _ = pause(state, "ana", "looking", now)
        text = json.dumps(state.to_dict(), allow_nan=False)
        back = RolloutState.from_dict(json.loads(text))
        assert back == state and back.to_dict() == state.to_dict()

    def test_actions_round_trip(self):
        """Actions serialise to tagged dicts and back (for an outbox persisted with the state)."""
        for action in (SetTraffic(5.0, False, "1", "2"), Emit("rollout.advanced", {"a": 1}), Promote("2", "1"),
                       Rollback("bad", "2", "1", manual=True)):
            assert action_from_dict(json.loads(json.dumps(action.to_dict()))) == action


class TestManualOperations:
    def _last_manual(self, state):
        return [h for h in state.history if h["kind"] == "manual"][-1]

    def test_promote_records_who_and_why(self):
        """promote completes at once and records the operator and the reason."""
        state, _ = start("churn", "2", "1", CFG, T0)
        state, actions = promote(state, "ana", "hotfix approved", T0)
        assert state.status == "completed" and Promote("2", previous="1") in actions
        entry = self._last_manual(state)
        assert (entry["action"], entry["who"], entry["why"]) == ("promote", "ana", "hotfix approved")
        event = next(a for a in actions if isinstance(a, Emit))
        assert event.type == "rollout.completed" and event.data["who"] == "ana" and event.data["manual"]

    def test_emergency_rollback_skips_analysis(self):
        """rollback returns traffic to production at once, from any live status, with who/why."""
        state, _ = start("churn", "2", "1", CFG, T0)
        state, _ = step(state, healthy(state, T0 + SHADOW.min_duration), T0 + SHADOW.min_duration, CFG)
        state, actions = rollback(state, "bob", "pager", T0)
        assert state.status == "rolled_back"
        assert names(actions)[:3] == ["set_traffic", "rollback", "rollout.rolled_back"]
        assert actions[1].manual and actions[1].to_version == "1"
        assert (self._last_manual(state)["who"], self._last_manual(state)["why"]) == ("bob", "pager")
        with pytest.raises(TransitionError):
            rollback(state, "bob", "again", T0)

    def test_rollback_after_completion_restores_old_production(self):
        """After completion an emergency rollback serves the old production version again."""
        state, _ = start("churn", "2", "1", CFG, T0)
        state, _ = promote(state, "ana", "", T0)
        state, _ = rollback(state, "bob", "regression in prod", T0)
        assert traffic_for(state, CFG).production == "1"

    def test_abort_pause_resume_recorded(self):
        """pause, resume and abort are recorded with who/why and refuse invalid states."""
        state, _ = start("churn", "2", "1", CFG, T0)
        state, actions = pause(state, "ana", "traffic spike", T0)
        assert state.status == "paused" and names(actions) == ["rollout.paused"]
        with pytest.raises(TransitionError):
            pause(state, "ana", "", T0)
        state, actions = resume(state, "ana", "spike over", T0)
        assert state.status == "shadow" and not state.paused and actions[0].data["resumed"]
        state, actions = abort(state, "carl", "wrong model", T0)
        assert state.status == "aborted" and actions[1].aborted
        assert [(h["action"], h["who"], h["why"]) for h in state.history if h["kind"] == "manual"] == [
            ("pause", "ana", "traffic spike"), ("resume", "ana", "spike over"), ("abort", "carl", "wrong model")]
        for op in (pause, resume, abort, promote):
            with pytest.raises(TransitionError):
                op(state, "ana", "", T0)

    def test_manual_operation_needs_an_operator(self):
        """A manual operation without who is refused."""
        state, _ = start("churn", "2", "1", CFG, T0)
        with pytest.raises(TransitionError):
            pause(state, " ", "why", T0)
