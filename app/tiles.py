"""Tile routes: GET /tiles/{tms}/{z}/{x}/{y}[.{format}] and the read plan behind a tile."""

from __future__ import annotations

import asyncio
import hashlib
import time
from functools import partial
from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response

from app import responses
from app.encoders import FORMATS, default_format, encode, plain_png
from app.headers import final, nothing, read_headers
from app.params import (
    RenderParams,
    TileParams,
    api_router,
    read_params,
    render_params,
    search_query,
    tile_params,
)
from core.catalog import SearchQuery
from core.engine import Engine, ParamError, ReadParams
from core.plan import tile_grid

router = api_router("tiles")
DEFAULT_TMS = "WebMercatorQuad"

Z = Annotated[int, Path(description="Zoom level", ge=0)]
X = Annotated[int, Path(description="Tile column", ge=0)]
Y = Annotated[int, Path(description="Tile row", ge=0)]
Tilesize = Annotated[int, Query(ge=1, description="Output tile width and height in pixels.")]
Format = str | None  # a path parameter on the suffixed route, a query parameter on the other
Scale = int  # @{scale}x in the path, else a query parameter (TiTiler's), 1 to MAX_SCALE
MAX_SCALE = 4
TILE_RESPONSES: dict = {"response_class": Response, "responses": responses.TILE}


def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def render_tile(
    request: Request,
    tms: str,
    z: int,
    x: int,
    y: int,
    fmt: str | None,
    tilesize: int,
    query: SearchQuery,
    params: ReadParams,
    render: RenderParams,
    tile: TileParams,
) -> Response:
    started = time.perf_counter()
    engine = _engine(request)
    if fmt is not None and fmt not in FORMATS:
        raise ParamError(f"format: unknown {fmt!r}; choose one of {sorted(FORMATS)}")
    limit = engine.settings.max_tilesize
    if tilesize > limit:
        raise ParamError(f"tilesize: {tilesize} is above this server's limit of {limit}")
    grid = tile.output_grid(tile_grid(tms, z, x, y, tilesize))
    etag = await _etag(request, engine)
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=_cacheable(engine, etag))
    async with asyncio.timeout(engine.settings.tile_timeout_s):  # cancels the work, then 504
        mosaic = await engine.read(tile.read_grid(grid), query, params)
    if mosaic is not None and tile.padding:
        mosaic.data, mosaic.valid = tile.crop(mosaic.data, mosaic.valid)
        if not mosaic.valid.any() and not mosaic.plan.truncated:
            mosaic = None  # data only in the padding: nothing here, as without it
    if (empty := nothing(mosaic)) is not None:
        return empty
    assert mosaic is not None
    options = render.options()
    if fmt is None:
        fmt = default_format(mosaic.data.dtype, bool(mosaic.valid.all()), options)
    with mosaic.clock.stage("encode"):
        job = partial(encode, **options, crs=grid.crs, transform=tuple(grid.transform)[:6])
        if plain_png(mosaic.data, fmt, options):  # numpy and ISA-L, off the GIL: a thread
            body = await asyncio.to_thread(job, mosaic.data, mosaic.valid, fmt)
        else:
            body = await engine.compute.run(job, mosaic.data, mosaic.valid, fmt)
    total = time.perf_counter() - started
    request.app.state.metrics.observe_stages(mosaic.clock)
    headers = {
        **read_headers([mosaic]),
        "X-Terrazzo-Source": mosaic.plan.source,  # "pyramid" (pre-rendered) or "dynamic"
        "Server-Timing": mosaic.clock.server_timing({"total": total}),
    }
    if final([mosaic]):
        headers.update(_cacheable(engine, etag))
    else:
        headers["Cache-Control"] = "no-store"  # an item failed or was left out: not final
    return Response(body, media_type=FORMATS[fmt][1], headers=headers)


async def _etag(request: Request, engine: Engine) -> str:
    """A tile is a function of the catalog file in use and the request (COG assets are
    immutable, as STAC assets are by convention): hash both, no pixel read needed."""
    params = sorted(request.query_params.multi_items())
    key = f"{await engine.catalog.version_async()}|{request.url.path}|{params}"
    return '"' + hashlib.blake2b(key.encode(), digest_size=12).hexdigest() + '"'


def _cacheable(engine: Engine, etag: str) -> dict[str, str]:
    """Shared caches may keep an open server's tiles; behind an API key only the caller's own
    cache may (`private`), and `Vary` names the key headers for any cache that ignores that."""
    age = engine.settings.cache_max_age_s
    if engine.settings.api_key:
        return {
            "ETag": etag,
            "Cache-Control": f"private, max-age={age}",
            "Vary": "X-API-Key, Authorization",
        }
    return {"ETag": etag, "Cache-Control": f"public, max-age={age}"}


async def _assets(
    engine: Engine, tms: str, z: int, x: int, y: int, query: SearchQuery, params: ReadParams
) -> list[dict]:
    grid = tile_grid(tms, z, x, y)
    read_plan = await engine.plan(grid, query, params)
    return [
        {
            "id": item.item_id,
            "collection": item.collection,
            "datetime": item.datetime,
            "assets": {r.asset: r.href for r in item.reads},
        }
        for item in read_plan.items
    ]


