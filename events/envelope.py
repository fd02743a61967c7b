"""The CloudEvents 1.0 envelope (JSON structured mode) and its validation.

``parse_event`` is the single gate every event passes, at the producer and again at the
consumer: it returns a :class:`CloudEvent` or raises :class:`EventError` whose message is the
one-line reason that goes to the caller, the HTTP response or the dead-letter stream.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import PydanticSerializationError
from typing_extensions import NotRequired, TypedDict

from config.keys import MODEL_NAME_PATTERN
from events.types import EVENT_TYPES, EventData

SPEC_VERSION = "1.0"
DEFAULT_SOURCE = "urn:retrain"


class EventError(ValueError):
    """An event that cannot be accepted; ``str()`` is the reason, one line."""


_DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")
"""The start every accepted ``time`` has (the rest is pydantic's RFC 3339 parser's business)."""


EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=timezone.utc)
EVENT_TEXT_CHARS = 2000
"""The longest free text (a reason, an error, an alert's message) the system's own events carry: such text can
be any length (an exception's, an operator's, a list of removed columns), and an event must fit the bus's size
limit. The record the event announces keeps the text whole."""
"""An event's time must fall in [EARLIEST_TIME, LATEST_TIME): time windows around it stay in range."""


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str = SPEC_VERSION
    id: str = Field(min_length=1, max_length=256)
    source: str = Field(min_length=1)
    type: str
    time: datetime
    subject: str = Field(pattern=MODEL_NAME_PATTERN)
    """The model name."""
    datacontenttype: str = "application/json"
    data: dict[str, Any]

    @field_validator("specversion")
    @classmethod
    def _spec(cls, v: str) -> str:
        if v != SPEC_VERSION:
            raise ValueError(f"specversion must be {SPEC_VERSION!r}")
        return v

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        if v not in EVENT_TYPES:
            raise ValueError(f"unknown event type {v!r}")
        return v

    @field_validator("time", mode="before")
    @classmethod
    def _timestamp(cls, v: Any) -> Any:
        # pydantic would also read a number (seconds since 1970) or a bare date: neither is RFC 3339.
        if isinstance(v, str) and not _DATE_TIME.match(v):
            raise ValueError("time must be an RFC 3339 timestamp like 2024-05-01T10:00:00Z")
        if isinstance(v, (int, float)):
            raise ValueError("time must be an RFC 3339 timestamp like 2024-05-01T10:00:00Z, not a number")
        return v

    @field_validator("time")
    @classmethod
    def _aware(cls, v: datetime) -> datetime:
        v = v if v.tzinfo else v.replace(tzinfo=timezone.utc)
        try:
            in_utc = v.astimezone(timezone.utc)
        except OverflowError:  # 0001-01-01T00:00:00+05:00 is before year 1 in UTC
            in_utc = None
        if in_utc is None or not EARLIEST_TIME <= in_utc < LATEST_TIME:
            raise ValueError(f"time must be between {EARLIEST_TIME.year} and {LATEST_TIME.year} "
                             "(years 1 and 9999 break the log's time arithmetic)")
        return v

    @property
    def model(self) -> str:
        return self.subject

    def typed_data(self) -> EventData:
        return EVENT_TYPES[self.type].model_validate(self.data)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=False)


def new_event(
    type: str,
    subject: str,
    data: dict[str, Any] | EventData,
    *,
    source: str = DEFAULT_SOURCE,
    id: str | None = None,
    time: datetime | None = None,
) -> CloudEvent:
    """Build and validate an event (the producer side of the contract)."""
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", exclude_none=True)
    raw = {
        "specversion": SPEC_VERSION,
        "id": id or uuid.uuid4().hex,
        "source": source,
        "type": type,
        "time": (time or datetime.now(timezone.utc)).isoformat(),
        "subject": subject,
        "datacontenttype": "application/json",
        "data": data,
    }
    return parse_event(raw)


