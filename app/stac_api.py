"""STAC API over the served catalog (issue 16): /search, /collections/{id}/items, full items.

Why: pystac-client, STAC Browser and odc-stac/stackstac speak STAC API, not Terrazzo's own
/items. These routes answer from the same catalog backend and its search threads as the tile
routes (`CatalogBackend.stac_page_async`: never SQL on the event loop), with the items as the
catalog stores them (core.catalog.stac). What each parameter means is STAC API's; every bad
one is a 400 that says what to send instead (ParamError), and every answer is bounded: `limit`
is capped at MAX_LIMIT, a page token is at most MAX_TOKEN characters and is checked to belong
to the search it is sent with.

Paging is by key (the last item's sort values): the `next` link carries a token; for GET it
is the same URL with `token`, for POST a POST link whose body `{"token": ...}` is merged into
the request's own body (STAC API item-search's paging).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from typing import Any
from urllib.parse import quote, urlencode

import shapely
import shapely.geometry
from fastapi import Query, Request
from fastapi.responses import JSONResponse
from shapely.geometry.base import BaseGeometry

from app import responses
from app.catalog_routes import GEOJSON, parse_bbox
from app.ogc import public_base_url
from app.params import FILTER_LANGS, api_router
from core.catalog import SearchQuery, parse_datetime_range
from core.engine import ParamError
from core.filters import parse as parse_filter

router = api_router("stac")
STAC_VERSION = "1.1.0"
DEFAULT_LIMIT = 10
MAX_LIMIT = 10_000  # items per page; a larger `limit` is served as this (OGC API Features)
MAX_TOKEN = 4_096  # characters of a page token
MAX_INTERSECTS_POINTS = 100_000  # vertices of an `intersects` geometry
GEOMETRY_TYPES = (
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
)
# what this API implements (app.landing lists them in /conformance and the landing page)
CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#sort",
    "https://api.stacspec.org/v1.0.0/item-search#filter",
    "https://api.stacspec.org/v1.0.0/ogcapi-features#sort",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/filter",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/features-filter",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-text",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
]
# the keys a POST /search body may have
BODY_KEYS = (
    "bbox",
    "intersects",
    "datetime",
    "collections",
    "ids",
    "filter",
    "filter-lang",
    "filter-crs",
    "sortby",
    "limit",
    "token",
)


# -- parameters: one parser per STAC parameter, for GET text and POST JSON alike -----------


def _strings(name: str, value: Any) -> tuple[str, ...]:
    """A GET comma list or a POST array of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(v for v in value if v)
    raise ParamError(f"{name}: expected an array of strings, got {json.dumps(value)[:200]}")


def parse_limit(value: Any) -> int:
    """`limit`: 1.. (default DEFAULT_LIMIT); above MAX_LIMIT it is MAX_LIMIT."""
    if value is None:
        return DEFAULT_LIMIT
    if isinstance(value, bool):
        raise ParamError(f"limit: expected a whole number of items, got {value!r}")
    try:
        number = int(value) if isinstance(value, str | int) else None
    except ValueError:
        number = None
    if number is None:
        raise ParamError(f"limit: expected a whole number of items, got {value!r}")
    if number < 1:
        raise ParamError(f"limit: must be at least 1, got {number}")
    return min(number, MAX_LIMIT)


def _bbox(value: Any) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ParamError(f"bbox: expected an array of 4 or 6 numbers, got {value!r}"[:300])
        value = ",".join(repr(float(v)) for v in value)
    if not isinstance(value, str):
        raise ParamError(f"bbox: expected an array of 4 or 6 numbers, got {value!r}"[:300])
    return parse_bbox(value)


