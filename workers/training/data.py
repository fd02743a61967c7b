"""Reading the training window from Parquet/CSV files, and the time-based holdout.

Files are found by glob (``data/churn/**/*.parquet``, a directory, or a ``file://`` URI).
Only the data inside the window is read, and as little as possible is opened to find it:

1. **Hive partitions** — a path segment ``date=2024-05-01`` (also ``dt=``, ``day=``,
   ``year=/month=/day=``; see :mod:`workers.datafiles`, which the volume monitor shares)
   bounds the file's rows; files of days before the window start (or after its end) are
   skipped without being opened.
2. **Parquet statistics** — the footer holds min/max of the time column per row group; row
   groups (and so whole files) whose max is older than the window start are never read.
3. Rows are then filtered exactly on the time column. CSV files have no statistics, so a CSV
   file outside a date partition is read and filtered.

Every timestamp is normalised to UTC (naive times are taken as UTC). The result says which
files were read and which were pruned, so the pipeline can record the data's lineage.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from workers.datafiles import SourceError, csv_delimiter, file_format, list_data_files, partition_bounds



class DataError(ValueError):
    """Unusable training data (no files, unreadable file, missing time column); one line."""


@dataclass
class WindowData:
    """The rows of a training window and where they came from."""

    frame: pd.DataFrame
    start: datetime | None
    end: datetime | None
    files_read: list[str] = field(default_factory=list)
    files_pruned: list[str] = field(default_factory=list)
    row_groups_read: int = 0
    row_groups_pruned: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no rows) for events and the registry's lineage."""
        return {
            "rows": int(len(self.frame)),
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "files_read": list(self.files_read),
            "files_pruned": list(self.files_pruned),
            "row_groups_read": self.row_groups_read,
            "row_groups_pruned": self.row_groups_pruned,
            "fingerprint": frame_fingerprint(self.frame),
        }


def list_files(source: str) -> list[str]:
    """Expand a glob, directory or ``file://`` URI to the sorted list of data files (:func:`list_data_files`)."""
    try:
        return list_data_files(source)
    except SourceError as exc:
        raise DataError(str(exc)) from None


