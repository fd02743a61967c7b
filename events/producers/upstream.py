"""Upstream changes: the data source's schema (and feature-store version) against training time.

The schema recorded with the production model and the one the source has now are compared
column by column. Types are compared by *kind* (integer, floating, boolean, string,
datetime, date, ...) so a reader's spelling (pandas ``int64`` vs Arrow ``int64``,
``datetime64[ns, UTC]`` vs ``timestamp[us, tz=UTC]``) is not a change.

Verdict: a feature the model uses that was removed, or whose kind changed outside the
numeric family (integer <-> floating is a widening scikit-learn absorbs), is **breaking**: a
retrain on the new schema is needed and the current model cannot score it. Added columns,
and changes to columns the model does not use, are **compatible**.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

from events.envelope import CloudEvent, new_event
from events.producers.volume import VolumeError, expand_source
from events.types import UpstreamChanged
from workers.datafiles import csv_delimiter, file_format

SOURCE = "urn:retrain:monitor:upstream"
CSV_SAMPLE_BYTES = 1 << 20
"""Bytes of a CSV file read to infer its column types (header plus a sample)."""
NUMERIC_KINDS = frozenset({"integer", "floating"})

Verdict = Literal["unchanged", "compatible", "breaking"]


def dtype_kind(dtype: str) -> str:
    """Normalise a pandas/NumPy/Arrow dtype spelling to a kind.

    >>> dtype_kind("int64"), dtype_kind("Float32"), dtype_kind("timestamp[us, tz=UTC]")
    ('integer', 'floating', 'datetime')
    """
    t = str(dtype).strip().lower()
    if t.startswith(("datetime", "timestamp")):
        return "datetime"
    if t.startswith("date"):
        return "date"
    if t.startswith(("int", "uint")):
        return "integer"
    if t.startswith(("float", "double", "halffloat")):
        return "floating"
    if t.startswith("decimal"):
        return "decimal"
    if t in ("bool", "boolean"):
        return "boolean"
    if t.startswith(("str", "string", "large_string", "utf8", "object")):
        return "string"
    if t.startswith(("category", "dictionary")):
        return "categorical"
    if t.startswith(("timedelta", "duration")):
        return "duration"
    if t.startswith(("binary", "large_binary", "bytes")):
        return "binary"
    return t


def schema_fingerprint(schema: Mapping[str, str]) -> str:
    """A stable sha256 of the columns and their kinds, independent of column order.

    >>> schema_fingerprint({"a": "int64", "b": "str"}) == schema_fingerprint({"b": "object", "a": "int32"})
    True
    """
    canonical = json.dumps(sorted((str(c), dtype_kind(t)) for c, t in schema.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def schema_of_frame(frame) -> dict[str, str]:
    """The schema of a pandas DataFrame (to record with a model version at training time)."""
    return {str(c): str(t) for c, t in frame.dtypes.items()}


def schema_of_source(source_glob: str) -> dict[str, str]:
    """The schema of the data source's newest file, reading only metadata.

    Parquet: the footer schema only. CSV: the header and a sample of at most
    :data:`CSV_SAMPLE_BYTES` bytes, to infer the types. The newest file is the last in path
    order (partition directories and date-stamped names sort by time).
    """
    path = expand_source(source_glob)[-1]
    if file_format(path) == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        return {f.name: str(f.type) for f in schema}
    return _csv_schema(path)


def _csv_schema(path: Path) -> dict[str, str]:
    import io

    import pyarrow as pa
    from pyarrow import csv

    opener = _opener(path)
    with opener(path, "rb") as fh:
        sample = fh.read(CSV_SAMPLE_BYTES)
    if len(sample) == CSV_SAMPLE_BYTES and b"\n" in sample:
        sample = sample[: sample.rindex(b"\n") + 1]  # whole lines only
    try:
        table = csv.read_csv(io.BytesIO(sample), parse_options=csv.ParseOptions(delimiter=csv_delimiter(path)))
    except pa.ArrowInvalid as exc:
        raise VolumeError(f"{path}: cannot read CSV header ({exc})") from None
    return {f.name: str(f.type) for f in table.schema}


def _opener(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open
    if name.endswith(".bz2"):
        import bz2

        return bz2.open
    return open


@dataclass(frozen=True)
class UpstreamDiff:
    """The difference between the schema at training time and now."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    retyped: list[str] = field(default_factory=list)
    type_changes: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Retyped column -> (kind at training, kind now)."""
    breaking: bool = False
    reasons: list[str] = field(default_factory=list)
    """Why the verdict is breaking (one line per offending feature)."""

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed or self.retyped)

    @property
    def verdict(self) -> Verdict:
        if self.breaking:
            return "breaking"
        return "compatible" if self.changed else "unchanged"


def compare_schemas(trained: Mapping[str, str], current: Mapping[str, str],
                    features: list[str] | None = None) -> UpstreamDiff:
    """Compare the schema recorded at training with the current one.

    Parameters
    ----------
    trained, current
        Column -> dtype string (any pandas/NumPy/Arrow spelling).
    features
        Columns the model uses; ``None`` or empty means every trained column.

    Returns
    -------
    UpstreamDiff
        ``breaking`` when a used feature was removed or changed kind (integer <-> floating
        excepted); added columns and changes to unused columns are compatible.

    Examples
    --------
    >>> compare_schemas({"a": "int64"}, {"a": "int64", "b": "str"}).verdict
    'compatible'
    >>> compare_schemas({"a": "int64", "b": "str"}, {"a": "int64"}).verdict
    'breaking'
    """
    used = set(features) if features else set(trained)
    added = sorted(c for c in current if c not in trained)
    removed = sorted(c for c in trained if c not in current)
    changes = {
        c: (dtype_kind(trained[c]), dtype_kind(current[c]))
        for c in sorted(set(trained) & set(current))
        if dtype_kind(trained[c]) != dtype_kind(current[c])
    }
    reasons = [f"feature {c!r} was removed" for c in removed if c in used]
    for c, (old, new) in changes.items():
        if c in used and not {old, new} <= NUMERIC_KINDS:
            reasons.append(f"feature {c!r} changed type from {old} to {new}")
    missing_features = sorted(c for c in used if c not in trained and c not in current)
    reasons += [f"feature {c!r} is in neither schema" for c in missing_features]
    return UpstreamDiff(added, removed, sorted(changes), changes, bool(reasons), reasons)


def upstream_event(model: str, diff: UpstreamDiff, feature_version: str | None = None,
                   fingerprint: str | None = None, *, previous_fingerprint: str | None = None,
                   source: str = SOURCE) -> CloudEvent:
    """Build the ``upstream.changed`` event.

    The event id is derived from the model, the fingerprints and the feature version, so
    a monitor that keeps seeing the same change publishes the same id and the consumer's
    de-duplication gives it one effect.
    """
    data = UpstreamChanged(
        feature_version=feature_version,
        schema_fingerprint=fingerprint,
        added=diff.added,
        removed=diff.removed,
        retyped=diff.retyped,
        breaking=diff.breaking,
    ).model_dump(mode="json", exclude_none=True)
    data.update(verdict=diff.verdict, reasons=diff.reasons,
                type_changes={c: list(v) for c, v in diff.type_changes.items()})
    if previous_fingerprint:
        data["previous_fingerprint"] = previous_fingerprint
    key = json.dumps([model, previous_fingerprint, fingerprint, feature_version, diff.added, diff.removed, diff.retyped])
    event_id = "upstream-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return new_event("upstream.changed", model, data, source=source, id=event_id)
