"""The quality gate: each check fails on a candidate built to fail it, passes on a better one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor, RandomForestClassifier
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).parent))

from gate_helpers import ColumnModel, Overconfident, SlowModel, make_frame, minority_collapse  # noqa: E402

from config.policy import policy_from_dict  # noqa: E402
from workers.gate import checks  # noqa: E402
from workers.gate.checks import CHECKS, GateContext, GateError, run_gate  # noqa: E402
from workers.training.fit import build_pipeline, split_features  # noqa: E402
from workers.training.validate import Problem, ValidationResult  # noqa: E402

RETRAIN = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "retrain"
FEATURES = ["a", "b", "c"]
TASKS = ["binary", "multiclass", "regression"]
SEED_FIVE = {"minimum_performance", "no_regression", "prediction_stability", "latency", "model_size"}


def policy(task: str = "binary", **gate):
    gate.setdefault("min_accuracy", 0.5 if task == "regression" else 0.7)
    return policy_from_dict({"model": {"name": "m", "task": task}, "gate": gate})


def fit(frame: pd.DataFrame, task: str, estimator=None):
    if estimator is None:
        cls = HistGradientBoostingRegressor if task == "regression" else HistGradientBoostingClassifier
        estimator = cls(max_iter=40, random_state=0)
    numeric, categorical = split_features(frame, FEATURES)
    return build_pipeline(estimator, numeric, categorical).fit(frame[FEATURES], frame["target"])


def shuffled(frame: pd.DataFrame, seed: int = 7) -> pd.DataFrame:
    """Every feature column permuted independently: the features no longer explain the target."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    for col in FEATURES:
        out[col] = rng.permutation(out[col].to_numpy())
    return out


@pytest.fixture(scope="module")
def models():
    """Per task: holdout, production, a better candidate, a label-noise one and a shuffled-features one."""
    out = {}
    for task in TASKS:
        out[task] = {
            "holdout": make_frame(task, 800, seed=99),
            "production": fit(make_frame(task, 1500, seed=1), task),
            "better": fit(make_frame(task, 3000, seed=2), task),
            "noisy": fit(make_frame(task, 1500, seed=3, noise=1.0 if task != "regression" else 3.0), task),
            "shuffled": fit(shuffled(make_frame(task, 1500, seed=4)), task),
        }
    return out


@pytest.fixture(autouse=True)
def quick_latency(request, monkeypatch):
    """Outside the tests that judge latency, time fewer calls to keep the suite fast."""
    if request.cls is None or request.cls.__name__ not in ("TestLatency", "TestGoodCandidate", "TestCli"):
        monkeypatch.setattr(checks, "LATENCY_CALLS", 10)
        monkeypatch.setattr(checks, "THROUGHPUT_MIN_SECONDS", 0.01)


_REPORTS: dict = {}


def gate(models, task: str, which: str, *, production=True, **cfg):
    """run_gate on the fixture models; identical calls share one report (the models are fixed).

    The latency bound gets headroom (250 ms) so a busy machine cannot fail unrelated tests;
    TestLatency sets its own bounds.
    """
    cfg.setdefault("max_latency_p99_ms", 250)
    key = (task, which, production, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in cfg.items())))
    if key not in _REPORTS:
        m = models[task]
        _REPORTS[key] = run_gate(m[which], m["production"] if production else None, m["holdout"], policy(task, **cfg))
    return _REPORTS[key]


class TestGoodCandidate:
    @pytest.mark.parametrize("task", TASKS)
    def test_better_candidate_passes_every_check(self, models, task):
        """A candidate trained on more clean data passes every check for binary, multiclass and regression."""
        report = gate(models, task, "better", slice_feature="c")
        assert report.passed, report.to_dict()
        assert not report.first_model
        ran = {c.name for c in report.checks if not c.skipped}
        assert SEED_FIVE <= ran
        assert "slice_regression" in ran


