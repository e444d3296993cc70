"""Request models: query parameters in TiTiler's spelling, turned into engine objects.

Lists accept both TiTiler forms: repeated (`assets=a&assets=b`) and comma-separated
(`assets=a,b`). Every check raises a ParamError whose message names the parameter to fix.
The dependencies are `async def` because they only parse (bounded input, no I/O): FastAPI
runs a sync dependency in its thread pool, three thread hops per tile for nothing.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from app import color_formula as formulas
from app.encoders import check_colormap, check_render, parse_colormap
from app.guard import TOKEN_PARAMETER
from app.query import DeclaredQueryRoute, QueryParameters, query_parameters
from core import algorithms
from core.catalog import SearchQuery, parse_datetime_range
from core.engine import Engine, ParamError, ReadParams
from core.filters import parse as parse_filter
from core.plan import Grid
from core.process import ProcessError

FILTER_LANGS = ("cql2-text", "cql2-json")
# every route takes these: the API key for <img> clients (app.guard)
ANYWHERE = frozenset({TOKEN_PARAMETER})


def _split(values: list[str] | None) -> tuple[str, ...]:
    out: list[str] = []
    for value in values or []:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return tuple(out)


def _numbers(name: str, values: tuple[str, ...], kind: type) -> tuple:
    try:
        return tuple(kind(v) for v in values)
    except ValueError as exc:
        raise ParamError(f"{name}: expected {kind.__name__} values, got {list(values)}") from exc


def _number(name: str, value: str | None, kind: type) -> float | int | None:
    """An optional number; a bad one is a 400 naming the parameter (FastAPI's own 422 would
    not say what the server expects)."""
    return None if value is None else _numbers(name, (value,), kind)[0]


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _boolean(name: str, value: str | None) -> bool:
    """TiTiler's boolean spellings; anything else is a 400 naming the parameter (a silent
    `false` would serve raw values to a client that asked for physical ones)."""
    if value is None:
        return False
    text = value.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ParamError(f"{name}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class RenderParams:
    rescale: tuple[tuple[float, float], ...] = ()
    colormap_name: str | None = None
    colormap: Any = None  # parsed custom colormap (app.encoders.parse_colormap)
    return_mask: bool = True
    color_formula: formulas.ColorFormula | None = None

    def options(self) -> dict[str, Any]:
        """`app.encoders.encode`'s keyword arguments for these render choices."""
        return {
            "rescale": self.rescale,
            "colormap_name": self.colormap_name,
            "colormap": self.colormap,
            "color_formula": self.color_formula,
            "return_mask": self.return_mask,
        }


MAX_TILE_BUFFER = 64  # pixels on each side of a tile (TiTiler sets no bound; ours is memory)
MAX_TILE_PADDING = 64


