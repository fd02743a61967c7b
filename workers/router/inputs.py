"""Feature input preparation: request features -> the input one model version was fitted on.

On the request path the features of a request (a dict, a list of dicts, a DataFrame or a 2-D
array) become the routed version's input in its cached column order (:class:`ModelInput`, built
once per loaded version from the estimator and its registry ``training_schema``). Features that
cannot be turned into that input raise :class:`FeatureError`, a client error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

# --------------------------------------------------------------------------- errors


class RouterError(Exception):
    """Base class of the router's errors (``str()`` is one line)."""


class FeatureError(RouterError, ValueError):
    """The request's features cannot be turned into the model's input (a client error).

    ``version`` is the version the request was routed to (set by :meth:`Router.predict`).
    """

    version: str | None = None


# --------------------------------------------------------------------------- model inputs

_NUMERIC_TYPES = frozenset({float, int, np.float64, np.float32, np.int64, np.int32})
_FLOAT = np.float64
_HAS_FROM_ARRAYS = hasattr(pd.DataFrame, "_from_arrays")


def column_specs(schema: Mapping[str, Any] | None) -> dict[str, tuple[str, str]]:
    """``name -> (kind, dtype)`` from a registry ``training_schema`` (empty when absent)."""
    if not schema:
        return {}
    cols = schema.get("columns") or []
    if isinstance(cols, Mapping):
        cols = list(cols.values())
    out = {}
    for c in cols:
        if isinstance(c, Mapping) and "name" in c:
            out[str(c["name"])] = (str(c.get("kind") or ""), str(c.get("dtype") or ""))
    return out