def to_utc(value: Any) -> pd.Timestamp:
    """A timestamp (datetime, date, string, epoch) as a tz-aware UTC :class:`pandas.Timestamp`."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _time_series_utc(series: pd.Series, column: str, origin: str) -> pd.Series:
    textual = series.dtype == object or pd.api.types.is_string_dtype(series)
    try:
        return pd.to_datetime(series, utc=True, format="mixed" if textual else None)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{origin}: time column '{column}' is not a timestamp ({exc})") from None


def _partition_value(path: str, key: str) -> str | None:
    """The value of the hive partition directory ``key=...`` in ``path``, if there is one."""
    for segment in Path(path).parts[:-1]:
        name, sep, value = segment.partition("=")
        if sep and name == key:
            return value
    return None


def _stat_to_utc(value: Any) -> pd.Timestamp | None:
    if value is None:
        return None
    try:
        return to_utc(value)
    except (ValueError, TypeError):
        return None


def _read_parquet(path: str, time_column: str, start: pd.Timestamp | None, end: pd.Timestamp | None, columns: list[str] | None) -> tuple[pd.DataFrame | None, int, int]:
    """Read the row groups of one Parquet file that may hold rows in ``[start, end)``."""
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    names = pf.schema_arrow.names
    leaves = [pf.schema.column(i).path for i in range(len(pf.schema))]
    col_idx = leaves.index(time_column) if time_column in leaves else None
    keep: list[int] = []
    for rg in range(pf.num_row_groups):
        stats = pf.metadata.row_group(rg).column(col_idx).statistics if col_idx is not None else None
        lo = _stat_to_utc(stats.min) if stats is not None and stats.has_min_max else None
        hi = _stat_to_utc(stats.max) if stats is not None and stats.has_min_max else None
        if start is not None and hi is not None and hi < start:
            continue
        if end is not None and lo is not None and lo >= end:
            continue
        keep.append(rg)
    pruned = pf.num_row_groups - len(keep)
    if not keep:
        return None, 0, pruned
    wanted = None if columns is None else [c for c in names if c in set(columns) | {time_column}]
    table = pf.read_row_groups(keep, columns=wanted)
    return table.to_pandas(), len(keep), pruned


def _read_csv(path: str, columns: list[str] | None, time_column: str) -> pd.DataFrame:
    try:
        usecols = None if columns is None else (lambda c: c in set(columns) | {time_column})
        return pd.read_csv(path, usecols=usecols, sep=csv_delimiter(path))
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from None


def read_frame(path_or_glob: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read every Parquet/CSV file matching ``path_or_glob`` into one frame (no window)."""
    frames = []
    for path in list_files(path_or_glob):
        if file_format(path) != "parquet":
            frames.append(_read_csv(path, columns, ""))
        else:
            try:
                frames.append(pq.read_table(path, columns=columns).to_pandas())
            except (pa.ArrowInvalid, OSError, KeyError) as exc:
                raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def load_window(
    source: str,
    time_column: str,
    window: timedelta | None = None,
    *,
    now: datetime | str | None = None,
    since: datetime | str | None = None,
    columns: list[str] | None = None,
    query: str = "",
) -> WindowData:
    """Read the rows of ``source`` whose time lies in ``[start, now]``, pruning what it can.

    Parameters
    ----------
    source
        Path glob, directory or ``file://`` URI of Parquet/CSV files; or a SQLAlchemy database
        URL (``postgresql://...``, ``sqlite:///x.db``; needs the ``sql`` extra), read with
        ``query`` and the window bound as ``:start`` / ``:end`` (the database prunes).
    query
        For a database source: SQL selecting the rows, e.g. ``SELECT * FROM events WHERE ts >=
        :start AND ts <= :end``; ``table:NAME`` is shorthand for exactly that on NAME.
    time_column
        Column holding each row's event time.
    window
        Training window length; ``start = now - window``. None = no lower bound.
    now
        End of the window (default: current UTC time). Pass it for reproducible reads.
    since
        A later start overriding the window (e.g. the detected drift onset).
    columns
        Columns to read (the time column is always read); None = all.

    Returns
    -------
    WindowData
        The rows, sorted by time (stable), with the time column as UTC timestamps, plus which
        files and row groups were read or pruned.
    """
    end = to_utc(now) if now is not None else pd.Timestamp(datetime.now(timezone.utc))
    start = end - pd.Timedelta(window) if window is not None else None
    if since is not None:
        since_ts = to_utc(since)
        start = since_ts if start is None else max(start, since_ts)
    if is_sql_source(source):
        return _load_sql_window(source, time_column, start, end, columns, query)
    frames: list[pd.DataFrame] = []
    out = WindowData(frame=pd.DataFrame(), start=start.to_pydatetime() if start is not None else None, end=end.to_pydatetime())
    for path in list_files(source):
        bounds = partition_bounds(path, time_column)
        if bounds is not None and ((start is not None and bounds[1] <= start) or bounds[0] > end):
            out.files_pruned.append(path)
            continue
        if file_format(path) != "parquet":
            df = _read_csv(path, columns, time_column)
            out.row_groups_read += 1
        else:
            df, read, pruned = _read_parquet(path, time_column, start, end + pd.Timedelta(microseconds=1), columns)
            out.row_groups_read += read
            out.row_groups_pruned += pruned
            if df is None:
                out.files_pruned.append(path)
                continue
        if time_column not in df.columns:
            if bounds is not None and _partition_value(path, time_column) is not None:
                df[time_column] = bounds[0]  # the time column is the partition directory itself
            else:
                raise DataError(f"{path}: no time column '{time_column}'")
        out.files_read.append(path)
        df[time_column] = _time_series_utc(df[time_column], time_column, path)
        mask = df[time_column] <= end
        if start is not None:
            mask &= df[time_column] >= start
        frames.append(df.loc[mask])
    if frames:
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0].reset_index(drop=True)
        frame = frame.sort_values(time_column, kind="stable").reset_index(drop=True)
    else:
        frame = pd.DataFrame()
    out.frame = frame
    return out


SQL_SCHEMES = ("postgresql", "postgres", "mysql", "mariadb", "sqlite", "mssql", "oracle", "duckdb", "snowflake")


def is_sql_source(source: str) -> bool:
    """A SQLAlchemy database URL rather than files (``postgresql+psycopg://...``, ``sqlite:///x.db``)."""
    scheme = urlparse(source).scheme.split("+", 1)[0].lower()
    return scheme in SQL_SCHEMES


