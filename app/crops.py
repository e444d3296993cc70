"""Crops (issue 17): GET /bbox/{minx},{miny},{maxx},{maxy}[/{w}x{h}].{format}, POST /feature.

TiTiler's part/feature endpoints over the mosaic, in its names: the bbox is in `coord_crs`
(default lon/lat), the output in `dst_crs` (default the bbox's), `{width}x{height}` fixes the
size, else the longer side gets `max_size` pixels and the other keeps the aspect. A feature's
bounds are the crop and pixels its geometry does not touch are masked (rio-tiler's rule:
`all_touched`). Each crop is one `core.plan.Grid` read through `Engine.read` and encoded in
the pool like a tile, with every tile parameter (app.params) checked once first.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Annotated, Any

import shapely
import shapely.geometry
from fastapi import Body, Depends, Query, Request, Response
from pyproj import CRS
from pyproj.exceptions import CRSError, ProjError

from app import responses
from app.cutline import encode_crop
from app.encoders import FORMATS
from app.headers import final, nothing, read_headers
from app.params import (
    RenderParams,
    api_router,
    check_read,
    read_params,
    render_params,
    search_query,
)
from app.tiles import _cacheable, _etag
from core.catalog import SearchQuery
from core.chunks import LimitError
from core.engine import Engine, ParamError, ReadParams
from core.plan import Grid, reproject_bounds

router = api_router("crops")

LONLAT = "EPSG:4326"
CROP_RESPONSES: dict = {"response_class": Response, "responses": responses.CROP}
CoordCRS = Annotated[
    str | None,
    Query(
        description="CRS of the bbox or the feature's coordinates, e.g. EPSG:32632 "
        "(default: lon/lat, EPSG:4326)."
    ),
]
DstCRS = Annotated[
    str | None, Query(description="CRS of the output image (default: the coordinates' CRS).")
]
MaxSize = Annotated[
    str | None,
    Query(
        description="Without {width}x{height}: pixels on the longer side (default 1024); the "
        "other side keeps the aspect."
    ),
]
Format = str | None  # a path parameter on the suffixed routes, a query parameter on /feature
_CRS_TEXT = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}:[A-Za-z0-9_.-]{1,30}$")
_CRS_URI = re.compile(r"^https?://www\.opengis\.net/def/crs/[A-Za-z]+/[0-9.]+/[A-Za-z0-9_.-]+$")


def _engine(request: Request) -> Engine:
    return request.app.state.engine


@lru_cache(maxsize=256)
def _parse_crs(text: str) -> tuple[str, tuple[float, float, float, float] | None, bool]:
    """(the grid's CRS string, its area of use in lon/lat, geographic?) of an AUTHORITY:CODE
    or OGC URI. Only those forms: PROJ strings and WKT are refused (PROJ strings may name
    grid files and init files; a crop does not need them)."""
    if not (_CRS_TEXT.match(text) or _CRS_URI.match(text)):
        raise ValueError("expected AUTHORITY:CODE (EPSG:32632) or an OGC CRS URI")
    crs = CRS.from_user_input(text)
    if not (crs.is_projected or crs.is_geographic) or len(crs.axis_info) not in (2, 3):
        raise ValueError("not a 2D geographic or projected CRS")
    authority = crs.to_authority()
    if authority == ("OGC", "CRS84"):  # lon/lat, as EPSG:4326 is read here (always_xy)
        authority = ("EPSG", "4326")
    if authority is None:
        raise ValueError("no authority code")
    area = crs.area_of_use.bounds if crs.area_of_use else None
    return f"{authority[0]}:{authority[1]}", area, crs.is_geographic


def _crs(name: str, text: str) -> tuple[str, tuple[float, float, float, float] | None, bool]:
    try:
        return _parse_crs(text.strip())
    except (ValueError, CRSError) as exc:
        raise ParamError(
            f"{name}: {text[:100]!r} is not a CRS this server reads ({exc}); "
            "give an EPSG code such as EPSG:32632, or EPSG:4326 for lon/lat"
        ) from exc


def _crs_uri(crs: str) -> str:
    authority, code = crs.split(":", 1)
    return f"http://www.opengis.net/def/crs/{authority}/0/{code}"


def _check_bounds(
    what: str,
    bounds: tuple[float, float, float, float],
    crs: str,
    area: tuple[float, float, float, float] | None,
    geographic: bool,
    fix: str = "check the coordinates' order and coord_crs",
) -> None:
    """Finite, min < max, and where the CRS is meant to be used: a geographic CRS within
    -180..180, -90..90; a projected one overlapping its area of use (a UTM box may reach into
    the next zone, as scenes do)."""
    minx, miny, maxx, maxy = bounds
    if not all(math.isfinite(v) for v in bounds):
        raise ParamError(f"{what}: coordinates must be finite numbers, got {list(bounds)}")
    if not (minx < maxx and miny < maxy):
        raise ParamError(
            f"{what}: expected minx < maxx and miny < maxy, got {list(bounds)} "
            "(the order is minx,miny,maxx,maxy; a box across the antimeridian is two requests)"
        )
    if geographic and not (minx >= -180 and maxx <= 180 and miny >= -90 and maxy <= 90):
        raise ParamError(
            f"{what}: {list(bounds)} is outside -180..180, -90..90 in {crs}; lon/lat order is "
            "minlon,minlat,maxlon,maxlat (set coord_crs for projected coordinates)"
        )
    if area is None or geographic:
        return
    try:
        lonlat = reproject_bounds(bounds, crs, LONLAT)
    except ProjError:
        lonlat = (math.inf,) * 4
    west, south, east, north = area
    if not all(math.isfinite(v) for v in lonlat) or not (
        lonlat[0] < east and lonlat[2] > west and lonlat[1] < north and lonlat[3] > south
    ):
        raise ParamError(
            f"{what}: {list(bounds)} is outside {crs}'s area of use (lon {west}..{east}, lat "
            f"{south}..{north}); {fix}"
        )


def _bbox(minx: str, miny: str, maxx: str, maxy: str) -> tuple[float, float, float, float]:
    try:
        return tuple(float(v) for v in (minx, miny, maxx, maxy))  # type: ignore[return-value]
    except ValueError as exc:
        raise ParamError(
            f"bbox: expected four numbers minx,miny,maxx,maxy, got {[minx, miny, maxx, maxy]}"
        ) from exc


def _geometry(feature: Any) -> tuple[dict[str, Any], tuple[float, float, float, float]]:
    """The GeoJSON Feature body's (Multi)Polygon geometry and its bounds."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        kind = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
        # one image per request, as TiTiler's /feature (its POST /statistics takes collections)
        fix = (
            "crop one Feature per request (POST /statistics takes a FeatureCollection)"
            if kind == "FeatureCollection"
            else "wrap a bare geometry in a Feature"
        )
        raise ParamError(
            f"body: expected a GeoJSON Feature ({{'type': 'Feature', 'geometry': ...}}), got "
            f"{str(kind)[:40]!r}; {fix}"
        )
    geometry = feature.get("geometry")
    kind = geometry.get("type") if isinstance(geometry, dict) else None
    if kind not in ("Polygon", "MultiPolygon"):
        raise ParamError(
            "body: the feature's geometry must be a Polygon or MultiPolygon, got "
            f"{str(kind)[:40]!r}"
        )
    try:
        shape = shapely.geometry.shape(geometry)
    except Exception as exc:  # shapely raises several kinds on malformed coordinates
        raise ParamError(f"body: the feature's geometry is not valid GeoJSON ({exc})") from exc
    if shape.is_empty:
        raise ParamError("body: the feature's geometry is empty")
    coords = shapely.get_coordinates(shape)
    if not all(math.isfinite(v) for v in coords.ravel()):
        raise ParamError("body: the feature's coordinates must be finite numbers")
    return shapely.geometry.mapping(shape), tuple(float(v) for v in shape.bounds)  # type: ignore[return-value]


def _size(
    size: tuple[str, str] | None,
    max_size: str | None,
    bounds: tuple[float, float, float, float],
    limit: int,
) -> tuple[int, int]:
    if size is not None:
        try:
            width, height = int(size[0]), int(size[1])
        except ValueError as exc:
            raise ParamError(
                f"size: expected {{width}}x{{height}} in pixels, e.g. 512x256, got "
                f"{size[0][:20]!r}x{size[1][:20]!r}"
            ) from exc
        if width < 1 or height < 1:
            raise ParamError(f"size: width and height must be at least 1, got {width}x{height}")
    else:
        try:
            longest = 1024 if max_size is None else int(max_size)
        except ValueError as exc:
            raise ParamError(
                f"max_size: expected a whole number of pixels, got {max_size!r}"
            ) from exc
        if longest < 1:
            raise ParamError(f"max_size: must be at least 1, got {longest}")
        span_x, span_y = bounds[2] - bounds[0], bounds[3] - bounds[1]
        if span_x >= span_y:
            width, height = longest, max(1, round(longest * span_y / span_x))
        else:
            width, height = max(1, round(longest * span_x / span_y)), longest
    if width * height > limit:
        raise LimitError(
            f"size: {width}x{height} is {width * height} pixels, above this server's limit of "
            f"{limit} (TERRAZZO_MAX_CHUNK_PIXELS); ask a smaller {{width}}x{{height}} or max_size"
        )
    return width, height


@dataclass(frozen=True)
class CropOptions:
    """What every crop route takes besides its area, size and format: the coordinates' and
    output CRSs, max_size and the tile parameters (one dependency, so four routes declare it
    once and cannot drift apart)."""

    coord_crs: str | None
    dst_crs: str | None
    max_size: str | None
    query: SearchQuery
    params: ReadParams
    render: RenderParams


async def crop_options(
    coord_crs: CoordCRS = None,
    dst_crs: DstCRS = None,
    max_size: MaxSize = None,  # declared on the sized routes too, as TiTiler does; a size wins
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
) -> CropOptions:
    return CropOptions(coord_crs, dst_crs, max_size, query, params, render)


async def render_crop(
    request: Request,
    crop: CropOptions,
    *,
    fmt: str | None,
    size: tuple[str, str] | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    feature: Any = None,
) -> Response:
    """One crop: the grid from the bbox (or the feature's bounds), the combination checked,
    the mosaic read on the grid, masked outside the feature and encoded in one pool job."""
    started = time.perf_counter()
    coord_crs, dst_crs, max_size = crop.coord_crs, crop.dst_crs, crop.max_size
    query, params, render = crop.query, crop.params, crop.render
    engine = _engine(request)
    if fmt is not None and fmt not in FORMATS:
        raise ParamError(f"format: unknown {fmt!r}; choose one of {sorted(FORMATS)}")
    src, src_area, src_geographic = _crs("coord_crs", coord_crs or LONLAT)
    dst, dst_area, dst_geographic = _crs("dst_crs", dst_crs) if dst_crs else (src, None, False)
    geometry = None
    if bbox is None:  # a feature route (its body may be any JSON, `null` too)
        geometry, bbox = _geometry(feature)
    what = "bbox" if geometry is None else "body: the feature's bounds"
    _check_bounds(what, bbox, src, src_area, src_geographic)
    try:
        bounds = reproject_bounds(bbox, src, dst)
    except ProjError as exc:
        raise ParamError(f"dst_crs: the {what} cannot be projected to {dst} ({exc})") from exc
    if dst != src:
        _check_bounds(
            f"dst_crs: the {what} in {dst}",
            bounds,
            dst,
            dst_area,
            dst_geographic,
            fix="choose a dst_crs whose area of use covers the area",
        )
    width, height = _size(size, max_size, bounds, engine.settings.max_chunk_pixels)
    grid = Grid.from_bounds(dst, bounds, width, height)
    await check_read(engine, query, params, render, fmt)

    etag = None
    if request.method == "GET":  # a POST's body is not in the key: no validators
        etag = await _etag(request, engine)
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=_cacheable(engine, etag))
    async with asyncio.timeout(engine.settings.tile_timeout_s):  # cancels the work, then 504
        mosaic = await engine.read(grid, query, params)
    if (empty := nothing(mosaic)) is not None:
        return empty
    assert mosaic is not None
    with mosaic.clock.stage("encode"):
        body, fmt = await engine.compute.run(
            partial(
                encode_crop,
                crs=grid.crs,
                transform=tuple(grid.transform)[:6],
                geometry=geometry,
                geometry_crs=src,
                **render.options(),
            ),
            mosaic.data,
            mosaic.valid,
            fmt,
        )
    total = time.perf_counter() - started
    request.app.state.metrics.observe_stages(mosaic.clock)
    headers = {
        **read_headers([mosaic]),
        "X-Terrazzo-Source": mosaic.plan.source,
        "Server-Timing": mosaic.clock.server_timing({"total": total}),
        "Content-Bbox": ",".join(repr(float(v)) for v in grid.bounds),  # TiTiler's headers
        "Content-Crs": f"<{_crs_uri(grid.crs)}>",
    }
    if etag is None or not final([mosaic]):
        headers["Cache-Control"] = "no-store"  # a POST, a failed item or one left out
    else:
        headers.update(_cacheable(engine, etag))
    return Response(body, media_type=FORMATS[fmt][1], headers=headers)