class TestMinimumPerformance:
    @pytest.mark.parametrize("task", TASKS)
    def test_label_noise_candidate_fails(self, models, task):
        """A candidate trained on noise-replaced labels falls below min_accuracy / min R²."""
        report = gate(models, task, "noisy")
        check = report.check("minimum_performance")
        assert not check.passed and not report.passed
        assert check.value < check.threshold
        assert check.extra["metric"] == ("r2" if task == "regression" else "accuracy")

    def test_primary_metric_from_policy(self, models):
        """gate.primary_metric changes the metric judged against min_accuracy."""
        report = gate(models, "binary", "better", primary_metric="roc_auc")
        check = report.check("minimum_performance")
        assert check.extra["metric"] == "roc_auc"
        assert check.value > report.check("minimum_performance").threshold

    def test_metric_that_does_not_fit_the_task_is_refused(self, models):
        """A regression metric named for a classifier is a configuration error, not a silent pass."""
        with pytest.raises(GateError, match="primary_metric"):
            gate(models, "binary", "better", primary_metric="r2")


class TestNoRegression:
    @pytest.mark.parametrize("task", TASKS)
    def test_label_noise_candidate_fails_significantly(self, models, task):
        """A clearly worse candidate fails no_regression and the paired test calls the drop significant."""
        check = gate(models, task, "noisy").check("no_regression")
        assert not check.passed
        assert check.extra["significant"] is True
        assert check.value < check.threshold

    def test_classifier_reports_seed_fields_and_the_test_used(self, models):
        """Classifier output carries the seed's new_f1/production_f1 and the test of the compared metric:
        a bootstrap interval for weighted F1 (the default), McNemar counts and p-value for accuracy."""
        m = models["binary"]
        y = m["holdout"]["target"]
        seed_f1 = f1_score(y, m["better"].predict(m["holdout"][FEATURES]), average="weighted")
        d = gate(models, "binary", "better").check("no_regression").to_dict()
        assert d["metric"] == "f1_weighted" and d["new_f1"] == pytest.approx(seed_f1)
        assert d["test"] == "paired_bootstrap" and d["confidence_level"] == pytest.approx(0.95)
        assert d["upper_bound"] >= 0 and "upper bound" in d["detail"]
        d = gate(models, "binary", "better", primary_metric="accuracy").check("no_regression").to_dict()
        assert d["metric"] == "accuracy" and d["new_f1"] == pytest.approx(seed_f1)
        assert d["test"] == "mcnemar_exact" and d["only_production_right"] >= 0 and 0 <= d["p_value"] <= 1
        assert "mcnemar_exact p=" in d["detail"]

    @staticmethod
    def _ctx(task, y, cand, prod):
        ctx = GateContext(None, object(), pd.DataFrame({"target": y}), "target", task, [])
        ctx.candidate_pred = np.asarray(cand)
        ctx.production_pred = np.asarray(prod)
        return ctx

    def test_drop_beyond_tolerance_within_noise_does_not_block(self):
        """On 60 rows, 2 extra errors exceed the 2% tolerance (seed rule fails) but McNemar finds no real drop."""
        y = np.array([0, 1] * 30)
        prod = y.copy()
        cand = y.copy()
        cand[:2] = 1 - cand[:2]
        check = checks.check_no_regression(self._ctx("binary", y, cand, prod), policy().gate)
        assert check.value < -0.02  # the seed's point rule alone would block this candidate
        assert check.passed and check.extra["significant"] is False
        assert "noise" in check.detail

    @staticmethod
    def _classifier_trial(rng, n, cand_error, prod_error=0.10):
        y = rng.integers(0, 2, n)
        prod = np.where(rng.random(n) < prod_error, 1 - y, y)
        cand = np.where(rng.random(n) < cand_error, 1 - y, y)
        return y, cand, prod

    def test_classifier_equal_up_to_noise_passes_and_clearly_worse_fails(self):
        """Over 60 seeds: equal-error candidates pass (more often than the seed rule) and much worse ones fail."""
        rng = np.random.default_rng(0)
        cfg = policy().gate
        equal = [self._classifier_trial(rng, 200, 0.10) for _ in range(60)]
        worse = [self._classifier_trial(rng, 400, 0.25) for _ in range(60)]
        ours_equal = np.mean([checks.check_no_regression(self._ctx("binary", *t), cfg).passed for t in equal])
        seed_equal = np.mean(
            [f1_score(t[0], t[1], average="weighted") >= f1_score(t[0], t[2], average="weighted") - 0.02 for t in equal]
        )
        ours_worse = np.mean([checks.check_no_regression(self._ctx("binary", *t), cfg).passed for t in worse])
        assert ours_equal >= 0.9  # false blocks only at about the test level alpha = 0.05
        assert seed_equal < ours_equal  # noise blocks the seed's rule, not ours
        assert ours_worse == 0.0

    def test_regression_bootstrap_equal_passes_clearly_worse_fails(self):
        """Regression: a paired bootstrap lets equal-up-to-noise candidates pass and fails clearly worse ones."""
        rng = np.random.default_rng(1)
        cfg = policy("regression").gate
        outcomes = {"equal": [], "worse": []}
        for _ in range(20):
            y = rng.normal(size=120)
            prod = y + rng.normal(scale=0.5, size=120)
            outcomes["equal"].append(
                checks.check_no_regression(self._ctx("regression", y, y + rng.normal(scale=0.5, size=120), prod), cfg)
            )
            outcomes["worse"].append(
                checks.check_no_regression(self._ctx("regression", y, y + rng.normal(scale=1.2, size=120), prod), cfg)
            )
        assert np.mean([c.passed for c in outcomes["equal"]]) >= 0.9
        assert not any(c.passed for c in outcomes["worse"])
        assert all(c.extra["test"] == "paired_bootstrap" for c in outcomes["worse"])
        beyond = [c for c in outcomes["equal"] if c.value < -0.02]
        assert any(c.passed for c in beyond)  # a drop beyond the tolerance that is noise did not block


