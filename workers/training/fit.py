"""Build the estimator from the policy, search its hyperparameters, fit the candidate.

The estimator is any scikit-learn-API class given by import path
(``sklearn.ensemble.HistGradientBoostingClassifier``) or a user function
``package.module:build`` called with ``[training.params]`` as keyword arguments. It is wrapped
in a :class:`~sklearn.pipeline.Pipeline` with the feature steps (``features``: a
ColumnTransformer one-hot encoding categoricals with ``handle_unknown="ignore"``, passing
numeric columns through — or median-imputing them when the estimator does not accept NaN) and
the estimator (``model``).

**Search, seeded with production.** The candidate list is drawn once from the policy's space
with :class:`~sklearn.model_selection.ParameterSampler` (seeded by
``[training.search] random_state``), and production's current values of the searched
hyperparameters are put *first* in it, so the incumbent configuration always competes and a
search can never do worse than re-fitting it. The list goes to scikit-learn's search CV as
single-point distributions, so every candidate is evaluated:

* ``halving`` (default): ``HalvingRandomSearchCV(n_candidates=len(list), min_resources="exhaust")``
* ``random``: ``RandomizedSearchCV(n_iter=len(list))``
* ``grid``: ``GridSearchCV`` over the full grid of the space plus production's point
* ``none`` (or an empty space): fit ``[training.params]`` (+ production's values) directly

Folds are (stratified) shuffled K-folds with a fixed seed, and the estimator gets
``random_state = [training] random_state`` when it has one and the policy does not set it, so a
rerun on the same data gives the same parameters and the same predictions.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats as st
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.experimental import enable_halving_search_cv  # noqa: F401  (registers the class)
from sklearn.impute import SimpleImputer
from sklearn.model_selection import (
    GridSearchCV,
    HalvingRandomSearchCV,
    KFold,
    ParameterSampler,
    RandomizedSearchCV,
    StratifiedKFold,
)
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder

from workers.training.validate import TrainingSchema, column_kind, feature_columns, profile_frame

DEFAULT_CLASSIFIER = "sklearn.ensemble.HistGradientBoostingClassifier"
DEFAULT_REGRESSOR = "sklearn.ensemble.HistGradientBoostingRegressor"
MODEL_STEP = "model"
FEATURES_STEP = "features"
MAX_ONEHOT_CATEGORIES = 64
"""Rarer categories beyond this many per column share one "infrequent" column."""
HALVING_FACTOR = 3

PRIMARY_SCORERS = {
    # gate.primary_metric / search.scoring alias -> scikit-learn scorer name
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced_accuracy",
    "f1_weighted": "f1_weighted",
    "f1": "f1",
    "roc_auc": "roc_auc",
    "r2": "r2",
    "neg_rmse": "neg_root_mean_squared_error",
    "neg_mae": "neg_mean_absolute_error",
}


class TrainingError(ValueError):
    """The policy's estimator or search space cannot be used; ``str()`` is one line."""


@dataclass
class FitResult:
    """A fitted candidate and what it took to get it."""

    pipeline: Pipeline
    best_params: dict[str, Any]
    cv_score: float | None
    scoring: str
    estimator: str
    search: str
    candidates: list[dict[str, Any]] = field(default_factory=list)
    seeded_with: dict[str, Any] | None = None
    schema: TrainingSchema | None = None
    n_train: int = 0
    fit_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Everything but the fitted pipeline, JSON-friendly (for the registry and events)."""
        return {
            "best_params": self.best_params,
            "cv_score": self.cv_score,
            "scoring": self.scoring,
            "estimator": self.estimator,
            "search": self.search,
            "candidates": self.candidates,
            "seeded_with": self.seeded_with,
            "schema": self.schema.to_dict() if self.schema else None,
            "n_train": self.n_train,
            "fit_seconds": self.fit_seconds,
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _is_simple(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, np.generic))


def resolve_estimator_spec(spec: str, task: str) -> str:
    """The estimator spec to use: the schema's default classifier becomes a regressor for regression."""
    if task == "regression" and spec == DEFAULT_CLASSIFIER:
        return DEFAULT_REGRESSOR
    return spec


