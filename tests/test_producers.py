"""Producers: performance from delayed labels, new-data volume with pruning, upstream schema
verdicts, and redbeat schedule entries with the schedule.tick task (on a real Redis)."""

from __future__ import annotations

import base64
import json
import math
from datetime import date, datetime, timezone
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score, mean_absolute_error, roc_auc_score
from scipy import stats

from config.policy import policy_from_dict
from events.bus import PAYLOAD_FIELD, EventBus
from events.envelope import parse_event
from events.producers.performance import measure_performance, performance_event, read_request_log
from events.producers.upstream import (
    compare_schemas,
    schema_fingerprint,
    schema_of_frame,
    schema_of_source,
    upstream_event,
)
from events.producers.volume import VolumeError, count_new_rows, scan_new_rows, volume_event

UTC = timezone.utc


def stream_events(redis_client, keys, model):
    return [parse_event(f[PAYLOAD_FIELD.encode()]) for _, f in redis_client.xrange(keys.events_for(model))]


def classification_log(n: int, accuracy: float, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    correct = rng.random(n) < accuracy
    preds = np.where(correct, labels, 1 - labels)
    ids = [f"r{i}" for i in range(n)]
    score = np.clip(preds * 0.6 + rng.random(n) * 0.4, 0, 1)
    return (pd.DataFrame({"request_id": ids, "prediction": preds, "score": score}),
            pd.DataFrame({"request_id": ids, "label": labels}))


def wilson(k: int, n: int, z: float = stats.norm.ppf(0.975)) -> tuple[float, float]:
    """The textbook Wilson score interval, written out independently of the code under test."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# ============================================================================ performance
class TestPerformance:
    def test_accuracy_has_the_wilson_interval_and_the_labeled_count(self):
        """Accuracy and its interval equal the textbook Wilson interval over the matched labels."""
        preds, labels = classification_log(500, 0.8)
        m = measure_performance(preds, labels, "binary")
        k = int((preds["prediction"] == labels["label"]).sum())
        assert m.metric == "accuracy" and m.n_labeled == 500
        assert m.value == pytest.approx(k / 500)
        low, high = wilson(k, 500)
        assert (m.ci_low, m.ci_high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))

    def test_interval_shrinks_with_more_labels(self):
        """The same accuracy on 100x more labels gives an interval about 10x narrower."""
        small = measure_performance(*classification_log(200, 0.85, seed=1), "binary")
        large = measure_performance(*classification_log(20_000, 0.85, seed=1), "binary")
        w_small, w_large = small.ci_high - small.ci_low, large.ci_high - large.ci_low
        assert w_large < w_small / 5
        assert large.n_labeled == 20_000 and small.n_labeled == 200

    def test_interval_covers_the_true_accuracy_at_its_level(self):
        """Over repeated samples the 95% interval covers the true accuracy about 95% of the time."""
        hits = 0
        for seed in range(200):
            m = measure_performance(*classification_log(150, 0.8, seed=seed), "binary")
            hits += m.ci_low <= 0.8 <= m.ci_high
        assert 0.90 <= hits / 200 <= 0.99

    def test_only_labeled_primary_answers_count(self):
        """Unlabeled, shadow and errored answers are left out; the last label of a request wins."""
        preds = pd.DataFrame({
            "request_id": ["a", "b", "c", "d", "e", "b"],
            "prediction": [1, 0, 1, 1, 0, 0],
            "shadow": [False, False, False, True, False, True],
            "error": ["", "", "", "", "timeout", ""],
        })
        labels = pd.DataFrame({"request_id": ["a", "b", "c", "d", "e", "c", "zzz"], "label": [1, 1, 0, 1, 0, 1, 0]})
        m = measure_performance(preds, labels, "binary")
        assert m.n_labeled == 3  # a, b, c (d is shadow, e errored, zzz has no answer)
        assert m.n_predictions == 3
        assert m.value == pytest.approx(2 / 3)  # a right, b wrong, c right (its last label is 1)

    def test_below_the_minimum_count_there_is_no_value_and_no_event(self):
        """Fewer matched labels than min_labeled report n_labeled but no value, and no event is built."""
        preds, labels = classification_log(30, 0.9)
        m = measure_performance(preds, labels, "binary", min_labeled=50)
        assert m.value is None and m.n_labeled == 30 and not m.sufficient
        with pytest.raises(ValueError, match="30 labeled"):
            performance_event("churn", m)
        empty = measure_performance(preds, labels.iloc[:0], "binary")
        assert empty.n_labeled == 0 and empty.value is None

    def test_f1_and_auc_agree_with_sklearn(self):
        """F1 and (with scores) AUC equal scikit-learn's on the joined rows."""
        preds, labels = classification_log(400, 0.75, seed=3)
        m = measure_performance(preds, labels, "binary")
        assert m.extra["f1"] == pytest.approx(f1_score(labels["label"], preds["prediction"]))
        assert m.extra["auc"] == pytest.approx(roc_auc_score(labels["label"], preds["score"]))
        no_scores = measure_performance(preds.drop(columns="score"), labels, "binary")
        assert "auc" not in no_scores.extra

    def test_multiclass_string_labels(self):
        """Multiclass text labels are compared as text and get macro F1."""
        preds = pd.DataFrame({"request_id": list("abcd"), "prediction": ["x", "y", "z", "x"]})
        labels = pd.DataFrame({"request_id": list("abcd"), "label": ["x", "y", "y", "x"]})
        m = measure_performance(preds, labels, "multiclass")
        assert m.value == 0.75
        assert m.extra["f1_macro"] == pytest.approx(f1_score(labels["label"], preds["prediction"], average="macro"))

    def test_regression_rmse_mae_and_an_interval_that_shrinks(self):
        """RMSE and MAE equal numpy's; the RMSE interval holds the truth and narrows with n."""
        rng = np.random.default_rng(5)

        def log(n):
            y = rng.normal(0, 3, n)
            return (pd.DataFrame({"request_id": range(n), "prediction": y + rng.normal(0, 2, n)}),
                    pd.DataFrame({"request_id": range(n), "label": y}))

        p, l = log(400)
        m = measure_performance(p, l, "regression")
        err = p["prediction"].to_numpy() - l["label"].to_numpy()
        assert m.metric == "rmse" and not m.higher_is_better
        assert m.value == pytest.approx(float(np.sqrt(np.mean(err**2))))
        assert m.extra["mae"] == pytest.approx(mean_absolute_error(l["label"], p["prediction"]))
        assert m.ci_low < 2.0 < m.ci_high
        big = measure_performance(*log(40_000), "regression")
        assert (big.ci_high - big.ci_low) < (m.ci_high - m.ci_low) / 5

    def test_router_streams_to_a_published_event(self, redis_client, keys, settings):
        """Requests and feedback logged in Redis are read, measured, and published as performance.measured."""
        pipe = redis_client.pipeline()
        for i in range(300):
            pred = i % 2 if i % 10 else 1 - i % 2  # every tenth answer wrong
            pipe.xadd(keys.requests("churn"), {"request_id": f"q{i}", "version": "3", "latency_ms": "4.2",
                                               "prediction": str(pred), "score": "0.7", "error": "", "shadow": "0",
                                               "ts": "1714557600.0"})
            pipe.xadd(keys.requests("churn"), {"request_id": f"q{i}", "version": "4", "latency_ms": "5.0",
                                               "prediction": str(1 - i % 2), "score": "0.1", "error": "",
                                               "shadow": "1", "ts": "1714557600.0"})
            if i < 250:
                pipe.xadd(keys.feedback("churn"), {"request_id": f"q{i}", "label": str(i % 2), "ts": "1714560000.0"})
        pipe.execute()
        preds, labels = read_request_log(redis_client, keys, "churn", since_ms=0)
        assert len(preds) == 600 and preds["shadow"].sum() == 300 and len(labels) == 250
        m = measure_performance(preds, labels, "binary")
        assert m.n_labeled == 250 and m.value == pytest.approx(225 / 250)  # shadow answers (all wrong) ignored
        event = performance_event("churn", m, baseline=0.95, version=3)
        EventBus.from_settings(redis_client, settings).publish(event)
        (got,) = stream_events(redis_client, keys, "churn")
        assert got.type == "performance.measured"
        data = got.typed_data()
        assert (data.value, data.baseline, data.n_labeled, data.version) == (pytest.approx(0.9), 0.95, 250, "3")
        assert data.ci_low < 0.9 < data.ci_high
        later = read_request_log(redis_client, keys, "churn", since_ms=int(datetime.now(UTC).timestamp() * 1000) + 60_000)
        assert len(later[0]) == 0 and len(later[1]) == 0


# ============================================================================ volume
def write_parquet(path, times, row_group_size=None, extra=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"ts": times, "x": np.arange(len(times)), **(extra or {})})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, row_group_size=row_group_size)
    return frame