def _intersects(value: Any) -> BaseGeometry | None:
    """A GeoJSON geometry in lon/lat (POST: an object; GET: its JSON text)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ParamError(f"intersects: not valid JSON ({exc})") from exc
    if not isinstance(value, dict) or value.get("type") not in GEOMETRY_TYPES:
        kind = value.get("type") if isinstance(value, dict) else type(value).__name__
        raise ParamError(
            f"intersects: expected a GeoJSON geometry (type one of {list(GEOMETRY_TYPES)}), "
            f"got type {kind!r}"
        )
    try:
        shape = shapely.geometry.shape(value)
    except Exception as exc:  # shapely/GEOS raise several types for malformed coordinates
        raise ParamError(f"intersects: not a valid {value['type']} ({exc})") from exc
    if shape.is_empty:
        raise ParamError("intersects: the geometry is empty")
    if shapely.get_num_coordinates(shape) > MAX_INTERSECTS_POINTS:
        raise ParamError(f"intersects: more than {MAX_INTERSECTS_POINTS} vertices")
    minx, miny, maxx, maxy = shape.bounds
    if not all(math.isfinite(v) for v in shape.bounds):
        raise ParamError("intersects: coordinates must be finite numbers")
    if minx < -180 or maxx > 180 or miny < -90 or maxy > 90:
        raise ParamError(f"intersects: {list(shape.bounds)} is outside lon -180..180, lat -90..90")
    if not shape.is_valid:
        shape = shape.buffer(0) if shape.geom_type in ("Polygon", "MultiPolygon") else shape
    return shape


def _sortby(value: Any) -> tuple[str, ...]:
    """GET `-datetime,+id` (a `+` decoded as a space is a `+`); POST
    `[{"field": "datetime", "direction": "desc"}]`. Default: newest first."""
    if value is None:
        return ("-datetime",)
    if isinstance(value, str):
        fields = tuple(s.strip() for s in value.split(",") if s.strip())
    elif isinstance(value, list):
        fields = ()
        for entry in value:
            direction = entry.get("direction", "asc") if isinstance(entry, dict) else None
            if not (isinstance(entry, dict) and isinstance(entry.get("field"), str)) or (
                direction not in ("asc", "desc")
            ):
                raise ParamError(
                    'sortby: expected [{"field": name, "direction": "asc" or "desc"}], got '
                    + json.dumps(entry)[:200]
                )
            fields += (("-" if direction == "desc" else "+") + entry["field"],)
    else:
        raise ParamError(f"sortby: expected a list of fields, got {value!r}"[:300])
    return fields or ("-datetime",)


def _filter(value: Any, lang: Any, crs: Any) -> dict[str, Any] | None:
    if lang is not None and lang not in FILTER_LANGS:
        raise ParamError(f"filter-lang: expected one of {list(FILTER_LANGS)}, got {lang!r}")
    if crs is not None and not (
        isinstance(crs, str) and crs.rstrip("/").endswith(("CRS84", "4326"))
    ):
        raise ParamError(f"filter-crs: only CRS84 (lon/lat) is supported, got {crs!r}")
    if value is None:
        return None
    if not isinstance(value, str | dict):
        raise ParamError("filter: expected CQL2-text (a string) or CQL2-JSON (an object)")
    is_json = isinstance(value, dict) or value.lstrip().startswith("{")
    if lang is not None and is_json != (lang == "cql2-json"):
        raise ParamError(f"filter-lang: {lang} was given; the filter is not {lang}")
    return parse_filter(value)


def search_from(params: dict[str, Any]) -> tuple[SearchQuery, int, str | None]:
    """The catalog query, page size and token of a STAC search (GET or POST spelling)."""
    bbox = _bbox(params.get("bbox"))
    intersects = _intersects(params.get("intersects"))
    if bbox is not None and intersects is not None:
        raise ParamError("bbox, intersects: give one of them, not both")
    if intersects is not None:
        bbox = intersects.bounds  # the catalog's bbox pruning; the footprint test refines
    when = params.get("datetime")
    if when is not None and not isinstance(when, str):
        raise ParamError(f"datetime: expected an RFC 3339 instant or interval, got {when!r}")
    token = params.get("token")
    if token is not None and not isinstance(token, str):
        raise ParamError("token: expected the string of a `next` link")
    query = SearchQuery(
        bbox=bbox,
        intersects=intersects,
        datetime=parse_datetime_range(when) if when else None,
        collections=_strings("collections", params.get("collections")),
        ids=_strings("ids", params.get("ids")),
        sortby=_sortby(params.get("sortby")),
        filter=_filter(params.get("filter"), params.get("filter-lang"), params.get("filter-crs")),
    )
    return query, parse_limit(params.get("limit")), token


# -- page tokens -----------------------------------------------------------------------------


def _fingerprint(query: SearchQuery) -> str:
    """What a token is tied to: the search without its page size (a token sent with other
    parameters would start a different search at a key that means nothing there)."""
    shape = query.intersects.wkb_hex if query.intersects is not None else None
    when = [t.isoformat() if t else None for t in query.datetime] if query.datetime else None
    text = json.dumps(
        [query.bbox, shape, when, query.collections, query.ids, query.sortby, query.filter],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_token(query: SearchQuery, key: list[Any]) -> str:
    raw = json.dumps({"q": _fingerprint(query), "k": key}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_token(query: SearchQuery, token: str | None) -> list[Any] | None:
    """The key a page starts after, from a `next` link's token (checked, bounded)."""
    if token is None or token == "":
        return None
    if len(token) > MAX_TOKEN:
        raise ParamError(f"token: longer than {MAX_TOKEN} characters; use a `next` link's token")
    try:
        doc = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, binascii.Error) as exc:
        raise ParamError("token: not a page token of this server; use a `next` link's") from exc
    key = doc.get("k") if isinstance(doc, dict) else None
    if not (
        isinstance(key, list)
        and key
        and all(v is None or isinstance(v, str | int | float | bool) for v in key)
    ):
        raise ParamError("token: not a page token of this server; use a `next` link's")
    if doc.get("q") != _fingerprint(query):
        raise ParamError(
            "token: it belongs to another search; send it with the same bbox, intersects, "
            "datetime, collections, ids, filter and sortby as the request it came from"
        )
    return key