def _import(spec: str) -> Any:
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
    else:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise TrainingError(f"estimator '{spec}': use 'package.module.Class' or 'package.module:build'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise TrainingError(f"estimator '{spec}': cannot import module '{module_name}' ({exc})") from None
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TrainingError(f"estimator '{spec}': module '{module_name}' has no '{attr}'") from None
    return obj


def build_estimator(spec: str, params: dict[str, Any] | None = None, random_state: int | None = None) -> Any:
    """Instantiate the policy's estimator.

    Parameters
    ----------
    spec
        ``package.module.Class`` (a scikit-learn-API class) or ``package.module:build`` (a
        function returning an unfitted estimator).
    params
        ``[training.params]``: keyword arguments for the class or the build function.
    random_state
        Set on the estimator when it has a ``random_state`` parameter the params leave unset.

    Examples
    --------
    >>> build_estimator("sklearn.linear_model.LogisticRegression", {"C": 0.5})
    LogisticRegression(C=0.5)
    """
    params = dict(params or {})
    factory = _import(spec)
    if not callable(factory):
        raise TrainingError(f"estimator '{spec}' is not callable")
    try:
        estimator = factory(**params)
    except TypeError as exc:
        raise TrainingError(f"estimator '{spec}': bad parameters ({exc})") from None
    if not (hasattr(estimator, "fit") and hasattr(estimator, "get_params") and hasattr(estimator, "predict")):
        raise TrainingError(f"estimator '{spec}' did not produce a scikit-learn-API estimator (fit/predict/get_params)")
    if random_state is not None and "random_state" not in params:
        if "random_state" in estimator.get_params(deep=False) and estimator.get_params(deep=False)["random_state"] is None:
            estimator.set_params(random_state=random_state)
    return estimator


def _allows_nan(estimator: Any) -> bool:
    try:
        return bool(estimator.__sklearn_tags__().input_tags.allow_nan)
    except Exception:
        return False


def split_features(frame: pd.DataFrame, columns: list[str], categorical: list[str] = ()) -> tuple[list[str], list[str]]:
    """Split feature columns into (numeric, categorical) the way :func:`build_pipeline` treats them.

    Booleans and strings are categorical; datetimes are dropped (turn them into numbers first).
    """
    numeric, cats = [], []
    for col in columns:
        kind = column_kind(frame[col], categorical)
        if kind == "numeric":
            numeric.append(col)
        elif kind in ("categorical", "boolean"):
            cats.append(col)
    return numeric, cats


def build_pipeline(estimator: Any, numeric: list[str], categorical: list[str]) -> Pipeline:
    """``Pipeline([("features", ColumnTransformer(...)), ("model", estimator)])``."""
    transformers = []
    if categorical:
        transformers.append(
            (
                "categorical",
                OneHotEncoder(handle_unknown="ignore", max_categories=MAX_ONEHOT_CATEGORIES, sparse_output=False),
                list(categorical),
            )
        )
    if numeric:
        numeric_step = "passthrough" if _allows_nan(estimator) else SimpleImputer(strategy="median")
        transformers.append(("numeric", numeric_step, list(numeric)))
    features = ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=False)
    return Pipeline([(FEATURES_STEP, features), (MODEL_STEP, estimator)])


def primary_scoring(task: str, metric: str = "") -> str:
    """The scikit-learn scorer for a task's primary metric (accuracy / R² unless named)."""
    if not metric:
        return "r2" if task == "regression" else "accuracy"
    scorer = PRIMARY_SCORERS.get(metric, metric)
    if task == "multiclass" and scorer == "roc_auc":
        return "roc_auc_ovr"
    return scorer


def _distribution(name: str, spec: Any) -> Any:
    if isinstance(spec, list):
        if not spec:
            raise TrainingError(f"search space '{name}': empty list")
        return spec
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, bounds), = spec.items()
        if not (isinstance(bounds, list) and len(bounds) == 2):
            raise TrainingError(f"search space '{name}': {kind} needs [low, high]")
        low, high = bounds
        if kind == "uniform":
            return st.uniform(low, high - low)
        if kind == "loguniform":
            return st.loguniform(low, high)
        if kind == "randint":
            return st.randint(low, high + 1)
        raise TrainingError(f"search space '{name}': unknown distribution '{kind}' (uniform, loguniform, randint)")
    if isinstance(spec, dict):
        raise TrainingError(f"search space '{name}': give a list or one of uniform/loguniform/randint")
    return [spec]


