"""The FastAPI service: builds the engine at start-up and maps engine errors to HTTP."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from app import chunks, tiles
from app.encoders import EncodeError
from core.catalog import SearchError
from core.chunks import LimitError
from core.engine import Engine, ParamError, ReadFailed
from core.filters import FilterError
from core.plan import TileError
from core.settings import Settings

log = logging.getLogger("terrazzo")


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The service for one catalog. Pass `engine` to share one already built (tests, bench)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = engine is None
        app.state.engine = engine or Engine(settings)
        await asyncio.to_thread(app.state.engine.compute.warm)
        log.info("serving %s", app.state.engine.catalog.summary())
        print(app.state.engine.access_report(), flush=True)
        try:
            yield
        finally:
            if own:
                app.state.engine.close()

    app = FastAPI(
        title="Terrazzo",
        summary="Mosaics of STAC-GeoParquet catalogs of Cloud-Optimized GeoTIFFs.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(tiles.router)
    app.include_router(chunks.router)

    def error(status: int, exc: Exception, **extra: object) -> JSONResponse:
        return JSONResponse({"detail": str(exc), **extra}, status_code=status)

    @app.exception_handler(ParamError)
    @app.exception_handler(SearchError)
    @app.exception_handler(EncodeError)
    @app.exception_handler(FilterError)
    async def bad_parameter(request: Request, exc: Exception) -> JSONResponse:
        return error(400, exc)

    @app.exception_handler(LimitError)
    async def over_limit(request: Request, exc: Exception) -> JSONResponse:
        return error(413, exc)

    @app.exception_handler(TileError)
    async def no_such_tile(request: Request, exc: Exception) -> JSONResponse:
        return error(404, exc)

    @app.exception_handler(ReadFailed)
    async def read_failed(request: Request, exc: ReadFailed) -> JSONResponse:
        items = [{"id": i, "error": e} for i, e in exc.errors]
        return error(502, exc, items=items)

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

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info", summary="Catalog summary: item count, extent, dates, assets")
    async def info(request: Request) -> dict:
        return request.app.state.engine.catalog.summary()

    return app