class TestVolume:
    def test_row_groups_older_than_since_are_skipped(self, tmp_path):
        """Only the row group straddling `since` is read; older ones are pruned, newer ones counted from metadata."""
        times = pd.date_range("2024-01-01", periods=1000, freq="h", tz="UTC")
        frame = write_parquet(tmp_path / "events.parquet", times, row_group_size=100)
        since = datetime(2024, 2, 10, 5, 30, tzinfo=UTC)
        scan = scan_new_rows(str(tmp_path / "*.parquet"), "ts", since)
        assert scan.rows == int((frame["ts"] > since).sum())
        assert scan.row_groups == 10
        assert scan.row_groups_read == 1
        assert scan.row_groups_pruned == 9  # all but the last group end before since
        assert scan.row_groups_pruned + scan.row_groups_from_metadata + scan.row_groups_read == 10

    def test_hive_partitions_before_since_are_never_opened(self, tmp_path):
        """A corrupt file in a date=... partition wholly before `since` is not opened; including it fails."""
        truth = 0
        since = datetime(2024, 3, 3, 12, tzinfo=UTC)
        for day in range(1, 6):
            d = date(2024, 3, day)
            times = pd.date_range(pd.Timestamp(d, tz="UTC"), periods=24, freq="h")
            write_parquet(tmp_path / f"date={d.isoformat()}" / "part-0.parquet", times)
            truth += int((times > since).sum())
        (tmp_path / "date=2024-03-01" / "part-1.parquet").write_bytes(b"definitely not parquet")
        scan = scan_new_rows(str(tmp_path / "**" / "*.parquet"), "ts", since)
        assert scan.rows == truth == 24 + 24 + 11
        assert scan.files == 6 and scan.files_pruned == 3 and scan.files_opened == 3
        with pytest.raises(Exception):
            count_new_rows(str(tmp_path / "**" / "*.parquet"), "ts", datetime(2024, 2, 1, tzinfo=UTC))

    def test_naive_timestamps_and_date_columns(self, tmp_path):
        """Naive timestamps are read as UTC; a date column counts days after since's day."""
        naive = pd.date_range("2024-01-01", periods=48, freq="h")
        write_parquet(tmp_path / "a" / "n.parquet", naive)
        assert count_new_rows(str(tmp_path / "a" / "*.parquet"), "ts", datetime(2024, 1, 2, 6, tzinfo=UTC)) == 17
        days = [date(2024, 1, d) for d in range(1, 11)]
        write_parquet(tmp_path / "b" / "d.parquet", days)
        assert count_new_rows(str(tmp_path / "b" / "*.parquet"), "ts", datetime(2024, 1, 7, 12)) == 3

    def test_csv_reads_the_time_column(self, tmp_path):
        """CSV sources are counted from the time column, with or without UTC offsets."""
        times = pd.date_range("2024-06-01", periods=50, freq="30min", tz="UTC")
        frame = pd.DataFrame({"id": range(50), "ts": times.strftime("%Y-%m-%dT%H:%M:%S+00:00"), "v": 1.5})
        frame.to_csv(tmp_path / "a.csv", index=False)
        since = datetime(2024, 6, 1, 12, tzinfo=UTC)
        assert count_new_rows(str(tmp_path / "*.csv"), "ts", since) == int((times > since).sum()) == 25
        with pytest.raises(VolumeError, match="no time column"):
            count_new_rows(str(tmp_path / "*.csv"), "event_time", since)

    def test_time_text_is_read_as_training_reads_it(self, tmp_path):
        """Times like 05/11/2024 10:00 count as training and the drift monitor read them (they counted as 0: parsed
        as ISO 8601 only, the rest became NaT); text that is no time at all is a VolumeError, not silently 0."""
        frame = pd.DataFrame({"ts": [f"05/{d:02d}/2024 10:00" for d in range(1, 21)], "x": range(20)})
        frame.to_csv(tmp_path / "a.csv", index=False)
        since = datetime(2024, 5, 10, 8, 30, tzinfo=UTC)
        assert count_new_rows(str(tmp_path / "a.csv"), "ts", since) == 11
        pd.DataFrame({"ts": ["yesterday", "soon"], "x": [1, 2]}).to_csv(tmp_path / "b.csv", index=False)
        with pytest.raises(VolumeError, match="not a timestamp"):
            count_new_rows(str(tmp_path / "b.csv"), "ts", since)

    def test_unusable_sources_raise_volume_error(self, tmp_path):
        """No matching files, or a Parquet file without the time column, raise VolumeError."""
        with pytest.raises(VolumeError, match="no Parquet or CSV"):
            count_new_rows(str(tmp_path / "*.parquet"), "ts", datetime(2024, 1, 1))
        write_parquet(tmp_path / "p.parquet", pd.date_range("2024-01-01", periods=3, freq="h"))
        with pytest.raises(VolumeError, match="no time column"):
            count_new_rows(str(tmp_path / "p.parquet"), "timestamp", datetime(2024, 1, 1))

    def test_volume_event_is_valid(self):
        """The volume event carries the count and the since time."""
        e = volume_event("churn", 51_000, datetime(2024, 1, 1))
        assert e.type == "volume.accumulated" and e.typed_data().new_samples == 51_000
        assert e.typed_data().since == datetime(2024, 1, 1, tzinfo=UTC)


