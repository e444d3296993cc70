"""Catalog browsing: STAC-like collections and item footprints.

A viewer (and a person with curl) needs to know what the mosaic is made of before asking
for pixels: which collections, dates and assets exist, and where each item lies. These routes
answer from the DuckDB catalog only (no COG is opened), on its search threads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any
from urllib.parse import quote

from fastapi import Depends, Query, Request
from fastapi.responses import JSONResponse

from app import responses
from app.ogc import public_base_url
from app.params import api_router, search_query
from core.catalog import SearchQuery
from core.engine import ParamError

router = api_router("catalog")
MAX_LIMIT = 10_000
GEOJSON = "application/geo+json"


def parse_bbox(text: str) -> tuple[float, float, float, float]:
    """`minx,miny,maxx,maxy` in lon/lat (a 6-number 3D bbox drops its heights), checked."""
    parts = [p.strip() for p in text.split(",")]
    try:
        numbers = [float(p) for p in parts]
    except ValueError as exc:
        raise ParamError(f"bbox: expected 4 comma-separated numbers, got {text!r}") from exc
    if len(numbers) == 6:
        numbers = [numbers[0], numbers[1], numbers[3], numbers[4]]
    if len(numbers) != 4 or not all(math.isfinite(n) for n in numbers):
        raise ParamError(f"bbox: expected minx,miny,maxx,maxy (lon/lat), got {text!r}")
    minx, miny, maxx, maxy = numbers
    if not (
        -180 <= minx <= 180 and -180 <= maxx <= 180 and -90 <= miny <= 90 and -90 <= maxy <= 90
    ):
        raise ParamError(f"bbox: {text!r} is outside lon -180..180, lat -90..90")
    if miny > maxy:
        raise ParamError(f"bbox: miny {miny} is above maxy {maxy}")
    if minx > maxx:
        raise ParamError(
            f"bbox: minx {minx} > maxx {maxx} (across the antimeridian) is not supported; "
            "ask for each side separately"
        )
    return minx, miny, maxx, maxy


def _collection(entry: dict[str, Any], base: str) -> dict[str, Any]:
    """One catalog summary row as a STAC Collection (plus item count, asset names, dates)."""
    cid = entry["id"]
    here = f"{base}collections/{quote(str(cid), safe='')}"
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/item-assets/v1.0.0/schema.json"],
        "id": cid,
        "title": cid,
        "description": f"{entry['items']} items served by Terrazzo",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [entry["bbox"]]},
            "temporal": {"interval": [entry["interval"]]},
        },
        "item_count": entry["items"],
        "asset_names": list(entry["item_assets"]),
        "dates": entry["dates"],
        "dates_truncated": entry["dates_truncated"],
        "item_assets": entry["item_assets"],
        "links": [
            {"rel": "self", "href": here, "type": "application/json"},
            {"rel": "root", "href": base, "type": "application/json"},
            {"rel": "parent", "href": base, "type": "application/json"},
            # STAC API's paged full items (app.stac_api); /items is the viewer's footprints
            {"rel": "items", "href": f"{here}/items", "type": GEOJSON},
            {
                "rel": "alternate",
                "href": f"{base}items?collections={quote(str(cid), safe='')}",
                "type": GEOJSON,
                "title": "Item footprints",
            },
            {
                "rel": "tilejson",
                "href": f"{base}tilejson.json?collections={quote(str(cid), safe='')}",
                "type": "application/json",
            },
        ],
    }


async def _collections(request: Request) -> list[dict[str, Any]]:
    return await request.app.state.engine.catalog.collections_async()


@router.get("/collections", summary="Collections: item counts, extents, dates, assets")
async def collections(request: Request) -> dict[str, Any]:
    base = public_base_url(request)
    found = [_collection(c, base) for c in await _collections(request)]
    return {
        "collections": found,
        "numberMatched": len(found),
        "numberReturned": len(found),
        "links": [
            {"rel": "self", "href": f"{base}collections", "type": "application/json"},
            {"rel": "root", "href": base, "type": "application/json"},
            {"rel": "parent", "href": base, "type": "application/json"},
        ],
    }


@router.get("/collections/{collectionId}", summary="One collection", responses=responses.NOT_FOUND)
async def collection(request: Request, collectionId: str) -> JSONResponse:
    entries = await _collections(request)
    for entry in entries:
        if entry["id"] == collectionId:
            return JSONResponse(_collection(entry, public_base_url(request)))
    known = [e["id"] for e in entries]
    return JSONResponse(
        {"detail": f"collectionId: no collection {collectionId!r}; this catalog has {known}"},
        status_code=404,
    )


@router.get(
    "/items",
    summary="Item footprints as a GeoJSON FeatureCollection",
    response_class=JSONResponse,
    responses=responses.body(GEOJSON, "A FeatureCollection of footprints"),
)
async def items(
    request: Request,
    bbox: str | None = Query(
        None,
        description="minx,miny,maxx,maxy in lon/lat: items whose bbox intersects it.",
    ),
    limit: int = Query(100, ge=1, le=MAX_LIMIT, description=f"At most {MAX_LIMIT}."),
    query: SearchQuery = Depends(search_query),
) -> JSONResponse:
    """Matching items (newest first unless `sortby`), each with its footprint, bbox, datetime,
    collection and asset names; `numberMatched` counts all matches, not only this page."""
    query = dataclasses.replace(
        query, bbox=parse_bbox(bbox) if bbox else None, limit=limit, intersects=None
    )
    features, matched = await request.app.state.engine.catalog.footprints_async(query)
    return JSONResponse(
        {
            "type": "FeatureCollection",
            "features": features,
            "numberMatched": matched,
            "numberReturned": len(features),
            "links": [{"rel": "self", "href": str(request.url), "type": GEOJSON}],
        },
        media_type=GEOJSON,
    )