class TestNoRegressionTestsTheComparedMetric:
    """The paired test judges the metric whose drop is measured, not accuracy in its place."""

    _ctx = staticmethod(TestNoRegression._ctx)

    def test_minority_class_collapse_with_equal_accuracy_is_blocked(self, models):
        """Same accuracy, minority class never predicted: weighted F1 drops 0.047 and the gate blocks,
        though McNemar (an accuracy test) sees nothing."""
        y, production, candidate = minority_collapse(1000, seed=0)
        assert np.mean(candidate == y) == np.mean(production == y)
        ctx = self._ctx("binary", y, candidate, production)
        assert checks._mcnemar(ctx)["p_value"] > 0.5  # why the accuracy test let it through
        holdout = pd.DataFrame({"target": y, "cand": candidate, "prod": production})
        report = run_gate(ColumnModel("cand"), ColumnModel("prod"), holdout,
                          policy(min_accuracy=0.5, disabled=["prediction_stability"], max_latency_p99_ms=250))
        assert not report.passed and report.failed == ["no_regression"]
        check = report.check("no_regression")
        assert check.extra["metric"] == "f1_weighted" and "f1_weighted dropped 0.047" in check.detail
        assert check.extra["test"] == "paired_bootstrap" and check.extra["significant"] is True
        assert check.extra["upper_bound"] < 0

    def test_equal_quality_candidate_passes(self):
        """Production's predictions with a few random flips each way pass on the same holdout, and
        candidates drawn like production on a small holdout pass even when noise drops F1 beyond 0.02."""
        cfg = policy().gate
        for seed in range(10):
            y, production, _ = minority_collapse(1000, seed=seed)
            rng = np.random.default_rng(seed)
            flipped = production.copy()
            for idx in (rng.choice(np.flatnonzero(production == 1), 5, replace=False),
                        rng.choice(np.flatnonzero(production == 0), 5, replace=False)):
                flipped[idx] = 1 - flipped[idx]
            check = checks.check_no_regression(self._ctx("binary", y, flipped, production), cfg)
            assert check.passed and check.extra["test"] == "paired_bootstrap", check.detail
        rng = np.random.default_rng(0)
        outcomes = []
        for _ in range(40):
            y = (rng.random(300) < 0.1).astype(int)
            draw = lambda: np.where(y == 1, rng.random(300) < 0.5, rng.random(300) < 0.055).astype(int)  # noqa: E731
            outcomes.append(checks.check_no_regression(self._ctx("binary", y, draw(), draw()), cfg))
        assert np.mean([c.passed for c in outcomes]) >= 0.9
        assert any(c.passed and c.value < -0.02 for c in outcomes)  # a noisy drop beyond tolerance did not block

    def test_accuracy_regression_is_caught_by_mcnemar(self, models):
        """With accuracy as the compared metric McNemar decides: a real accuracy drop fails, the
        equal-accuracy minority collapse passes (its accuracy did not drop)."""
        cfg = policy(primary_metric="accuracy").gate
        rng = np.random.default_rng(3)
        y = rng.integers(0, 2, 400)
        production = np.where(rng.random(400) < 0.10, 1 - y, y)
        candidate = np.where(rng.random(400) < 0.25, 1 - y, y)
        check = checks.check_no_regression(self._ctx("binary", y, candidate, production), cfg)
        assert not check.passed and check.extra["test"] == "mcnemar_exact"
        assert check.extra["p_value"] < cfg.regression_alpha and "accuracy dropped" in check.detail
        check = checks.check_no_regression(self._ctx("binary", *(lambda y, p, c: (y, c, p))(*minority_collapse())), cfg)
        assert check.passed and check.extra["test"] == "mcnemar_exact" and check.value == 0
        noisy = gate(models, "multiclass", "noisy", primary_metric="accuracy").check("no_regression")
        assert not noisy.passed and noisy.extra["test"] == "mcnemar_exact"

    def test_an_undefined_bootstrap_bound_does_not_pass_a_drop(self):
        """roc_auc on a holdout with 4 positives: some resamples hold none, their AUC is nan and so is the bound. A drop
        beyond the tolerance then blocks (it passed before as "within noise": nan < 0 is false)."""
        rng = np.random.default_rng(1)
        n = 1000
        y = np.zeros(n, int)
        y[rng.choice(n, 4, replace=False)] = 1
        production = np.where(y == 1, 0.95, rng.uniform(0.0, 0.4, n))  # AUC 1.0
        candidate = production.copy()
        candidate[y == 1] = [0.17, 0.27, 0.38, 0.5]  # its positives rank among the negatives: AUC ~0.98
        ctx = self._ctx("binary", y, (candidate > 0.5).astype(int), (production > 0.5).astype(int))
        ctx.candidate_proba = np.c_[1 - candidate, candidate]
        ctx.production_proba = np.c_[1 - production, production]
        ctx.labels = np.array([0, 1])
        check = checks.check_no_regression(ctx, policy(primary_metric="roc_auc").gate)
        assert check.value < -0.02 and not np.isfinite(check.extra["upper_bound"])
        assert not check.passed and "cannot be told" in check.detail

    def test_roc_auc_is_bootstrapped_on_probabilities(self, models):
        """roc_auc as the compared metric: the bootstrap scores each model's probabilities."""
        worse = gate(models, "binary", "noisy", primary_metric="roc_auc").check("no_regression")
        assert worse.extra["metric"] == "roc_auc" and worse.extra["test"] == "paired_bootstrap"
        assert not worse.passed and worse.extra["upper_bound"] < -0.02
        better = gate(models, "multiclass", "better", primary_metric="roc_auc").check("no_regression")
        assert better.passed and better.extra["test"] == "paired_bootstrap"

    @pytest.mark.parametrize("labels,n_true", [([0, 1], 2), (["a", "b", "c", "d"], 3)])
    def test_resampled_metrics_equal_sklearn(self, labels, n_true):
        """The vectorised per-resample metrics the bootstrap uses equal sklearn's on every resample
        (including a label no row has, predictions of it, and classes missing from a resample)."""
        rng = np.random.default_rng(0)
        labels = np.array(labels)
        names = ["accuracy", "balanced_accuracy", "f1_weighted", "roc_auc"] + (["f1"] if len(labels) == 2 else [])
        for _ in range(20):
            n = int(rng.integers(6, 40))
            y = rng.choice(labels[:n_true], n)
            y[:n_true] = labels[:n_true]  # every true class present in the holdout
            pred = rng.choice(labels, n)
            proba = rng.dirichlet(np.ones(n_true), n).round(1)
            proba /= proba.sum(axis=1, keepdims=True)
            rows = rng.integers(0, n, (8, n))
            for name in names:
                auc = name == "roc_auc"
                judged = labels[:n_true] if auc else labels
                got = checks._classifier_metric_vectorized(name, y, judged)(rows, proba if auc else pred)
                for r, value in zip(rows, got):
                    if auc and any(np.sum(y[r] == k) in (0, len(r)) for k in judged):
                        continue  # sklearn leaves roc_auc undefined on this resample
                    want = checks.metric(name, y[r], pred[r], proba[r] if auc else None, judged)
                    assert value == pytest.approx(want, abs=1e-12), (name, y[r], pred[r])


