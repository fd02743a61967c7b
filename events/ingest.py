"""HTTP ingest: the door for events from monitors we did not write (FastAPI on uvicorn).

Routes
------
``POST /events``
    One CloudEvent in structured mode (``application/cloudevents+json`` or
    ``application/json``), one in binary mode (``ce-*`` headers, the data as the JSON body),
    or a batch (``application/cloudevents-batch+json``: a JSON array; a JSON array sent as
    ``application/json`` is read as a batch too).
``POST /adapters/alertmanager``
    A Prometheus Alertmanager webhook (payload version 4), see :mod:`events.adapters`.
``POST /adapters/evidently?model=NAME``
    An Evidently ``DataDriftPreset`` report, mapped to one ``drift.data`` event.
``GET /healthz``
    200 when Redis answers PING, 503 otherwise (no token needed, for load balancers).
``GET /metrics``
    Prometheus metrics, **no token needed**: scrapers usually scrape unauthenticated over a
    loopback or private port, and the counters hold no event content. Publish the ingest port
    only where that is acceptable (compose binds it to 127.0.0.1).
``GET /openapi.json``, ``GET /docs``
    The OpenAPI document and its browser.

Answers: 202 with the accepted ids; 400 with a reason per invalid event; 401 without the
bearer token (or with a wrong one); 413 when the body is over the limit; 415 for other
content types; 503 when Redis is down (nothing was acknowledged: retry).

**Only signals come in here**: the types in :data:`events.types.SIGNAL_TYPES` (what monitors
and the adapters send). Lifecycle events (``retrain.decided``, ``rollout.completed``,
``alert.raised``...) are the system's own; one sent over HTTP is a 400 naming the allowed
types, since a forged one would move a model's state (``retrain emit`` stays unrestricted:
it is the operator's tool). A non-finite number in typed data is a 400 with the reason, as is
a body nested too deep to parse, or an event that would not read back from the stream. On
``/events`` the body must be strict JSON (no ``NaN``/``Infinity`` literals, which would reach
the stream as ``null``); adapter bodies may hold them (reports write NaN for some statistics).

**A batch is all or nothing.** If any event of a batch is invalid, the response is 400
listing every invalid event's index and reason, and *no* event of the batch is published:
a sender can fix and resend the whole batch without working out which half went through, and
since event ids are the sender's, a resend is safe either way (the consumer de-duplicates).

**Authentication** is a bearer token from ``RETRAIN_INGEST_TOKEN``, compared in constant
time (``hmac.compare_digest``). With no token configured, :func:`create_app` refuses to build
the app unless ``insecure_no_auth=True`` is passed explicitly (``retrain ingest
--insecure-no-auth``): an unauthenticated endpoint that can trigger retraining and rollouts
must be a decision someone makes, never a default someone forgets.

**Limits.** A request body may hold at most ``max_batch`` events of ``max_event_bytes``
(``max_body_bytes`` = their product unless given). Content-Length is checked before anything
is read; the body is then read in chunks and refused as soon as it passes the limit (a chunked
body has no Content-Length). A single event (structured or binary mode) is refused with 413
past ``max_event_bytes``.
"""

from __future__ import annotations

import hmac
import json
import math
import re
from typing import Any

import structlog
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from events.adapters import AdapterError, alertmanager_events, evidently_event
from events.envelope import MODEL_NAME_PATTERN, CloudEvent, EventError, parse_event
from events.types import SIGNAL_TYPES

log = structlog.get_logger(__name__)

DEFAULT_MAX_BATCH = 500
"""Events per request (the body limit is this times ``max_event_bytes``)."""
BATCH_TYPE = "application/cloudevents-batch+json"
STRUCTURED_TYPE = "application/cloudevents+json"
JSON_TYPE = "application/json"
BINARY_ATTRIBUTES = ("specversion", "id", "source", "type", "time", "subject", "dataschema")


