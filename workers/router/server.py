"""The router's HTTP server (FastAPI): predict, feedback, health and Prometheus metrics.

``POST /models/{name}/predict``   ``{"request_id"?: str, "features": {...} | [{...}, ...]}``
                                  -> ``{"request_id", "version", "prediction", "score"}``
``POST /models/{name}/feedback``  ``{"request_id": str, "label": str | number | bool}`` -> 202
``GET /healthz``                  200 when every served model has a production version, else 503
``GET /metrics``                  Prometheus exposition (requests, errors, latency by model and
                                  version; shadow mirrors, drops and errors; traffic revision)

Errors are JSON ``{"detail": "<one line>"}``, never a traceback: 404 for an unknown model or one
with no production version, 422 for a body that does not match the schema (or is not JSON), 400
for features the routed version cannot use, 500 when the model itself raised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

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


def create_app(models: Sequence[str], *, client=None, keys=None, registry=None,
               router_factory: Callable[[str], Router] | None = None, **router_options: Any) -> FastAPI:
    """Build the app serving ``models`` (routers start with the app and close with it).

    Parameters
    ----------
    models : sequence of str
        Model names to serve; any other name answers 404.
    client, keys, registry
        Passed to each :class:`~workers.router.router.Router` (defaults from settings).
    router_factory : callable, optional
        ``name -> Router``, replacing the default construction (tests, custom registries).
    **router_options
        Extra keyword arguments for :class:`Router` (``check_interval``, ``flush_interval``...).
    """
    routers: dict[str, Router] = {}
    metrics = CollectorRegistry()
    requests_total = Counter("retrain_router_requests", "Requests answered", ["model", "version", "served_by"],
                             registry=metrics)
    errors_total = Counter("retrain_router_errors", "Requests that failed", ["model", "version", "kind"],
                           registry=metrics)
    latency = Histogram("retrain_router_latency_seconds", "Model latency (features to answer)",
                        ["model", "version"], buckets=LATENCY_BUCKETS, registry=metrics)
    feedback_total = Counter("retrain_router_feedback", "Feedback labels accepted", ["model"], registry=metrics)
    metrics.register(_RouterCollector(lambda: dict(routers)))

    def make(name: str) -> Router:
        if router_factory is not None:
            return router_factory(name)
        return Router(name, client, keys, registry, **router_options)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            for name in dict.fromkeys(models):
                routers[name] = make(name)
            log.info("router.serving", models=list(routers))
            yield
        finally:
            for router in routers.values():
                router.close()
            routers.clear()

    app = FastAPI(title="retrain router", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.routers = routers
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_reason(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("router.http_error", path=request.url.path, error=f"{type(exc).__name__}: {exc}")
        return _error(500, f"internal error ({type(exc).__name__})")

    def router_for(name: str) -> Router | JSONResponse:
        router = routers.get(name)
        if router is None:
            return _error(404, f"unknown model {name!r}")
        return router

    @app.post("/models/{name}/predict")
    def predict(name: str, body: PredictBody):
        router = router_for(name)
        if isinstance(router, JSONResponse):
            return router
        try:
            answer = router.predict(body.features, body.request_id)
        except NoProductionVersion as exc:
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
        for name, router in routers.items():
            status = router.status()
            serving = status["serving"]
            ok = ok and serving["production"] is not None
            report[name] = {**serving, "revision": status["table"]["revision"], "loaded": status["loaded"],
                            "load_errors": status["load_errors"]}
        body = {"status": "ok" if ok else "degraded", "models": report}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    return app
