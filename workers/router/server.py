"""The router's HTTP server (FastAPI): predict, feedback, health and Prometheus metrics.

``POST /models/{name}/predict``   ``{"request_id"?: str, "features": {...} | [{...}, ...]}``
                                  -> ``{"request_id", "version", "prediction", "score"}``
``POST /models/{name}/feedback``  ``{"request_id": str, "label": str | number | bool}`` -> 202
``GET /healthz``                  200 when every served model has a production version (or none is
                                  served yet), else 503
``GET /metrics``                  Prometheus exposition of the series below

Which models: with a model list, those (opened at start; any other name is 404). Without one,
every model in the registry: those registered at start are opened then, and a name the server
does not hold yet is looked up in the registry's model set on its first request, so a model
registered later is served without a restart (:class:`RouterPool`). A fresh system therefore
starts a router with no models.

Errors are JSON ``{"detail": "<one line>"}``, never a traceback: 404 for an unknown model or one
with no production version, 422 for a body that does not match the schema (or is not JSON), 400
for features the routed version cannot use, 500 when the model itself raised, 503 when Redis
cannot be read to look a model up.

Metrics (this server's own registry; the workers' names are in :mod:`workers.metrics`):

==============================================================  ==========================================
``retrain_router_requests_total{model,version,served_by}``      predictions answered (``served_by``:
                                                                ``production``/``candidate``)
``retrain_router_errors_total{model,version,kind}``             failed predictions: ``features`` (400),
                                                                ``model`` (500), ``no_production`` (404,
                                                                version empty)
``retrain_router_latency_seconds{model,version}``               histogram, features to answer
``retrain_router_feedback_total{model}``                        feedback labels accepted
``retrain_router_shadow_requests_total{model}``                 mirrored requests the shadow answered
``retrain_router_shadow_errors_total{model}``                   mirrored requests the shadow failed
``retrain_router_shadow_dropped_total{model}``                  mirrors dropped (queue full, shadow down)
``retrain_router_records_written_total{model}``                 request records written to the stream
``retrain_router_records_dropped_total{model}``                 request records dropped (buffer full)
``retrain_router_load_failures_total{model}``                   versions refused on load
``retrain_router_traffic_revision{model}``                      traffic table revision served
``retrain_router_candidate_percent{model,candidate}``           share of requests routed to the candidate
``retrain_router_loaded_versions{model}``                       versions held in memory
==============================================================  ==========================================

Requests naming a model the server does not serve are answered 404 and not counted (their names
are the client's, an unbounded label set).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import redis
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from workers.router.router import FeatureError, NoProductionVersion, PredictionError, Router

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_REQUEST_ID = 256
MAX_ROWS_PER_REQUEST = 10_000
"""Rows one predict request may carry: the request log buffers 100,000 records, and one huge batch
would make it drop other clients' records (their feedback could never be joined)."""
MAX_BODY_BYTES = 16 * 1024 * 1024
"""A request body declared larger than this is refused before it is read."""
DISCOVERY_INTERVAL_S = 1.0
"""Without a model list, the registry's model set is re-read at most this often for names the
server does not hold: a negative cache, so unknown names cost one Redis read per interval
whatever their number, and a newly registered model waits at most this long."""


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(None, min_length=1, max_length=MAX_REQUEST_ID)
    features: dict[str, Any] | list[dict[str, Any]]


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=MAX_REQUEST_ID)
    label: StrictBool | StrictInt | StrictFloat | StrictStr


class _RouterCollector:
    """Exposes the routers' background counters (shadow, log, loads, table) at scrape time."""

    def __init__(self, routers: Callable[[], dict[str, Router]]):
        self._routers = routers

    def collect(self) -> Iterable[Any]:
        counters = {
            "shadow_requests": ("retrain_router_shadow_requests", "Mirrored requests answered by the shadow version"),
            "shadow_errors": ("retrain_router_shadow_errors", "Mirrored requests the shadow version failed"),
            "shadow_dropped": ("retrain_router_shadow_dropped", "Mirrors dropped (queue full or shadow down)"),
            "records_written": ("retrain_router_records_written", "Request records written to the stream"),
            "records_dropped": ("retrain_router_records_dropped", "Request records dropped (buffer full)"),
            "load_failures": ("retrain_router_load_failures", "Model versions refused on load"),
        }
        families = {k: CounterMetricFamily(name, doc, labels=["model"]) for k, (name, doc) in counters.items()}
        revision = GaugeMetricFamily("retrain_router_traffic_revision", "Traffic table revision served",
                                     labels=["model"])
        percent = GaugeMetricFamily("retrain_router_candidate_percent", "Share of requests routed to the candidate",
                                    labels=["model", "candidate"])
        loaded = GaugeMetricFamily("retrain_router_loaded_versions", "Model versions held in memory", labels=["model"])
        for name, router in self._routers().items():
            status = router.status()
            stats = status["stats"]
            for key, family in families.items():
                family.add_metric([name], float(stats.get(key, 0)))
            revision.add_metric([name], float(status["table"]["revision"]))
            serving = status["serving"]
            percent.add_metric([name, serving["candidate"] or ""],
                               status["table"]["candidate_percent"] if serving["candidate"] else 0.0)
            loaded.add_metric([name], float(len(status["loaded"])))
        yield from families.values()
        yield from (revision, percent, loaded)


