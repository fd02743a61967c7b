"""Power of the rollout's accuracy test: false rollbacks of equal candidates, caught bad ones.

Simulates rollouts through the real ``analyze`` / ``step`` functions with the default policy's
phases (shadow 60m -> canary 5 % 30m -> 25 % -> 50 % -> 100 %, 15m each, max_wait 2h), time
compressed: one look per simulated minute, requests arriving at ``--rpm`` per minute and split
by the phase's traffic, labels arriving for a fraction of the *served* requests after an
exponential delay (shadow answers get no labels by default: in many systems the outcome depends
on the served prediction). Half the runs have a candidate as accurate as production, half one
``--gap`` points worse. Every run is judged twice on the same seed: by the sequential test and
by the naive baseline (roll back whenever the observed candidate accuracy is below production's
minus ``max_accuracy_drop`` at a look), everything else identical.

Bar (issue 6): <= 5 % false rollbacks and 100 % of bad candidates caught (rolled back).

    .venv/bin/python bench/rollout_power.py --json [--runs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from config.policy import RolloutSection  # noqa: E402
from workers.rollout.analysis import ArmStats, PairStats  # noqa: E402
from workers.rollout.machine import analyze, start, step  # noqa: E402

T0 = datetime(2025, 1, 1, tzinfo=UTC)
MAX_SECONDS = 40.0
PAUSED_WATCH_MIN = 12 * 60
"""How long a paused rollout keeps being watched (simulated minutes) before the run ends."""
BAR_FALSE_ROLLBACKS = 0.05
BAR_CAUGHT = 1.0
ERROR_RATE = 0.002
LATENCY_P99_MS = 20.0
DISAGREEMENT = 0.07
"""Share of requests on which the two models' predictions differ (binary: correctness differs)."""


class Arm:
    """One version's window counts plus its labels still in flight."""

    def __init__(self, version: str) -> None:
        self.stats = ArmStats(version=version)
        self.arrival = np.empty(0)
        self.correct = np.empty(0, dtype=bool)

    def serve(self, rng: np.random.Generator, correct: np.ndarray, now_min: float, p: dict, labeled: bool) -> None:
        n = len(correct)
        self.stats.requests += n
        errors = rng.random(n) < ERROR_RATE
        self.stats.errors += int(errors.sum())
        self.stats.latency_count += n
        self.stats.latency_p99_ms = LATENCY_P99_MS * (1 + 0.02 * rng.standard_normal())
        if labeled:
            gets_label = (rng.random(n) < p["label_rate"]) & ~errors
            k = int(gets_label.sum())
            self.arrival = np.concatenate([self.arrival, now_min + rng.exponential(p["label_delay_min"], k)])
            self.correct = np.concatenate([self.correct, correct[gets_label]])

    def collect(self, now_min: float) -> None:
        arrived = self.arrival <= now_min
        self.stats.labeled += int(arrived.sum())
        self.stats.correct += int(self.correct[arrived].sum())
        self.arrival, self.correct = self.arrival[~arrived], self.correct[~arrived]


