"""``retrain backtest``: the offline replay of a policy against never / periodic / every-batch retraining."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import workers.backtest as bt
from config.policy import policy_from_dict
from workers.backtest import BacktestError, run_backtest, split_batches
from workers.simulate import TARGET, TIME, make_frame

RETRAIN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "retrain"
T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
DRIFT_DAY = 5
"""The concept drift starts on this day of the drifting frame (2024-01-06)."""

POLICY_TOML = f"""
[model]
name = "churn"
target = "{TARGET}"

[data]
time_column = "{TIME}"
window = "3d"

[triggers]
max_model_age_days = 1000
new_data_threshold = 1000000000
drift_threshold = 0.5
performance_drop_threshold = 0.05
cooldown = "1h"

[gate]
min_accuracy = 0.6
min_prediction_correlation = -1
disabled = ["latency", "model_size", "calibration"]

[training]
estimator = "sklearn.linear_model.LogisticRegression"
params = {{ max_iter = 300 }}

[training.search]
method = "none"
"""


def policy(**gate):
    """A tiny, fast policy: LogisticRegression, no search, scheduled and volume triggers off."""
    return policy_from_dict({
        "model": {"name": "churn", "target": TARGET},
        "data": {"time_column": TIME, "window": "3d"},
        "triggers": {"max_model_age_days": 1000, "new_data_threshold": 10**9, "drift_threshold": 0.5,
                     "performance_drop_threshold": 0.05, "cooldown": "1h"},
        "gate": {"min_accuracy": 0.6, "min_prediction_correlation": -1,
                 "disabled": ["latency", "model_size", "calibration"], **gate},
        "training": {"estimator": "sklearn.linear_model.LogisticRegression", "params": {"max_iter": 300},
                     "search": {"method": "none"}},
    })


def days(n: int, rows, *, seed: int = 0, concept_from: int | None = None) -> pd.DataFrame:
    """``n`` days of simulated churn data; the labelling rule flips from day ``concept_from`` on."""
    return pd.concat(
        [
            make_frame(rows(d) if callable(rows) else rows, start=T0 + timedelta(days=d), end=T0 + timedelta(days=d + 1),
                       seed=seed * 1000 + d, concept=1.0 if concept_from is not None and d >= concept_from else 0.0)
            for d in range(n)
        ],
        ignore_index=True,
    )


@pytest.fixture(scope="module")
def drifting() -> pd.DataFrame:
    return days(10, lambda d: 400 + 60 * d, concept_from=DRIFT_DAY)


@pytest.fixture(scope="module")
def stable() -> pd.DataFrame:
    return days(8, 800, seed=1)


@pytest.fixture(scope="module")
def drift_result(drifting):
    return run_backtest(drifting, policy(), warmup=2)


@pytest.fixture(scope="module")
def stable_result(stable):
    return run_backtest(stable, policy(), warmup=3)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RETRAIN), "backtest", *args], capture_output=True, text=True, timeout=120, cwd=cwd)


class TestBatches:
    def test_day_batches_align_to_utc_days_and_skip_gaps(self):
        """Fixed-length batches are calendar days (epoch-aligned) and a day without rows is no batch."""
        t = pd.Series(pd.to_datetime(["2024-01-01 05:00", "2024-01-01 23:00", "2024-01-03 01:00",
                                      "2024-01-03 02:00", "2024-01-03 03:00"], utc=True))
        cut = split_batches(t, batch=timedelta(days=1))
        assert [(b.start.isoformat(), b.rows) for b in cut] == [
            ("2024-01-01T00:00:00+00:00", 2), ("2024-01-03T00:00:00+00:00", 3)]
        assert [b.index for b in cut] == [0, 1] and cut[0].end == cut[0].start + pd.Timedelta(days=1)

    def test_equal_batches_cover_every_row_once(self):
        """``batches=N`` cuts the time span into N contiguous batches holding every row, the last one included."""
        t = pd.Series(pd.date_range("2024-01-01", periods=97, freq="h", tz="UTC"))
        cut = split_batches(t, batches=4)
        assert len(cut) == 4
        assert [b.lo for b in cut[1:]] == [b.hi for b in cut[:-1]] and cut[0].lo == 0 and cut[-1].hi == 97
        assert cut[-1].end > t.iloc[-1]

    def test_a_zero_batch_length_is_an_error_not_the_default(self):
        """``batch=0`` is refused like any non-positive length (it was taken as 'one day')."""
        t = pd.Series(pd.date_range("2024-01-01", periods=48, freq="h", tz="UTC"))
        with pytest.raises(BacktestError, match="must be positive"):
            split_batches(t, batch=timedelta(0))

    def test_too_few_batches_is_an_error(self, stable):
        """With no batch left after the warm-up, the replay refuses instead of reporting nothing."""
        with pytest.raises(BacktestError, match="warm-up"):
            run_backtest(stable, policy(), batch="30d")


class TestConceptDrift:
    def test_policy_retrains_after_the_drift_and_beats_never(self, drift_result):
        """After the labelling rule changes, the performance drop makes the policy retrain and it ends above 'never'."""
        drift_start = (T0 + timedelta(days=DRIFT_DAY)).isoformat()
        promoted = [row for row in drift_result.timeline if row["promoted"]]
        assert any(row["start"] >= drift_start for row in promoted)
        assert drift_result.retrains >= 1
        assert drift_result.accuracy > drift_result.baselines["never"].accuracy + 0.03

    def test_live_accuracy_is_measured_before_retraining(self, drift_result):
        """Up to and including the first promoting batch, the policy is scored with the initial model, like 'never'."""
        first = next(i for i, row in enumerate(drift_result.timeline) if row["promoted"])
        for row in drift_result.timeline[: first + 1]:
            assert row["accuracy"] == row["baselines"]["never"]
        after = drift_result.timeline[first + 1]
        assert after["model_version"] == 2 and after["accuracy"] != after["baselines"]["never"]

    def test_accuracy_is_row_weighted_over_evaluated_batches(self, drift_result):
        """The headline accuracy is the mean of the per-batch live accuracy weighted by batch rows."""
        rows = np.array([row["rows"] for row in drift_result.timeline])
        for name, values in [("policy", [row["accuracy"] for row in drift_result.timeline])] + [
            (b, [row["baselines"][b] for row in drift_result.timeline]) for b in bt.STRATEGIES
        ]:
            expected = float(np.average(values, weights=rows))
            got = drift_result.accuracy if name == "policy" else drift_result.baselines[name].accuracy
            assert got == pytest.approx(expected), name
        assert len(set(rows)) > 1  # the weighting matters on this frame


class TestNoDrift:
    def test_policy_does_not_retrain_without_drift(self, stable_result):
        """With stable data and age/volume triggers off, the policy never starts a training."""
        assert stable_result.retrains == 0
        assert stable_result.policy.trainings_attempted == 0
        assert {row["action"] for row in stable_result.timeline} == {"none"}

    def test_every_batch_retrains_after_every_batch(self, stable_result):
        """The anti-pattern baseline retrains after each evaluated batch but the last; 'never' never does."""
        n = len(stable_result.timeline)
        assert n >= 4
        assert stable_result.baselines["every_batch"].retrains == n - 1
        assert stable_result.baselines["never"].retrains == 0

    def test_periodic_retrains_every_k_batches(self, stable):
        """``periodic=k`` retrains the periodic baseline after every k-th evaluated batch."""
        result = run_backtest(stable, policy(), warmup=3, periodic=2)
        assert result.baselines["periodic"].retrains == (len(result.timeline) - 1) // 2
        assert result.periodic == "every 2 batches"

    def test_periodic_defaults_to_max_model_age(self, stable):
        """Without ``periodic``, the baseline retrains when the model is ``max_model_age_days`` old."""
        aged = policy_from_dict({**policy().model_dump(mode="json"),
                                 "triggers": {**policy().triggers.model_dump(mode="json"), "max_model_age_days": 2}})
        result = run_backtest(stable, aged, warmup=3)
        assert result.periodic == "2d"
        assert result.baselines["periodic"].retrains == 2  # after the 2nd and 4th of 5 batches
        assert result.retrains >= 1  # the scheduled trigger (same age) retrains the policy too


class TestGate:
    def test_a_blocking_gate_means_no_retrains(self, drifting):
        """With min_accuracy 0.99 every candidate is rejected: retrains 0, but trainings were attempted."""
        result = run_backtest(drifting, policy(min_accuracy=0.99), warmup=2)
        assert result.retrains == 0
        assert result.policy.trainings_attempted > 0
        assert result.gate_rejections + result.validation_failures + result.training_failures == \
            result.policy.trainings_attempted
        rejected = [row for row in result.timeline if row.get("outcome") == "gate_failed"]
        assert rejected and all("minimum_performance" in row["gate_failed"] for row in rejected)
        assert {row["model_version"] for row in result.timeline} == {1}
        assert result.accuracy == pytest.approx(result.baselines["never"].accuracy)


class TestNoRefit:
    def test_each_window_is_fitted_once(self, drifting, monkeypatch):
        """Strategies training on the same window share one fit: one for the warm-up plus one per later window."""
        calls = []
        real = bt.train_candidate

        def counting(frame, pol, **kwargs):
            calls.append(len(frame))
            return real(frame, pol, **kwargs)

        monkeypatch.setattr(bt, "train_candidate", counting)
        result = run_backtest(drifting, policy(), warmup=2, periodic=2)
        assert result.policy.trainings_attempted >= 1
        assert len(calls) == 1 + (len(result.timeline) - 1)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("backtest")
    days(6, 400, seed=2, concept_from=3).to_parquet(d / "data.parquet", index=False)
    (d / "policy.toml").write_text(POLICY_TOML)
    return d


class TestCli:
    def test_json_shape(self, files):
        """``--json`` prints one object: accuracy, retrains, and the three baselines with the same keys."""
        proc = run_cli("--policy", str(files / "policy.toml"), "--data", str(files / "data.parquet"), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert isinstance(out["accuracy"], float) and 0 <= out["accuracy"] <= 1
        assert isinstance(out["retrains"], int) and not isinstance(out["retrains"], bool)
        assert set(out["baselines"]) == {"never", "periodic", "every_batch"}
        keys = {frozenset(b) for b in out["baselines"].values()}
        assert len(keys) == 1 and {"accuracy", "retrains"} <= next(iter(keys))
        for b in out["baselines"].values():
            assert isinstance(b["accuracy"], float) and isinstance(b["retrains"], int)
        assert len(out["timeline"]) == out["batches"] == 5
        for field in ("start", "rows", "accuracy", "drift_score", "action", "reason", "gate_passed"):
            assert field in out["timeline"][0]
        assert isinstance(out["trainings_attempted"], int) and isinstance(out["gate_rejections"], int)

    def test_table_without_json(self, files):
        """Without ``--json`` the command prints the per-batch table and the strategy summary."""
        proc = run_cli("--policy", str(files / "policy.toml"), "--data", str(files / "data.parquet"), "--batches", "4")
        assert proc.returncode == 0, proc.stderr
        assert "every batch" in proc.stdout and "policy" in proc.stdout and "retrains" in proc.stdout
        assert not proc.stdout.lstrip().startswith("{")

    def test_a_zero_batch_exits_2_with_one_line(self, files):
        proc = run_cli("--policy", str(files / "policy.toml"), "--data", str(files / "data.parquet"),
                       "--batch", "0s", "--json")
        assert proc.returncode == 2 and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "batch length must be positive" in lines[0]

    @pytest.mark.parametrize(
        ("case", "message"),
        [
            ("missing_data", "no such file"),
            ("missing_policy", "no such policy file"),
            ("bad_policy", "unknown key"),
            ("no_time_column", "time_column"),
            ("no_target", "target"),
        ],
    )
    def test_unusable_input_exits_2_with_one_line(self, files, tmp_path, case, message):
        """Missing files, a bad policy and missing time/target columns end with exit 2 and one line on stderr."""
        data, pol = files / "data.parquet", files / "policy.toml"
        if case == "missing_data":
            data = tmp_path / "nope.parquet"
        elif case == "missing_policy":
            pol = tmp_path / "nope.toml"
        elif case == "bad_policy":
            pol = tmp_path / "bad.toml"
            pol.write_text(POLICY_TOML.replace("[gate]", "[gate]\nmin_acuracy = 0.5"))
        else:
            column = TIME if case == "no_time_column" else TARGET
            data = tmp_path / "data.csv"
            pd.read_parquet(files / "data.parquet").drop(columns=[column]).to_csv(data, index=False)
        proc = run_cli("--policy", str(pol), "--data", str(data), "--json")
        assert proc.returncode == 2
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0]
