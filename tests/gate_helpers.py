"""Models and data built to pass or fail particular gate checks (imported by tests by path).

Importable as ``gate_helpers`` (pytest puts ``tests/`` on ``sys.path``), so estimator specs like
``gate_helpers:build_logistic`` and skops type names like ``gate_helpers.SlowModel`` work.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression


def make_frame(task: str, n: int, seed: int, *, noise: float = 0.0, start: str = "2024-01-01") -> pd.DataFrame:
    """Synthetic rows with numeric ``a``, ``b``, categorical ``c``, an hourly ``timestamp`` and ``target``.

    ``noise`` replaces that share of class labels by a uniformly random class (classifiers;
    1.0 = labels independent of the features) or adds that many standard deviations of Gaussian
    noise (regression).
    """
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.normal(size=n),
            "c": rng.choice(["x", "y", "z"], size=n),
            "timestamp": pd.date_range(start, periods=n, freq="h", tz="UTC"),
        }
    )
    signal = df["a"] + 0.7 * df["b"] + np.where(df["c"] == "x", 1.0, 0.0) - 0.3
    if task == "binary":
        y = (signal > 0).astype(int).to_numpy()
    elif task == "multiclass":
        y = np.digitize(signal, [-0.6, 0.6])
    else:
        df["target"] = signal + rng.normal(scale=0.2 + noise, size=n)
        return df
    if noise:
        k = 2 if task == "binary" else 3
        y = np.where(rng.random(n) < noise, rng.integers(0, k, size=n), y)
    df["target"] = y
    return df


class SlowModel(BaseEstimator):
    """Wraps a fitted estimator and sleeps ``delay`` seconds in every predict call."""

    def __init__(self, base=None, delay: float = 0.02):
        self.base = base
        self.delay = delay

    def fit(self, X, y):
        return self

    def predict(self, X):
        time.sleep(self.delay)
        return self.base.predict(X)

    def predict_proba(self, X):
        return self.base.predict_proba(X)

    @property
    def classes_(self):
        return self.base.classes_

    @property
    def feature_names_in_(self):
        return self.base.feature_names_in_


class Overconfident(BaseEstimator, ClassifierMixin):
    """Wraps a fitted classifier and reports probability 1 for whatever it predicts."""

    def __init__(self, base=None):
        self.base = base

    def fit(self, X, y):
        return self

    def predict(self, X):
        return self.base.predict(X)

    def predict_proba(self, X):
        pred = self.base.predict(X)
        return (pred[:, None] == self.base.classes_[None, :]).astype(float)

    @property
    def classes_(self):
        return self.base.classes_

    @property
    def feature_names_in_(self):
        return self.base.feature_names_in_


def build_logistic(C: float = 1.0, max_iter: int = 200) -> LogisticRegression:
    """A user build function (``gate_helpers:build_logistic``) returning an unfitted estimator."""
    return LogisticRegression(C=C, max_iter=max_iter)


def minority_collapse(n: int = 1000, positive_share: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, production, candidate)`` labels with equal accuracy but a lost minority class.

    Production finds half of the positives and raises as many false alarms as it misses; the
    candidate never predicts the positive class. Both get exactly the same rows wrong in number,
    so an accuracy test sees nothing, while weighted F1 drops by about 0.047.
    """
    rng = np.random.default_rng(seed)
    n_pos = int(n * positive_share)
    y = np.zeros(n, dtype=int)
    y[rng.permutation(n)[:n_pos]] = 1
    positives, negatives = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    production = np.zeros(n, dtype=int)
    production[rng.choice(positives, n_pos // 2, replace=False)] = 1
    production[rng.choice(negatives, n_pos - n_pos // 2, replace=False)] = 1
    return y, production, np.zeros(n, dtype=int)


class ColumnModel(BaseEstimator, ClassifierMixin):
    """Predicts the holdout column ``column`` as its label: fixed predictions through ``run_gate``."""

    def __init__(self, column: str = "pred"):
        self.column = column

    def fit(self, X, y):
        return self

    def predict(self, X):
        return X[self.column].to_numpy()
