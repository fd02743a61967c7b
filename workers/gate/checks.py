"""The quality gate: small check callables in a registry, run on one time-based holdout.

Each check is ``check(ctx: GateContext, cfg: GateSection) -> CheckResult``. The context holds
the candidate, production (None for the first model of a name), the holdout and each model's
predictions (computed once and cached), so checks stay a few lines each. :func:`run_gate` runs
them all in order, skips those in ``[gate] disabled`` and — for the first model — those that
need production, and returns a :class:`GateReport` that passes only when no check failed.

The checks (names are a machine-readable contract):

``data_validation``
    Carried from the validation step: fails when it listed any problem.
``minimum_performance``
    Primary metric on the holdout ``>= min_accuracy`` (accuracy for classifiers, R² for
    regression, or ``gate.primary_metric``).
``no_regression`` (needs production)
    The seed's rule judged with a paired test on the same holdout rows, so noise neither
    blocks nor passes. ``delta`` = candidate − production of the compared metric:
    ``gate.primary_metric`` when set, else weighted F1 (classifiers, as the seed) or R²
    (regression). Exact rule: the check **fails iff** ``delta < -max_regression`` **and** the
    drop is significant at ``regression_alpha``, by a test of that same metric:

    * accuracy — exact McNemar test on the discordant rows (``b`` = only the candidate right,
      ``c`` = only production right): one-sided ``binomtest(c, b + c, 0.5, "greater")`` p-value
      below alpha (McNemar tests accuracy only, so it judges no other metric: a candidate with
      production's accuracy that lost a minority class still drops weighted F1);
    * every other metric — a paired bootstrap (rows resampled jointly for both models, seeded)
      of the metric's difference: one-sided upper ``1 - alpha`` bound of ``delta`` below zero.

    A drop beyond the tolerance that the test cannot tell from noise passes (and says so); a drop
    beyond the tolerance that is real fails; a drop within the tolerance passes, as in the seed.
    The result names the test (``test``) and its p-value or bound.
``prediction_stability`` (needs production)
    Correlation of positive-class scores (binary), share of identical predicted labels
    (multiclass), correlation of predictions (regression) ``>= min_prediction_correlation``.
``slice_regression`` (needs production; skipped when ``slice_feature`` is unset)
    For every category of ``slice_feature`` (numeric features with many values are cut into
    quantile bins) with at least :data:`MIN_SLICE_ROWS` rows, the primary metric may not drop by
    more than ``max_slice_regression``.
``calibration`` (probabilistic classifiers; skipped otherwise)
    Top-label expected calibration error over :data:`CALIBRATION_BINS` equal-width bins
    ``<= max_calibration_error``.
``latency``
    Single-row ``predict`` p99 over up to :data:`LATENCY_CALLS` calls ``<= max_latency_p99_ms``
    and batch throughput ``>= min_throughput_rows_per_s``.
``model_size``
    Size of the candidate's skops artifact ``<= max_model_size_mb``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import pandas as pd
import scipy.stats as st
from sklearn import metrics as skm
from threadpoolctl import threadpool_limits

from config.policy import GateSection

LATENCY_CALLS = 100
LATENCY_WARMUP_CALLS = 3
LATENCY_BUDGET_S = 3.0
"""Stop timing single-row calls after this long (at least :data:`LATENCY_MIN_CALLS` are made)."""
LATENCY_MIN_CALLS = 10
LATENCY_THREADS = 1
"""Native threads (OpenMP/BLAS) allowed while timing, like a serving process."""
THROUGHPUT_MAX_ROWS = 10_000
THROUGHPUT_MIN_SECONDS = 0.2
THROUGHPUT_MAX_REPEATS = 20
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_BATCH = 200
MIN_SLICE_ROWS = 30
MAX_SLICE_CATEGORIES = 20
SLICE_QUANTILE_BINS = 5
CALIBRATION_BINS = 10

CLASSIFIER_METRICS = ("accuracy", "balanced_accuracy", "f1_weighted", "f1", "roc_auc")
REGRESSION_METRICS = ("r2", "neg_rmse", "neg_mae")


class GateError(ValueError):
    """The gate cannot run on this input (bad configuration or data); ``str()`` is one line."""


@dataclass
class CheckResult:
    """One check's outcome. ``extra`` carries check-specific fields (flattened by ``to_dict``)."""

    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return "skipped" if self.skipped else ("passed" if self.passed else "failed")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "passed": bool(self.passed),
            "value": _num(self.value),
            "threshold": _num(self.threshold),
            "detail": self.detail,
            "skipped": self.skipped,
            "status": self.status,
        }
        out.update({k: _plain(v) for k, v in self.extra.items() if k not in out})
        return out


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if np.isfinite(v) else None


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def skipped(name: str, detail: str, threshold: float | None = None) -> CheckResult:
    return CheckResult(name, True, None, threshold, detail, skipped=True)