def signal_only(event_type: str) -> str | None:
    """Why an event of ``event_type`` is refused by HTTP ingest, or None when it is a signal."""
    if event_type in SIGNAL_TYPES:
        return None
    return (f"type {event_type!r} is not accepted over HTTP; ingest takes signals only: "
            f"{', '.join(SIGNAL_TYPES)}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: Python's parser makes it an infinity
        raise ValueError(f"number {text[:40]} is out of range (numbers must be finite)")
    return value


def load_json(body: bytes, *, strict: bool = False) -> Any:
    """Parse a request body; raise ValueError with the reason (never RecursionError).

    ``strict`` refuses the ``NaN``/``Infinity`` literals Python's parser would take, and
    numbers too large for a float (``1e999``), which it would read as an infinity.
    """
    try:
        if strict:
            return json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
        return json.loads(body)
    except RecursionError:
        raise ValueError("nested too deeply") from None


_REDIS_REFUSALS = re.compile(r"\b(OOM|READONLY|MISCONF|NOREPLICAS|BUSY|LOADING|WRONGTYPE|NOSCRIPT)\b[^\n]*")


def _redis_refusal(exc: Exception) -> str:
    """The reason Redis gave, without redis-py's pipeline and script wrapping around it.

    redis-py turns some error codes into exception classes and drops the code from the message
    (``OutOfMemoryError``: "command not allowed when used memory > 'maxmemory'"): it is put back.
    """
    import redis

    text = str(exc)
    found = _REDIS_REFUSALS.search(text)
    reason = (found.group(0) if found else text.rsplit("caused error: ", 1)[-1]).strip()
    for cls, code in ((redis.exceptions.OutOfMemoryError, "OOM"), (redis.exceptions.ReadOnlyError, "READONLY"),
                      (redis.exceptions.BusyLoadingError, "LOADING")):
        if isinstance(exc, cls) and not reason.startswith(code):
            reason = f"{code} {reason}"
    return reason[:160]


class IngestConfigError(RuntimeError):
    """The ingest server cannot start as configured (e.g. no token and no explicit opt-out)."""


class _TooLarge(Exception):
    pass


# --- response models (for the OpenAPI document) ---------------------------------------------
class Accepted(BaseModel):
    accepted: list[str]
    """Ids of the events written to the stream, in request order."""
    count: int


class RejectedEvent(BaseModel):
    index: int
    id: str | None = None
    reason: str


class Rejected(BaseModel):
    error: str
    rejected: list[RejectedEvent] = []
    accepted: list[str] = []


class Problem(BaseModel):
    error: str


class AdapterAccepted(BaseModel):
    accepted: list[str]
    count: int
    rejected: list[dict[str, Any]] = []
    ignored_resolved: int = 0


class Health(BaseModel):
    status: str
    redis: bool


_EVENT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            STRUCTURED_TYPE: {"schema": {"type": "object", "description": "One CloudEvent 1.0 (structured mode)."}},
            JSON_TYPE: {"schema": {"type": "object", "description": "One CloudEvent 1.0 (or an array: a batch)."}},
            BATCH_TYPE: {"schema": {"type": "array", "items": {"type": "object"}, "description": "A batch of CloudEvents."}},
        },
    }
}
_JSON_BODY = {"requestBody": {"required": True, "content": {JSON_TYPE: {"schema": {"type": "object"}}}}}
_ERRORS = {
    400: {"model": Rejected, "description": "Invalid event(s): nothing was published."},
    401: {"model": Problem, "description": "Missing or wrong bearer token."},
    413: {"model": Problem, "description": "Body or batch over the limit."},
    503: {"model": Problem, "description": "Redis unavailable: nothing acknowledged, retry."},
}


def _problem(status: int, error: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, **extra}, status_code=status)


class CountResponses:
    """ASGI middleware: counts every HTTP response by route and status code (``retrain_ingest_requests_total``).

    In one place, so refusals that happen before any event is read (401 from the token check,
    413 from the body limit, 415, a 400 from a bad query) are counted like the rest.
    """

    def __init__(self, app, routes: frozenset[str]):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]  # a handler that fails before answering is a 500 to the client

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            from workers.metrics import observe_ingest_request

            path, root = scope.get("path", ""), scope.get("root_path", "")
            if root and path.startswith(root):  # served under a prefix (a proxy's root_path): the route is the rest
                path = path[len(root):]
            observe_ingest_request(path if path in self.routes else "other", status[0])