def simulate(
    seed: int, acc_candidate: float, acc_production: float, cfg: RolloutSection, judge: str, p: dict
) -> dict:
    """One rollout; returns its outcome and the candidate's labeled requests at the verdict."""
    rng = np.random.default_rng(seed)
    state, _ = start("sim", "2", "1", cfg, T0)
    prod, cand, pairs = Arm("1"), Arm("2"), PairStats()
    labeled, paused_at = 0, None
    for minute in range(1, p["horizon_min"] + 1):
        now = T0 + timedelta(minutes=minute)
        traffic = cfg.phases[state.phase_index].traffic
        n = rng.poisson(p["rpm"])
        if traffic == 0:
            prod_ok = rng.random(n) < acc_production
            # Joint draw with the requested disagreement and the candidate's marginal accuracy.
            a = (DISAGREEMENT + acc_production - acc_candidate) / 2  # production right, candidate wrong
            b = DISAGREEMENT - a
            u = rng.random(n)
            flip = np.where(prod_ok, u < a / acc_production, u < b / (1 - acc_production))
            cand_ok = prod_ok ^ flip
            prod.serve(rng, prod_ok, minute, p, labeled=True)
            cand.serve(rng, cand_ok, minute, p, labeled=p["shadow_labels"])
            pairs.n += n
            pairs.agree += int((~flip).sum())
        else:
            n_c = rng.binomial(n, traffic / 100)
            cand.serve(rng, rng.random(n_c) < acc_candidate, minute, p, labeled=True)
            prod.serve(rng, rng.random(n - n_c) < acc_production, minute, p, labeled=True)
        prod.collect(minute)
        cand.collect(minute)
        analysis = analyze(state, cfg, prod.stats, cand.stats, pairs, now, accuracy_test=judge)
        labeled = analysis.sample_sizes["candidate_labeled_total"]
        before = state.phase_index
        state, _ = step(state, analysis, now, cfg)
        if not state.active:
            break
        if state.paused:
            # Nobody resumes in the simulation: a paused rollout only keeps watching (it still
            # rolls back on a rollback verdict) until the horizon.
            paused_at = paused_at or minute
            if not p["watch_paused"]:
                break
        if state.phase_index != before:  # a new phase: a new window (in-flight labels are dropped)
            prod, cand, pairs = Arm("1"), Arm("2"), PairStats()
    return {"outcome": state.status, "labeled": labeled, "minutes": minute, "phase": state.phase,
            "paused_first": paused_at is not None}


def _rate(outcomes: list[dict], status: str, paused_first: bool | None = None) -> float:
    hits = [
        o for o in outcomes
        if o["outcome"] == status and (paused_first is None or o["paused_first"] == paused_first)
    ]
    return round(len(hits) / len(outcomes), 4) if outcomes else 0.0


def _median(outcomes: list[dict], key: str = "labeled") -> float | None:
    values = [o[key] for o in outcomes]
    return float(statistics.median(values)) if values else None


def summarize_judge(equal: list[dict], bad: list[dict]) -> dict:
    """The benchmark's figures for one judge over the equal and the bad candidates' runs."""
    return {
        "false_rollback_rate": _rate(equal, "rolled_back"),
        "caught_bad_rate": _rate(bad, "rolled_back"),
        "caught_bad_after_a_pause_rate": _rate(bad, "rolled_back", paused_first=True),
        "equal_completed_rate": _rate(equal, "completed"),
        "equal_paused_rate": _rate(equal, "paused"),
        "bad_completed_rate": _rate(bad, "completed"),
        "bad_still_paused_rate": _rate(bad, "paused"),
        "median_labeled_to_verdict_equal": _median(equal),
        "median_labeled_to_verdict_bad": _median(bad),
        "median_minutes_to_verdict_equal": _median(equal, "minutes"),
        "median_minutes_to_verdict_bad": _median(bad, "minutes"),
        "bad_rolled_back_in_phase": {
            ph: sum(o["phase"] == ph and o["outcome"] == "rolled_back" for o in bad)
            for ph in dict.fromkeys(o["phase"] for o in bad)
        },
    }