class TestPredictionStability:
    @pytest.mark.parametrize("task,measure", [("binary", "score_correlation"), ("multiclass", "agreement"), ("regression", "correlation")])
    def test_shuffled_features_candidate_fails(self, models, task, measure):
        """A candidate trained on shuffled features disagrees with production and fails stability."""
        check = gate(models, task, "shuffled").check("prediction_stability")
        assert check.extra["measure"] == measure
        assert not check.passed and check.value < 0.8

    @pytest.mark.parametrize("task", TASKS)
    def test_better_candidate_is_stable(self, models, task):
        """A candidate trained on more of the same data stays close to production."""
        check = gate(models, task, "better").check("prediction_stability")
        assert check.passed and check.value >= 0.8


class TestLatency:
    def test_slow_model_fails(self, models, monkeypatch):
        """A model sleeping 20 ms per predict fails a 10 ms p99 bound."""
        monkeypatch.setattr(checks, "LATENCY_BUDGET_S", 0.25)
        m = models["binary"]
        slow = SlowModel(m["production"], delay=0.02)
        report = run_gate(slow, m["production"], m["holdout"], policy(max_latency_p99_ms=10))
        check = report.check("latency")
        assert not check.passed and check.value >= 20
        assert check.extra["calls"] >= checks.LATENCY_MIN_CALLS

    def test_fast_model_passes_and_throughput_is_judged(self, models):
        """The plain pipeline passes latency; an impossible throughput floor fails it."""
        ok = gate(models, "binary", "better", max_latency_p99_ms=1000).check("latency")
        assert ok.passed and ok.extra["throughput_rows_per_s"] > 0
        starved = gate(models, "binary", "better", max_latency_p99_ms=1000, min_throughput_rows_per_s=1e12).check("latency")
        assert not starved.passed and "throughput" in starved.detail


