"""New-data volume: rows in the data source newer than the production model's training data.

The count never scans the whole source:

1. **Partition pruning.** Files under hive partition directories (``date=2024-05-01``,
   ``dt=``, ``ds=``, ``<time_column>=``, ``year=/month=/day=``; :mod:`workers.datafiles`,
   shared with training, so the monitor counts the files training reads) whose range ends
   at or before ``since`` are never opened.
2. **Row-group pruning (Parquet).** Through ``pyarrow.dataset``, only row groups whose
   time-column statistics may hold rows newer than ``since`` are kept
   (``ParquetFileFragment.split_by_row_group(filter=...)``). A kept row group whose minimum is
   already newer is counted from its metadata; only row groups straddling ``since`` read
   the time column.
3. **CSV** has no statistics: it reads the time column alone (``include_columns``).

:func:`scan_new_rows` reports what it opened and skipped (:class:`VolumeScan`), which the
tests use to prove the pruning; :func:`count_new_rows` returns just the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from events.envelope import CloudEvent, new_event
from events.types import VolumeAccumulated
from workers.datafiles import SourceError, csv_delimiter, file_format, list_data_files, partition_bounds

SOURCE = "urn:retrain:monitor:volume"


class VolumeError(ValueError):
    """The source cannot be counted (no files, unknown format, no usable time column)."""


@dataclass
class VolumeScan:
    """The count and what it took to get it."""

    rows: int = 0
    files: int = 0
    """Files matched by the glob."""
    files_pruned: int = 0
    """Files skipped by their partition directory, never opened."""
    files_opened: int = 0
    row_groups: int = 0
    """Row groups in the opened Parquet files."""
    row_groups_pruned: int = 0
    """Row groups skipped by their statistics."""
    row_groups_from_metadata: int = 0
    """Row groups wholly newer than ``since``, counted from metadata alone."""
    row_groups_read: int = 0
    """Row groups whose time column was read (they straddle ``since`` or lack statistics)."""


def expand_source(source_glob: str) -> list[Path]:
    """The data files a policy's ``data.source`` names (a glob, a file or a directory), sorted."""
    try:
        return [Path(p) for p in list_data_files(source_glob)]
    except SourceError as exc:
        raise VolumeError(str(exc)) from None


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _bound_for(arrow_type: pa.DataType, since: datetime):
    """``since`` as a scalar of the column's type (naive timestamps are taken as UTC)."""
    if pa.types.is_timestamp(arrow_type):
        value = since if arrow_type.tz else since.replace(tzinfo=None)
        return pa.scalar(value, type=arrow_type)
    if pa.types.is_date(arrow_type):
        return pa.scalar(since.date(), type=arrow_type)
    raise VolumeError(f"time column has type {arrow_type}; expected a timestamp or a date")


def _newer(value, since: datetime) -> bool:
    """Whether a statistics value is strictly newer than ``since``."""
    if isinstance(value, datetime):
        return _utc(value) > since
    if isinstance(value, date):
        return value > since.date()
    return False


def _count_parquet(path: Path, time_column: str, since: datetime, scan: VolumeScan) -> int:
    fragment = ds.ParquetFileFormat().make_fragment(str(path), filesystem=pafs.LocalFileSystem())
    schema = fragment.physical_schema
    scan.files_opened += 1
    index = schema.get_field_index(time_column)
    if index < 0:
        raise VolumeError(f"{path}: no time column {time_column!r}")
    arrow_type = schema.field(index).type
    scan.row_groups += fragment.num_row_groups
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        # Time text: no trustworthy statistics order across offsets and formats; read the column.
        scan.row_groups_read += fragment.num_row_groups
        table = fragment.to_table(columns=[time_column])
        return _count_text_times(table.column(0), since, f"{path}: {time_column}")
    expr = ds.field(time_column) > _bound_for(arrow_type, since)
    kept = fragment.split_by_row_group(filter=expr)
    scan.row_groups_pruned += fragment.num_row_groups - len(kept)
    total = 0
    for piece in kept:
        group = piece.row_groups[0]
        col_stats = (group.statistics or {}).get(time_column) or {}
        if "min" in col_stats and _newer(col_stats["min"], since):
            scan.row_groups_from_metadata += 1
            total += group.num_rows
        else:
            scan.row_groups_read += 1
            total += piece.count_rows(filter=expr)
    return total


def _count_text_times(column: pa.ChunkedArray, since: datetime, where: str) -> int:
    """Rows newer than ``since`` in a column of time text, parsed as training reads it (``format="mixed"``: not
    only ISO 8601); text that is no time at all is an error, not a row silently left out of the count."""
    import pandas as pd

    from workers.training.data import DataError, _time_series_utc

    try:
        times = _time_series_utc(column.to_pandas(), where, "volume")
    except DataError as exc:
        raise VolumeError(str(exc)) from None
    return int((times > pd.Timestamp(since)).sum())


def _count_csv(path: Path, time_column: str, since: datetime, scan: VolumeScan) -> int:
    from pyarrow import csv

    scan.files_opened += 1
    try:
        table = csv.read_csv(
            path,
            parse_options=csv.ParseOptions(delimiter=csv_delimiter(path)),
            convert_options=csv.ConvertOptions(include_columns=[time_column], strings_can_be_null=True),
        )
    except KeyError:  # pyarrow.lib.ArrowKeyError: the column is not in the header
        raise VolumeError(f"{path}: no time column {time_column!r}") from None
    except pa.ArrowInvalid as exc:
        raise VolumeError(f"{path}: cannot read CSV ({exc})") from None
    column = table.column(0)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return int(pc.sum(pc.greater(column, _bound_for(column.type, since))).as_py() or 0)
    return _count_text_times(column, since, f"{path}: {time_column}")


def scan_new_rows(source_glob: str, time_column: str, since: datetime) -> VolumeScan:
    """Count rows with ``time_column > since`` in the source, pruning what cannot match.

    Parameters
    ----------
    source_glob
        The policy's ``data.source``: a glob, file or directory of Parquet/CSV files.
    time_column
        The policy's ``data.time_column`` (timestamp or date; ISO strings are parsed).
    since
        The end of the production model's training window (naive means UTC).

    Returns
    -------
    VolumeScan
        The count plus files/row groups pruned, counted from metadata and read.
    """
    since = _utc(since)
    scan = VolumeScan()
    for path in expand_source(source_glob):
        scan.files += 1
        bounds = partition_bounds(path, time_column)
        if bounds is not None and bounds[1] <= since:
            scan.files_pruned += 1
            continue
        if file_format(path) == "parquet":
            scan.rows += _count_parquet(path, time_column, since, scan)
        else:
            scan.rows += _count_csv(path, time_column, since, scan)
    return scan


def count_new_rows(source_glob: str, time_column: str, since: datetime) -> int:
    """Rows newer than ``since`` in the data source (see :func:`scan_new_rows`).

    Examples
    --------
    >>> count_new_rows("data/churn/**/*.parquet", "timestamp", datetime(2024, 5, 1))  # doctest: +SKIP
    12873
    """
    return scan_new_rows(source_glob, time_column, since).rows


def volume_event(model: str, new_samples: int, since: datetime | None = None, *,
                 source: str = SOURCE, event_id: str | None = None) -> CloudEvent:
    """Build the ``volume.accumulated`` event (rows accumulated since ``since``)."""
    data = VolumeAccumulated(new_samples=new_samples, since=_utc(since) if since else None)
    return new_event("volume.accumulated", model, data, source=source, id=event_id)
