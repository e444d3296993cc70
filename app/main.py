"""The FastAPI service: builds the engine at start-up and maps engine errors to HTTP."""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from app import (
    analysis,
    catalog_routes,
    chunks,
    crops,
    landing,
    ogc,
    responses,
    stac_api,
    tiles,
    viewer,
)
from app.encoders import EncodeError
from app.guard import Guard
from app.head import HeadAsGet
from app.metrics import CONTENT_TYPE, Metrics
from app.observe import Observer
from app.proxy import ForwardedPrefix
from app.warm import WARM_MODULES
from core.catalog import SearchError, SearchQuery
from core.chunks import LimitError
from core.compute import WorkerDied
from core.engine import Engine, ParamError, ReadFailed
from core.filters import FilterError
from core.plan import TileError
from core.settings import Settings

log = logging.getLogger("terrazzo")
# Terrazzo's exceptions and the status each answers, most specific first (LimitError is a
# ParamError). ReadFailed and WorkerDied are 502: the service is fine, the upstream work
# failed (a compute worker that crashed on the job twice is already replaced).
ERRORS: dict[type[Exception], int] = {
    LimitError: 413,
    TileError: 404,
    ParamError: 400,
    SearchError: 400,
    EncodeError: 400,
    FilterError: 400,
    ReadFailed: 502,
    WorkerDied: 502,
    TimeoutError: 504,
}


class LoopLag:
    """Samples how late the event loop wakes from a 50 ms sleep: its lag, kept for 60 s."""

    def __init__(self, interval: float = 0.05, observe: Callable[[float], None] | None = None):
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=int(60 / interval))
        self.observe = observe

    async def run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval)
            lag = time.perf_counter() - started - self.interval
            self.samples.append(lag)
            if self.observe is not None:
                self.observe(lag)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        values = sorted(self.samples)
        pick = lambda q: round(1000 * values[min(len(values) - 1, int(q * len(values)))], 2)  # noqa: E731
        return {
            "p50": pick(0.5),
            "p99": pick(0.99),
            "max": round(1000 * values[-1], 2),
            "samples": len(values),
        }


def _guard(app: FastAPI) -> Guard | None:
    """The Guard instance in the built middleware stack (for its in-flight count)."""
    layer = getattr(app, "middleware_stack", None)
    while layer is not None and not isinstance(layer, Guard):
        layer = getattr(layer, "app", None)
    return layer


def _build_routes(app: FastAPI) -> None:
    """Build every included router's routes now, before serving.

    FastAPI (0.16x) builds an included router's routes (pydantic models, type adapters and
    validators of every route in it) on the first request that reaches it: on the event loop,
    while serving. Measured with a loop watchdog under bench/load at 32 clients: stalls of
    130-390 ms in `_populate_api_route_state` early in serving, and ~1,200 type adapters made
    after gc.freeze() for every full collection to walk again. Uses FastAPI's own methods when
    they exist (older versions build routes at include time and have none of them)."""
    for route in app.router.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            for _ in contexts():
                pass
        low = getattr(route, "effective_low_priority_routes", None)
        if callable(low):
            low()


def _prepare(app: FastAPI) -> None:
    """Start-up work that needs neither the engine nor the loop, in a thread."""
    _import(WARM_MODULES)
    _build_routes(app)
    _first_gdal_use()


def _first_gdal_use() -> None:
    """GDAL's and PROJ's one-time set-up in this process (driver registration, PROJ's
    database: the first `calculate_default_transform` took 43 ms quiet, the next 1-3 ms) now,
    not inside the first tiles' plans on the event loop (a loop watchdog under bench/load saw
    stalls of 60-220 ms there early in serving)."""
    import rasterio
    import rasterio.warp

    from core.plan import transformer

    with rasterio.Env():
        rasterio.warp.calculate_default_transform(
            "EPSG:32631", "EPSG:3857", 16, 16, left=5e5, bottom=4.98e6, right=5.3e5, top=5.01e6
        )
    transformer("EPSG:32631", "EPSG:4326").transform_bounds(5e5, 4.98e6, 5.3e5, 5.01e6)