def _load_sql_window(source: str, time_column: str, start, end, columns, query: str) -> WindowData:
    """Read a window from a database through SQLAlchemy (an optional extra: ``pip install retrain[sql]``)."""
    try:
        import sqlalchemy as sa
    except ImportError:
        raise DataError("a database source needs SQLAlchemy: install the 'sql' extra") from None
    if not query:
        raise DataError("a database source needs [data] query (SQL with :start and :end), or 'table:NAME'")
    if query.startswith("table:"):
        table = query.removeprefix("table:").strip()
        if not table.replace("_", "").replace(".", "").isalnum():
            raise DataError(f"bad table name {table!r}")
        query = f"SELECT * FROM {table} WHERE {time_column} >= :start AND {time_column} <= :end"
    lower = (start if start is not None else pd.Timestamp("1970-01-01", tz="UTC"))
    try:
        engine = sa.create_engine(source)
        with engine.connect() as conn:
            frame = pd.read_sql(sa.text(query), conn, params={"start": lower.to_pydatetime(), "end": end.to_pydatetime()})
    except (sa.exc.SQLAlchemyError, pd.errors.DatabaseError) as exc:  # pandas wraps execution errors
        raise DataError(f"database source: {str(exc).splitlines()[0]}") from None
    finally:
        try:
            engine.dispose()
        except UnboundLocalError:
            pass
    if time_column not in frame.columns:
        raise DataError(f"database source: no time column '{time_column}' in the query's result")
    if columns:
        frame = frame[[c for c in dict.fromkeys([*columns, time_column]) if c in frame.columns]]
    frame[time_column] = _time_series_utc(frame[time_column], time_column, "database")
    mask = frame[time_column] <= end
    if start is not None:
        mask &= frame[time_column] >= start
    frame = frame.loc[mask].sort_values(time_column, kind="stable").reset_index(drop=True)
    return WindowData(frame=frame, start=start.to_pydatetime() if start is not None else None,
                      end=end.to_pydatetime(), files_read=[urlparse(source).scheme + "://(database)"])


@dataclass(frozen=True)
class Holdout:
    """A time-based split: ``train`` is older than ``test``; ``cutoff`` is the first test time."""

    train: pd.DataFrame
    test: pd.DataFrame
    cutoff: datetime | None


def time_holdout(frame: pd.DataFrame, time_column: str, fraction: float = 0.2) -> Holdout:
    """Hold out the newest ``fraction`` of rows by time as the test set, like production.

    Rows sharing a timestamp are never split across train and test (the tied block goes to the
    test set, or to the training set when it starts the data); both sides get at least one row
    when ``frame`` has two.

    Examples
    --------
    >>> split = time_holdout(df, "timestamp", 0.2)          # doctest: +SKIP
    >>> split.train["timestamp"].max() < split.test["timestamp"].min()   # doctest: +SKIP
    True
    """
    if not 0 < fraction < 1:
        raise ValueError("fraction must be in (0, 1)")
    if len(frame) < 2:
        raise DataError(f"need at least 2 rows for a holdout, got {len(frame)}")
    ordered = frame.sort_values(time_column, kind="stable").reset_index(drop=True)
    times = ordered[time_column]
    pos = min(max(int(round(len(ordered) * (1 - fraction))), 1), len(ordered) - 1)
    tied = times.iloc[pos]
    first = int(times.searchsorted(tied, side="left"))
    after = int(times.searchsorted(tied, side="right"))
    if first >= 1:
        pos = first  # the whole block of equal timestamps goes to the test set...
    elif after < len(ordered):
        pos = after  # ...or, when it starts the data, to the training set
    cutoff = times.iloc[pos]
    return Holdout(
        train=ordered.iloc[:pos].reset_index(drop=True),
        test=ordered.iloc[pos:].reset_index(drop=True),
        cutoff=pd.Timestamp(cutoff).to_pydatetime() if pd.notna(cutoff) else None,
    )


def frame_fingerprint(frame: pd.DataFrame) -> str:
    """A sha256 of the frame's columns, dtypes and values (order-sensitive), for lineage."""
    h = hashlib.sha256()
    h.update(repr([(str(c), str(t)) for c, t in frame.dtypes.items()]).encode())
    if len(frame):
        try:
            hashed = pd.util.hash_pandas_object(frame, index=False)
        except TypeError:  # nested values (lists, arrays) are not hashable: hashed by their text
            nested = {c: str for c in frame.columns if frame[c].dtype == object}
            hashed = pd.util.hash_pandas_object(frame.astype(nested), index=False)
        h.update(hashed.to_numpy().tobytes())
    return h.hexdigest()