class TestModelSize:
    def test_huge_forest_fails_small_model_passes(self, models):
        """A forest of deep trees exceeds a 0.25 MB bound that the gradient-boosting pipeline meets."""
        task = "binary"
        train = make_frame(task, 2000, seed=5, noise=0.4)
        forest = fit(train, task, RandomForestClassifier(n_estimators=40, random_state=0))
        m = models[task]
        big = run_gate(forest, m["production"], m["holdout"], policy(max_model_size_mb=0.25)).check("model_size")
        small = gate(models, task, "better", max_model_size_mb=0.25).check("model_size")
        assert not big.passed and big.value > 0.25
        assert small.passed and small.value < 0.25

    def test_stored_size_is_used_when_given(self, models):
        """The artifact size passed by the pipeline (bytes on disk) is what gets judged."""
        m = models["binary"]
        check = run_gate(m["better"], m["production"], m["holdout"], policy(max_model_size_mb=2),
                         candidate_size_bytes=3 * 1024 * 1024).check("model_size")
        assert not check.passed and check.value == pytest.approx(3.0)


class TestSliceRegression:
    def test_candidate_broken_on_one_category_fails(self, models):
        """A candidate trained with random labels for c == 'x' loses that slice and fails."""
        train = make_frame("binary", 3000, seed=6)
        rng = np.random.default_rng(0)
        mask = train["c"] == "x"
        train.loc[mask, "target"] = rng.integers(0, 2, int(mask.sum()))
        cand = fit(train, "binary")
        m = models["binary"]
        check = run_gate(cand, m["production"], m["holdout"], policy(slice_feature="c")).check("slice_regression")
        assert not check.passed
        worst = max(check.extra["slices"], key=lambda s: s["drop"])
        assert worst["slice"] == "x" and worst["drop"] > 0.05

    def test_skipped_without_slice_feature(self, models):
        """With gate.slice_feature unset the check is listed as skipped."""
        report = gate(models, "binary", "better")
        assert report.check("slice_regression").skipped and "slice_regression" in report.skipped