def create_app(
    bus=None,
    settings=None,
    *,
    insecure_no_auth: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_body_bytes: int | None = None,
) -> FastAPI:
    """Build the ingest application.

    Parameters
    ----------
    bus
        The :class:`events.bus.EventBus` to publish to; ``None`` builds one from the settings
        (and the shared Redis client) on first use.
    settings
        :class:`config.settings.Settings`; ``None`` reads the environment.
    insecure_no_auth
        Accept requests without a token when none is configured. Without this flag and
        without ``settings.ingest_token``, :class:`IngestConfigError` is raised.
    max_batch
        Most events in one request.
    max_body_bytes
        Largest request body; default ``max_batch * settings.max_event_bytes``.

    Returns
    -------
    fastapi.FastAPI

    Examples
    --------
    >>> app = create_app(settings=Settings(ingest_token="s3cret"))  # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8080)  # doctest: +SKIP
    """
    if settings is None:
        from config.settings import get_settings

        settings = get_settings()
    secret = settings.ingest_token.get_secret_value() if settings.ingest_token is not None else ""
    token = secret.encode() if secret else None
    if token is None and not insecure_no_auth:
        raise IngestConfigError(
            "no ingest token configured: set RETRAIN_INGEST_TOKEN, or pass --insecure-no-auth "
            "to accept unauthenticated events (only behind a trusted network)"
        )
    if max_batch < 1:
        raise IngestConfigError("max_batch must be at least 1")
    max_event_bytes = int(settings.max_event_bytes)
    body_limit = int(max_body_bytes or max_event_bytes * max_batch)

    app = FastAPI(
        title="retrain ingest",
        version="1",
        summary="Publish monitoring signals (CloudEvents) to the retraining event bus.",
    )
    app.state.bus = bus
    app.state.settings = settings

    def get_bus():
        if app.state.bus is None:
            from events.bus import EventBus
            from workers.connections import get_redis

            app.state.bus = EventBus.from_settings(get_redis(settings), settings)
        return app.state.bus

    bearer = HTTPBearer(auto_error=False, description="The ingest token (RETRAIN_INGEST_TOKEN).")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not given or not hmac.compare_digest(given, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        return _problem(400, f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))

    @app.exception_handler(_TooLarge)
    async def _too_large(_request: Request, exc: _TooLarge) -> JSONResponse:
        return _problem(413, str(exc))

    async def read_body(request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise HTTPException(400, "bad Content-Length header") from None
            if size > limit:
                raise _TooLarge(f"body of {size} bytes is over the limit of {limit}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _TooLarge(f"body is over the limit of {limit} bytes")
        return bytes(body)

    def count(source: str, accepted: int = 0, rejected: int = 0) -> None:
        from workers.metrics import observe_ingest

        observe_ingest(source, accepted=accepted, rejected=rejected)

    async def publish(events: list[CloudEvent], source: str) -> list[str] | JSONResponse:
        import redis

        refused = [{"index": i, "id": e.id, "reason": reason} for i, e in enumerate(events)
                   if (reason := signal_only(e.type))]
        if refused:  # the adapters map to signals only; a defence, nothing should land here
            count(source, rejected=len(events))
            return _problem(400, refused[0]["reason"], rejected=refused, accepted=[])
        try:
            result = await run_in_threadpool(get_bus().publish_many, events)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("ingest.bus_unavailable", error=str(exc))
            return _problem(503, "event bus unavailable; nothing acknowledged, retry")
        except redis.ResponseError as exc:  # OOM under noeviction, READONLY after a failover
            reason = _redis_refusal(exc)
            log.warning("ingest.bus_refused", error=reason)
            return _problem(503, f"event bus refused the write ({reason}); nothing acknowledged, retry")
        count(source, accepted=len(result.published), rejected=len(result.rejected))
        if result.rejected:  # only size checks remain at this point; nothing should land here
            return _problem(400, "event(s) refused by the bus", accepted=result.published,
                            rejected=[{"index": i, "reason": r} for i, r in result.rejected])
        log.debug("ingest.accepted", count=len(result.published))
        return result.published

    def media_type(request: Request) -> str:
        return request.headers.get("content-type", JSON_TYPE).split(";", 1)[0].strip().lower() or JSON_TYPE

    def binary_event(request: Request, body: bytes) -> dict[str, Any]:
        raw: dict[str, Any] = {}
        for name, value in request.headers.items():
            if name.lower().startswith("ce-"):
                raw[name[3:].lower()] = value
        raw["datacontenttype"] = media_type(request)
        try:
            raw["data"] = load_json(body, strict=True) if body.strip() else {}
        except ValueError as exc:
            raise EventError(f"malformed JSON data: {exc}") from None
        return raw

    @app.post(
        "/events", status_code=202, response_model=Accepted, responses=_ERRORS, openapi_extra=_EVENT_BODY,
        dependencies=[Depends(require_token)], summary="Publish one CloudEvent or a batch",
    )
    async def post_events(request: Request):
        kind = media_type(request)
        binary = "ce-specversion" in request.headers
        if not binary and kind not in (BATCH_TYPE, STRUCTURED_TYPE, JSON_TYPE):
            return _problem(415, f"unsupported content type {kind!r}; use {STRUCTURED_TYPE}, {BATCH_TYPE} or {JSON_TYPE}")
        single = binary or kind == STRUCTURED_TYPE
        body = await read_body(request, min(max_event_bytes, body_limit) if single else body_limit)
        if binary:
            try:
                items: list[Any] = [binary_event(request, body)]
            except EventError as exc:
                count("http", rejected=1)
                return _problem(400, str(exc), rejected=[{"index": 0, "reason": str(exc)}])
        else:
            try:
                payload = load_json(body, strict=True)
            except ValueError as exc:
                reason = f"malformed JSON: {exc}"
                count("http", rejected=1)
                return _problem(400, reason, rejected=[{"index": 0, "reason": reason}])
            if kind == BATCH_TYPE and not isinstance(payload, list):
                reason = "a batch must be a JSON array of events"
                count("http", rejected=1)
                return _problem(400, reason, rejected=[{"index": 0, "reason": reason}])
            if isinstance(payload, list):
                if len(payload) > max_batch:
                    count("http", rejected=len(payload))
                    raise _TooLarge(f"batch of {len(payload)} events is over the limit of {max_batch}")
                items = payload
            else:
                if len(body) > max_event_bytes:
                    count("http", rejected=1)
                    raise _TooLarge(f"event of {len(body)} bytes is over the limit of {max_event_bytes}")
                items = [payload]
        events: list[CloudEvent] = []
        rejected: list[dict[str, Any]] = []
        for index, item in enumerate(items):
            try:
                if not isinstance(item, dict):
                    raise EventError(f"an event must be a JSON object, got {type(item).__name__}")
                event = parse_event(item, max_bytes=max_event_bytes)
                refused = signal_only(event.type)
                if refused:
                    raise EventError(refused)
                events.append(event)
            except EventError as exc:
                given = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else None
                rejected.append({"index": index, "id": given, "reason": str(exc)})
        if rejected:
            what = "event is invalid" if len(items) == 1 else f"{len(rejected)} of {len(items)} events are invalid; none was published"
            log.info("ingest.rejected", count=len(rejected), first=rejected[0]["reason"])
            count("http", rejected=len(items))  # a batch is refused whole
            return _problem(400, what if len(items) > 1 else rejected[0]["reason"], rejected=rejected, accepted=[])
        published = await publish(events, "http")
        if isinstance(published, JSONResponse):
            return published
        return {"accepted": published, "count": len(published)}

    @app.post(
        "/adapters/alertmanager", status_code=202, response_model=AdapterAccepted, responses=_ERRORS,
        openapi_extra=_JSON_BODY, dependencies=[Depends(require_token)],
        summary="Prometheus Alertmanager webhook (v4): firing alerts become signal events",
    )
    async def post_alertmanager(request: Request):
        body = await read_body(request, body_limit)
        try:
            result = alertmanager_events(load_json(body), max_event_bytes=max_event_bytes)
        except ValueError as exc:  # AdapterError and malformed JSON
            reason = str(exc) if isinstance(exc, AdapterError) else f"malformed JSON: {exc}"
            count("alertmanager", rejected=1)
            return _problem(400, reason)
        if len(result.events) > max_batch:
            count("alertmanager", rejected=len(result.events) + len(result.rejected))
            raise _TooLarge(f"{len(result.events)} alerts are over the limit of {max_batch}")
        if result.rejected:
            count("alertmanager", rejected=len(result.rejected))
        if result.rejected and not result.events:
            return _problem(400, f"no alert could be mapped ({len(result.rejected)} rejected)",
                            rejected=result.rejected, accepted=[], ignored_resolved=result.ignored_resolved)
        published = await publish(result.events, "alertmanager") if result.events else []
        if isinstance(published, JSONResponse):
            return published
        return {"accepted": published, "count": len(published), "rejected": result.rejected,
                "ignored_resolved": result.ignored_resolved}

    @app.post(
        "/adapters/evidently", status_code=202, response_model=Accepted, responses=_ERRORS,
        openapi_extra=_JSON_BODY, dependencies=[Depends(require_token)],
        summary="Evidently DataDriftPreset report: one drift.data event",
    )
    async def post_evidently(request: Request, model: str = Query(..., pattern=MODEL_NAME_PATTERN,
                                                                  description="The model the report is about.")):
        body = await read_body(request, body_limit)
        try:
            event = evidently_event(load_json(body), model, max_event_bytes=max_event_bytes)
        except RecursionError:  # parsed, but too deep for the report's hash
            count("evidently", rejected=1)
            return _problem(400, "the report is nested too deeply")
        except (ValueError, EventError) as exc:
            reason = str(exc) if isinstance(exc, (AdapterError, EventError)) else f"malformed JSON: {exc}"
            count("evidently", rejected=1)
            return _problem(400, reason)
        published = await publish([event], "evidently")
        if isinstance(published, JSONResponse):
            return published
        return {"accepted": published, "count": len(published)}

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}}, summary="Liveness and Redis reachability")
    def healthz():
        try:
            ok = bool(get_bus().redis.ping())
        except Exception as exc:  # noqa: BLE001 - any failure means not healthy
            log.warning("ingest.unhealthy", error=str(exc))
            ok = False
        return JSONResponse({"status": "ok" if ok else "unavailable", "redis": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics (events accepted/rejected by source)")
    def metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        import workers.metrics  # noqa: F401 - registers the metric families

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(CountResponses, routes=frozenset(r.path for r in app.routes if getattr(r, "path", None)))
    return app