class UnknownModel(LookupError):
    """The server does not serve this model (not registered, or not in its model list)."""


class RouterPool:
    """The routers of one server, by model name: a fixed list, or every model in the registry.

    Parameters
    ----------
    models : sequence of str or None
        Serve only these (opened by :meth:`start`). ``None``: every registered model -- those
        listed at start are opened then, any other name is looked up on its first request.
    open_router : callable
        ``name -> Router``.
    list_models : callable
        ``() -> names`` registered now (the registry's model set).
    discovery_interval : float
        Shortest time between two reads of the model set for a name not held (a negative cache).
    """

    def __init__(self, models: Sequence[str] | None, open_router: Callable[[str], Router],
                 list_models: Callable[[], Iterable[str]], discovery_interval: float = DISCOVERY_INTERVAL_S):
        self.fixed = tuple(dict.fromkeys(models)) if models is not None else None
        self._open = open_router
        self._list_models = list_models
        self._interval = discovery_interval
        # Replaced, never mutated: the request path and /metrics read it without the lock.
        self._routers: dict[str, Router] = {}
        self._lock = threading.Lock()
        self._registered: frozenset[str] = frozenset()
        self._listed_at: float | None = None
        self._closed = False

    @property
    def discover(self) -> bool:
        """True when any registered model is served (no fixed list)."""
        return self.fixed is None

    def routers(self) -> dict[str, Router]:
        """The routers open now (a snapshot)."""
        return self._routers

    def start(self) -> None:
        """Open the listed models, or every model registered now (possibly none)."""
        with self._lock:
            names = self.fixed if self.fixed is not None else sorted(self._list())
            for name in names:
                self._add(name)

    def get(self, name: str) -> Router:
        """The router of ``name``, opened on first use when the registry holds the model.

        Raises
        ------
        UnknownModel
            Not served (one line saying why).
        redis.RedisError
            The registry could not be read.
        """
        router = self._routers.get(name)
        if router is not None:
            return router
        with self._lock:
            router = self._routers.get(name)
            if router is not None:
                return router
            if self._closed:
                raise UnknownModel(f"unknown model {name!r}: the server is shutting down")
            if self.fixed is not None:
                shown = ", ".join(self.fixed[:10]) + (" ..." if len(self.fixed) > 10 else "")
                raise UnknownModel(f"unknown model {name!r}: this server serves only {shown}")
            stale = self._listed_at is None or time.monotonic() - self._listed_at >= self._interval
            if name not in self._registered and stale:
                self._list()
            if name not in self._registered:
                raise UnknownModel(f"unknown model {name!r}: not in the registry")
            router = self._add(name)
            log.info("router.discovered", model=name)
            return router

    def close(self) -> None:
        """Close every router; later lookups are refused."""
        with self._lock:
            self._closed = True
            routers, self._routers = self._routers, {}
        for router in routers.values():
            router.close()

    def _list(self) -> frozenset[str]:
        self._registered = frozenset(self._list_models())
        self._listed_at = time.monotonic()
        return self._registered

    def _add(self, name: str) -> Router:
        router = self._open(name)
        self._routers = {**self._routers, name: router}
        return router


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: such values (a regressor's NaN, say) are answered as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _validation_reason(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request body"


def create_app(models: Sequence[str] | None = None, *, client=None, keys=None, registry=None,
               router_factory: Callable[[str], Router] | None = None,
               discovery_interval: float = DISCOVERY_INTERVAL_S, **router_options: Any) -> FastAPI:
    """Build the app (routers open with the app and close with it).

    Parameters
    ----------
    models : sequence of str, optional
        Serve only these model names (any other name answers 404). ``None`` (default): every
        model in the registry, including ones registered after the server started.
    client, keys, registry
        Passed to each :class:`~workers.router.router.Router` (defaults from settings); the
        registry (or ``Registry(client, keys)``) also lists the models to serve.
    router_factory : callable, optional
        ``name -> Router``, replacing the default construction (tests, custom registries).
    discovery_interval : float
        Without ``models``: shortest time between two registry lookups for names not served yet.
    **router_options
        Extra keyword arguments for :class:`Router` (``check_interval``, ``flush_interval``...).
    """
    metrics = CollectorRegistry()
    requests_total = Counter("retrain_router_requests", "Requests answered", ["model", "version", "served_by"],
                             registry=metrics)
    errors_total = Counter("retrain_router_errors", "Requests that failed", ["model", "version", "kind"],
                           registry=metrics)
    latency = Histogram("retrain_router_latency_seconds", "Model latency (features to answer)",
                        ["model", "version"], buckets=LATENCY_BUCKETS, registry=metrics)
    feedback_total = Counter("retrain_router_feedback", "Feedback labels accepted", ["model"], registry=metrics)

    def make(name: str) -> Router:
        if router_factory is not None:
            return router_factory(name)
        return Router(name, client, keys, registry, **router_options)

    def registered() -> list[str]:
        nonlocal registry
        if registry is None:
            from config.keys import keys_from_settings
            from config.settings import get_settings
            from workers.connections import get_redis
            from workers.registry.store import Registry

            registry = Registry(client if client is not None else get_redis(),
                                keys if keys is not None else keys_from_settings(get_settings()))
        return registry.models()

    pool = RouterPool(models, make, registered, discovery_interval)
    metrics.register(_RouterCollector(pool.routers))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            pool.start()
            log.info("router.serving", models=list(pool.routers()), discover=pool.discover)
            yield
        finally:
            pool.close()

    app = FastAPI(title="retrain router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.routers = pool
    app.state.metrics = metrics

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"request body of {declared} bytes is over the limit of {MAX_BODY_BYTES}")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_reason(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("router.http_error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return _error(500, f"internal error ({type(exc).__name__})")

    def router_for(name: str) -> Router | JSONResponse:
        try:
            return pool.get(name)
        except UnknownModel as exc:
            return _error(404, str(exc))
        except redis.RedisError as exc:
            log.warning("router.lookup_failed", model=name, error=f"{type(exc).__name__}: {exc}")
            return _error(503, f"cannot look model {name!r} up in the registry ({type(exc).__name__}); retry")

    @app.post("/models/{name}/predict")
    def predict(name: str, body: PredictBody):
        if isinstance(body.features, list) and len(body.features) > MAX_ROWS_PER_REQUEST:
            return _error(413, f"{len(body.features)} rows in one request, over the limit of {MAX_ROWS_PER_REQUEST}")
        router = router_for(name)
        if isinstance(router, JSONResponse):
            return router
        try:
            answer = router.predict(body.features, body.request_id)
        except NoProductionVersion as exc:
            errors_total.labels(name, "", "no_production").inc()
            return _error(404, str(exc))
        except FeatureError as exc:
            errors_total.labels(name, exc.version or "", "features").inc()
            return _error(400, str(exc))
        except PredictionError as exc:
            errors_total.labels(name, exc.version, "model").inc()
            return _error(500, str(exc))
        requests_total.labels(name, answer.version, answer.served_by).inc()
        latency.labels(name, answer.version).observe(answer.latency_ms / 1000.0)
        return {"request_id": answer.request_id, "version": answer.version,
                "prediction": _finite(answer.prediction), "score": _finite(answer.score)}

    @app.post("/models/{name}/feedback", status_code=202)
    def feedback(name: str, body: FeedbackBody):
        router = router_for(name)
        if isinstance(router, JSONResponse):
            return router
        try:
            router.feedback(body.request_id, body.label)
        except FeatureError as exc:
            return _error(400, str(exc))
        feedback_total.labels(name).inc()
        return {"accepted": True, "request_id": body.request_id}

    @app.get("/healthz")
    def healthz():
        report = {}
        ok = True
        for name, router in pool.routers().items():
            status = router.status()
            serving = status["serving"]
            ok = ok and serving["production"] is not None
            report[name] = {**serving, "revision": status["table"]["revision"], "loaded": status["loaded"],
                            "load_errors": status["load_errors"]}
        body = {"status": "ok" if ok else "degraded", "models": report, "discover": pool.discover}
        if not report:
            body["detail"] = ("no model served yet; a model registered in the registry is served from its "
                              "first request" if pool.discover else "no model served")
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app