class TestCalibration:
    def test_overconfident_classifier_fails(self, models):
        """Probabilities of exactly 0/1 on a noisy classifier give an ECE above the bound."""
        m = models["binary"]
        report = run_gate(Overconfident(m["noisy"]), m["production"], m["holdout"], policy())
        check = report.check("calibration")
        assert not check.passed and check.value > 0.1

    def test_calibrated_passes_and_regression_skips(self, models):
        """A gradient-boosting classifier is calibrated enough; regression models skip the check."""
        assert gate(models, "multiclass", "better").check("calibration").passed
        assert gate(models, "regression", "better").check("calibration").skipped


class TestDataValidation:
    def test_validation_problems_fail_the_gate(self, models):
        """A validation result with problems fails data_validation and lists every problem."""
        m = models["binary"]
        result = ValidationResult(100, [Problem("null_rate", "too many nulls", "a"), Problem("columns", "missing", "d")])
        report = run_gate(m["better"], m["production"], m["holdout"], policy(), validation=result)
        check = report.check("data_validation")
        assert not check.passed and not report.passed
        assert check.value == 2 and [p["column"] for p in check.to_dict()["problems"]] == ["a", "d"]

    def test_clean_result_as_dict_passes(self, models):
        """A JSON validation result (as passed between Celery steps) without problems passes."""
        m = models["binary"]
        report = run_gate(m["better"], m["production"], m["holdout"], policy(),
                          validation=ValidationResult(100).to_dict())
        assert report.check("data_validation").passed and not report.check("data_validation").skipped


