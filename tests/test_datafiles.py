"""Data files of a source: one listing and one partition reading for training and the monitors."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest

from events.producers.volume import VolumeError, scan_new_rows
from workers.datafiles import SourceError, file_format, list_data_files, partition_bounds
from workers.training.data import DataError, load_window

UTC = timezone.utc


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


class TestPartitionBounds:
    @pytest.mark.parametrize("path, start, end", [
        ("/d/date=2024-01-05/p.parquet", utc(2024, 1, 5), utc(2024, 1, 6)),
        ("/d/dt=2024-01-05/p.parquet", utc(2024, 1, 5), utc(2024, 1, 6)),
        ("/d/ds=2024-12-31/p.csv", utc(2024, 12, 31), utc(2025, 1, 1)),
        ("/d/day=2024-01-05/p.parquet", utc(2024, 1, 5), utc(2024, 1, 6)),
        ("/d/date=2024-01-05%2000%3A00%3A00/p.parquet", utc(2024, 1, 5), utc(2024, 1, 6)),  # Spark's escaped timestamp
        ("/d/year=2024/month=02/day=29/p.parquet", utc(2024, 2, 29), utc(2024, 3, 1)),
        ("/d/year=2024/month=12/p.parquet", utc(2024, 12, 1), utc(2025, 1, 1)),
        ("/d/year=2024/p.parquet", utc(2024, 1, 1), utc(2025, 1, 1)),
        ("/d/region=eu/date=2024-01-05/hour=13/p.parquet", utc(2024, 1, 5), utc(2024, 1, 6)),
    ])
    def test_partition_directories_bound_the_rows(self, path, start, end):
        """Date-valued keys and year=/month=/day= directories give the UTC [start, end) of the file's rows."""
        assert partition_bounds(path) == (start, end)

    @pytest.mark.parametrize("path", [
        "/d/p.parquet", "/d/region=eu/p.parquet", "/d/year=all/p.parquet", "/d/year=2024/month=13/p.parquet",
        "/d/date=latest/p.parquet", "/d/date=2024-01-05.parquet",
    ])
    def test_other_paths_are_not_bounded(self, path):
        """No partition, a non-time partition or an unreadable value: no bounds (the file is read)."""
        assert partition_bounds(path) is None

    def test_the_time_column_may_be_the_partition_key(self):
        """A partition named after the policy's time column bounds the rows too."""
        assert partition_bounds("/d/event_day=2024-03-01/p.parquet") is None
        assert partition_bounds("/d/event_day=2024-03-01/p.parquet", "event_day") == (utc(2024, 3, 1), utc(2024, 3, 2))


class TestListing:
    def test_formats_and_sources(self, tmp_path):
        """A directory, a glob and a file:// URI list the same data files; other files are ignored."""
        for name in ("a.parquet", "b.pq", "c.csv", "d.csv.gz", "e.tsv", "notes.txt", "model.skops"):
            (tmp_path / "x" / name).parent.mkdir(exist_ok=True)
            (tmp_path / "x" / name).write_bytes(b"")
        expected = sorted(str(tmp_path / "x" / n) for n in ("a.parquet", "b.pq", "c.csv", "d.csv.gz", "e.tsv"))
        assert list_data_files(str(tmp_path / "x")) == expected
        assert list_data_files(str(tmp_path / "x" / "*")) == expected
        assert list_data_files(f"file://{tmp_path / 'x'}") == expected
        assert [file_format(p) for p in expected] == ["parquet", "parquet", "csv", "csv", "tsv"]

    def test_unusable_sources_are_one_line_errors(self, tmp_path):
        """Nothing matching, an empty source or a remote scheme: one line, raised as each caller's own error."""
        with pytest.raises(SourceError, match="no Parquet or CSV"):
            list_data_files(str(tmp_path / "*.parquet"))
        with pytest.raises(SourceError, match="unsupported data source scheme 's3'"):
            list_data_files("s3://bucket/churn/")
        with pytest.raises(DataError, match="no data source configured"):
            load_window("", "ts", timedelta(days=1))
        with pytest.raises(VolumeError, match="no Parquet or CSV"):
            scan_new_rows(str(tmp_path / "*.csv"), "ts", utc(2024, 1, 1))


class TestMonitorAndTrainingAgree:
    def test_the_volume_monitor_counts_exactly_the_rows_training_reads(self, tmp_path):
        """Nested year=/month=/day= Parquet, a TSV and a CSV: new rows counted by the monitor == rows training loads after `since`; old partitions are pruned by both."""
        rng = np.random.default_rng(0)
        total_after = 0
        since = utc(2024, 3, 4, 12)
        for day in range(1, 8):
            d = date(2024, 3, day)
            times = pd.date_range(pd.Timestamp(d, tz="UTC"), periods=24, freq="h")
            folder = tmp_path / f"year={d.year}" / f"month={d.month:02d}" / f"day={d.day:02d}"
            folder.mkdir(parents=True)
            frame = pd.DataFrame({"ts": times, "x": rng.normal(size=24)})
            if day == 5:
                frame.to_csv(folder / "part.tsv", sep="\t", index=False)
            elif day == 6:
                frame.to_csv(folder / "part.csv", index=False)
            else:
                frame.to_parquet(folder / "part.parquet")
            total_after += int((times > since).sum())
        # Corrupt files in partitions wholly before `since`: neither side may open them.
        (tmp_path / "year=2024" / "month=03" / "day=01" / "broken.parquet").write_bytes(b"not parquet")
        (tmp_path / "year=2024" / "month=03" / "day=02" / "broken.tsv").write_bytes(b"\x00\x01")

        scan = scan_new_rows(str(tmp_path), "ts", since)
        window = load_window(str(tmp_path), "ts", since=since, now=utc(2024, 3, 8))
        trained_after = int((window.frame["ts"] > since).sum())
        assert scan.rows == trained_after == total_after == 11 + 3 * 24
        before = sorted(str(p) for day in ("01", "02", "03") for p in (tmp_path / "year=2024" / "month=03" / f"day={day}").iterdir())
        assert len(before) == 5  # days 1-3 and the two broken files
        assert scan.files_pruned == 5 and sorted(window.files_pruned) == before