@router.get(
    "/bbox/{minx},{miny},{maxx},{maxy}.{format}",
    summary="Mosaic of a bounding box, max_size on the longer side",
    **CROP_RESPONSES,
)
async def bbox_image(
    request: Request,
    minx: str,
    miny: str,
    maxx: str,
    maxy: str,
    format: str,
    crop: CropOptions = Depends(crop_options),
) -> Response:
    return await render_crop(request, crop, fmt=format, bbox=_bbox(minx, miny, maxx, maxy))


@router.get(
    "/bbox/{minx},{miny},{maxx},{maxy}/{width}x{height}.{format}",
    summary="Mosaic of a bounding box at a size",
    **CROP_RESPONSES,
)
async def bbox_image_sized(
    request: Request,
    minx: str,
    miny: str,
    maxx: str,
    maxy: str,
    width: str,
    height: str,
    format: str,
    crop: CropOptions = Depends(crop_options),
) -> Response:
    bbox = _bbox(minx, miny, maxx, maxy)
    return await render_crop(request, crop, fmt=format, size=(width, height), bbox=bbox)


FEATURE_BODY = Body(
    description="A GeoJSON Feature with a Polygon or MultiPolygon geometry, in coord_crs. "
    "Its bounds are the crop; pixels the geometry does not touch are masked.",
    examples=[
        {
            "type": "Feature",
            "properties": {},
            "geometry": {
                "type": "Polygon",
                "coordinates": [[[7.0, 44.95], [7.15, 44.95], [7.1, 45.05], [7.0, 44.95]]],
            },
        }
    ],
)


@router.post(
    "/feature",
    summary="Mosaic of a GeoJSON feature, masked outside it (format by ?format=)",
    **CROP_RESPONSES,
)
@router.post(
    "/feature.{format}", summary="Mosaic of a GeoJSON feature in a format", **CROP_RESPONSES
)
async def feature_image(
    request: Request,
    feature: Annotated[Any, FEATURE_BODY],
    format: Format = None,
    crop: CropOptions = Depends(crop_options),
) -> Response:
    return await render_crop(request, crop, fmt=format, feature=feature)


@router.post(
    "/feature/{width}x{height}.{format}",
    summary="Mosaic of a GeoJSON feature at a size",
    **CROP_RESPONSES,
)
async def feature_image_sized(
    request: Request,
    width: str,
    height: str,
    format: str,
    feature: Annotated[Any, FEATURE_BODY],
    crop: CropOptions = Depends(crop_options),
) -> Response:
    return await render_crop(request, crop, fmt=format, size=(width, height), feature=feature)