# -- items and pages -------------------------------------------------------------------------


def _href(base: str, *parts: str) -> str:
    return base + "/".join(quote(p, safe="") for p in parts)


def with_links(item: dict[str, Any], base: str) -> dict[str, Any]:
    """The API's links on a catalog item (its stored links that are not self, root, parent
    or collection are kept)."""
    own = {"self", "root", "parent", "collection"}
    links = [link for link in item.get("links", []) if link.get("rel") not in own]
    links.append({"rel": "root", "href": base, "type": "application/json"})
    collection = item.get("collection")
    if collection is not None:
        links += [
            {"rel": "self", "href": _href(base, "collections", collection, "items", item["id"]),
             "type": GEOJSON},
            {"rel": "parent", "href": _href(base, "collections", collection),
             "type": "application/json"},
            {"rel": "collection", "href": _href(base, "collections", collection),
             "type": "application/json"},
        ]  # fmt: skip
    return {**item, "links": links}


async def _page(
    request: Request,
    route: str,
    query: SearchQuery,
    limit: int,
    token: str | None,
    next_link: Any,
) -> JSONResponse:
    """A FeatureCollection page; `next_link(token)` builds the `next` link."""
    after = decode_token(query, token)
    page = await request.app.state.engine.catalog.stac_page_async(query, limit, after)
    base = public_base_url(request)
    links = [
        {"rel": "root", "href": base, "type": "application/json"},
        {"rel": "self", "href": _self_href(request, route), "type": GEOJSON},
    ]
    if page.next_key is not None:
        links.append(next_link(encode_token(query, page.next_key)))
    body: dict[str, Any] = {
        "type": "FeatureCollection",
        "features": [with_links(item, base) for item in page.items],
        "numberReturned": len(page.items),
        "links": links,
    }
    if page.matched is not None:  # with `intersects`, counting would test every footprint
        body["numberMatched"] = page.matched
    return JSONResponse(body, media_type=GEOJSON)


def _self_href(request: Request, route: str) -> str:
    """This request's URL under the public base (root path, forwarded prefix)."""
    query = request.url.query
    return f"{public_base_url(request)}{route}" + (f"?{query}" if query else "")


def _get_next(request: Request, route: str, limit: int) -> Any:
    """A GET `next` link: this request's parameters, its limit, the new token."""

    def link(token: str) -> dict[str, Any]:
        params = [
            (k, v) for k, v in request.query_params.multi_items() if k not in ("token", "limit")
        ]
        params += [("limit", str(limit)), ("token", token)]
        return {
            "rel": "next",
            "href": f"{public_base_url(request)}{route}?{urlencode(params)}",
            "type": GEOJSON,
            "method": "GET",
        }

    return link


# -- routes ----------------------------------------------------------------------------------