# ============================================================================ upstream
TRAINED = {"age": "int64", "income": "float64", "plan": "str", "ts": "datetime64[ns, UTC]", "target": "int64"}


class TestUpstream:
    def test_added_column_is_compatible(self):
        """A new column upstream is a compatible change."""
        diff = compare_schemas(TRAINED, {**TRAINED, "region": "str"}, ["age", "income", "plan"])
        assert diff.added == ["region"] and not diff.breaking and diff.verdict == "compatible"

    def test_removed_feature_is_breaking_but_removed_unused_column_is_not(self):
        """Removing a feature the model uses breaks it; removing an unused column does not."""
        current = {k: v for k, v in TRAINED.items() if k != "plan"}
        assert compare_schemas(TRAINED, current, ["age", "plan"]).verdict == "breaking"
        assert compare_schemas(TRAINED, current, ["age", "income"]).verdict == "compatible"
        assert compare_schemas(TRAINED, current).removed == ["plan"]  # no feature list: every column is used

    def test_retyped_feature_is_breaking_but_numeric_widening_is_not(self):
        """A feature turned from number to text breaks; int -> float is listed but compatible."""
        text_age = compare_schemas(TRAINED, {**TRAINED, "age": "object"}, ["age"])
        assert text_age.retyped == ["age"] and text_age.breaking
        assert "from integer to string" in text_age.reasons[0]
        widened = compare_schemas(TRAINED, {**TRAINED, "age": "double"}, ["age"])
        assert widened.retyped == ["age"] and not widened.breaking

    def test_reader_spelling_is_not_a_change(self):
        """pandas and Arrow spellings of the same types are unchanged, with equal fingerprints."""
        arrow = {"ts": "timestamp[us, tz=UTC]", "target": "int64", "plan": "large_string", "income": "double", "age": "int32"}
        assert compare_schemas(TRAINED, arrow).verdict == "unchanged"
        assert schema_fingerprint(TRAINED) == schema_fingerprint(arrow)

    def test_fingerprint_is_stable_under_column_order_and_changes_with_the_schema(self):
        """Reordering columns keeps the fingerprint; adding or retyping a column changes it."""
        reordered = dict(reversed(list(TRAINED.items())))
        fp = schema_fingerprint(TRAINED)
        assert schema_fingerprint(reordered) == fp and len(fp) == 64
        assert schema_fingerprint({**TRAINED, "x": "int64"}) != fp
        assert schema_fingerprint({**TRAINED, "plan": "int64"}) != fp

    def test_schema_of_source_parquet_and_csv_agree(self, tmp_path):
        """The same data as Parquet and CSV give the same fingerprint as the training frame."""
        frame = pd.DataFrame({"age": [30, 40], "income": [1.5, 2.5], "plan": ["a", "b"],
                              "ts": pd.to_datetime(["2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"])})
        frame.to_parquet(tmp_path / "d.parquet")
        frame.assign(ts=frame["ts"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")).to_csv(tmp_path / "d.csv", index=False)
        fp = schema_fingerprint(schema_of_frame(frame))
        assert schema_fingerprint(schema_of_source(str(tmp_path / "d.parquet"))) == fp
        assert schema_fingerprint(schema_of_source(str(tmp_path / "d.csv"))) == fp

    def test_upstream_event_is_deterministic_and_publishable(self, redis_client, keys, settings):
        """The event carries the diff and verdict, and the same change always has the same id."""
        current = {**{k: v for k, v in TRAINED.items() if k != "plan"}, "region": "str"}
        diff = compare_schemas(TRAINED, current, ["age", "plan"])
        args = ("churn", diff, "fs-v8", schema_fingerprint(current))
        e1 = upstream_event(*args, previous_fingerprint=schema_fingerprint(TRAINED))
        e2 = upstream_event(*args, previous_fingerprint=schema_fingerprint(TRAINED))
        assert e1.id == e2.id
        data = e1.typed_data()
        assert (data.added, data.removed, data.breaking, data.feature_version) == (["region"], ["plan"], True, "fs-v8")
        assert e1.data["verdict"] == "breaking"
        EventBus.from_settings(redis_client, settings).publish(e1)
        assert [e.id for e in stream_events(redis_client, keys, "churn")] == [e1.id]


# ============================================================================ schedule
@pytest.fixture
def beat_app(celery_app, redis_client):
    """The Celery app with redbeat's cached config/connection pointed at the test server."""
    for attr in ("redbeat_conf", "redbeat_redis"):
        if attr in celery_app.__dict__:
            delattr(celery_app, attr)
    yield celery_app
    for attr in ("redbeat_conf", "redbeat_redis"):
        if attr in celery_app.__dict__:
            delattr(celery_app, attr)


def policy(model, schedule=""):
    return policy_from_dict({"model": {"name": model}, "triggers": {"schedule": schedule}})


def definition(redis_client, model):
    raw = redis_client.hget(f"retrain:redbeat:schedule-tick:{model}", "definition")
    return json.loads(raw) if raw else None


class TestSchedule:
    def test_entries_are_written_with_their_schedule(self, beat_app, redis_client):
        """Cron and interval schedules become redbeat entries in Redis, indexed in the schedule set."""
        from events.producers.schedule import TASK_NAME, sync_schedules

        names = sync_schedules(beat_app, [policy("churn", "0 3 * * *"), policy("fraud", "24h"), policy("ltv")])
        assert names == ["schedule-tick:churn", "schedule-tick:fraud"]
        cron = definition(redis_client, "churn")
        assert cron["task"] == TASK_NAME and cron["kwargs"] == {"model": "churn", "schedule": "0 3 * * *"}
        assert cron["schedule"]["__type__"] == "crontab"
        assert (cron["schedule"]["minute"], cron["schedule"]["hour"]) == ("0", "3")
        interval = definition(redis_client, "fraud")
        assert interval["schedule"] == {"__type__": "interval", "every": 86400.0, "relative": False}
        assert interval["options"]["queue"] == "decision"
        assert definition(redis_client, "ltv") is None
        members = {m.decode() for m in redis_client.zrange("retrain:redbeat::schedule", 0, -1)}
        assert members == {"retrain:redbeat:schedule-tick:churn", "retrain:redbeat:schedule-tick:fraud"}

    def test_update_keeps_last_run_and_removed_schedules_are_deleted(self, beat_app, redis_client):
        """Changing a schedule updates the entry in place (last run kept); dropping it deletes the entry."""
        from redbeat import RedBeatSchedulerEntry

        from events.producers.schedule import sync_schedules

        sync_schedules(beat_app, {"churn": policy("churn", "1h"), "fraud": policy("fraud", "2h")})
        other = RedBeatSchedulerEntry("someone-else", "x.y", 60, app=beat_app).save()
        entry = RedBeatSchedulerEntry.from_key("retrain:redbeat:schedule-tick:churn", app=beat_app)
        ran = datetime(2024, 5, 1, 3, 0, tzinfo=UTC)
        entry.reschedule(ran)
        sync_schedules(beat_app, {"churn": policy("churn", "30m"), "fraud": policy("fraud")})
        assert definition(redis_client, "churn")["schedule"]["every"] == 1800.0
        reloaded = RedBeatSchedulerEntry.from_key("retrain:redbeat:schedule-tick:churn", app=beat_app)
        assert reloaded.last_run_at == ran
        assert definition(redis_client, "fraud") is None
        assert redis_client.exists(other.key)  # entries that are not ours are left alone

    def test_bad_schedule_changes_nothing(self, beat_app, redis_client):
        """An unparseable schedule raises ScheduleError before any entry is written or deleted."""
        from events.producers.schedule import ScheduleError, sync_schedules

        sync_schedules(beat_app, [policy("churn", "1h")])
        with pytest.raises(ScheduleError, match="neither a cron expression"):
            sync_schedules(beat_app, [policy("fraud", "every tuesday")])
        with pytest.raises(ScheduleError, match="bad cron"):
            sync_schedules(beat_app, [policy("fraud", "61 3 * * *")])
        assert definition(redis_client, "churn") is not None and definition(redis_client, "fraud") is None

    def test_task_publishes_the_tick_with_an_id_from_the_task_id(self, beat_app, redis_client, keys):
        """The tick task publishes schedule.tick; its id derives from the Celery task id (redelivery-safe)."""
        from events.producers.schedule import schedule_tick

        first = schedule_tick("churn", "24h")
        schedule_tick.push_request(id="task-123")
        try:
            again = [schedule_tick("churn", "24h"), schedule_tick("churn", "24h")]
        finally:
            schedule_tick.pop_request()
        assert again == ["tick-task-123", "tick-task-123"] and first != again[0]
        got = stream_events(redis_client, keys, "churn")
        assert [e.type for e in got] == ["schedule.tick"] * 3
        assert got[0].id == first and got[0].typed_data().schedule == "24h"

    def test_redbeat_scheduler_sends_the_tick_task(self, beat_app, redis_client, keys):
        """redbeat's scheduler, holding the lock, loads our entry and sends the tick task to the decision queue."""
        import time

        from redbeat import RedBeatScheduler
        from redbeat.schedulers import acquire_distributed_beat_lock

        from events.producers.schedule import TASK_NAME, schedule_tick, sync_schedules

        sync_schedules(beat_app, [policy("churn", "1s")])
        scheduler = RedBeatScheduler(app=beat_app)
        acquire_distributed_beat_lock(sender=SimpleNamespace(scheduler=scheduler))
        try:
            assert redis_client.ttl(scheduler.lock_key) > 0
            deadline = time.monotonic() + 5
            while not redis_client.llen("decision") and time.monotonic() < deadline:
                scheduler.tick()
                time.sleep(0.1)
        finally:
            scheduler.close()
        message = json.loads(redis_client.lindex("decision", 0))
        assert message["headers"]["task"] == TASK_NAME
        args, kwargs, _ = json.loads(base64.b64decode(message["body"]))
        assert kwargs == {"model": "churn", "schedule": "1s"}
        schedule_tick(*args, **kwargs)  # what the worker does with it
        assert [e.type for e in stream_events(redis_client, keys, "churn")] == ["schedule.tick"]