class _Predictor(Protocol):
    def predict(self, X: Any) -> Any: ...


@dataclass
class GateContext:
    """Everything a check looks at; predictions are computed once, on first use."""

    candidate: _Predictor
    production: _Predictor | None
    holdout: pd.DataFrame
    target: str
    task: str
    candidate_columns: list[str]
    production_columns: list[str] | None = None
    validation: Any = None
    """A ``ValidationResult`` (or its dict) from the validation step, or None."""
    candidate_size_bytes: int | None = None

    @property
    def first_model(self) -> bool:
        return self.production is None

    @property
    def is_classifier(self) -> bool:
        return self.task != "regression"

    @cached_property
    def y(self) -> np.ndarray:
        return self.holdout[self.target].to_numpy()

    @cached_property
    def X(self) -> pd.DataFrame:
        return self.holdout[self.candidate_columns]

    @cached_property
    def X_production(self) -> pd.DataFrame:
        return self.holdout[self.production_columns if self.production_columns is not None else self.candidate_columns]

    @cached_property
    def labels(self) -> np.ndarray:
        parts = [np.unique(self.y)]
        for model in (self.candidate, self.production):
            if model is not None and hasattr(model, "classes_"):
                parts.append(np.asarray(model.classes_))
        return np.unique(np.concatenate(parts))

    @cached_property
    def candidate_pred(self) -> np.ndarray:
        return np.asarray(self.candidate.predict(self.X))

    @cached_property
    def production_pred(self) -> np.ndarray:
        assert self.production is not None
        return np.asarray(self.production.predict(self.X_production))

    def _proba(self, model: Any, X: pd.DataFrame) -> np.ndarray | None:
        if not self.is_classifier or not hasattr(model, "predict_proba"):
            return None
        try:
            raw = np.asarray(model.predict_proba(X), dtype=float)
        except (AttributeError, NotImplementedError):
            return None
        classes = list(getattr(model, "classes_", self.labels))
        out = np.zeros((len(X), len(self.labels)))
        for j, label in enumerate(classes):
            out[:, int(np.searchsorted(self.labels, label))] = raw[:, j]
        return out

    @cached_property
    def candidate_proba(self) -> np.ndarray | None:
        return self._proba(self.candidate, self.X)

    @cached_property
    def production_proba(self) -> np.ndarray | None:
        return self._proba(self.production, self.X_production) if self.production is not None else None

    def score(self, which: str) -> np.ndarray:
        """Binary positive-class score (probability, else decision function, else label)."""
        model, X = (self.candidate, self.X) if which == "candidate" else (self.production, self.X_production)
        proba = self.candidate_proba if which == "candidate" else self.production_proba
        if proba is not None:
            return proba[:, -1]
        if hasattr(model, "decision_function"):
            return np.asarray(model.decision_function(X), dtype=float).ravel()
        pred = self.candidate_pred if which == "candidate" else self.production_pred
        return (pred == self.labels[-1]).astype(float)


CheckFn = Callable[[GateContext, GateSection], CheckResult]


@dataclass(frozen=True)
class GateCheck:
    """A registered check: its callable and whether it compares against production."""

    name: str
    fn: CheckFn
    needs_production: bool = False


CHECKS: dict[str, GateCheck] = {}
"""Every gate check by name, in the order :func:`run_gate` runs them."""


def gate_check(name: str, *, needs_production: bool = False) -> Callable[[CheckFn], CheckFn]:
    """Register a check under ``name`` (decorator)."""

    def deco(fn: CheckFn) -> CheckFn:
        CHECKS[name] = GateCheck(name, fn, needs_production)
        return fn

    return deco


# ---------------------------------------------------------------------------------- metrics


def primary_metric_name(task: str, cfg: GateSection) -> str:
    """``gate.primary_metric`` or the task's default (accuracy / r2), validated for the task."""
    name = cfg.primary_metric or ("r2" if task == "regression" else "accuracy")
    allowed = REGRESSION_METRICS if task == "regression" else CLASSIFIER_METRICS
    if name not in allowed:
        raise GateError(f"gate.primary_metric '{name}' is not valid for a {task} model (use one of {', '.join(allowed)})")
    return name