_BBOX = Query(None, description="minx,miny,maxx,maxy (lon/lat): items whose bbox intersects it.")
_DATETIME = Query(None, description="RFC 3339 instant or interval `start/end` ('..' = open).")
_LIMIT = Query(None, description=f"Items per page (default {DEFAULT_LIMIT}, at most {MAX_LIMIT}).")
_TOKEN = Query(None, description="The page token of a `next` link.")
_FILTER = Query(None, description="CQL2-text or CQL2-JSON on item properties (see /queryables).")
_FILTER_LANG = Query(None, alias="filter-lang", description="cql2-text or cql2-json.")
_FILTER_CRS = Query(None, alias="filter-crs", description="Only CRS84 is supported.")
_SORTBY = Query(None, description="Fields, `-` for descending, e.g. `-datetime,id`.")


@router.get(
    "/search",
    summary="STAC item search (GET)",
    response_class=JSONResponse,
    responses=responses.body(GEOJSON, "An ItemCollection, `next` link while more match"),
)
async def search_get(
    request: Request,
    bbox: str | None = _BBOX,
    intersects: str | None = Query(None, description="A GeoJSON geometry (lon/lat), as JSON."),
    datetime: str | None = _DATETIME,
    collections: str | None = Query(None, description="Collection ids, comma-separated."),
    ids: str | None = Query(None, description="Item ids, comma-separated."),
    filter: str | None = _FILTER,
    filter_lang: str | None = _FILTER_LANG,
    filter_crs: str | None = _FILTER_CRS,
    sortby: str | None = _SORTBY,
    limit: str | None = _LIMIT,
    token: str | None = _TOKEN,
) -> JSONResponse:
    """Items matching every parameter given, in `sortby` order, `limit` per page."""
    params = {
        "bbox": bbox,
        "intersects": intersects,
        "datetime": datetime,
        "collections": collections,
        "ids": ids,
        "filter": filter,
        "filter-lang": filter_lang,
        "filter-crs": filter_crs,
        "sortby": sortby,
        "limit": limit,
        "token": token,
    }
    query, size, token = search_from(params)
    next_link = _get_next(request, "search", size)
    return await _page(request, "search", query, size, token, next_link)


_STRINGS = {"type": "array", "items": {"type": "string"}}
SEARCH_BODY = {  # documented for clients and schema-driven tests; parsed by `search_from`
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 6},
        "intersects": {"type": "object", "description": "A GeoJSON geometry (lon/lat)."},
        "datetime": {"type": "string"},
        "collections": _STRINGS,
        "ids": _STRINGS,
        "filter": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "filter-lang": {"type": "string", "enum": ["cql2-text", "cql2-json"]},
        "filter-crs": {"type": "string"},
        "sortby": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field"],
                "properties": {
                    "field": {"type": "string"},
                    "direction": {"type": "string", "enum": ["asc", "desc"]},
                },
            },
        },
        "limit": {"type": "integer", "minimum": 1},
        "token": {"type": "string"},
    },
}


@router.post(
    "/search",
    summary="STAC item search (POST, JSON body)",
    response_class=JSONResponse,
    responses=responses.body(GEOJSON, "An ItemCollection, `next` link while more match"),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": SEARCH_BODY}},
        }
    },
)
async def search_post(request: Request) -> JSONResponse:
    """The body's keys are STAC API's (see BODY_KEYS); the `next` link is a POST whose body
    `{"token": ...}` is merged into this one."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise ParamError(f"body: not valid JSON ({exc})") from exc
    if not isinstance(body, dict):
        raise ParamError("body: expected a JSON object of search parameters")
    unknown = sorted(set(body) - set(BODY_KEYS))
    if unknown:
        raise ParamError(f"body: unknown key(s) {unknown}; a search takes {list(BODY_KEYS)}")
    query, size, token = search_from(body)

    def next_link(new: str) -> dict[str, Any]:
        return {
            "rel": "next",
            "href": f"{public_base_url(request)}search",
            "type": GEOJSON,
            "method": "POST",
            "body": {"token": new, "limit": size},
            "merge": True,
        }

    return await _page(request, "search", query, size, token, next_link)


async def _known_collection(request: Request, collection_id: str) -> dict[str, Any]:
    """The catalog's summary of `collection_id`, else a 404 that lists the ones it has."""
    entries = await request.app.state.engine.catalog.collections_async()
    for entry in entries:
        if entry["id"] == collection_id:
            return entry
    known = [e["id"] for e in entries]
    raise CollectionNotFound(
        f"collectionId: no collection {collection_id!r}; this catalog has {known}"
    )


class CollectionNotFound(LookupError):
    """A 404 with what exists (answered by `_not_found`)."""