class TestRunGate:
    def test_first_model_runs_absolute_checks_only(self, models):
        """Without production, comparisons are skipped, the report says first_model and why."""
        report = gate(models, "multiclass", "better", production=False)
        d = report.to_dict()
        assert d["first_model"] is True and d["passed"] is True
        assert {"no_regression", "prediction_stability", "slice_regression"} <= set(d["skipped"])
        assert "first model" in d["note"]
        ran = {c["name"] for c in d["checks"] if not c["skipped"]}
        assert {"minimum_performance", "latency", "model_size", "calibration"} <= ran

    def test_disabled_check_is_skipped_and_listed(self, models):
        """A failing check named in gate.disabled no longer fails the gate and shows as skipped."""
        failing = gate(models, "binary", "noisy")
        assert not failing.passed
        report = gate(models, "binary", "noisy", disabled=failing.failed)
        assert report.passed and set(failing.failed) <= set(report.skipped)
        assert all("disabled" in report.check(n).detail for n in failing.failed)

    def test_unknown_disabled_name_is_an_error(self, models):
        """A typo in gate.disabled is refused rather than silently disabling nothing."""
        with pytest.raises(GateError, match="unknown checks"):
            gate(models, "binary", "better", disabled=["latancy"])

    def test_report_shape(self, models):
        """to_dict has passed, first_model and every registered check with the contract fields."""
        d = gate(models, "binary", "better").to_dict()
        assert set(d) >= {"passed", "checks", "first_model"}
        assert [c["name"] for c in d["checks"]] == list(CHECKS)
        for c in d["checks"]:
            assert {"name", "passed", "value", "threshold", "detail"} <= set(c)
        json.dumps(d)

    def test_holdout_without_target_is_refused(self, models):
        """A holdout lacking the policy's target column raises GateError."""
        m = models["binary"]
        with pytest.raises(GateError, match="target"):
            run_gate(m["better"], m["production"], m["holdout"].drop(columns="target"), policy())

    def test_crashing_check_fails(self, models):
        """A model that raises during predict_proba makes the calibration check fail, not pass."""

        class Broken(Overconfident):
            def predict_proba(self, X):
                raise RuntimeError("boom")

        m = models["binary"]
        report = run_gate(Broken(m["better"]), m["production"], m["holdout"], policy())
        assert not report.passed and "calibration" in report.failed


# ------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(RETRAIN), "gate", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, models):
    from workers.registry.artifacts import save_artifact

    d = tmp_path_factory.mktemp("gate_cli")
    m = models["binary"]
    save_artifact(m["production"], d / "A.skops")
    save_artifact(m["better"], d / "B.skops")
    save_artifact(m["noisy"], d / "N.skops")
    m["holdout"].to_parquet(d / "D.parquet")
    m["holdout"].drop(columns="target").to_csv(d / "nolabel.csv", index=False)
    (d / "p.toml").write_text('[model]\nname = "churn"\n\n[gate]\nmin_accuracy = 0.7\nmax_latency_p99_ms = 500\n')
    (d / "bad.toml").write_text('[model]\nname = "churn"\n\n[gate]\nmin_acuracy = 0.7\n')
    return d


class TestCli:
    def test_json_shape_with_model_and_gate_only_policy(self, cli_files):
        """`retrain gate --json` prints one object with passed, checks and first_model; exit 0 on pass."""
        d = cli_files
        proc = run_cli("--policy", str(d / "p.toml"), "--production", str(d / "A.skops"),
                       "--candidate", str(d / "B.skops"), "--data", str(d / "D.parquet"), "--json")
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["passed"] is True and out["first_model"] is False
        names = [c["name"] for c in out["checks"]]
        assert SEED_FIVE <= set(names) and {"slice_regression", "calibration", "data_validation"} <= set(names)
        for c in out["checks"]:
            assert {"name", "passed", "value", "threshold", "detail"} <= set(c)
        assert out["artifacts"]["candidate"]["sha256_verified"] is True

    def test_failing_candidate_exits_1(self, cli_files):
        """A label-noise candidate makes the command print passed=false and exit 1."""
        d = cli_files
        proc = run_cli("--policy", str(d / "p.toml"), "--production", str(d / "A.skops"),
                       "--candidate", str(d / "N.skops"), "--data", str(d / "D.parquet"), "--json")
        assert proc.returncode == 1, proc.stderr
        out = json.loads(proc.stdout)
        assert out["passed"] is False and "minimum_performance" in out["failed"]

    @pytest.mark.parametrize(
        "case,expect",
        [("missing", "no such"), ("policy", "unknown key"), ("target", "no target column")],
    )
    def test_unusable_input_exits_2_with_one_line(self, cli_files, case, expect):
        """Missing file, bad policy and data without the target column exit 2 with one stderr line."""
        d = cli_files
        args = {"policy": d / "p.toml", "production": d / "A.skops", "candidate": d / "B.skops", "data": d / "D.parquet"}
        if case == "missing":
            args["production"] = d / "nope.skops"
        elif case == "policy":
            args["policy"] = d / "bad.toml"
        else:
            args["data"] = d / "nolabel.csv"
        proc = run_cli(*[x for k, v in args.items() for x in (f"--{k}", str(v))], "--json")
        assert proc.returncode == 2
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expect in lines[0]


