"""OGC-style descriptions of the mosaic so map clients can use it without reading our docs.

TileJSON 3.0.0 (MapLibre, Leaflet, deck.gl), the OGC TileMatrixSet documents and a WMTS 1.0.0
GetCapabilities (QGIS, ArcGIS, OpenLayers). Every URL in them is absolute and carries the
request's own query string unchanged, so `assets`, `datetime`, `method`, `rescale`… chosen once
apply to every tile the client then asks for.

Zoom range rule (both TileJSON and WMTS), from the catalog alone (no COG header is opened):

- maxzoom: the zoom whose output pixel is closest to the finest item pixel (the item with the
  smallest pixel in degrees of longitude: bbox width / `proj:shape` columns, else `gsd`),
  measured in the matrix set's CRS at that item (morecantile's `zoom_for_res`, "auto");
  beyond it a client should overzoom rather than ask for upsampled tiles.
- minzoom: the lowest zoom at which the largest item still spans MIN_ITEM_PIXELS output
  pixels; below it a tile would read the coarsest overview of every item only to paint specks.
  And no lower than the lowest zoom at which every tile of the matrix set can be served
  complete: no tile touches more items (matching the request's datetime, collections, ids
  and filter) than a tile search takes (`items_limit` capped by `max_items`, and `max_scan`);
  below it some tiles would be `X-Terrazzo-Truncated`. Counted from the items' bboxes in
  DuckDB, once per catalog snapshot and query (`core/density.py`, which says how other matrix
  sets than WebMercatorQuad are counted). When no zoom is complete, minzoom is maxzoom.
- both clamped to the matrix set's range (minzoom ≤ maxzoom); with `tilesize` other than the
  matrix's tile width the zooms shift accordingly; without `proj:shape`/`gsd` in the
  catalog the whole range of the matrix set is announced.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any
from urllib.parse import urlencode
from xml.etree import ElementTree as ET

import morecantile
from fastapi import Depends, Query, Request, Response
from morecantile import TileMatrixSet
from starlette.datastructures import URL

from app import responses
from app.encoders import FORMATS
from app.params import (
    RenderParams,
    TileParams,
    api_router,
    check_read,
    read_params,
    render_params,
    search_query,
    tile_params,
)
from core.catalog import SearchQuery
from core.density import complete_zoom_async, tile_limit
from core.engine import Engine, ParamError, ReadParams
from core.plan import matrix_set, matrix_set_crs, reproject_bounds

router = api_router("OGC")
DEFAULT_TMS = "WebMercatorQuad"
MIN_ITEM_PIXELS = 8
TILE_FORMAT = "png"  # WMTS layers are PNG unless tile_format says: the mask is transparency

NS = {
    "": "http://www.opengis.net/wmts/1.0",
    "ows": "http://www.opengis.net/ows/1.1",
    "xlink": "http://www.w3.org/1999/xlink",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
}
for _prefix, _uri in NS.items():
    ET.register_namespace(_prefix, _uri)

Tilesize = Annotated[
    int | None, Query(ge=1, description="Tile size the client will ask for (zooms shift).")
]
Format = Annotated[
    str | None, Query(description="Copied to the tiles: their `format` query parameter.")
]
TileFormat = Annotated[
    str | None,
    Query(description="The tiles' format as a path suffix, e.g. png (TiTiler's tile_format)."),
]
# WMTS key-value-pair keys (case-insensitive, OGC 07-057r7 Table 26): accepted on the
# capabilities routes, left out of the tile URLs, and a KVP GetTile is answered as the tile
KVP = ("service", "request", "version", "layer", "style", "format", "tilematrixset")
KVP_TILE = ("tilematrix", "tilerow", "tilecol")


def public_url(request: Request, url: URL | None = None) -> URL:
    """`url` (default: the request's) as the client sees it.

    Behind a proxy, `X-Forwarded-Proto` and `X-Forwarded-Host` (the first value when a chain
    is listed) replace the scheme and host.
    """
    url = url or request.url
    proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip()
    host = request.headers.get("x-forwarded-host", "").split(",")[0].strip()
    if proto in ("http", "https"):
        url = url.replace(scheme=proto)
    if host and re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+", host):
        url = url.replace(netloc=host)
    return url


def public_base_url(request: Request) -> str:
    """The service's public URL ending with '/' (root path kept), for absolute links."""
    text = str(public_url(request, request.base_url))
    return text if text.endswith("/") else text + "/"


def _extent(bounds: tuple[float, float, float, float], crs: str) -> tuple[float, float] | None:
    """Width and height of lon/lat `bounds` in `crs`, None outside its domain."""
    try:
        left, bottom, right, top = reproject_bounds(bounds, "EPSG:4326", crs)
    except Exception:
        return None
    size = (right - left, top - bottom)
    return size if all(math.isfinite(v) and v > 0 for v in size) else None


def zoom_range(
    tms: TileMatrixSet, stats: dict[str, Any] | None, tilesize: int | None = None
) -> tuple[int, int]:
    """(minzoom, maxzoom) of the mosaic in `tms`; the rule is in this module's docstring."""
    lo, hi = tms.minzoom, tms.maxzoom
    if not stats:
        return lo, hi
    crs = matrix_set_crs(tms.id)
    # output pixel at zoom z with `tilesize` = cellSize(z) * tileWidth / tilesize
    scale = (tilesize or tms.matrix(lo).tileWidth) / tms.matrix(lo).tileWidth
    minx, miny, maxx, maxy = stats["finest_bbox"]
    cx, cy, d = (minx + maxx) / 2, (miny + maxy) / 2, stats["res_deg"]
    # a ground square of one pixel at the finest item, as a side length in the TMS's units
    pixel = _extent((cx, cy, cx + d, cy + d * math.cos(math.radians(cy))), crs)
    largest = _extent(stats["largest_bbox"], crs)
    if pixel is None or largest is None:
        return lo, hi
    res = math.sqrt(pixel[0] * pixel[1])
    maxzoom = tms.zoom_for_res(res * scale, zoom_level_strategy="auto")
    widest = max(largest) * scale / MIN_ITEM_PIXELS
    minzoom = tms.zoom_for_res(widest, zoom_level_strategy="upper")
    return min(minzoom, maxzoom), maxzoom


def _bounds(summary: dict[str, Any], tms: TileMatrixSet) -> list[float]:
    """The catalog's lon/lat bbox clipped to what the matrix set covers."""
    world = tms.bbox
    bbox = summary.get("bbox") or [world.left, world.bottom, world.right, world.top]
    return [
        max(bbox[0], world.left),
        max(bbox[1], world.bottom),
        min(bbox[2], world.right),
        min(bbox[3], world.top),
    ]


def _engine(request: Request) -> Engine:
    return request.app.state.engine


async def _describe(
    request: Request,
    tms: TileMatrixSet,
    tilesize: int | None,
    query: SearchQuery | None = None,
    params: ReadParams | None = None,
) -> tuple[list[float], int, int]:
    """Bounds and zoom range; the zooms from the pixels of the assets asked for, over the
    collections asked for (a 10 m band and a 60 m band of one catalog differ by 2.6 zooms)."""
    engine = _engine(request)
    catalog = engine.catalog
    summary = await catalog.summary_async()
    assets = engine.resolve_assets(params.assets) if params else ()
    collections = query.collections if query else ()
    stats = (
        await catalog.resolution_stats_async(assets, collections) if summary.get("items") else None
    )
    minzoom, maxzoom = zoom_range(tms, stats, tilesize)
    if summary.get("items"):
        density = await complete_zoom_async(
            catalog,
            tms,
            query or SearchQuery(),
            tile_limit(engine.settings, query or SearchQuery()),
            minzoom,
        )
        minzoom = maxzoom if density.zoom is None else min(max(minzoom, density.zoom), maxzoom)
        finest = await _pyramid_zoom(engine, tms, tilesize, query, params)
        if finest is not None and (density.zoom is not None and density.zoom <= finest + 1):
            minzoom = tms.minzoom  # the pyramid serves 0..finest complete, dynamic reads the rest
    return _bounds(summary, tms), minzoom, maxzoom


async def _pyramid_zoom(
    engine: Engine,
    tms: TileMatrixSet,
    tilesize: int | None,
    query: SearchQuery | None,
    params: ReadParams | None,
) -> int | None:
    """The finest zoom the overview pyramid serves for this request (None: it serves none)."""
    pyramid = getattr(engine, "pyramid", None)
    if pyramid is None or tms.id != "WebMercatorQuad" or tilesize not in (None, 256):
        return None
    params = params or ReadParams()
    resolved = ReadParams(
        assets=engine.resolve_assets(params.assets),
        method=params.method,
        resampling=params.resampling,
        nodata=params.nodata,
        unscale=params.unscale,
    )
    if not pyramid.serves(tms.id, 0, query or SearchQuery(), resolved):
        return None
    if not await pyramid.current_async(engine.catalog, await engine.catalog.version_async()):
        return None
    return int(pyramid.recipe["max_zoom"])


def _query_without(request: Request, drop: set[str]) -> str:
    """The request's query string (with its "?") without the keys in `drop`, any case."""
    kept = [(k, v) for k, v in request.query_params.multi_items() if k.lower() not in drop]
    return ("?" + urlencode(kept)) if kept else ""


def tile_query(request: Request, *, drop_kvp: bool = False) -> str:
    """The request's query as the tiles need it: every tile parameter (and the access
    token) unchanged, this document's own `tile_format` (and on WMTS the KVP keys) left out;
    `tilesize` is kept, as the tiles must be asked at that size."""
    return _query_without(request, {"tile_format", *(KVP + KVP_TILE if drop_kvp else ())})


def _suffix(tile_format: str | None) -> str:
    if tile_format is None:
        return ""
    if tile_format not in FORMATS:
        raise ParamError(f"tile_format: unknown {tile_format!r}; choose one of {sorted(FORMATS)}")
    return f".{tile_format}"


async def _tilejson(
    request: Request,
    tms_id: str,
    tilesize: int | None,
    fmt: str | None,
    tile_format: str | None,
    query: SearchQuery,
    params: ReadParams,
    render: RenderParams,
) -> dict[str, Any]:
    tms = matrix_set(tms_id)
    suffix = _suffix(tile_format)
    # what every tile would refuse is refused here, once
    await check_read(_engine(request), query, params, render, tile_format or fmt)
    bounds, minzoom, maxzoom = await _describe(request, tms, tilesize, query, params)
    template = f"{public_base_url(request)}tiles/{tms.id}/{{z}}/{{x}}/{{y}}{suffix}"
    return {
        "tilejson": "3.0.0",
        "name": "terrazzo",
        "description": f"Mosaic of {_engine(request).catalog.name} ({tms.id})",
        "version": "1.0.0",
        "scheme": "xyz",
        "tiles": [template + tile_query(request)],
        "minzoom": minzoom,
        "maxzoom": maxzoom,
        "bounds": bounds,
        "center": [(bounds[0] + bounds[2]) / 2, (bounds[1] + bounds[3]) / 2, minzoom],
    }


@router.get("/tilejson.json", summary="TileJSON 3.0.0 of the mosaic (WebMercatorQuad)")
async def tilejson(
    request: Request,
    tilesize: Tilesize = None,
    format: Format = None,
    tile_format: TileFormat = None,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
    tile: TileParams = Depends(tile_params),  # checked here, copied into the tile URLs
) -> dict[str, Any]:
    """The tile parameters are copied into the `tiles` template; a combination every tile
    would refuse (a float asset as PNG without rescale, a colormap on three bands, a bidx
    past the bands) is a 400 here."""
    return await _tilejson(
        request, DEFAULT_TMS, tilesize, format, tile_format, query, params, render
    )


@router.get(
    "/{tileMatrixSetId}/tilejson.json",
    summary="TileJSON 3.0.0 of the mosaic",
    responses=responses.NOT_FOUND,
)
async def tilejson_tms(
    request: Request,
    tileMatrixSetId: str,
    tilesize: Tilesize = None,
    format: Format = None,
    tile_format: TileFormat = None,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
    tile: TileParams = Depends(tile_params),  # checked here, copied into the tile URLs
) -> dict[str, Any]:
    """As /tilejson.json, in the matrix set `tileMatrixSetId`."""
    return await _tilejson(
        request, tileMatrixSetId, tilesize, format, tile_format, query, params, render
    )


@router.get("/tileMatrixSets", summary="The tile matrix sets tiles can be asked in")
async def tile_matrix_sets(request: Request) -> dict[str, Any]:
    base = public_base_url(request)
    return {
        "tileMatrixSets": [
            {
                "id": tms_id,
                "title": matrix_set(tms_id).title,
                "links": [
                    {
                        "href": f"{base}tileMatrixSets/{tms_id}",
                        "rel": "self",
                        "type": "application/json",
                        "title": "The tile matrix set definition",
                    }
                ],
            }
            for tms_id in morecantile.tms.list()
        ],
        "links": [{"href": f"{base}tileMatrixSets", "rel": "self", "type": "application/json"}],
    }


@router.get(
    "/tileMatrixSets/{tileMatrixSetId}",
    summary="One OGC TileMatrixSet 2.0 document",
    responses=responses.NOT_FOUND,
)
async def tile_matrix_set(tileMatrixSetId: str) -> Response:
    tms = matrix_set(tileMatrixSetId)
    return Response(
        tms.model_dump_json(exclude_none=True, by_alias=True), media_type="application/json"
    )


def _crs_urn(uri: str) -> str:
    """http://www.opengis.net/def/crs/EPSG/0/3857 → urn:ogc:def:crs:EPSG::3857 (WMTS 1.0)."""
    match = re.search(r"/def/crs/([^/]+)/([^/]+)/([^/]+)$", uri)
    if not match:
        return uri
    authority, version, code = match.groups()
    return f"urn:ogc:def:crs:{authority}:{'' if version == '0' else version}:{code}"


def _el(parent: ET.Element, tag: str, text: Any = None, **attrs: str) -> ET.Element:
    prefix, _, name = tag.rpartition(":")
    element = ET.SubElement(parent, f"{{{NS[prefix]}}}{name}", attrs)
    if text is not None:
        element.text = str(text)
    return element


def _operation(parent: ET.Element, name: str, href: str) -> None:
    """An operation at `href` (the capabilities URL): RESTful, and KVP (GetTile answered by
    the capabilities routes themselves, as OWSLib's `gettile` asks)."""
    op = _el(parent, "ows:Operation", name=name)
    get = _el(_el(_el(op, "ows:DCP"), "ows:HTTP"), "ows:Get", **{f"{{{NS['xlink']}}}href": href})
    allowed = _el(_el(get, "ows:Constraint", name="GetEncoding"), "ows:AllowedValues")
    _el(allowed, "ows:Value", "RESTful")
    _el(allowed, "ows:Value", "KVP")


def wmts_capabilities(
    tms: TileMatrixSet,
    *,
    base: str,
    self_url: str,
    query: str,
    bounds: list[float],
    minzoom: int,
    maxzoom: int,
    tilesize: int | None = None,
    fmt: str = TILE_FORMAT,
) -> bytes:
    """A WMTS 1.0.0 GetCapabilities document, elements in the schema's order: one layer
    (the mosaic) with a RESTful ResourceURL and its matrix set (zooms minzoom..maxzoom).

    With `tilesize`, tiles are that many pixels over the same ground, so TileWidth/Height
    are `tilesize` and the scale denominators shrink in proportion.
    """
    root = ET.Element(
        f"{{{NS['']}}}Capabilities",
        {
            "version": "1.0.0",
            f"{{{NS['xsi']}}}schemaLocation": (
                "http://www.opengis.net/wmts/1.0 "
                "http://schemas.opengis.net/wmts/1.0/wmtsGetCapabilities_response.xsd"
            ),
        },
    )
    ident = _el(root, "ows:ServiceIdentification")
    _el(ident, "ows:Title", "Terrazzo")
    _el(ident, "ows:ServiceType", "OGC WMTS")
    _el(ident, "ows:ServiceTypeVersion", "1.0.0")
    ops = _el(root, "ows:OperationsMetadata")
    _operation(ops, "GetCapabilities", self_url)
    _operation(ops, "GetTile", self_url)

    contents = _el(root, "Contents")
    layer = _el(contents, "Layer")
    _el(layer, "ows:Title", "Terrazzo mosaic")
    _el(layer, "ows:Abstract", f"Mosaic of the catalog's items in {tms.id}")
    box = _el(layer, "ows:WGS84BoundingBox", crs="urn:ogc:def:crs:OGC:2:84")
    _el(box, "ows:LowerCorner", f"{bounds[0]} {bounds[1]}")
    _el(box, "ows:UpperCorner", f"{bounds[2]} {bounds[3]}")
    _el(layer, "ows:Identifier", "terrazzo")
    style = _el(layer, "Style", isDefault="true")
    _el(style, "ows:Identifier", "default")
    media = FORMATS[fmt][1]
    _el(layer, "Format", media)
    _el(_el(layer, "TileMatrixSetLink"), "TileMatrixSet", tms.id)
    template = f"{base}tiles/{tms.id}/{{TileMatrix}}/{{TileCol}}/{{TileRow}}.{fmt}"
    _el(layer, "ResourceURL", format=media, resourceType="tile", template=template + query)

    matrix_set = _el(contents, "TileMatrixSet")
    _el(matrix_set, "ows:Identifier", tms.id)
    _el(matrix_set, "ows:SupportedCRS", _crs_urn(str(tms.crs.root)))
    for z in range(minzoom, maxzoom + 1):
        m = tms.matrix(z)
        width, height = (tilesize, tilesize) if tilesize else (m.tileWidth, m.tileHeight)
        matrix = _el(matrix_set, "TileMatrix")
        _el(matrix, "ows:Identifier", m.id)
        _el(matrix, "ScaleDenominator", repr(m.scaleDenominator * m.tileWidth / width))
        _el(matrix, "TopLeftCorner", " ".join(repr(float(v)) for v in m.pointOfOrigin))
        _el(matrix, "TileWidth", width)
        _el(matrix, "TileHeight", height)
        _el(matrix, "MatrixWidth", m.matrixWidth)
        _el(matrix, "MatrixHeight", m.matrixHeight)
    _el(root, "ServiceMetadataURL", **{f"{{{NS['xlink']}}}href": self_url})
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


async def _wmts(
    request: Request,
    tms_id: str,
    tilesize: int | None,
    tile_format: str | None,
    query: SearchQuery,
    params: ReadParams,
    render: RenderParams,
    tile: TileParams,
) -> Response:
    tms = matrix_set(tms_id)
    kvp = {k.lower(): v for k, v in request.query_params.items() if k.lower() in KVP + KVP_TILE}
    operation = kvp.get("request", "GetCapabilities")
    if operation.lower() == "gettile":
        return await _kvp_tile(request, tms, kvp, tilesize, query, params, render, tile)
    if operation.lower() != "getcapabilities":
        raise ParamError(
            f"request: this WMTS answers GetCapabilities and GetTile, not {operation!r}"
        )
    fmt = _suffix(tile_format)[1:] or TILE_FORMAT
    await check_read(_engine(request), query, params, render, fmt)  # once, not per tile
    bounds, minzoom, maxzoom = await _describe(request, tms, tilesize, query, params)
    body = wmts_capabilities(
        tms,
        base=public_base_url(request),
        # this document's URL with the tile parameters, without KVP keys: OWSLib appends its
        # own (REQUEST=GetTile...) to it
        self_url=str(public_url(request).replace(query=""))
        + _query_without(request, set(KVP + KVP_TILE)),
        query=tile_query(request, drop_kvp=True),
        bounds=bounds,
        minzoom=minzoom,
        maxzoom=maxzoom,
        tilesize=tilesize,
        fmt=fmt,
    )
    return Response(body, media_type="application/xml")


async def _kvp_tile(
    request: Request,
    tms: TileMatrixSet,
    kvp: dict[str, str],
    tilesize: int | None,
    query: SearchQuery,
    params: ReadParams,
    render: RenderParams,
    tile: TileParams,
) -> Response:
    """A KVP GetTile (TILEMATRIXSET, TILEMATRIX, TILECOL, TILEROW, FORMAT), answered as the
    RESTful tile it names; a key missing or naming something this service lacks is a 400."""
    from app.tiles import render_tile

    missing = [k.upper() for k in KVP_TILE if k not in kvp]
    if missing:
        raise ParamError(f"GetTile: missing {', '.join(missing)}")
    if kvp.get("layer", "terrazzo") != "terrazzo":
        raise ParamError(f"LAYER: this WMTS has one layer, 'terrazzo', not {kvp['layer']!r}")
    if kvp.get("tilematrixset", tms.id) != tms.id:
        raise ParamError(
            f"TILEMATRIXSET: this document's is {tms.id!r}, not {kvp['tilematrixset']!r}"
        )
    ids = [m.id for m in tms.tileMatrices]
    if kvp["tilematrix"] not in ids:
        raise ParamError(
            f"TILEMATRIX: {kvp['tilematrix']!r} is not one of {tms.id}'s {ids[0]}..{ids[-1]}"
        )
    media = {m: f for f, (_, m) in reversed(FORMATS.items())}
    fmt = media.get(kvp.get("format", FORMATS[TILE_FORMAT][1]))
    if fmt is None:
        raise ParamError(f"FORMAT: expected one of {sorted(media)}, got {kvp['format']!r}")
    try:
        col, row = int(kvp["tilecol"]), int(kvp["tilerow"])
    except ValueError as exc:
        raise ParamError("TILECOL, TILEROW: expected integers") from exc
    z = ids.index(kvp["tilematrix"])
    return await render_tile(
        request, tms.id, z, col, row, fmt, tilesize or 256, query, params, render, tile
    )


WMTS_ROUTE: dict[str, Any] = {
    "response_class": Response,
    "responses": responses.WMTS,
    "openapi_extra": {"x-query-names-nocase": list(KVP + KVP_TILE)},
}


@router.get(
    "/WMTSCapabilities.xml",
    summary="OGC WMTS 1.0.0 capabilities (WebMercatorQuad); KVP GetTile",
    **WMTS_ROUTE,
)
async def wmts(
    request: Request,
    tilesize: Tilesize = None,
    tile_format: TileFormat = None,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
    tile: TileParams = Depends(tile_params),
) -> Response:
    """The tile parameters are copied into the ResourceURL template (the KVP keys are not);
    a combination every tile would refuse is a 400 here."""
    return await _wmts(request, DEFAULT_TMS, tilesize, tile_format, query, params, render, tile)


@router.get(
    "/{tileMatrixSetId}/WMTSCapabilities.xml",
    summary="OGC WMTS 1.0.0 capabilities; KVP GetTile",
    **WMTS_ROUTE,
)
async def wmts_tms(
    request: Request,
    tileMatrixSetId: str,
    tilesize: Tilesize = None,
    tile_format: TileFormat = None,
    query: SearchQuery = Depends(search_query),
    params: ReadParams = Depends(read_params),
    render: RenderParams = Depends(render_params),
    tile: TileParams = Depends(tile_params),
) -> Response:
    """As /WMTSCapabilities.xml, in the matrix set `tileMatrixSetId`."""
    return await _wmts(request, tileMatrixSetId, tilesize, tile_format, query, params, render, tile)
