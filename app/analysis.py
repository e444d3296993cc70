"""Statistics over an area: GET /statistics (bbox), POST /statistics (GeoJSON), issue 17.

Both read the area through the engine's read path (`Engine.read` on a `Grid` of the area in
the output CRS: search, plan, fetch, warp, mosaic, with every read and search parameter of
the tile routes) and compute rio-tiler's statistics of the mosaic in the compute pool
(`core.statistics`). Names follow TiTiler's /statistics: `categorical`, `c`/`categories`,
`p`/`percentiles`, `histogram_bins`, `histogram_range`, `max_size`, `width`, `height`,
`dst_crs`, `coord_crs`, `cover_scale`; `bbox`, `bbox_crs`, `resolution` and `coverage` are
Terrazzo's (a mosaic has no single dataset to preview, and no native size).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from functools import partial
from typing import Annotated, Any, Literal

import numpy as np
import pyproj
import shapely.geometry
from fastapi import Body, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from app import responses
from app.headers import read_headers
from app.params import _boolean, api_router, read_params, search_query
from app.query import query_parameters
from core.catalog import SearchQuery
from core.chunks import LimitError, check_crs, output_layout
from core.engine import Engine, Mosaic, ParamError, ReadParams
from core.plan import Grid, reproject_bounds
from core.statistics import (
    DEFAULT_COVER_SCALE,
    StatisticsError,
    StatsOptions,
    area_statistics,
    check_coverage_size,
)

router = api_router("analysis")

LONLAT = "EPSG:4326"
DEFAULT_MAX_SIZE = 1024  # rio-tiler's Reader.statistics default
MAX_FEATURES = 100  # features of one POST /statistics, each its own read
GEOMETRIES = ("Polygon", "MultiPolygon")
GEOJSON = "application/geo+json"

STATS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "`{band name: statistics}`: rio-tiler's figures (min, max, mean, count, "
        "sum, std, median, majority, minority, unique, histogram [counts, edges], valid_percent, "
        "masked_pixels, valid_pixels, percentile_{p}); null where no pixel is valid",
        "content": {"application/json": {}},
    },
    **responses.BAD,
    413: responses.GUARD[413],
    502: responses.TILE[502],
    504: responses.TILE[504],
}
FEATURE_RESPONSES: dict[int | str, dict[str, Any]] = {
    **STATS_RESPONSES,
    200: {
        "description": "The Feature or FeatureCollection, each feature with "
        "`properties.statistics` = `{band name: statistics}` of the pixels inside it",
        "content": {GEOJSON: {}},
    },
}


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _floats(name: str, text: str, count: int | None = None) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or (count is not None and len(values) != count):
        want = f"{count} comma-separated numbers" if count else "comma-separated numbers"
        raise ParamError(f"{name}: expected {want}, got {text!r}")
    if not all(math.isfinite(v) for v in values):
        raise ParamError(f"{name}: finite numbers only, got {text!r}")
    return values


def _int(name: str, text: str | None, low: int = 1) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ParamError(f"{name}: expected an integer, got {text!r}") from None
    if value < low:
        raise ParamError(f"{name}: must be at least {low}, got {value}")
    return value


def _crs(name: str, value: str) -> str:
    try:
        check_crs(value)
    except ParamError as exc:
        raise ParamError(str(exc).replace("crs:", f"{name}:", 1)) from None
    return value


@query_parameters
async def stats_options(
    categorical: str | None = Query(
        None, description="`true`: counts of each value (or of `categories`), no histogram bins."
    ),
    c: list[str] | None = Query(
        None, description="Values whose pixel counts categorical statistics report (TiTiler)."
    ),
    categories: list[str] | None = Query(None, description="Alias of `c`."),
    p: list[str] | None = Query(
        None, description="Percentiles to report, integers 0..100 (default 2,98; TiTiler)."
    ),
    percentiles: list[str] | None = Query(None, description="Alias of `p`."),
    histogram_bins: str | None = Query(
        None, description="Bin count (default 10) or comma-separated increasing bin edges."
    ),
    histogram_range: str | None = Query(
        None, description="`min,max` of the bins (default: the data's min and max)."
    ),
) -> StatsOptions:
    cats = ",".join([*(c or []), *(categories or [])])
    pcts = ",".join([*(p or []), *(percentiles or [])])
    pct_values = _floats("percentiles", pcts) if pcts else None
    if pct_values and any(v != int(v) for v in pct_values):
        raise ParamError(f"percentiles: integers 0..100, got {pcts!r}")
    bins: int | tuple[float, ...] = 10
    if histogram_bins is not None:
        edges = _floats("histogram_bins", histogram_bins)
        if len(edges) == 1:
            if edges[0] != int(edges[0]):
                raise ParamError(f"histogram_bins: a bin count is an integer, got {edges[0]}")
            bins = int(edges[0])
        else:
            bins = edges
    hist_range = None
    if histogram_range is not None:
        lo, hi = _floats("histogram_range", histogram_range, 2)
        hist_range = (lo, hi)
    try:
        return StatsOptions(
            categorical=_boolean("categorical", categorical),
            categories=_floats("categories", cats) if cats else (),
            percentiles=tuple(int(v) for v in pct_values) if pct_values else (2, 98),
            bins=bins,
            range=hist_range,
        )
    except StatisticsError as exc:
        raise ParamError(str(exc)) from None


@query_parameters
async def size_params(
    max_size: str | None = Query(
        None,
        description=f"Longest side of the read in pixels (default {DEFAULT_MAX_SIZE}); "
        "ignored when width or height is given.",
    ),
    width: str | None = Query(None, description="Output width in pixels."),
    height: str | None = Query(None, description="Output height in pixels."),
    resolution: str | None = Query(
        None, description="Pixel size in the output CRS's units (instead of a size)."
    ),
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max_size": _int("max_size", max_size),
        "width": _int("width", width),
        "height": _int("height", height),
        "resolution": None,
    }
    if resolution is not None:
        if out["width"] or out["height"] or out["max_size"]:
            raise ParamError("resolution: give either resolution or width/height/max_size")
        (res,) = _floats("resolution", resolution, 1)
        if not res > 0:
            raise ParamError(f"resolution: must be positive, got {resolution!r}")
        out["resolution"] = res
    return out


@query_parameters
async def output_crs(
    dst_crs: str | None = Query(
        None, description="CRS of the grid the statistics are computed on (TiTiler's name)."
    ),
    crs: str | None = Query(None, description="Alias of `dst_crs`."),
) -> str | None:
    if dst_crs and crs and dst_crs != crs:
        raise ParamError("dst_crs, crs: the same parameter twice with different values")
    value = dst_crs or crs
    return _crs("dst_crs", value) if value else None


def area_grid(
    bounds: tuple[float, float, float, float],
    bounds_crs: str,
    crs: str,
    size: dict[str, Any],
    max_pixels: int,
) -> Grid:
    """The output grid of an area: `bounds` (in `bounds_crs`, densified into `crs` as
    rio-tiler's `part` does) at `width` x `height`, `resolution`, or `max_size` on the longest
    side (the other by rio-tiler's rule, `_get_width_height`: ceil of the aspect)."""
    left, bottom, right, top = reproject_bounds(bounds, bounds_crs, crs)
    if not all(math.isfinite(v) for v in (left, bottom, right, top)) or not (
        right > left and top > bottom
    ):
        raise ParamError(
            f"bbox: {list(bounds)} has no area in {crs} (check bbox_crs/coord_crs and dst_crs)"
        )
    dx, dy = right - left, top - bottom
    width, height = size["width"], size["height"]
    if size["resolution"] is not None:
        cols, rows = dx / size["resolution"], dy / size["resolution"]
        if cols * rows > max_pixels:  # before rounding: a huge float would not fit an int
            width, height = math.inf, math.inf
        else:
            width, height = max(1, round(cols)), max(1, round(rows))
    elif width and not height:
        height = max(1, math.ceil(width * dy / dx))
    elif height and not width:
        width = max(1, math.ceil(height * dx / dy))
    elif not (width and height):
        longest = size["max_size"] or DEFAULT_MAX_SIZE
        if dy > dx:
            height, width = longest, max(1, math.ceil(longest * dx / dy))
        else:
            width, height = longest, max(1, math.ceil(longest * dy / dx))
    if width * height > max_pixels:
        side = int(math.sqrt(max_pixels))
        shown = "more" if math.isinf(width) else f"{width}x{height} ="
        raise LimitError(
            f"the area is {shown} {width * height} pixels; the limit is {max_pixels} "
            f"(TERRAZZO_MAX_CHUNK_PIXELS, e.g. {side}x{side}): lower max_size, width/height "
            "or a coarser resolution, or a smaller area"
        )
    return Grid.from_bounds(crs, (left, bottom, right, top), int(width), int(height))


def _names(layout: dict[str, Any] | None, mosaic: Mosaic | None, params: ReadParams) -> list[str]:
    """Band names of the read: the checked layout's (`Engine.layout`), else the plan's."""
    bands = mosaic.data.shape[0] if mosaic is not None and mosaic.valid.any() else None
    if layout is not None and (bands is None or layout["bands"] == bands):
        return list(layout["names"])
    if mosaic is not None and mosaic.plan.items:
        names = (output_layout(mosaic.plan, params, None) or {}).get("names", [])
        if bands is None or len(names) == bands:
            return list(names)
    return [f"b{i + 1}" for i in range(bands or 0)]


async def _statistics(
    engine: Engine,
    grid: Grid,
    query: SearchQuery,
    params: ReadParams,
    options: StatsOptions,
    layout: dict[str, Any] | None,
    geometry: tuple[dict[str, Any], str] | None = None,
) -> tuple[dict[str, Any], Mosaic | None]:
    """Read `grid` and compute its statistics in the pool (inside `geometry` if given)."""
    async with asyncio.timeout(engine.settings.tile_timeout_s):  # cancels the work, then 504
        mosaic = await engine.read(grid, query, params)
        names = _names(layout, mosaic, params)
        if mosaic is not None and mosaic.valid.any():
            data, valid = mosaic.data, mosaic.valid
        else:  # nothing there: every pixel masked (counts, nulls), not an error
            data = np.zeros((len(names), grid.height, grid.width), dtype="uint8")
            valid = np.zeros((grid.height, grid.width), dtype=bool)
        job = partial(
            area_statistics,
            names=tuple(names),
            options=options,
            crs=grid.crs,
            transform=tuple(grid.transform)[:6],
            geometry=geometry[0] if geometry else None,
            geometry_crs=geometry[1] if geometry else LONLAT,
        )
        stats = await engine.compute.run(job, data, valid)
    return stats, mosaic


@router.get(
    "/statistics",
    summary="Statistics of the mosaic over a bbox (rio-tiler's figures per band)",
    responses=STATS_RESPONSES,
)
async def bbox_statistics(
    request: Request,
    bbox: str = Query(..., description="minx,miny,maxx,maxy in `bbox_crs`."),
    bbox_crs: str = Query(LONLAT, description="CRS of `bbox` (default lon/lat)."),
    dst_crs: str | None = Depends(output_crs),
    size: dict[str, Any] = Depends(size_params),
    options: StatsOptions = Depends(stats_options),
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
) -> JSONResponse:
    """The area is read as a tile is (every search and read parameter of the tile routes
    applies) on a grid of `bbox` in `dst_crs` (default: `bbox_crs`), then rio-tiler's
    `get_array_statistics` runs on the mosaic's valid pixels."""
    engine = _engine(request)
    bounds = _floats("bbox", bbox, 4)
    if not (bounds[2] > bounds[0] and bounds[3] > bounds[1]):
        raise ParamError(f"bbox: needs minx < maxx and miny < maxy, got {bbox!r}")
    _crs("bbox_crs", bbox_crs)
    crs = dst_crs or bbox_crs
    grid = area_grid(bounds, bbox_crs, crs, size, engine.settings.max_chunk_pixels)  # type: ignore[arg-type]
    layout = await engine.check(query, params)
    stats, mosaic = await _statistics(engine, grid, query, params, options, layout)
    return JSONResponse(stats, headers=read_headers([mosaic]))


class Feature(BaseModel):
    """A GeoJSON Feature; its Polygon or MultiPolygon masks the pixels it does not touch."""

    model_config = ConfigDict(extra="allow")
    type: Literal["Feature"]
    geometry: dict[str, Any] | None
    properties: dict[str, Any] | None = None


class FeatureCollection(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["FeatureCollection"]
    features: list[Feature] = Field(min_length=1)


def _geometry(feature: Feature, index: int, crs: str) -> tuple[dict[str, Any], tuple]:
    """The feature's geometry, checked (type, coordinates), and its bounds."""
    where = f"features[{index}].geometry"
    geometry = feature.geometry
    if not geometry or geometry.get("type") not in GEOMETRIES:
        got = geometry.get("type") if geometry else None
        raise ParamError(f"{where}: a Polygon or MultiPolygon is needed, got {got!r}")
    try:
        shape = shapely.geometry.shape(geometry)
    except Exception as exc:  # shapely's messages vary by what is wrong
        raise ParamError(f"{where}: not a valid {geometry['type']} ({exc})") from None
    bounds = shape.bounds
    if shape.is_empty or not all(math.isfinite(v) for v in bounds) or not shape.area > 0:
        raise ParamError(f"{where}: the geometry is empty or has no area")
    if pyproj.CRS.from_user_input(crs).is_geographic and not (
        bounds[0] >= -180 and bounds[2] <= 180 and bounds[1] >= -90 and bounds[3] <= 90
    ):
        raise ParamError(f"{where}: lon/lat out of range in {crs} (is coord_crs right?)")
    return geometry, bounds


@router.post(
    "/statistics",
    summary="Statistics of the mosaic inside each GeoJSON feature",
    response_class=JSONResponse,
    responses=FEATURE_RESPONSES,
)
async def feature_statistics(
    request: Request,
    geojson: Annotated[
        Feature | FeatureCollection,
        Body(description="A GeoJSON Feature or FeatureCollection (Polygon, MultiPolygon)."),
    ],
    coord_crs: str = Query(LONLAT, description="CRS of the GeoJSON coordinates (TiTiler)."),
    dst_crs: str | None = Depends(output_crs),
    coverage: str | None = Query(
        None,
        description="`true`: weight each pixel by the fraction of it inside the geometry "
        "(rio-tiler's coverage array); default: every touched pixel counts fully.",
    ),
    cover_scale: str | None = Query(
        None, description="Sub-cells per pixel side for the coverage fractions (default 10)."
    ),
    size: dict[str, Any] = Depends(size_params),
    options: StatsOptions = Depends(stats_options),
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
) -> JSONResponse:
    """Each feature is read on its own grid (its bounds in `dst_crs`, default `coord_crs`,
    as rio-tiler's `Reader.feature`), pixels it does not touch (all-touched rasterizing)
    masked; with `coverage=true` pixels are weighted as TiTiler's POST /statistics does.
    The answer is the body with `properties.statistics` added to each feature."""
    engine = _engine(request)
    _crs("coord_crs", coord_crs)
    crs = dst_crs or coord_crs
    try:
        options = dataclasses.replace(
            options,
            coverage=_boolean("coverage", coverage),
            cover_scale=_int("cover_scale", cover_scale) or DEFAULT_COVER_SCALE,
        )
    except StatisticsError as exc:
        raise ParamError(str(exc)) from None
    features = geojson.features if isinstance(geojson, FeatureCollection) else [geojson]
    if len(features) > MAX_FEATURES:
        raise LimitError(
            f"features: {len(features)} in one request; the limit is {MAX_FEATURES}: split it"
        )
    work = []
    for n, feature in enumerate(features):
        geometry, bounds = _geometry(feature, n, coord_crs)
        grid = area_grid(bounds, coord_crs, crs, size, engine.settings.max_chunk_pixels)
        check_coverage_size(grid.width, grid.height, options)
        work.append((feature, geometry, grid))
    layout = await engine.check(query, params)
    gate = asyncio.Semaphore(engine.settings.chunk_concurrency)

    async def one(geometry: dict[str, Any], grid: Grid) -> tuple[dict[str, Any], Mosaic | None]:
        async with gate:
            return await _statistics(
                engine, grid, query, params, options, layout, (geometry, coord_crs)
            )

    results = await asyncio.gather(*(one(g, grid) for _, g, grid in work))
    out = []
    for (feature, _, _), (stats, _) in zip(work, results, strict=True):
        body = feature.model_dump()
        body["properties"] = {**(feature.properties or {}), "statistics": stats}
        out.append(body)
    if isinstance(geojson, FeatureCollection):
        answer = {**geojson.model_dump(), "features": out}
    else:
        answer = out[0]
    headers = read_headers([m for _, m in results])
    return JSONResponse(answer, headers=headers, media_type=GEOJSON)