def _import(modules: tuple[str, ...]) -> None:
    for name in modules:
        importlib.import_module(name)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The service for one catalog. Pass `engine` to share one already built (tests, bench)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = engine is None
        # imports and route building (_build_routes) overlap the catalog's opening
        preload = threading.Thread(target=_prepare, args=(app,), daemon=True)
        preload.start()
        # the compute workers start (and import the encoders) while the catalog opens
        app.state.engine = engine or Engine(settings, warm=WARM_MODULES)
        app.state.lag = LoopLag(observe=metrics.loop_lag.observe)
        if own:
            await asyncio.to_thread(app.state.engine.warmed)
        else:
            await asyncio.to_thread(app.state.engine.compute.warm, WARM_MODULES)
        await asyncio.to_thread(preload.join)
        # What start-up made (~190k objects: modules, functions, types) lives as long as the
        # process; frozen, the collector stops re-scanning it: each full collection under load
        # took 70-130 ms of the loop (measured with bench/load at 32 clients), now a few ms
        gc.collect()
        gc.freeze()
        # sampled from here: while serving (start-up's imports in threads hold the GIL)
        probe = asyncio.ensure_future(app.state.lag.run())
        log.info("serving %s", await app.state.engine.catalog.summary_async())
        print(app.state.engine.access_report(), flush=True)
        print(await app.state.engine.catalog.report_async(), flush=True)
        try:
            yield
        finally:
            probe.cancel()
            await app.state.engine.fetcher.stores.aclose()
            if own:
                app.state.engine.close()

    app = FastAPI(
        title="Terrazzo",
        summary="Mosaics of STAC-GeoParquet catalogs of Cloud-Optimized GeoTIFFs.",
        version="0.1.0",
        lifespan=lifespan,
        responses=responses.APP,
        docs_url=None,  # app.landing serves /docs and /redoc from vendored assets (no CDN)
        redoc_url=None,
    )
    app.include_router(landing.router)  # before the viewer: its /static mount is broader
    app.include_router(tiles.router)
    app.include_router(chunks.router)
    app.include_router(ogc.router)
    app.include_router(catalog_routes.router)
    app.include_router(stac_api.router)
    app.include_router(analysis.router)
    app.include_router(crops.router)
    app.include_router(viewer.router)
    app.add_middleware(HeadAsGet)
    app.add_middleware(Guard, settings=settings)
    if settings.cors_origins:  # outside the guard: its 401/413/414/503 carry CORS headers too
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "HEAD", "OPTIONS"] + ([] if origins == ["*"] else ["POST"]),
            allow_headers=["*"],
            allow_credentials=False,
            expose_headers=[
                "X-Terrazzo-Items",
                "X-Terrazzo-Errors",
                "X-Terrazzo-Truncated",
                "X-Terrazzo-Source",
                "Server-Timing",
                "Retry-After",
            ],
        )
    metrics = app.state.metrics = Metrics()
    metrics.watch(
        lambda: getattr(app.state, "engine", None),
        lambda: guard.inflight if (guard := _guard(app)) else 0,
    )
    app.add_middleware(Observer, metrics=metrics)  # sees 503s and 413s too
    app.add_middleware(ForwardedPrefix)  # outermost: everything sees the public path

    def error(status: int, exc: Exception, **extra: object) -> JSONResponse:
        return JSONResponse({"detail": str(exc), **extra}, status_code=status)

    async def from_table(request: Request, exc: Exception) -> JSONResponse:
        status = next(code for kind, code in ERRORS.items() if isinstance(exc, kind))
        if isinstance(exc, TimeoutError):
            limit = request.app.state.engine.settings.tile_timeout_s
            exc = TimeoutError(f"not done in {limit} s (TERRAZZO_TILE_TIMEOUT_S)")
        if isinstance(exc, ReadFailed):
            return error(status, exc, items=[{"id": i, "error": e} for i, e in exc.errors])
        return error(status, exc)

    for kind in ERRORS:
        app.add_exception_handler(kind, from_table)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "parameter": ".".join(str(p) for p in e.get("loc", ())[1:]) or "body",
                "problem": e.get("msg"),
                "got": e.get("input"),
            }
            for e in exc.errors()
        ]
        summary = "; ".join(f"{p['parameter']}: {p['problem']}" for p in problems)
        return JSONResponse({"detail": summary, "errors": problems}, status_code=422)

    @app.get("/healthz", summary="Liveness: the process answers", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: the catalog and the compute pool answer",
        tags=["service"],
        responses={503: {"description": "Not ready: the failing check is named"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Ready when the catalog answers and the compute pool runs a job, each within 2 s."""
        engine = request.app.state.engine
        checks = {}
        try:
            async with asyncio.timeout(2):
                await engine.catalog.search(SearchQuery(limit=1))
            checks["catalog"] = "ok"
        except Exception as exc:
            checks["catalog"] = f"{type(exc).__name__}: {exc}"
        try:
            async with asyncio.timeout(2):
                await engine.compute.ping()
            checks["compute_pool"] = "ok"
        except Exception as exc:
            checks["compute_pool"] = f"{type(exc).__name__}: {exc}"
        ready = all(v == "ok" for v in checks.values())
        return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)

    @app.get("/stats", summary="Event-loop lag, requests in flight, cache and fetch counters")
    async def stats(request: Request) -> dict:
        engine = request.app.state.engine
        return {
            "loop_lag_ms": request.app.state.lag.summary(),
            "fetch": engine.fetcher.stats,
            "tile_cache": {
                "hits": engine.fetcher.tiles.hits,
                "misses": engine.fetcher.tiles.misses,
                "bytes": engine.fetcher.tiles.bytes,
            },
            "inflight": guard.inflight if (guard := _guard(request.app)) else None,
            "compute": engine.compute.stats(),
        }

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        tags=["service"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Text exposition"}},
    )
    async def prometheus(request: Request) -> Response:
        """Prometheus text format: requests, latency and stage histograms, caches, pool."""
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/info", summary="Catalog summary: item count, extent, dates, assets")
    async def info(request: Request) -> dict:
        return await request.app.state.engine.catalog.summary_async()

    return app