class TestStabilityAfterConceptChange:
    def test_moved_predictions_that_win_rows_by_dropping_the_minority_class_stay_blocked(self):
        """The override tests the metric no_regression compares: a candidate that never predicts the minority
        class wins twice as many rows as it loses (accuracy 0.90 vs 0.85, an exact test says better) but has the
        lower weighted F1, so its moved predictions stay blocked; with accuracy as the metric they pass."""
        rng = np.random.default_rng(0)
        y = np.zeros(1000, dtype=int)
        y[rng.permutation(1000)[:100]] = 1
        positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
        production = np.zeros(1000, dtype=int)
        production[rng.choice(positives, 50, replace=False)] = 1  # finds half the positives ...
        production[rng.choice(negatives, 100, replace=False)] = 1  # ... with 100 false alarms
        candidate = np.zeros(1000, dtype=int)  # never predicts the positive class
        holdout = pd.DataFrame({"target": y, "cand": candidate, "prod": production})
        report = run_gate(ColumnModel("cand"), ColumnModel("prod"), holdout, policy(min_accuracy=0.5, max_latency_p99_ms=250))
        check = report.check("prediction_stability")
        better = check.extra["candidate_significantly_better"]
        assert not check.passed and "prediction_stability" in report.failed
        assert better["metric"] == "f1_weighted" and better["test"] == "paired_bootstrap"
        assert better["lower_bound"] < 0 and not better["significant"]
        assert report.check("no_regression").passed  # the F1 drop (0.01) is within the tolerance: only this check holds it
        by_accuracy = run_gate(ColumnModel("cand"), ColumnModel("prod"), holdout,
                               policy(min_accuracy=0.5, max_latency_p99_ms=250, primary_metric="accuracy"))
        check = by_accuracy.check("prediction_stability")
        assert check.passed and check.extra["candidate_significantly_better"]["test"] == "mcnemar_exact"
        assert "significantly better" in check.detail

    def test_unstable_but_significantly_better_candidate_passes_stability(self):
        """After a concept change, a candidate whose predictions moved but who is significantly better is not blocked."""
        from datetime import datetime, timedelta, timezone

        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.compose import make_column_transformer
        from sklearn.preprocessing import OneHotEncoder, StandardScaler

        from config.policy import policy_from_dict
        from workers.gate.checks import run_gate
        from workers.simulate import CATEGORICAL, FEATURES, TARGET, make_frame

        now = datetime.now(timezone.utc)

        def fit(frame):
            ct = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
                                         (StandardScaler(), [c for c in FEATURES if c not in CATEGORICAL]))
            return make_pipeline(ct, LogisticRegression(max_iter=300)).fit(frame[FEATURES], frame[TARGET])

        old = fit(make_frame(3000, start=now - timedelta(days=2), end=now - timedelta(days=1), seed=1))
        new_world = make_frame(3000, start=now - timedelta(days=1), end=now, seed=2, concept=1.5)
        new = fit(new_world.iloc[:2000])
        holdout = new_world.iloc[2000:][FEATURES + [TARGET]]
        policy = policy_from_dict({"model": {"name": "m", "target": TARGET},
                                   "gate": {"min_accuracy": 0.5, "max_latency_p99_ms": 1000,
                                            "min_throughput_rows_per_s": 1}})
        report = run_gate(new, old, holdout, policy)
        stability = report.check("prediction_stability")
        assert stability.value < 0.8  # the predictions really moved
        assert stability.passed and "significantly better" in stability.detail
        # and the same candidate judged against itself-as-worse: a worse unstable model still fails
        report = run_gate(old, new, holdout, policy)
        assert not report.check("prediction_stability").passed