def _data_check(cls: type[EventData]) -> Callable[[dict[str, Any]], Any]:
    """A validate-only twin of ``cls.model_validate`` for a ``data`` dict.

    The same fields, annotations and constraints as a TypedDict: it accepts exactly what the
    model accepts but builds no model instance (and copies no mutable defaults), about four
    times cheaper, which counts at the consumer where every event is validated. A model with
    anything a TypedDict would not reproduce (validators, aliases, other config) is checked
    through the model itself.
    """
    d = cls.__pydantic_decorators__
    plain = not (d.validators or d.field_validators or d.root_validators or d.model_validators)
    plain = plain and set(cls.model_config) <= {"extra", "frozen", "allow_inf_nan"}
    plain = plain and not any(i.alias or i.validation_alias or i.discriminator for i in cls.model_fields.values())
    if not plain:
        return cls.__pydantic_validator__.validate_python
    fields: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = annotation if info.is_required() else NotRequired[annotation]
    shape = TypedDict(f"{cls.__name__}Data", fields)  # type: ignore[operator]
    shape.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
        extra=cls.model_config.get("extra", "ignore"), allow_inf_nan=cls.model_config.get("allow_inf_nan", True))
    return TypeAdapter(shape).validator.validate_python


_DATA_CHECKS: dict[str, Callable[[dict[str, Any]], Any]] = {t: _data_check(cls) for t, cls in EVENT_TYPES.items()}


def _reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "event"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"missing field '{loc}'" if err["type"] == "missing" else f"{loc}: {msg}")
    return "; ".join(parts)


_NESTING_TO_VERIFY = 150
"""JSON with fewer brackets than this nests less deep than the parser's recursion limit."""


def check_size(text: str | bytes, max_bytes: int) -> None:
    """Raise :class:`EventError` when ``text`` takes more than ``max_bytes`` bytes on the stream.

    Bytes, not characters (a ``str``'s length counts characters): a text of at most a quarter
    of the limit in characters fits whatever they are, so most events are never measured.
    """
    if len(text) <= max_bytes // 4:
        return
    size = len(text) if isinstance(text, bytes) or text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise EventError(f"event is {size} bytes, over the limit of {max_bytes}")


def stream_json(event: CloudEvent) -> str:
    """The JSON of ``event`` as written to the stream; raise :class:`EventError` if it would not read back.

    An event built from a dict (``new_event``, HTTP ingest) never went through the JSON parser
    that the consumer uses: nested too deep, it would be accepted here and dead-lettered there
    (or not serialize at all). The bracket count bounds the nesting, so the common event costs
    two ``str.count`` calls; only a bracket-heavy one is parsed back as the consumer would.
    """
    try:
        payload = event.to_json()
    except PydanticSerializationError as exc:
        raise EventError(f"event cannot be written as JSON: {str(exc).splitlines()[0]}") from None
    if payload.count("[") + payload.count("{") >= _NESTING_TO_VERIFY:
        try:
            CloudEvent.model_validate_json(payload)
        except ValidationError as exc:
            raise EventError(f"event would not read back from the stream: {exc.errors()[0]['msg']}") from None
    return payload


def parse_event(raw: bytes | str | dict[str, Any], *, max_bytes: int | None = None) -> CloudEvent:
    """Validate an envelope and its typed data; raise :class:`EventError` with the reason.

    With ``max_bytes``, a dict is also checked to serialize and read back (:func:`stream_json`),
    so what is accepted here is what the consumer will accept.
    """
    try:
        if isinstance(raw, (bytes, str)):
            if max_bytes is not None:
                check_size(raw, max_bytes)
            event = CloudEvent.model_validate_json(raw)
        elif isinstance(raw, dict):
            event = CloudEvent.model_validate(raw)
            if max_bytes is not None:
                check_size(stream_json(event), max_bytes)
        else:
            raise EventError(f"an event must be a JSON object, got {type(raw).__name__}")
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise EventError(f"malformed JSON: {first['ctx'].get('error', first['msg'])}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise EventError("an event must be a JSON object") from None
        raise EventError(_reason(exc)) from None
    try:
        _DATA_CHECKS[event.type](event.data)
    except ValidationError:
        try:
            event.typed_data()  # the model is the authority, and words the reason
        except ValidationError as exc:
            raise EventError(f"{event.type} " + _reason(exc).replace("missing field '", "missing field 'data.")) from None
    return event