def metric(name: str, y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None, labels: np.ndarray) -> float:
    """A higher-is-better metric from predictions (``proba`` columns aligned with ``labels``)."""
    if name == "accuracy":
        return float(skm.accuracy_score(y, pred))
    if name == "balanced_accuracy":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(skm.balanced_accuracy_score(y, pred))
    if name == "f1_weighted":
        return float(skm.f1_score(y, pred, average="weighted", labels=labels, zero_division=0))
    if name == "f1":
        return float(skm.f1_score(y, pred, pos_label=labels[-1], zero_division=0))
    if name == "roc_auc":
        if proba is None:
            raise GateError("roc_auc needs a model with predict_proba")
        if len(labels) == 2:
            return float(skm.roc_auc_score(y == labels[-1], proba[:, -1]))
        return float(skm.roc_auc_score(y, proba, multi_class="ovr", labels=labels))
    if name == "r2":
        return float(skm.r2_score(y, pred))
    if name == "neg_rmse":
        return -float(skm.root_mean_squared_error(y, pred))
    if name == "neg_mae":
        return -float(skm.mean_absolute_error(y, pred))
    raise GateError(f"unknown metric '{name}'")


def _regression_metric_vectorized(name: str) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def r2(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        ss_res = ((y - p) ** 2).sum(axis=-1)
        ss_tot = ((y - y.mean(axis=-1, keepdims=True)) ** 2).sum(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(ss_tot > 0, 1 - ss_res / ss_tot, 0.0)

    def neg_rmse(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        return -np.sqrt(((y - p) ** 2).mean(axis=-1))

    def neg_mae(y: np.ndarray, p: np.ndarray) -> np.ndarray:
        return -np.abs(y - p).mean(axis=-1)

    return {"r2": r2, "neg_rmse": neg_rmse, "neg_mae": neg_mae}[name]


def _classifier_metric_vectorized(name: str, y: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """:func:`metric` ``name`` on many row samples at once: ``fn(rows, pred)`` → one value per sample.

    ``rows`` is a ``(samples, n)`` array of holdout row indices (a bootstrap resample per line)
    and ``pred`` a model's predictions for every holdout row (its ``proba`` for roc_auc). The
    definitions are sklearn's as :func:`metric` calls them (``labels``, ``zero_division=0``), but
    computed from per-sample confusion counts (ranks for roc_auc): thousands of resamples then
    cost a few array operations instead of thousands of sklearn calls. Like sklearn, a class
    absent from a sample's truth is left out of balanced accuracy; a roc_auc column without
    both classes in a sample is left out of the multiclass mean (``nan`` when none is left).
    """
    if name == "roc_auc":
        columns = [len(labels) - 1] if len(labels) == 2 else list(range(len(labels)))

        def roc_auc(rows: np.ndarray, proba: np.ndarray) -> np.ndarray:
            aucs = [_auc(y[rows] == labels[k], proba[rows, k]) for k in columns]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-nan sample: nan, not noise
                return np.nanmean(aucs, axis=0)

        return roc_auc

    def counts(rows: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per sample and class of ``space``: true positives, true count (support), predicted count;
        and where ``labels`` sit in ``space`` (predictions outside ``labels`` still count as errors)."""
        space = np.union1d(labels, pred)
        k, samples = len(space), rows.shape[0]
        true_idx, pred_idx = np.searchsorted(space, y)[rows], np.searchsorted(space, pred)[rows]
        cells = (np.arange(samples)[:, None] * k + true_idx) * k + pred_idx
        cm = np.bincount(cells.ravel(), minlength=samples * k * k).reshape(samples, k, k)
        return np.diagonal(cm, axis1=1, axis2=2), cm.sum(axis=2), cm.sum(axis=1), np.searchsorted(space, labels)

    def per_class_f1(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(support + predicted > 0, 2 * tp / (support + predicted), 0.0)

    def accuracy(rows: np.ndarray, pred: np.ndarray) -> np.ndarray:
        return (y[rows] == pred[rows]).mean(axis=-1)

    def balanced_accuracy(rows: np.ndarray, pred: np.ndarray) -> np.ndarray:
        tp, support, _, _ = counts(rows, pred)
        with np.errstate(divide="ignore", invalid="ignore"):
            recall = np.where(support > 0, tp / support, 0.0)
        return recall.sum(axis=1) / (support > 0).sum(axis=1)

    def f1_weighted(rows: np.ndarray, pred: np.ndarray) -> np.ndarray:
        tp, support, predicted, judged = counts(rows, pred)
        f1, weight = per_class_f1(tp, support, predicted)[:, judged], support[:, judged]
        total = weight.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, (f1 * weight).sum(axis=1) / total, 0.0)

    def f1(rows: np.ndarray, pred: np.ndarray) -> np.ndarray:
        tp, support, predicted, judged = counts(rows, pred)
        return per_class_f1(tp, support, predicted)[:, judged[-1]]

    return {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "f1_weighted": f1_weighted, "f1": f1}[name]


def _auc(positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC AUC per line (Mann-Whitney U from average ranks, so ties count half, as in sklearn)."""
    n_pos = positive.sum(axis=-1)
    n_neg = positive.shape[-1] - n_pos
    rank_sum = (st.rankdata(score, axis=-1) * positive).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg), np.nan)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2:
        return float(np.array_equal(a, b))
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 1.0 if np.allclose(a, b) else 0.0
    return float(st.pearsonr(a, b).statistic)


# ----------------------------------------------------------------------------------- checks


@gate_check("data_validation")
def check_data_validation(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """Carry the validation step's result: fail when it listed any problem."""
    v = ctx.validation
    if v is None:
        return skipped("data_validation", "no validation result supplied", 0)
    data = v.to_dict() if hasattr(v, "to_dict") else dict(v)
    problems = list(data.get("problems", []))
    passed = bool(data.get("passed", not problems))
    if passed:
        detail = f"{data.get('n_rows', '?')} rows valid"
    else:
        detail = f"{len(problems)} problems: " + "; ".join(
            (f"{p.get('column')}: " if p.get("column") else "") + str(p.get("detail")) for p in problems[:10]
        )
    return CheckResult("data_validation", passed, len(problems), 0, detail, extra={"problems": problems})


@gate_check("minimum_performance")
def check_minimum_performance(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """The candidate's primary metric on the holdout reaches ``min_accuracy``."""
    name = primary_metric_name(ctx.task, cfg)
    value = metric(name, ctx.y, ctx.candidate_pred, ctx.candidate_proba, ctx.labels)
    passed = value >= cfg.min_accuracy
    op = ">=" if passed else "<"
    return CheckResult(
        "minimum_performance", passed, value, cfg.min_accuracy,
        f"{name} {value:.4f} {op} {cfg.min_accuracy}", extra={"metric": name, "n": int(len(ctx.y))},
    )


def no_regression_metric_name(task: str, cfg: GateSection) -> str:
    """The metric ``no_regression`` compares: ``gate.primary_metric`` when set, else the seed's
    (weighted F1 for classifiers, R² for regression)."""
    if cfg.primary_metric or task == "regression":
        return primary_metric_name(task, cfg)
    return "f1_weighted"


def _mcnemar(ctx: GateContext) -> dict[str, Any]:
    cand_ok = ctx.candidate_pred == ctx.y
    prod_ok = ctx.production_pred == ctx.y
    b = int(np.sum(cand_ok & ~prod_ok))  # only the candidate is right
    c = int(np.sum(~cand_ok & prod_ok))  # only production is right
    p = float(st.binomtest(c, b + c, 0.5, alternative="greater").pvalue) if b + c else 1.0
    return {"test": "mcnemar_exact", "only_candidate_right": b, "only_production_right": c, "p_value": p}


def _resampled_delta(ctx: GateContext, name: str) -> Callable[[np.ndarray], np.ndarray]:
    """``delta(rows)``: candidate − production of metric ``name`` on each line of row indices."""
    if ctx.is_classifier:
        fn = _classifier_metric_vectorized(name, ctx.y, ctx.labels)
        if name == "roc_auc":
            cand, prod = ctx.candidate_proba, ctx.production_proba
        else:
            cand, prod = ctx.candidate_pred, ctx.production_pred
        return lambda rows: fn(rows, cand) - fn(rows, prod)
    reg = _regression_metric_vectorized(name)
    y = np.asarray(ctx.y, dtype=float)
    pc = np.asarray(ctx.candidate_pred, dtype=float)
    pp = np.asarray(ctx.production_pred, dtype=float)
    return lambda rows: reg(y[rows], pc[rows]) - reg(y[rows], pp[rows])


def _paired_bootstrap(ctx: GateContext, name: str, alpha: float, bound: str = "upper") -> dict[str, Any]:
    """One-sided percentile bootstrap of the metric's candidate − production difference.

    The holdout rows are resampled (seeded) and both models are scored on the same resampled
    rows, so the interval is for the paired difference of exactly the metric being compared.
    ``bound``: ``"upper"`` (is the candidate worse? the upper bound is below 0) or ``"lower"``
    (is it better? the lower bound is above 0).
    """
    delta = _resampled_delta(ctx, name)

    def statistic(rows: np.ndarray, axis: int = -1) -> np.ndarray:
        return delta(np.atleast_2d(rows).astype(np.intp))

    with warnings.catch_warnings():  # resamples whose metric is undefined make a nan bound: the callers judge it
        warnings.simplefilter("ignore", st.DegenerateDataWarning)
        res = st.bootstrap(
            (np.arange(len(ctx.y)),), statistic, vectorized=True, n_resamples=BOOTSTRAP_RESAMPLES,
            batch=BOOTSTRAP_BATCH, confidence_level=1 - alpha, alternative="less" if bound == "upper" else "greater",
            method="percentile", rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
    value = res.confidence_interval.high if bound == "upper" else res.confidence_interval.low
    return {"test": "paired_bootstrap", f"{bound}_bound": float(value),
            "confidence_level": 1 - alpha, "resamples": BOOTSTRAP_RESAMPLES}


@gate_check("no_regression", needs_production=True)
def check_no_regression(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """No drop beyond ``max_regression`` vs production that a paired test of that metric says is real."""
    alpha = cfg.regression_alpha
    name = no_regression_metric_name(ctx.task, cfg)
    cand_proba, prod_proba = (ctx.candidate_proba, ctx.production_proba) if name == "roc_auc" else (None, None)
    new = metric(name, ctx.y, ctx.candidate_pred, cand_proba, ctx.labels)
    prod = metric(name, ctx.y, ctx.production_pred, prod_proba, ctx.labels)
    undefined = False
    if name == "accuracy":  # McNemar tests exactly accuracy; any other metric needs its own test
        test = _mcnemar(ctx)
        significant = test["p_value"] < alpha
        evidence = f"mcnemar_exact p={test['p_value']:.3g}"
    else:
        test = _paired_bootstrap(ctx, name, alpha)
        # Undefined (nan) when resamples lack a class the metric needs (roc_auc with a handful of
        # positives): the test cannot clear the drop, so a drop beyond the tolerance blocks.
        undefined = not np.isfinite(test["upper_bound"])
        significant = undefined or test["upper_bound"] < 0
        evidence = ("paired_bootstrap: the bound is undefined (resamples without every class the metric needs)"
                    if undefined else f"paired_bootstrap: {1 - alpha:.0%} upper bound of delta {test['upper_bound']:+.4f}")
    delta = new - prod
    beyond = delta < -cfg.max_regression
    passed = not (beyond and significant)
    if not beyond:
        detail = f"{name} {new:.4f} vs production {prod:.4f} (delta {delta:+.4f}, tolerance -{cfg.max_regression}; {evidence})"
    elif undefined:
        detail = f"{name} dropped {-delta:.4f} > {cfg.max_regression} and noise cannot be told from it ({evidence})"
    elif significant:
        detail = f"{name} dropped {-delta:.4f} > {cfg.max_regression} and the drop is significant ({evidence}, alpha {alpha})"
    else:
        detail = f"{name} dropped {-delta:.4f} > {cfg.max_regression} but within noise ({evidence}, alpha {alpha}); not blocking"
    extra = {"metric": name, "new": new, "production": prod, "max_allowed_regression": cfg.max_regression,
             "significant": bool(significant), "alpha": alpha, **test}
    if ctx.is_classifier:  # the seed's field names, weighted F1 whatever metric was compared
        seed = "f1_weighted"
        extra.update(new_f1=new if name == seed else metric(seed, ctx.y, ctx.candidate_pred, None, ctx.labels),
                     production_f1=prod if name == seed else metric(seed, ctx.y, ctx.production_pred, None, ctx.labels))
    return CheckResult("no_regression", passed, delta, -cfg.max_regression, detail, extra=extra)


@gate_check("prediction_stability", needs_production=True)
def check_prediction_stability(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """Candidate and production predictions stay close on the same rows."""
    if ctx.task == "binary":
        kind, value = "score_correlation", _correlation(ctx.score("candidate"), ctx.score("production"))
    elif ctx.task == "multiclass":
        kind, value = "agreement", float(np.mean(ctx.candidate_pred == ctx.production_pred))
    else:
        kind, value = "correlation", _correlation(ctx.candidate_pred, ctx.production_pred)
    threshold = cfg.min_prediction_correlation
    passed = value >= threshold
    detail = f"{kind} {value:.4f} {'>=' if passed else '<'} {threshold}"
    extra: dict[str, Any] = {"measure": kind}
    if not passed:
        # After a concept change the right model *must* predict differently. Instability is not
        # blocking when the candidate is significantly better than production on the same rows,
        # in the metric no_regression compares (a candidate that wins rows by dropping a minority
        # class is not better).
        better = _significantly_better(ctx, no_regression_metric_name(ctx.task, cfg), cfg.regression_alpha)
        extra["candidate_significantly_better"] = better
        if better["significant"]:
            passed = True
            detail += (f", but the candidate is significantly better on the same rows "
                       f"({better['evidence']}): predictions moved for the better")
    return CheckResult("prediction_stability", passed, value, threshold, detail, extra=extra)


def _significantly_better(ctx: GateContext, name: str, alpha: float) -> dict[str, Any]:
    """Is the candidate significantly better than production in metric ``name`` on the same rows?

    For accuracy, a one-sided exact test of the rows only one model gets right (McNemar's
    discordant pairs, as no_regression uses); for any other metric, the lower bound of the paired
    bootstrap of its difference (as no_regression's upper bound).
    """
    from scipy.stats import binomtest

    if name == "accuracy":
        cand_ok, prod_ok = ctx.candidate_pred == ctx.y, ctx.production_pred == ctx.y
        wins, losses = int(np.sum(cand_ok & ~prod_ok)), int(np.sum(prod_ok & ~cand_ok))
        p = float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue) if wins + losses else 1.0
        return {"metric": name, "test": "mcnemar_exact", "wins": wins, "losses": losses, "p_value": p,
                "significant": p < alpha, "evidence": f"accuracy, paired exact test p={p:.2g}"}
    test = _paired_bootstrap(ctx, name, alpha, bound="lower")
    return {"metric": name, **test, "significant": test["lower_bound"] > 0,
            "evidence": f"{name}, paired bootstrap: {1 - alpha:.0%} lower bound of delta {test['lower_bound']:+.4f}"}


def _slices(values: pd.Series) -> pd.Series:
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values) and values.nunique() > MAX_SLICE_CATEGORIES:
        return pd.qcut(values, SLICE_QUANTILE_BINS, duplicates="drop").astype(str)
    return values.astype(object).where(values.notna(), "<null>").astype(str)


@gate_check("slice_regression", needs_production=True)
def check_slice_regression(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """No category of ``slice_feature`` loses more than ``max_slice_regression`` of the primary metric."""
    feature = cfg.slice_feature
    if not feature:
        return skipped("slice_regression", "no gate.slice_feature set", cfg.max_slice_regression)
    if feature not in ctx.holdout.columns:
        return CheckResult("slice_regression", False, None, cfg.max_slice_regression, f"slice feature '{feature}' is not in the holdout")
    name = primary_metric_name(ctx.task, cfg)
    groups = _slices(ctx.holdout[feature]).to_numpy()
    rows, worst, worst_slice, too_small = [], -np.inf, None, []
    for label in sorted(set(groups)):
        mask = groups == label
        n = int(mask.sum())
        if n < MIN_SLICE_ROWS:
            too_small.append(label)
            continue
        cp = ctx.candidate_proba[mask] if ctx.candidate_proba is not None else None
        pp = ctx.production_proba[mask] if ctx.production_proba is not None else None
        try:
            new = metric(name, ctx.y[mask], ctx.candidate_pred[mask], cp, ctx.labels)
            old = metric(name, ctx.y[mask], ctx.production_pred[mask], pp, ctx.labels)
        except ValueError:  # e.g. roc_auc on a one-class slice
            too_small.append(label)
            continue
        drop = old - new
        rows.append({"slice": label, "n": n, "candidate": new, "production": old, "drop": drop})
        if drop > worst:
            worst, worst_slice = drop, label
    if not rows:
        return skipped("slice_regression", f"no slice of '{feature}' has {MIN_SLICE_ROWS}+ rows", cfg.max_slice_regression)
    passed = worst <= cfg.max_slice_regression
    detail = (f"worst slice {feature}={worst_slice}: {name} drop {worst:+.4f} "
              f"{'<=' if passed else '>'} {cfg.max_slice_regression} ({len(rows)} slices judged)")
    return CheckResult("slice_regression", passed, worst, cfg.max_slice_regression, detail,
                       extra={"feature": feature, "metric": name, "slices": rows, "not_judged": too_small})


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, labels: np.ndarray, bins: int = CALIBRATION_BINS) -> float:
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by size."""
    confidence = proba.max(axis=1)
    correct = labels[proba.argmax(axis=1)] == y
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(idx, minlength=bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=bins)
    acc_sum = np.bincount(idx, weights=correct.astype(float), minlength=bins)
    nz = counts > 0
    return float(np.sum(np.abs(acc_sum[nz] - conf_sum[nz])) / len(y))


@gate_check("calibration")
def check_calibration(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """A probabilistic classifier's expected calibration error stays under ``max_calibration_error``."""
    if not ctx.is_classifier:
        return skipped("calibration", "regression model: no probabilities to calibrate", cfg.max_calibration_error)
    if ctx.candidate_proba is None:
        return skipped("calibration", "candidate has no predict_proba", cfg.max_calibration_error)
    ece = expected_calibration_error(ctx.y, ctx.candidate_proba, ctx.labels)
    extra: dict[str, Any] = {"bins": CALIBRATION_BINS}
    if ctx.production_proba is not None:
        extra["production_ece"] = expected_calibration_error(ctx.y, ctx.production_proba, ctx.labels)
    passed = ece <= cfg.max_calibration_error
    return CheckResult("calibration", passed, ece, cfg.max_calibration_error,
                       f"ECE {ece:.4f} {'<=' if passed else '>'} {cfg.max_calibration_error}", extra=extra)


def measure_latency(model: _Predictor, X: pd.DataFrame, threads: int | None = LATENCY_THREADS) -> dict[str, float]:
    """Single-row p50/p99 in ms and batch throughput in rows/s, within a bounded time.

    Native thread pools (OpenMP, BLAS) are limited to ``threads`` while timing, as a serving
    process should be: on a busy machine, spinning OpenMP workers turn a 5 ms single-row call
    into hundreds of milliseconds, which measures the machine, not the model.
    """
    if threads is None:
        return {**_measure_latency(model, X), "threads": None}
    with threadpool_limits(limits=threads):
        return {**_measure_latency(model, X), "threads": threads}


def _measure_latency(model: _Predictor, X: pd.DataFrame) -> dict[str, float]:
    singles = [X.iloc[[i]] for i in range(min(len(X), LATENCY_CALLS))]
    for row in singles[:LATENCY_WARMUP_CALLS]:
        model.predict(row)
    times = []
    started = time.perf_counter()
    for i in range(LATENCY_CALLS):
        t0 = time.perf_counter()
        model.predict(singles[i % len(singles)])
        times.append((time.perf_counter() - t0) * 1000)
        if i + 1 >= LATENCY_MIN_CALLS and time.perf_counter() - started > LATENCY_BUDGET_S:
            break
    batch = X.iloc[:THROUGHPUT_MAX_ROWS]
    rows, spent, repeats = 0, 0.0, 0
    while repeats < THROUGHPUT_MAX_REPEATS and (spent < THROUGHPUT_MIN_SECONDS or repeats == 0):
        t0 = time.perf_counter()
        model.predict(batch)
        spent += time.perf_counter() - t0
        rows += len(batch)
        repeats += 1
        if spent > LATENCY_BUDGET_S:
            break
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "calls": len(times),
        "throughput_rows_per_s": rows / spent if spent > 0 else float("inf"),
        "batch_rows": int(len(batch)),
    }


@gate_check("latency")
def check_latency(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """Single-row p99 within ``max_latency_p99_ms`` and batch throughput at least ``min_throughput_rows_per_s``."""
    m = measure_latency(ctx.candidate, ctx.X)
    fast = m["p99_ms"] <= cfg.max_latency_p99_ms
    enough = m["throughput_rows_per_s"] >= cfg.min_throughput_rows_per_s
    detail = (f"p99 {m['p99_ms']:.2f} ms {'<=' if fast else '>'} {cfg.max_latency_p99_ms} ms over {m['calls']} calls; "
              f"throughput {m['throughput_rows_per_s']:.0f} rows/s {'>=' if enough else '<'} {cfg.min_throughput_rows_per_s}")
    return CheckResult("latency", fast and enough, m["p99_ms"], cfg.max_latency_p99_ms, detail,
                       extra={**m, "p99_ms": m["p99_ms"], "threshold_ms": cfg.max_latency_p99_ms,
                              "min_throughput_rows_per_s": cfg.min_throughput_rows_per_s})


@gate_check("model_size")
def check_model_size(ctx: GateContext, cfg: GateSection) -> CheckResult:
    """The candidate's skops artifact is at most ``max_model_size_mb``."""
    size = ctx.candidate_size_bytes
    if size is None:
        from workers.registry.artifacts import artifact_bytes

        size = len(artifact_bytes(ctx.candidate))
    size_mb = size / (1024 * 1024)
    passed = size_mb <= cfg.max_model_size_mb
    return CheckResult("model_size", passed, size_mb, cfg.max_model_size_mb,
                       f"skops artifact {size_mb:.3f} MB {'<=' if passed else '>'} {cfg.max_model_size_mb} MB",
                       extra={"size_mb": size_mb, "size_bytes": int(size), "max_mb": cfg.max_model_size_mb})


# ----------------------------------------------------------------------------------- report


@dataclass
class GateReport:
    """Every check's result; ``passed`` when none failed (skipped checks do not count)."""

    checks: list[CheckResult]
    first_model: bool
    note: str = ""
    n_holdout: int = 0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks if not c.skipped)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.skipped and not c.passed]

    @property
    def skipped(self) -> list[str]:
        return [c.name for c in self.checks if c.skipped]

    def check(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks],
            "first_model": self.first_model,
            "failed": self.failed,
            "skipped": self.skipped,
            "note": self.note,
            "n_holdout": self.n_holdout,
        }


def model_columns(model: Any, holdout: pd.DataFrame, target: str, exclude: Iterable[str] = ()) -> list[str]:
    """The columns ``model`` was fitted on (``feature_names_in_``), else every non-target column."""
    names = getattr(model, "feature_names_in_", None)
    if names is not None:
        return [str(n) for n in names]
    skip = {target, *exclude}
    return [c for c in holdout.columns if c not in skip]


def run_gate(
    candidate: Any,
    production: Any | None,
    holdout_df: pd.DataFrame,
    policy: Any,
    *,
    validation: Any = None,
    candidate_size_bytes: int | None = None,
) -> GateReport:
    """Run every gate check of the policy on one holdout and return the report.

    Parameters
    ----------
    candidate, production
        Fitted scikit-learn-API estimators/pipelines; ``production`` None for the first model of
        a name (then only absolute checks run and the report says so).
    holdout_df
        The newest slice of the data (never trained on), with the policy's target column.
    policy
        A :class:`config.policy.Policy`; ``[model]`` and ``[gate]`` are read.
    validation
        The validation step's ``ValidationResult`` (or its dict), carried as ``data_validation``.
    candidate_size_bytes
        Size of the candidate's stored artifact; None = serialize it with skops to measure.

    Raises
    ------
    GateError
        Unknown names in ``gate.disabled``, a metric that does not fit the task, a holdout
        without the target or without the candidate's feature columns.

    Examples
    --------
    >>> report = run_gate(candidate, production, split.test, policy)   # doctest: +SKIP
    >>> report.to_dict()["passed"], report.failed                      # doctest: +SKIP
    (False, ['no_regression'])
    """
    cfg: GateSection = policy.gate
    target, task = policy.model.target, policy.model.task
    unknown = sorted(set(cfg.disabled) - set(CHECKS))
    if unknown:
        raise GateError(f"gate.disabled names unknown checks {unknown} (known: {', '.join(CHECKS)})")
    primary_metric_name(task, cfg)
    if target not in holdout_df.columns:
        raise GateError(f"holdout has no target column '{target}'")
    holdout = holdout_df.loc[holdout_df[target].notna()].reset_index(drop=True)
    if len(holdout) == 0:
        raise GateError("holdout has no labeled rows")
    time_col = getattr(getattr(policy, "data", None), "time_column", None)
    exclude = [time_col] if time_col else []
    cand_cols = model_columns(candidate, holdout, target, exclude)
    missing = [c for c in cand_cols if c not in holdout.columns]
    if missing:
        raise GateError(f"holdout lacks the candidate's feature columns {missing[:6]}")
    note = ""
    prod_cols = None
    first_model = production is None
    if production is not None:
        prod_cols = model_columns(production, holdout, target, exclude)
        prod_missing = [c for c in prod_cols if c not in holdout.columns]
        if prod_missing:
            note = f"production cannot score this holdout (lacks {prod_missing[:6]}): comparisons skipped"
            production = None
    if production is None and not note:
        note = "first model of this name: absolute checks only"
    ctx = GateContext(candidate, production, holdout, target, task, cand_cols, prod_cols, validation, candidate_size_bytes)
    results = []
    for check in CHECKS.values():
        if check.name in cfg.disabled:
            results.append(skipped(check.name, "disabled by policy (gate.disabled)"))
            continue
        if check.needs_production and production is None:
            results.append(skipped(check.name, note))
            continue
        try:
            results.append(check.fn(ctx, cfg))
        except GateError:
            raise
        except Exception as exc:  # a check that crashes fails; it never passes silently
            results.append(CheckResult(check.name, False, None, None, f"check error: {type(exc).__name__}: {exc}"))
    return GateReport(results, first_model=first_model, note=note, n_holdout=int(len(holdout)))