def production_params(production: Any, keys: list[str] | None = None) -> dict[str, Any]:
    """The hyperparameters of production's estimator (the last pipeline step), JSON-friendly.

    Parameters
    ----------
    production
        A fitted estimator or pipeline, or None.
    keys
        Restrict to these parameter names (e.g. the search space's); None = every simple value.
    """
    if production is None:
        return {}
    est = production.steps[-1][1] if isinstance(production, Pipeline) else production
    params = est.get_params(deep=False)
    wanted = params.keys() if keys is None else [k for k in keys if k in params]
    return {k: _jsonable(params[k]) for k in wanted if _is_simple(params[k])}


def search_candidates(
    space: dict[str, Any],
    n_candidates: int,
    random_state: int,
    seed_params: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The concrete parameter sets the search evaluates: production's first, then seeded draws.

    ``seed_params`` values for keys outside ``space`` are ignored (the policy fixes those); keys
    of the space production does not set take the first draw's value.
    """
    dists = {k: _distribution(k, v) for k, v in space.items()}
    if not dists:
        return [{}]
    seed = {k: _jsonable(v) for k, v in (seed_params or {}).items() if k in dists}
    n_draw = max(n_candidates - (1 if seed else 0), 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "grid smaller than n_iter" is fine
        drawn = [{k: _jsonable(v) for k, v in p.items()} for p in ParameterSampler(dists, n_iter=n_draw, random_state=random_state)]
    drawn = [dict(sorted(p.items())) for p in drawn]
    out: list[dict[str, Any]] = []
    if seed:
        out.append(dict(sorted({**drawn[0], **seed}.items())))
    for p in drawn:
        if p not in out:
            out.append(p)
    return out


def _prefixed(params: dict[str, Any]) -> dict[str, Any]:
    return {f"{MODEL_STEP}__{k}": v for k, v in params.items()}


def _cv(task: str, n_splits: int, random_state: int) -> Any:
    if task == "regression":
        return KFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=random_state)


def _make_search(pipe: Pipeline, method: str, space: dict[str, Any], candidates: list[dict[str, Any]], seed: dict[str, Any], s: Any, task: str, scoring: str) -> Any:
    cv = _cv(task, s.cv, s.random_state)
    common = dict(scoring=scoring, cv=cv, n_jobs=s.n_jobs, refit=True, error_score=np.nan)
    points = [{k: [v] for k, v in _prefixed(c).items()} for c in candidates]
    if method == "grid":
        grid = {k: v for k, v in space.items()}
        for key, value in grid.items():
            if not isinstance(value, list):
                raise TrainingError(f"grid search needs a list of values for '{key}'")
        grids = [{k: list(v) for k, v in _prefixed(grid).items()}]
        if seed:
            grids.append({k: [v] for k, v in _prefixed({**candidates[0], **seed}).items()})
        return GridSearchCV(pipe, grids, **common)
    if method == "random":
        return RandomizedSearchCV(pipe, points, n_iter=len(points), random_state=s.random_state, **common)
    return HalvingRandomSearchCV(
        pipe,
        points,
        n_candidates=len(points),
        factor=HALVING_FACTOR,
        min_resources="exhaust",
        random_state=s.random_state,
        **common,
    )


def _model_params(params: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{MODEL_STEP}__"
    return {k[len(prefix):]: _jsonable(v) for k, v in params.items() if k.startswith(prefix)}


def train_candidate(
    frame: pd.DataFrame,
    policy: Any,
    *,
    production_hyperparams: dict[str, Any] | None = None,
) -> FitResult:
    """Fit the candidate for a policy on training rows, searching hyperparameters.

    Parameters
    ----------
    frame
        Training rows (the older part of the time-based split): features and the target; the
        time column, if present, is not used as a feature.
    policy
        A :class:`config.policy.Policy` (``[model]``, ``[data]``, ``[training]`` are read).
    production_hyperparams
        Production's current hyperparameters (the registry's record of them, or
        :func:`production_params` of the loaded model); put first in the candidate list.

    Returns
    -------
    FitResult
        The refitted best pipeline, its parameters and CV score, the candidates tried, and the
        :class:`TrainingSchema` of ``frame`` for validating the next training.

    Examples
    --------
    >>> result = train_candidate(split.train, policy, production_hyperparams={"max_depth": 6})  # doctest: +SKIP
    >>> result.best_params, result.cv_score                                                   # doctest: +SKIP
    ({'learning_rate': 0.1, 'max_depth': 6}, 0.91)
    """
    task, target = policy.model.task, policy.model.target
    d, t = policy.data, policy.training
    s = t.search
    if target not in frame.columns:
        raise TrainingError(f"training data has no target column '{target}'")
    frame = frame.loc[frame[target].notna()]
    columns = feature_columns(frame, target, d.time_column, d.features)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise TrainingError(f"training data lacks feature columns {missing[:6]}")
    numeric, categorical = split_features(frame, columns, list(d.categorical))
    if not numeric and not categorical:
        raise TrainingError("no usable feature columns (numeric, categorical or boolean)")
    used = set(numeric) | set(categorical)
    X = frame[[c for c in columns if c in used]]
    y = frame[target]

    spec = resolve_estimator_spec(t.estimator, task)
    estimator = build_estimator(spec, t.params, t.random_state)
    pipe = build_pipeline(estimator, numeric, categorical)
    scoring = primary_scoring(task, s.scoring)
    est_params = estimator.get_params(deep=False)
    unknown = [k for k in s.space if k not in est_params]
    if unknown:
        raise TrainingError(f"search space names parameters the estimator lacks: {unknown[:6]}")
    seed = {k: v for k, v in (production_hyperparams or {}).items() if k in s.space and k in est_params}

    started = time.perf_counter()
    candidates = search_candidates(s.space, s.n_candidates, s.random_state, seed) if s.method != "none" else [{}]
    if candidates == [{}]:
        # Nothing to search: fit the policy's parameters, with production's for keys it sets.
        fixed = {k: v for k, v in (production_hyperparams or {}).items() if k in est_params and k not in t.params and k in s.space}
        model = clone(pipe).set_params(**_prefixed(fixed))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            model.fit(X, y)
        best = {**{k: _jsonable(v) for k, v in t.params.items()}, **fixed}
        return FitResult(
            pipeline=model, best_params=best, cv_score=None, scoring=scoring, estimator=spec, search="none",
            candidates=[{"params": best, "mean_score": None, "rank": 1}], seeded_with=seed or None,
            schema=profile_frame(frame, target, task, features=columns, categorical=d.categorical),
            n_train=int(len(frame)), fit_seconds=time.perf_counter() - started,
        )
    search = _make_search(pipe, s.method, s.space, candidates, seed, s, task, scoring)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # failed-candidate notices: scores are NaN
        try:
            search.fit(X, y)
        except ValueError as exc:
            raise TrainingError(f"hyperparameter search failed: {str(exc).splitlines()[0]}") from None
    res = search.cv_results_
    iters = np.asarray(res.get("iter", np.zeros(len(res["params"]), dtype=int)))
    latest: dict[str, dict[str, Any]] = {}
    for i, params in enumerate(res["params"]):  # halving: keep each candidate's last round
        entry = {
            "params": _model_params(params),
            "mean_score": _jsonable(float(res["mean_test_score"][i])),
            "rank": int(res["rank_test_score"][i]),
            "round": int(iters[i]),
        }
        key = repr(sorted(entry["params"].items()))
        if key not in latest or entry["round"] >= latest[key]["round"]:
            latest[key] = entry
    tried = sorted(latest.values(), key=lambda c: (c["rank"], -c["round"]))
    best = {**{k: _jsonable(v) for k, v in t.params.items()}, **_model_params(search.best_params_)}
    return FitResult(
        pipeline=search.best_estimator_,
        best_params=best,
        cv_score=_jsonable(float(search.best_score_)),
        scoring=scoring,
        estimator=spec,
        search=s.method,
        candidates=tried,
        seeded_with=seed or None,
        schema=profile_frame(frame, target, task, features=columns, categorical=d.categorical),
        n_train=int(len(frame)),
        fit_seconds=time.perf_counter() - started,
    )


__all__ = [
    "FitResult",
    "TrainingError",
    "build_estimator",
    "build_pipeline",
    "primary_scoring",
    "production_params",
    "search_candidates",
    "split_features",
    "train_candidate",
]