def _not_found(exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


@router.get(
    "/collections/{collectionId}/items",
    summary="A collection's items (OGC API Features), paged",
    response_class=JSONResponse,
    responses={**responses.body(GEOJSON, "An ItemCollection"), **responses.NOT_FOUND},
)
async def collection_items(
    request: Request,
    collectionId: str,
    bbox: str | None = _BBOX,
    datetime: str | None = _DATETIME,
    ids: str | None = Query(None, description="Item ids, comma-separated."),
    collections: str | None = Query(
        None, description="Only this collection (pystac-client repeats it); others are a 400."
    ),
    filter: str | None = _FILTER,
    filter_lang: str | None = _FILTER_LANG,
    filter_crs: str | None = _FILTER_CRS,
    sortby: str | None = _SORTBY,
    limit: str | None = _LIMIT,
    token: str | None = _TOKEN,
) -> JSONResponse:
    """The collection's items in `sortby` order (newest first), `limit` per page."""
    try:
        await _known_collection(request, collectionId)
    except CollectionNotFound as exc:
        return _not_found(exc)
    others = sorted(set(_strings("collections", collections)) - {collectionId})
    if others:
        raise ParamError(
            f"collections: this route serves collection {collectionId!r} only, got {others}; "
            "use /search for several"
        )
    query, size, token = search_from(
        {
            "bbox": bbox,
            "datetime": datetime,
            "collections": [collectionId],
            "ids": ids,
            "filter": filter,
            "filter-lang": filter_lang,
            "filter-crs": filter_crs,
            "sortby": sortby,
            "limit": limit,
            "token": token,
        }
    )
    route = f"collections/{quote(collectionId, safe='')}/items"
    return await _page(request, route, query, size, token, _get_next(request, route, size))


@router.get(
    "/collections/{collectionId}/items/{itemId}",
    summary="One STAC Item",
    response_class=JSONResponse,
    responses={**responses.body(GEOJSON, "A STAC Item"), **responses.NOT_FOUND},
)
async def collection_item(request: Request, collectionId: str, itemId: str) -> JSONResponse:
    try:
        entry = await _known_collection(request, collectionId)
    except CollectionNotFound as exc:
        return _not_found(exc)
    query = SearchQuery(collections=(collectionId,), ids=(itemId,))
    page = await request.app.state.engine.catalog.stac_page_async(query, 1)
    if not page.items:
        items = _href(public_base_url(request), "collections", collectionId, "items")
        return _not_found(
            LookupError(
                f"itemId: no item {itemId!r} in collection {collectionId!r} "
                f"({entry['items']} items; list them at {items})"
            )
        )
    return JSONResponse(with_links(page.items[0], public_base_url(request)), media_type=GEOJSON)


# DuckDB column types as JSON Schema (the filter extension's queryables)
def _json_type(duck_type: str) -> dict[str, Any]:
    t = duck_type.upper()
    if t.endswith("[]"):
        return {"type": "array"}
    if t.startswith("TIMESTAMP"):
        return {"type": "string", "format": "date-time"}
    if t == "DATE":
        return {"type": "string", "format": "date"}
    if t in ("VARCHAR",):
        return {"type": "string"}
    if t == "BOOLEAN":
        return {"type": "boolean"}
    if t in ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
             "UINTEGER", "UBIGINT"):  # fmt: skip
        return {"type": "integer"}
    if t in ("FLOAT", "DOUBLE") or t.startswith("DECIMAL"):
        return {"type": "number"}
    return {}


@router.get(
    "/queryables",
    summary="The properties a filter can name (JSON Schema)",
    response_class=JSONResponse,
    responses=responses.body("application/schema+json", "A JSON Schema of the queryables"),
)
async def queryables(request: Request) -> JSONResponse:
    """Each catalog column a CQL2 filter or sortby can use, with its JSON type."""
    columns = request.app.state.engine.catalog.columns
    skip = {"assets", "links", "stac_extensions", "stac_version", "type", "bbox", "geometry"}
    properties = {
        name: {"title": name, **_json_type(kind)}
        for name, kind in columns.items()
        if name not in skip and not name.startswith("_")
    }
    return JSONResponse(
        {
            "$schema": "https://json-schema.org/draft/2019-09/schema",
            "$id": f"{public_base_url(request)}queryables",
            "type": "object",
            "title": "Queryables",
            "properties": properties,
            "additionalProperties": False,
        },
        media_type="application/schema+json",
    )