class ModelInput:
    """Turns request features into what one model version was fitted on, cheaply.

    A model fitted on a DataFrame (``feature_names_in_``) gets a DataFrame with those columns in
    that order; an all-numeric row is built from one 2-D float array (~15 us), a mixed row from
    per-column arrays through pandas' internal block constructor (~25 us; the public constructors
    take ~130 us for one row). A model fitted on a numpy array gets a 2-D float array in the
    column order of its registry ``training_schema``. Column order, dtypes and the index are
    computed once per loaded version.
    """

    def __init__(self, columns: list[str] | None, frame: bool, specs: Mapping[str, tuple[str, str]] | None = None):
        self.columns = tuple(columns) if columns is not None else None
        self.frame = frame
        self.signature = (self.columns, frame)
        specs = specs or {}
        self._index = pd.Index(self.columns) if self.columns is not None else None
        self._row_index = pd.RangeIndex(1)
        # Per column: "num" (float64), "obj" (as given), "str" (as text), "" (decide per value).
        self._kinds = tuple(self._kind_of(specs.get(c)) for c in (self.columns or ()))
        self._all_numeric = bool(self._kinds) and all(k == "num" for k in self._kinds)
        self._infer = all(k == "" for k in self._kinds)

    @staticmethod
    def _kind_of(spec: tuple[str, str] | None) -> str:
        if spec is None:
            return ""
        kind, dtype = spec
        if kind == "numeric":
            return "num"
        if kind == "categorical" and dtype in ("object", "str", "string", "category"):
            return "str"
        return "obj" if kind else ""

    # --- the public entry point ------------------------------------------------------------
    def __call__(self, features: Any) -> tuple[Any, int]:
        """Return ``(X, n_rows)`` for ``features`` (dict, list of dicts, DataFrame or 2-D array)."""
        if type(features) is dict or isinstance(features, Mapping):
            return self._from_dict(features), 1
        if isinstance(features, pd.DataFrame):
            return self._from_frame(features), len(features)
        if isinstance(features, list):
            if not features:
                raise FeatureError("no rows to predict")
            if all(isinstance(r, Mapping) for r in features):
                return self._from_records(features), len(features)
            raise FeatureError("features must be a dict, a list of dicts or a DataFrame")
        if isinstance(features, np.ndarray):
            return self._from_array(features)
        raise FeatureError(f"features must be a dict, a list of dicts or a DataFrame, not {type(features).__name__}")

    # --- shapes ------------------------------------------------------------------------------
    def _values(self, row: Mapping[str, Any]) -> list[Any]:
        cols = self.columns
        if cols is None:
            raise FeatureError("this model version records no feature names; send a DataFrame or a 2-D array")
        try:
            return [row[c] for c in cols]
        except KeyError:
            missing = [c for c in cols if c not in row]
            shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
            raise FeatureError(f"missing feature(s): {shown}") from None
        except TypeError:
            raise FeatureError("feature names must be strings") from None

    def _from_dict(self, row: Mapping[str, Any]) -> Any:
        values = self._values(row)
        if not self.frame:
            return self._float_rows([values])
        if self._all_numeric or (self._infer and self._numeric_values(values)):
            try:
                data = np.array([values], dtype=_FLOAT)
            except (TypeError, ValueError):
                data = None
            if data is not None:
                return pd.DataFrame(data, columns=self._index, index=self._row_index, copy=False)
        arrays = [self._column_array((v,), kind, name) for v, kind, name in zip(values, self._kinds, self.columns)]
        return self._frame(arrays, self._row_index)

    @staticmethod
    def _numeric_values(values: list[Any]) -> bool:
        types = _NUMERIC_TYPES
        for v in values:
            if type(v) not in types:
                return False
        return True

    def _from_records(self, rows: list[Mapping[str, Any]]) -> Any:
        table = [self._values(r) for r in rows]
        if not self.frame:
            return self._float_rows(table)
        columns = list(zip(*table))
        arrays = [self._column_array(col, kind, name) for col, kind, name in zip(columns, self._kinds, self.columns)]
        return self._frame(arrays, pd.RangeIndex(len(rows)))

    def _from_frame(self, frame: pd.DataFrame) -> Any:
        if len(frame) == 0:
            raise FeatureError("no rows to predict")
        if self.columns is None:
            return frame if self.frame else frame.to_numpy()
        missing = [c for c in self.columns if c not in frame.columns]
        if missing:
            raise FeatureError(f"missing feature(s): {', '.join(map(str, missing[:10]))}")
        sub = frame[list(self.columns)]
        if self.frame:
            return sub
        try:
            return sub.to_numpy(dtype=_FLOAT)
        except (TypeError, ValueError):
            raise FeatureError("every feature of this model must be numeric") from None

    def _from_array(self, array: np.ndarray) -> tuple[Any, int]:
        if array.ndim == 1:
            array = array.reshape(1, -1)
        if array.ndim != 2 or array.shape[0] == 0:
            raise FeatureError("an array of features must be 2-D with at least one row")
        if self.columns is not None and array.shape[1] != len(self.columns):
            raise FeatureError(f"expected {len(self.columns)} features per row, got {array.shape[1]}")
        if self.frame and self.columns is not None:
            return pd.DataFrame(array, columns=self._index, copy=False), array.shape[0]
        return array, array.shape[0]

    # --- building blocks ---------------------------------------------------------------------
    def _float_rows(self, table: list[list[Any]]) -> np.ndarray:
        try:
            return np.array(table, dtype=_FLOAT)
        except (TypeError, ValueError):
            for row in table:
                for name, v in zip(self.columns, row):
                    try:
                        float(v if v is not None else "nan")
                    except (TypeError, ValueError):
                        raise FeatureError(f"feature {name!r} must be a number, got {v!r}") from None
            raise FeatureError("features must be numbers") from None

    @staticmethod
    def _column_array(values: tuple[Any, ...], kind: str, name: str) -> np.ndarray:
        if kind == "num" or (kind == "" and all(v is None or type(v) in _NUMERIC_TYPES for v in values)):
            try:
                return np.array([np.nan if v is None else v for v in values], dtype=_FLOAT)
            except (TypeError, ValueError):
                raise FeatureError(f"feature {name!r} must be a number, got {values[0]!r}") from None
        out = np.empty(len(values), dtype=object)
        if kind == "str":
            out[:] = [v if v is None or isinstance(v, str) else str(v) for v in values]
        else:
            out[:] = list(values)
        return out

    def _frame(self, arrays: list[np.ndarray], index: pd.Index) -> pd.DataFrame:
        if _HAS_FROM_ARRAYS:
            try:
                return pd.DataFrame._from_arrays(arrays, columns=self._index, index=index, verify_integrity=False)
            except TypeError:  # a pandas whose private constructor changed: the public (slower) one
                pass
        return pd.DataFrame(dict(zip(self.columns, arrays)), index=index, copy=False)