@dataclass(frozen=True)
class TileParams:
    """TiTiler's tile options: `buffer` pixels added on each side of the tile (the image is
    tilesize + 2 x buffer, e.g. for a client that computes across tile edges) and `padding`
    pixels read beyond that and cropped (rio-tiler's: resampling kernels at the edge see real
    neighbours rather than the edge of the read)."""

    buffer: float = 0.0
    padding: int = 0

    def output_grid(self, grid: Grid) -> Grid:
        """The image's grid: the tile's, grown by `buffer`."""
        return grid.buffered(self.buffer)

    def read_grid(self, grid: Grid) -> Grid:
        """The grid to read for `output_grid`: grown by `padding` more."""
        return grid.buffered(self.padding)

    def crop(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A read of `read_grid` back to `output_grid`."""
        return algorithms.crop_border(data, valid, self.padding)


@query_parameters
async def tile_params(
    buffer: str | None = Query(
        None,
        description="Pixels added on each side of the tile, a multiple of 0.5: the image is "
        "tilesize + 2 x buffer (0.5 = 257x257, 1 = 258x258), TiTiler's.",
    ),
    padding: str | None = Query(
        None,
        description="Pixels read beyond each tile edge and cropped, so resampling at the edge "
        "sees real neighbours (TiTiler's; default 0).",
    ),
) -> TileParams:
    size = _number("buffer", buffer, float) or 0.0
    if not (math.isfinite(size) and 0 <= size <= MAX_TILE_BUFFER and (2 * size).is_integer()):
        raise ParamError(
            f"buffer: a multiple of 0.5 pixels from 0 to {MAX_TILE_BUFFER} (0.5 adds one pixel "
            f"to the tile's width), got {buffer!r}"
        )
    pad = _number("padding", padding, int) or 0
    if not 0 <= pad <= MAX_TILE_PADDING:
        raise ParamError(f"padding: whole pixels from 0 to {MAX_TILE_PADDING}, got {padding!r}")
    return TileParams(buffer=size, padding=pad)


@query_parameters
async def search_query(
    datetime: str | None = Query(
        None, description="RFC 3339 instant or interval `start/end` ('..' = open)."
    ),
    collections: list[str] | None = Query(None, description="Collection ids (comma-separated)."),
    ids: list[str] | None = Query(None, description="Item ids (comma-separated)."),
    sortby: str | None = Query(
        None, description="Mosaic order, e.g. `-datetime` (default: newest on top)."
    ),
    filter: str | None = Query(
        None, description="CQL2-text or CQL2-JSON on item properties, e.g. `eo:cloud_cover < 10`."
    ),
    filter_lang: str | None = Query(
        None,
        alias="filter-lang",
        description="cql2-text or cql2-json (default: told apart by the first character).",
    ),
    filter_crs: str | None = Query(
        None,
        alias="filter-crs",
        description="Only lon/lat (http://www.opengis.net/def/crs/OGC/1.3/CRS84) is supported.",
    ),
    items_limit: str | None = Query(
        None, description="Items mosaicked at most (default and cap: the server's max_items)."
    ),
    scan_limit: str | None = Query(
        None, description="Candidate items looked at, at most (cap: the server's max_scan)."
    ),
    time_limit: str | None = Query(
        None, description="Seconds the item search may take (cap: the server's max_search_s)."
    ),
    exitwhenfull: str | None = Query(
        None, description="Stop the search once footprints cover the tile (default: on for first)."
    ),
    skipcovered: str | None = Query(
        None,
        description="Leave out items whose footprint newer ones cover (default: on for first).",
    ),
) -> SearchQuery:
    if filter_lang is not None and filter_lang not in FILTER_LANGS:
        raise ParamError(f"filter-lang: expected one of {list(FILTER_LANGS)}, got {filter_lang!r}")
    if filter_lang and filter and (filter.lstrip().startswith("{")) != (filter_lang == "cql2-json"):
        raise ParamError(f"filter-lang: {filter_lang} was given; the filter is not {filter_lang}")
    if filter_crs is not None and not filter_crs.rstrip("/").endswith(("CRS84", "4326")):
        raise ParamError(f"filter-crs: only CRS84 (lon/lat) is supported, got {filter_crs!r}")
    return SearchQuery(
        filter=parse_filter(filter) if filter else None,
        datetime=parse_datetime_range(datetime) if datetime else None,
        collections=_split(collections),
        ids=_split(ids),
        sortby=tuple(s for s in (sortby or "-datetime").split(",") if s.strip()),
        limit=_number("items_limit", items_limit, int),
        scan_limit=_number("scan_limit", scan_limit, int),
        time_limit=_number("time_limit", time_limit, float),
        exitwhenfull=None if exitwhenfull is None else _boolean("exitwhenfull", exitwhenfull),
        skipcovered=None if skipcovered is None else _boolean("skipcovered", skipcovered),
    )


@query_parameters
async def read_params(
    assets: list[str] | None = Query(
        None, description="Assets to read (default: the catalog's first image asset)."
    ),
    bidx: list[str] | None = Query(None, description="1-based band indexes of the output."),
    expression: str | None = Query(
        None,
        description="Band math per item, TiTiler's syntax: `;` between output bands, bands as "
        "b1.., {asset}_b{n}, or a one-band asset's name, e.g. (b2-b1)/(b2+b1). float32.",
    ),
    algorithm: str | None = Query(
        None,
        description="On the mosaic (TiTiler's names): hillshade, slope, contours, terrarium, "
        "terrainrgb, normalizedIndex.",
    ),
    algorithm_params: str | None = Query(
        None, description='The algorithm\'s parameters as JSON, e.g. {"azimuth": 315}.'
    ),
    method: str | None = Query(
        None,
        description="Pixel selection: first, last, highest, lowest, mean, median, stdev, count.",
    ),
    pixel_selection: str | None = Query(None, description="Alias of `method` (TiTiler)."),
    resampling: str = Query("nearest", description="nearest, bilinear, cubic or average."),
    nodata: str | None = Query(None, description="Override the files' nodata value."),
    unscale: str | None = Query(
        None,
        description="`true`: apply each band's scale/offset (the file's, else the item's "
        "raster:bands) and return float32; default: the stored values.",
    ),
) -> ReadParams:
    nodata_value = None
    if nodata is not None:
        try:
            nodata_value = float(nodata)
        except ValueError as exc:
            raise ParamError(f"nodata: expected a number or 'nan', got {nodata!r}") from exc
    return ReadParams(
        unscale=_boolean("unscale", unscale),
        assets=_split(assets),
        bidx=_numbers("bidx", _split(bidx), int),
        expression=(expression or "").strip() or None,
        algorithm=algorithm_step(algorithm, algorithm_params),
        method=(method or pixel_selection or "first").lower(),
        resampling=resampling.lower(),
        nodata=nodata_value,
    )


def algorithm_step(name: str | None, params: str | dict[str, Any] | None) -> Any:
    """The algorithm a request names (core.algorithms.make), its mistakes as ParamErrors."""
    if name is None:
        if params is not None:
            raise ParamError("algorithm_params: given without an algorithm")
        return None
    try:
        return algorithms.make(name, params)
    except ProcessError as exc:
        raise ParamError(str(exc)) from exc


@query_parameters
async def render_params(
    rescale: list[str] | None = Query(
        None, description="`min,max` to stretch to 0..255; repeat once per band."
    ),
    colormap_name: str | None = Query(None, description="Colormap for one band, e.g. viridis."),
    colormap: str | None = Query(
        None,
        description='A custom colormap as JSON: {"1": "#ff0000", ...} or intervals '
        '[[[min, max], "#ff0000"], ...] (TiTiler\'s).',
    ),
    return_mask: str | None = Query(
        None, description="false: no mask (alpha) band in the image (default true)."
    ),
    color_formula: str | None = Query(
        None,
        description="rio-color operations after rescale, e.g. 'Gamma RGB 3.5 Saturation 1.7 "
        "Sigmoidal RGB 15 0.35' (gamma BANDS g, sigmoidal BANDS contrast bias, saturation p).",
    ),
) -> RenderParams:
    ranges = []
    for value in rescale or []:
        parts = value.split(",")
        try:
            lo, hi = (float(p) for p in parts)
        except ValueError as exc:
            raise ParamError(f"rescale: expected 'min,max' numbers, got {value!r}") from exc
        if not hi > lo:
            raise ParamError(f"rescale: max must be greater than min in {value!r}")
        ranges.append((lo, hi))
    try:
        check_colormap(colormap_name)
        custom = parse_colormap(colormap) if colormap is not None else None
    except ValueError as exc:
        raise ParamError(str(exc)) from exc
    if custom is not None and colormap_name:
        raise ParamError("colormap, colormap_name: give one")
    try:
        formula = formulas.parse(color_formula) if color_formula is not None else None
    except formulas.ColorFormulaError as exc:
        raise ParamError(str(exc)) from None
    return RenderParams(
        rescale=tuple(ranges),
        colormap_name=colormap_name,
        colormap=custom,
        return_mask=True if return_mask is None else _boolean("return_mask", return_mask),
        color_formula=formula,
    )


async def check_read(
    engine: Engine,
    query: SearchQuery,
    params: ReadParams,
    render: RenderParams,
    fmt: str | None,
) -> dict[str, Any] | None:
    """The whole combination checked once, as every tile would check it: the read (assets,
    filter, sortby, bidx: `Engine.check`) and what `fmt` can carry of its layout (rescale,
    colormap, dtype: `app.encoders.check_render`). TileJSON and WMTS call it so that a client
    is refused once, with the fix, instead of being handed URLs that all fail."""
    layout = await engine.check(query, params)
    if layout is not None:
        check_render(
            layout["bands"],
            layout["dtype"],
            fmt,
            rescale=render.rescale,
            colormap_name=render.colormap_name,
            colormap=render.colormap,
            color_formula=render.color_formula,
        )
    return layout


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    if isinstance(dependant.call, QueryParameters):
        names |= dependant.call.names
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


_KNOWN: dict[int, frozenset[str]] = {}


def known_query_names(route: APIRoute) -> frozenset[str]:
    """The query parameters `route` declares (its own and its dependencies'), and ANYWHERE;
    a route may add names through `openapi_extra={"x-query-names": [...]}` (WMTS KVP keys)."""
    key = id(route)
    if key not in _KNOWN:
        extra = (route.openapi_extra or {}).get("x-query-names", ())
        _KNOWN[key] = frozenset(_query_names(route.dependant)) | ANYWHERE | set(extra)
    return _KNOWN[key]


def api_router(tag: str) -> APIRouter:
    """A router of this service's routes: their query parameters read in one pass and
    documented (app.query), any other query parameter refused (reject_unknown_query)."""
    return APIRouter(
        tags=[tag], dependencies=[Depends(reject_unknown_query)], route_class=DeclaredQueryRoute
    )


async def reject_unknown_query(request: Request) -> None:
    """A misspelled parameter is a 400 naming the nearest known one: silently ignored,
    `?asets=dem` would serve the default asset with a 200."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = known_query_names(route)
    extra = (route.openapi_extra or {}).get("x-query-names-nocase", ())
    unknown = [
        k for k in dict.fromkeys(request.query_params) if k not in known and k.lower() not in extra
    ]
    if not unknown:
        return
    problems = []
    for name in unknown:
        near = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
        problems.append(f"{name!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    raise ParamError(
        f"unknown query parameter {', '.join(problems)}; this route takes {sorted(known)}"
    )