# Declared before the tile routes: "/tiles/{tms}/{z}/{x}/{y}" would otherwise match ".../assets".
@router.get(
    "/tiles/{tileMatrixSetId}/{z}/{x}/{y}/assets",
    summary="The items (and asset hrefs) a tile reads, in mosaic order",
    responses=responses.NOT_FOUND,
)
async def tile_assets_tms(
    request: Request,
    tileMatrixSetId: str,
    z: Z,
    x: X,
    y: Y,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
) -> list[dict]:
    return await _assets(_engine(request), tileMatrixSetId, z, x, y, query, params)


@router.get(
    "/tiles/{z}/{x}/{y}/assets",
    summary="The items a WebMercatorQuad tile reads",
    responses=responses.NOT_FOUND,
)
async def tile_assets(
    request: Request,
    z: Z,
    x: X,
    y: Y,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
) -> list[dict]:
    return await _assets(_engine(request), DEFAULT_TMS, z, x, y, query, params)


@router.get("/point/{lon},{lat}", summary="Each covering item's pixel values at a lon/lat point")
async def point(
    request: Request,
    lon: float,
    lat: float,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
) -> dict:
    engine = _engine(request)
    async with asyncio.timeout(engine.settings.tile_timeout_s):
        items = await engine.point(lon, lat, query, params)
    return {"coordinates": [lon, lat], "items": items}


# One handler per matrix-set form, each on four paths: `.{format}` in the path or the
# `format` query parameter (omitted: PNG, or JPEG for a full 8-bit tile), with or without
# TiTiler's `@{scale}x` (tiles of scale x tilesize pixels over the same ground). The most
# suffixed path is registered first (the decorator nearest the function): "{y}" would match
# "3.png" and "3@2x".
@router.get("/tiles/{tileMatrixSetId}/{z}/{x}/{y}", summary="Mosaic tile", **TILE_RESPONSES)
@router.get(
    "/tiles/{tileMatrixSetId}/{z}/{x}/{y}.{format}",
    summary="Mosaic tile in a format",
    **TILE_RESPONSES,
)
@router.get(
    "/tiles/{tileMatrixSetId}/{z}/{x}/{y}@{scale}x",
    summary="Mosaic tile, scale x tilesize pixels",
    **TILE_RESPONSES,
)
@router.get(
    "/tiles/{tileMatrixSetId}/{z}/{x}/{y}@{scale}x.{format}",
    summary="Mosaic tile in a format, scale x tilesize pixels",
    **TILE_RESPONSES,
)
async def tile_tms(
    request: Request,
    tileMatrixSetId: str,
    z: Z,
    x: X,
    y: Y,
    format: Format = None,
    scale: Scale = 1,
    tilesize: Tilesize = 256,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
    tile: TileParams = Depends(tile_params),
) -> Response:
    size = _scaled(tilesize, scale)
    return await render_tile(
        request, tileMatrixSetId, z, x, y, format, size, query, params, render, tile
    )


@router.get("/tiles/{z}/{x}/{y}", summary="WebMercatorQuad tile", **TILE_RESPONSES)
@router.get(
    "/tiles/{z}/{x}/{y}.{format}", summary="WebMercatorQuad tile in a format", **TILE_RESPONSES
)
@router.get("/tiles/{z}/{x}/{y}@{scale}x", summary="WebMercatorQuad tile, scaled", **TILE_RESPONSES)
@router.get(
    "/tiles/{z}/{x}/{y}@{scale}x.{format}",
    summary="WebMercatorQuad tile in a format, scaled",
    **TILE_RESPONSES,
)
async def tile(
    request: Request,
    z: Z,
    x: X,
    y: Y,
    format: Format = None,
    scale: Scale = 1,
    tilesize: Tilesize = 256,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
    tile: TileParams = Depends(tile_params),
) -> Response:
    size = _scaled(tilesize, scale)
    return await render_tile(
        request, DEFAULT_TMS, z, x, y, format, size, query, params, render, tile
    )


def _scaled(tilesize: int, scale: int) -> int:
    if not 1 <= scale <= MAX_SCALE:
        raise ParamError(f"scale: @{scale}x is not 1 to {MAX_SCALE}, e.g. @2x for 512 pixels")
    return tilesize * scale


@router.get(
    "/plan/{tileMatrixSetId}/{z}/{x}/{y}",
    summary="The read plan behind a tile",
    responses=responses.NOT_FOUND,
)
async def plan(
    request: Request,
    tileMatrixSetId: str,
    z: Z,
    x: X,
    y: Y,
    tilesize: Tilesize = 256,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
) -> dict:
    engine = _engine(request)
    grid = tile_grid(tileMatrixSetId, z, x, y, tilesize)
    read_plan = await engine.plan_read(grid, query, params)  # the pyramid's, if it serves
    return {**read_plan.to_dict(), "text": read_plan.describe()}
