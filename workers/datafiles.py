"""The files a policy's data source names, their format, and the time range their partitions bound.

Training reads the window from these files and the volume and upstream monitors count and
fingerprint them; all three go through this module, so a file the monitors count is a file
training reads, and a partition training prunes is one the monitors prune.

- A source is a glob (``data/churn/**/*.parquet``), a directory (every data file under it),
  a single file or a ``file://`` URI. Other schemes are refused by name.
- Formats by suffix: Parquet (``.parquet``, ``.pq``, ``.parq``), CSV (``.csv``, ``.csv.gz``,
  ``.csv.bz2``) and tab-separated (``.tsv``, ``.tsv.gz``).
- Hive partition directories bound a file's rows in time: a date-valued key
  (``date=2024-05-01``, ``dt=``, ``ds=``, ``day=``, ``event_date=``, ``day_date=``, or the
  policy's time column) is that day; ``year=2024/month=05/day=01`` is that day,
  ``year=/month=`` that month, ``year=`` that year.

Pure: no pandas, no I/O beyond listing files.
"""

from __future__ import annotations

import glob
import os
from datetime import date, datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
CSV_SUFFIXES = (".csv", ".csv.gz", ".csv.bz2")
TSV_SUFFIXES = (".tsv", ".tsv.gz")
DATE_PARTITION_KEYS = ("date", "dt", "ds", "day", "event_date", "day_date")
"""Hive partition keys whose value is a whole date (``date=2024-05-01``)."""


class SourceError(ValueError):
    """The source names no usable files (nothing matches, or a scheme we cannot read); one line."""


def file_format(path: str | Path) -> str | None:
    """``"parquet"``, ``"csv"`` or ``"tsv"`` by the file's suffix; None for anything else."""
    name = str(path).lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(CSV_SUFFIXES):
        return "csv"
    if name.endswith(TSV_SUFFIXES):
        return "tsv"
    return None


def csv_delimiter(path: str | Path) -> str:
    """The field separator of a CSV or TSV file."""
    return "\t" if file_format(path) == "tsv" else ","


def source_pattern(source: str) -> str:
    """The local path or glob a source names (``file://`` URIs unwrapped)."""
    if not source:
        raise SourceError("no data source configured ([data] source)")
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return unquote(parsed.path)
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise SourceError(f"{source}: unsupported data source scheme '{parsed.scheme}' (use a path glob)")
    return source


def list_data_files(source: str) -> list[str]:
    """The Parquet/CSV/TSV files a source names, sorted by path (partitioned paths sort by time)."""
    pattern = source_pattern(source)
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and file_format(p))
    if not files:
        raise SourceError(f"{source}: no Parquet or CSV files match")
    return files


def partition_bounds(path: str | Path, time_column: str | None = None) -> tuple[datetime, datetime] | None:
    """The UTC ``[start, end)`` the hive partition directories in ``path`` bound its rows to, or None.

    >>> partition_bounds("/d/date=2024-05-01/part-0.parquet")[0].isoformat()
    '2024-05-01T00:00:00+00:00'
    >>> [b.date().isoformat() for b in partition_bounds("/d/year=2024/month=02/part.parquet")]
    ['2024-02-01', '2024-03-01']
    """
    parts: dict[str, str] = {}
    for segment in Path(path).parts[:-1]:
        key, sep, value = segment.partition("=")
        if sep:
            parts[key] = unquote(value)
    date_keys = (*DATE_PARTITION_KEYS, time_column) if time_column else DATE_PARTITION_KEYS
    for key in date_keys:
        day = _iso_day(parts.get(key))
        if day is not None:
            return _midnight(day), _midnight(day, days=1)
    try:
        if "year" not in parts:
            return None
        year = int(parts["year"])
        if "month" not in parts:
            return _midnight(date(year, 1, 1)), _midnight(date(year + 1, 1, 1))
        month = int(parts["month"])
        if "day" not in parts:
            return _midnight(date(year, month, 1)), _midnight(date(year + month // 12, month % 12 + 1, 1))
        day = date(year, month, int(parts["day"]))
        return _midnight(day), _midnight(day, days=1)
    except ValueError:  # year=all, month=13, ...: not a time partition
        return None


def _iso_day(value: str | None) -> date | None:
    if not value or len(value) < 10:
        return None
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        return None


def _midnight(day: date, days: int = 0) -> datetime:
    return datetime.fromordinal(day.toordinal() + days).replace(tzinfo=timezone.utc)