def run_scenario(args: argparse.Namespace, cfg: RolloutSection, shadow_labels: bool, deadline: float) -> dict:
    """Equal and bad candidates, each judged by the sequential test and the naive rule."""
    params = {
        "rpm": args.rpm,
        "label_rate": args.label_rate,
        "label_delay_min": args.label_delay,
        "shadow_labels": shadow_labels,
        "watch_paused": True,
        # Every phase's minimum plus its full evidence wait, then PAUSED_WATCH_MIN of watching.
        "horizon_min": int(
            sum((ph.min_duration + (ph.max_wait or cfg.max_wait)).total_seconds() for ph in cfg.phases) // 60
        )
        + PAUSED_WATCH_MIN,
    }
    results: dict[str, dict[str, list[dict]]] = {j: {"equal": [], "bad": []} for j in ("sequential", "naive")}
    runs = 0
    for i in range(args.runs):
        if time.perf_counter() > deadline:
            break
        for kind, acc_c in (("equal", args.accuracy), ("bad", args.accuracy - args.gap)):
            seed = args.seed * 1_000_003 + 2 * i + (kind == "bad")
            for judge, outcomes in results.items():
                outcomes[kind].append(simulate(seed, acc_c, args.accuracy, cfg, judge, params))
        runs += 1
    seq, naive = summarize_judge(**results["sequential"]), summarize_judge(**results["naive"])

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    return {
        "shadow_answers_labeled": shadow_labels,
        "runs_per_kind": runs,
        "sequential": seq,
        "naive_baseline": naive,
        "ratios": {
            "false_rollbacks_naive_over_sequential": ratio(naive["false_rollback_rate"], seq["false_rollback_rate"]),
            "false_rollbacks_naive_minus_sequential": round(
                naive["false_rollback_rate"] - seq["false_rollback_rate"], 4
            ),
            "median_labeled_bad_sequential_over_naive": ratio(
                seq["median_labeled_to_verdict_bad"], naive["median_labeled_to_verdict_bad"]
            ),
        },
        "bar_met": seq["false_rollback_rate"] <= BAR_FALSE_ROLLBACKS and seq["caught_bad_rate"] >= BAR_CAUGHT,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--runs", type=int, default=100, help="rollouts per candidate kind and scenario")
    ap.add_argument("--rpm", type=float, default=300.0, help="requests per simulated minute")
    ap.add_argument("--label-rate", type=float, default=0.5, help="share of requests that get a label")
    ap.add_argument("--label-delay", type=float, default=10.0, help="mean label delay, minutes")
    ap.add_argument("--accuracy", type=float, default=0.85, help="production's accuracy")
    ap.add_argument("--gap", type=float, default=0.05, help="the bad candidate's accuracy deficit")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="time budget; fewer runs if exceeded")
    args = ap.parse_args(argv)

    cfg = RolloutSection()
    t_start = time.perf_counter()
    deadline = t_start + args.max_seconds
    scenarios = {
        # Feedback by request id labels the request: the shadow's answer is judged too.
        "labels_on_every_answer": run_scenario(args, cfg, True, t_start + args.max_seconds / 3),
        # Outcomes that depend on the served answer: only served requests get labels.
        "served_labels_only": run_scenario(args, cfg, False, deadline),
    }
    elapsed = time.perf_counter() - t_start
    out = {
        "benchmark": "rollout_power",
        "seconds": round(elapsed, 2),
        "truncated_by_time_budget": any(sc["runs_per_kind"] < args.runs for sc in scenarios.values()),
        "simulation": {
            "accuracy_production": args.accuracy,
            "accuracy_bad_candidate": round(args.accuracy - args.gap, 4),
            "requests_per_minute": args.rpm,
            "label_rate": args.label_rate,
            "label_delay_mean_min": args.label_delay,
            "look_every_s": 60,
            "paused_watch_min": PAUSED_WATCH_MIN,
            "phases": [
                {"name": ph.name, "traffic": ph.traffic, "min_duration_s": ph.min_duration.total_seconds(),
                 "min_requests": ph.min_requests, "min_labeled": ph.min_labeled}
                for ph in cfg.phases
            ],
            "max_wait_s": cfg.max_wait.total_seconds(),
            "alpha": cfg.alpha,
            "max_accuracy_drop": cfg.max_accuracy_drop,
        },
        "scenarios": scenarios,
        "bar": {
            "max_false_rollback_rate": BAR_FALSE_ROLLBACKS,
            "min_caught_bad_rate": BAR_CAUGHT,
            "met": all(sc["bar_met"] for sc in scenarios.values()),
        },
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"rollout power in {elapsed:.1f}s")
        for name, sc in scenarios.items():
            print(f"  {name} ({sc['runs_per_kind']} equal + {sc['runs_per_kind']} bad rollouts)")
            for judge in ("sequential", "naive_baseline"):
                r = sc[judge]
                print(
                    f"    {judge:15s} false rollbacks {r['false_rollback_rate']:6.1%}"
                    f"  caught bad {r['caught_bad_rate']:6.1%}"
                    f"  (after a pause {r['caught_bad_after_a_pause_rate']:.0%})  median labeled to verdict:"
                    f" equal {r['median_labeled_to_verdict_equal']}, bad {r['median_labeled_to_verdict_bad']}"
                )
        print(f"  bar (<= 5% false rollbacks, 100% caught): {'met' if out['bar']['met'] else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
