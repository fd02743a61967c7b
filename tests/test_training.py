"""Training data: windowed reads with pruning, time holdout, validation, seeded reproducible search."""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from gate_helpers import make_frame  # noqa: E402

from config.policy import policy_from_dict  # noqa: E402
from workers.training.data import DataError, load_window, read_frame, time_holdout  # noqa: E402
from workers.training.fit import (  # noqa: E402
    TrainingError,
    build_estimator,
    production_params,
    search_candidates,
    train_candidate,
)
from workers.training.validate import TrainingSchema, profile_frame, validate_for_policy, validate_frame  # noqa: E402

NOW = "2024-01-10T12:00:00Z"


def day_rows(day: str, n: int = 24) -> pd.DataFrame:
    return pd.DataFrame(
        {"timestamp": pd.date_range(day, periods=n, freq="h", tz="UTC"), "a": np.arange(n, dtype=float), "target": np.arange(n) % 2}
    )


class TestLoadWindow:
    def test_hive_partitions_outside_the_window_are_never_opened(self, tmp_path):
        """Only date= partitions inside the window are read; older ones are pruned unopened (they are corrupt here)."""
        for d in range(1, 11):
            part = tmp_path / f"date=2024-01-{d:02d}"
            part.mkdir()
            if d < 8:
                (part / "part-0.parquet").write_bytes(b"not parquet: opening this file would raise")
            else:
                day_rows(f"2024-01-{d:02d}").to_parquet(part / "part-0.parquet")
        out = load_window(str(tmp_path / "**" / "*.parquet"), "timestamp", timedelta(days=2), now=NOW)
        read_days = sorted(Path(p).parent.name for p in out.files_read)
        assert read_days == ["date=2024-01-08", "date=2024-01-09", "date=2024-01-10"]
        assert len(out.files_pruned) == 7
        assert out.frame["timestamp"].min() >= pd.Timestamp("2024-01-08T12:00Z")
        assert out.frame["timestamp"].max() <= pd.Timestamp(NOW)
        assert out.frame["timestamp"].is_monotonic_increasing

    def test_parquet_statistics_prune_old_files_and_row_groups(self, tmp_path):
        """Without partitions, footer min/max skip whole old files and old row groups."""
        day_rows("2023-12-01", 48).to_parquet(tmp_path / "old.parquet")
        table = pa.Table.from_pandas(pd.concat([day_rows("2024-01-05"), day_rows("2024-01-09"), day_rows("2024-01-10", 12)]), preserve_index=False)
        pq.write_table(table, tmp_path / "mixed.parquet", row_group_size=24)
        out = load_window(str(tmp_path), "timestamp", timedelta(days=3), now=NOW)
        assert [Path(p).name for p in out.files_read] == ["mixed.parquet"]
        assert [Path(p).name for p in out.files_pruned] == ["old.parquet"]
        assert out.row_groups_read == 2 and out.row_groups_pruned == 2  # old.parquet's one + mixed's first
        assert len(out.frame) == 24 + 12

    def test_csv_rows_filtered_and_since_narrows_the_window(self, tmp_path):
        """CSV files are read and filtered exactly; `since` (drift onset) starts the window later."""
        rows = pd.concat([day_rows("2024-01-08"), day_rows("2024-01-09")])
        rows.assign(timestamp=rows["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(tmp_path / "d.csv", index=False)
        full = load_window(f"file://{tmp_path}/*.csv", "timestamp", timedelta(days=90), now=NOW)
        since = load_window(str(tmp_path / "*.csv"), "timestamp", timedelta(days=90), now=NOW, since="2024-01-09")
        assert len(full.frame) == 48 and len(since.frame) == 24
        assert str(full.frame["timestamp"].dt.tz) == "UTC"

    def test_missing_time_column_and_no_files_are_data_errors(self, tmp_path):
        """A file without the time column, or a glob matching nothing, raises DataError with one line."""
        day_rows("2024-01-09").drop(columns="timestamp").to_parquet(tmp_path / "x.parquet")
        with pytest.raises(DataError, match="no time column"):
            load_window(str(tmp_path / "*.parquet"), "timestamp", timedelta(days=3), now=NOW)
        with pytest.raises(DataError, match="no Parquet or CSV"):
            load_window(str(tmp_path / "*.csv"), "timestamp", timedelta(days=3), now=NOW)

    def test_partition_key_serves_as_time_column(self, tmp_path):
        """With time_column 'date' absent from the files, the hive date= key supplies each row's time."""
        for d in (1, 9):
            part = tmp_path / f"date=2024-01-{d:02d}"
            part.mkdir()
            day_rows(f"2024-01-{d:02d}").drop(columns="timestamp").to_parquet(part / "p.parquet")
        out = load_window(str(tmp_path), "date", timedelta(days=3), now=NOW)
        assert len(out.frame) == 24 and (out.frame["date"] == pd.Timestamp("2024-01-09", tz="UTC")).all()
        assert len(out.files_pruned) == 1

    def test_read_frame_reads_all_files(self, tmp_path):
        """read_frame (the offline tools' reader) concatenates Parquet and CSV files."""
        day_rows("2024-01-01").to_parquet(tmp_path / "a.parquet")
        day_rows("2024-01-02").to_csv(tmp_path / "b.csv", index=False)
        assert len(read_frame(str(tmp_path))) == 48


class TestHoldout:
    def test_newest_slice_is_the_test_set(self):
        """The test set is the newest fraction of rows by time, regardless of input order."""
        df = make_frame("binary", 500, seed=0).sample(frac=1, random_state=0)
        split = time_holdout(df, "timestamp", 0.2)
        assert len(split.test) == 100 and len(split.train) == 400
        assert split.train["timestamp"].max() < split.test["timestamp"].min()
        assert split.cutoff == split.test["timestamp"].min()

    def test_equal_timestamps_stay_together(self):
        """Rows sharing a timestamp are never split between train and test."""
        df = pd.DataFrame({"timestamp": pd.to_datetime(["2024-01-01"] * 6 + ["2024-01-02"] * 4, utc=True), "x": range(10)})
        split = time_holdout(df, "timestamp", 0.5)
        assert len(split.test) == 4 and split.train["timestamp"].nunique() == 1
        later = time_holdout(df, "timestamp", 0.3)  # cutoff falls inside the second day's block
        assert len(later.test) == 4 and len(later.train) == 6


def _policy(task="binary", **training):
    training.setdefault("params", {"max_iter": 30})
    return policy_from_dict({"model": {"name": "m", "task": task}, "data": {"min_rows": 100}, "training": training})


class TestValidate:
    def test_every_problem_is_listed(self):
        """A frame with many upstream breakages gets one problem per breakage, not just the first."""
        train = make_frame("binary", 400, seed=0)
        schema = profile_frame(train, "target", "binary", time_column="timestamp")
        bad = make_frame("binary", 150, seed=1)
        bad = bad.drop(columns=["b"])                                   # column removed upstream
        bad["a"] = bad["a"] * 100                                       # unit change: out of range
        bad.loc[bad.index[:60], "c"] = None                             # null rate jump
        bad.loc[bad.index[60:120], "c"] = "w"                           # unseen categories
        bad["target"] = 1                                               # one class only
        result = validate_frame(bad, target="target", task="binary", schema=schema, min_rows=200, time_column="timestamp")
        found = {(p.check, p.column) for p in result.problems}
        assert not result.passed
        assert {("min_rows", None), ("columns", "b"), ("value_range", "a"), ("null_rate", "c"),
                ("category_domain", "c"), ("label", "target")} <= found
        assert json.loads(json.dumps(result.to_dict()))["passed"] is False

    def test_dtype_change_and_label_shift(self):
        """A numeric column arriving as text and a shifted label mix are both reported."""
        train = make_frame("multiclass", 400, seed=0)
        schema = profile_frame(train, "target", "multiclass", time_column="timestamp")
        new = make_frame("multiclass", 300, seed=1)
        new["b"] = new["b"].map(lambda v: f"{v:.3f}")
        new["target"] = np.where(np.arange(300) < 290, 0, new["target"])
        checks = {p.check for p in validate_frame(new, target="target", task="multiclass", schema=schema, min_rows=1).problems}
        assert {"dtypes", "label"} <= checks

    def test_clean_data_passes_and_first_model_uses_absolute_rules(self):
        """Fresh data like the training data passes; without a schema only absolute rules apply."""
        policy = _policy()
        train = make_frame("binary", 400, seed=0)
        schema = profile_frame(train, "target", "binary", time_column="timestamp")
        assert validate_for_policy(make_frame("binary", 300, seed=1), policy, schema).passed
        first = make_frame("binary", 300, seed=1)
        first.loc[first.index[:150], "a"] = np.nan
        result = validate_for_policy(first, policy, None)
        assert [(p.check, p.column) for p in result.problems] == [("null_rate", "a")]

    def test_infinite_values_are_refused_and_never_widen_the_recorded_range(self):
        """An inf in a feature or a regression target is a problem, also for a first model (no schema); the profile's
        range is of the finite values, so one inf that got into training data does not switch range checks off."""
        policy = _policy()
        first = make_frame("binary", 300, seed=1)
        first.loc[first.index[:3], "a"] = np.inf
        result = validate_for_policy(first, policy, None)
        assert [(p.check, p.column) for p in result.problems] == [("non_finite", "a")]
        assert "3 infinite values" in result.problems[0].detail
        schema = profile_frame(first, "target", "binary", time_column="timestamp")
        assert np.isfinite(schema.columns["a"].max)
        later = make_frame("binary", 300, seed=2)
        later["a"] = 1e12
        assert ("value_range", "a") in {(p.check, p.column) for p in validate_for_policy(later, policy, schema).problems}
        reg = make_frame("regression", 300, seed=1)
        reg.loc[reg.index[:2], "target"] = -np.inf
        problems = validate_for_policy(reg, _policy("regression"), None).problems
        assert [(p.check, p.detail) for p in problems] == [("label", "regression target has 2 infinite values")]
        assert np.isfinite(profile_frame(reg, "target", "regression").target_max)

    def test_a_column_of_lists_is_a_validation_problem_not_a_crash(self):
        """Nested values (a Parquet list column) are reported by validation, and the data window's fingerprint (taken
        for lineage before the result is looked at) still works."""
        from workers.training.data import frame_fingerprint

        frame = make_frame("binary", 300, seed=1)
        frame["tags"] = [np.array([i, i + 1]) for i in range(len(frame))]
        problems = validate_for_policy(frame, _policy(), None).problems
        assert [(p.check, p.column) for p in problems] == [("dtypes", "tags")]
        assert "300 values are lists" in problems[0].detail
        assert len(frame_fingerprint(frame)) == 64 and frame_fingerprint(frame) != frame_fingerprint(frame.iloc[1:])

    def test_schema_round_trips_through_json(self):
        """The recorded training schema survives to_dict -> JSON -> from_dict unchanged."""
        schema = profile_frame(make_frame("regression", 200, seed=0), "target", "regression", time_column="timestamp")
        again = TrainingSchema.from_dict(json.loads(json.dumps(schema.to_dict())))
        assert again == schema and again.features == ["a", "b", "c"]


class TestBuildEstimator:
    def test_class_path_and_build_function(self):
        """Both 'pkg.mod.Class' and 'pkg.mod:build' produce estimators with the policy's params."""
        est = build_estimator("sklearn.tree.DecisionTreeClassifier", {"max_depth": 3}, random_state=7)
        assert est.max_depth == 3 and est.random_state == 7
        built = build_estimator("gate_helpers:build_logistic", {"C": 0.25})
        assert type(built).__name__ == "LogisticRegression" and built.C == 0.25

    @pytest.mark.parametrize("spec", ["sklearn.nope.Model", "sklearn.tree.NoSuchTree", "nodots", "json:dumps"])
    def test_unusable_specs_raise_training_error(self, spec):
        """Bad import paths and non-estimators raise TrainingError, not a traceback."""
        with pytest.raises(TrainingError):
            build_estimator(spec, {} if spec != "json:dumps" else {"obj": 1})


class TestSearch:
    SPACE = {"learning_rate": [0.03, 0.1, 0.3], "max_depth": [2, 3, 5]}

    def test_production_params_are_the_first_candidate(self):
        """Production's values of the searched parameters are always evaluated, first in the list."""
        cands = search_candidates(self.SPACE, 4, random_state=0, seed_params={"learning_rate": 0.5, "max_depth": 7, "max_iter": 9})
        assert cands[0] == {"learning_rate": 0.5, "max_depth": 7}
        assert len(cands) == 4 and all(c["learning_rate"] in (0.03, 0.1, 0.3) for c in cands[1:])

    def test_search_is_seeded_with_production_and_reproducible(self):
        """The fitted search includes production's point, and a rerun gives the same params and predictions."""
        train = make_frame("binary", 900, seed=0)
        policy = _policy(search={"space": self.SPACE, "n_candidates": 4, "cv": 3})
        prod = {"learning_rate": 0.3, "max_depth": 2}
        first = train_candidate(train, policy, production_hyperparams=prod)
        again = train_candidate(train, policy, production_hyperparams=prod)
        assert first.seeded_with == prod
        assert prod in [c["params"] for c in first.candidates]
        assert first.best_params == again.best_params and first.cv_score == again.cv_score
        holdout = make_frame("binary", 200, seed=9)
        np.testing.assert_array_equal(first.pipeline.predict_proba(holdout), again.pipeline.predict_proba(holdout))
        assert first.search == "halving" and 0.5 < first.cv_score <= 1
        assert json.loads(json.dumps(first.to_dict()))["schema"]["target"] == "target"

    def test_production_wins_when_alternatives_are_worse(self):
        """When every drawn alternative is crippled, production's own configuration is selected."""
        train = make_frame("regression", 600, seed=0)
        policy = _policy("regression", params={"max_iter": 40}, search={"method": "random", "space": {"max_depth": [1], "learning_rate": [0.001]}, "n_candidates": 3})
        result = train_candidate(train, policy, production_hyperparams={"max_depth": 4, "learning_rate": 0.2})
        assert result.best_params["max_depth"] == 4 and result.best_params["learning_rate"] == 0.2
        assert result.estimator.endswith("HistGradientBoostingRegressor")

    def test_grid_search_and_production_params_from_a_model(self):
        """Grid search covers the space plus production's point, read off a fitted production model."""
        train = make_frame("multiclass", 600, seed=0)
        policy = _policy("multiclass", estimator="sklearn.linear_model.LogisticRegression", params={"max_iter": 300},
                         search={"method": "grid", "space": {"C": [0.1, 1.0]}, "cv": 2})
        prod_model = train_candidate(train, _policy("multiclass", estimator="sklearn.linear_model.LogisticRegression",
                                                    params={"C": 5.0, "max_iter": 300}, search={"method": "none"})).pipeline
        seed = production_params(prod_model, ["C"])
        assert seed == {"C": 5.0}
        result = train_candidate(train, policy, production_hyperparams=seed)
        assert sorted(c["params"]["C"] for c in result.candidates) == [0.1, 1.0, 5.0]

    def test_pipeline_handles_unseen_categories_and_nulls(self):
        """Predicting on unseen categories and missing numerics works (one-hot ignore, imputation)."""
        train = make_frame("binary", 400, seed=0)
        policy = _policy(estimator="sklearn.linear_model.LogisticRegression", params={}, search={"method": "none"})
        model = train_candidate(train, policy).pipeline
        new = make_frame("binary", 20, seed=1)
        new.loc[new.index[:5], "c"] = "never-seen"
        new.loc[new.index[5:10], "a"] = np.nan
        assert len(model.predict(new)) == 20

    def test_space_naming_unknown_parameter_is_refused(self):
        """A search space key the estimator does not have is a TrainingError."""
        policy = _policy(search={"space": {"max_dept": [2, 3]}})
        with pytest.raises(TrainingError, match="max_dept"):
            train_candidate(make_frame("binary", 300, seed=0), policy)


class TestSqlSource:
    def test_database_window_is_read_through_sqlalchemy_with_bound_times(self, tmp_path):
        """A sqlite:/// source with table:NAME reads only the window's rows, sorted and in UTC."""
        import sqlite3
        from datetime import datetime, timedelta, timezone

        from workers.training.data import DataError, is_sql_source, load_window

        db = tmp_path / "events.db"
        now = datetime(2026, 1, 10, tzinfo=timezone.utc)
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TABLE events (ts TIMESTAMP, x REAL, y INTEGER)")
            conn.executemany("INSERT INTO events VALUES (?, ?, ?)",
                             [((now - timedelta(days=d)).isoformat(sep=" "), float(d), d % 2)
                              for d in range(0, 40)])
        source = f"sqlite:///{db}"
        assert is_sql_source(source) and not is_sql_source(str(tmp_path / "*.parquet"))
        win = load_window(source, "ts", timedelta(days=10), now=now, query="table:events")
        assert len(win.frame) == 11 and win.frame["ts"].is_monotonic_increasing
        assert str(win.frame["ts"].dt.tz) == "UTC"
        custom = load_window(source, "ts", timedelta(days=10), now=now,
                             query="SELECT ts, x FROM events WHERE ts >= :start AND ts <= :end AND y = 0")
        assert len(custom.frame) == 6 and list(custom.frame.columns) == ["ts", "x"]
        with pytest.raises(DataError, match="needs \\[data\\] query"):
            load_window(source, "ts", timedelta(days=10), now=now)
        with pytest.raises(DataError, match="database source"):
            load_window(source, "ts", timedelta(days=10), now=now, query="table:nope")
