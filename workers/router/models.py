"""Loaded model versions: an estimator ready to answer, its input builder and how to score it.

The router's watcher and the shadow process load versions (hash-verified, through the
registry) into :class:`LoadedModel` before serving them; a version that fails to load is
refused and retried after ``LOAD_RETRY_S``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from workers.router.inputs import ModelInput, column_specs

LOAD_RETRY_S = 30.0
"""A version that failed to load is retried after this long (or on the next table change)."""


def _is_threshold_classifier(estimator: Any) -> bool:
    try:
        from sklearn.model_selection._classification_threshold import BaseThresholdClassifier
    except ImportError:  # pragma: no cover - older scikit-learn
        return False
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    return isinstance(final, BaseThresholdClassifier)


class LoadedModel:
    """A version ready to answer: the estimator, its input builder and how to score it."""

    def __init__(self, version: str, estimator: Any, *, schema: Mapping[str, Any] | None = None):
        from sklearn.base import is_classifier

        self.version = str(version)
        self.estimator = estimator
        self.classifier = bool(is_classifier(estimator))
        self.classes = getattr(estimator, "classes_", None) if self.classifier else None
        self.binary = self.classes is not None and len(self.classes) == 2
        has_proba = self.classifier and self.classes is not None and hasattr(estimator, "predict_proba")
        # One predict_proba call gives both answer and score, unless the estimator's predict is
        # not the arg-max of its probabilities (a tuned decision threshold).
        if has_proba and not _is_threshold_classifier(estimator):
            self.mode = "proba"
        elif has_proba:
            self.mode = "predict+proba"
        else:
            self.mode = "predict"
        self.task = "regression" if not self.classifier else ("binary" if self.binary else "multiclass")
        specs = column_specs(schema)
        names = getattr(estimator, "feature_names_in_", None)
        if names is not None:
            self.inputs = ModelInput([str(n) for n in names], True, specs)
        else:
            n = getattr(estimator, "n_features_in_", None)
            cols = list(specs) if specs and (n is None or n == len(specs)) else None
            self.inputs = ModelInput(cols, False, specs)

    def run(self, X: Any) -> tuple[list[Any], list[Any]]:
        """Predictions and scores (lists, one per row) for a prepared input."""
        est = self.estimator
        if self.mode == "proba":
            proba = est.predict_proba(X)
            preds = self.classes.take(proba.argmax(axis=1))
            scores = proba[:, 1] if self.binary else proba.max(axis=1)
            return preds.tolist(), scores.tolist()
        if self.mode == "predict+proba":
            preds = np.asarray(est.predict(X))
            proba = est.predict_proba(X)
            scores = proba[:, 1] if self.binary else proba.max(axis=1)
            return preds.tolist(), scores.tolist()
        preds = np.asarray(est.predict(X))
        values = preds.tolist()
        if self.classifier:
            return values, [None] * len(values)
        return values, [float(v) if isinstance(v, (int, float)) else None for v in values]


