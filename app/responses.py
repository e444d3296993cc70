"""What each route family answers, for OpenAPI: the real media types and every status code
the handlers and the guard return (a client generator or schemathesis reads these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from app.encoders import CHUNKS_MEDIA_TYPE, FORMATS


class Error(BaseModel):
    """Every error body: `detail` says what to change (app.main's error table)."""

    detail: str


class Problem(BaseModel):
    parameter: str
    problem: str | None = None
    got: Any = None


class Invalid(BaseModel):
    """A request FastAPI's validation refused: `detail` sums up `errors`."""

    detail: str
    errors: list[Problem]


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "model": Error}


# what the request guard (app.guard) may answer on any route
GUARD: dict[int | str, dict[str, Any]] = {
    401: _error("A missing or wrong API key (X-API-Key, Authorization: Bearer, ?access_token)"),
    408: _error("The request body did not arrive in time"),
    413: _error("The request or its result is over a server limit"),
    414: _error("The URL is too long"),
    415: _error("A POST body that is not JSON"),
    503: _error("Overloaded: retry after the Retry-After seconds"),
}
BAD = {400: _error("A parameter or a combination the server cannot honour; says the fix")}
# every route: a misspelled parameter (400), a malformed one (422), the guard's answers
APP: dict[int | str, dict[str, Any]] = {
    **BAD,
    422: {"description": "A parameter of the wrong type or range", "model": Invalid},
    **GUARD,
}
TILE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The tile, in the format asked for (by suffix or `format`)",
        "content": {media: {} for media in dict.fromkeys(m for _, m in FORMATS.values())},
    },
    204: {"description": "No item has data in this tile"},
    304: {"description": "Not modified (If-None-Match)"},
    **BAD,
    404: _error("No such tile matrix set or tile"),
    502: _error("Every covering item failed to read (the items and errors are listed)"),
    504: _error("Not done within the tile timeout"),
}
NOT_FOUND = {404: _error("Nothing by that name; the message lists what exists")}


def body(media: str, description: str = "OK") -> dict[int | str, dict[str, Any]]:
    """A 200 of `media` (GeoJSON, JSON Schema...), not FastAPI's default application/json."""
    return {200: {"description": description, "content": {media: {}}}}


CHUNKS: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A stream of frames (see the route's description); JSON with dry_run",
        "content": {CHUNKS_MEDIA_TYPE: {}, "application/json": {}},
    },
    **BAD,
}
# a WMTS capabilities route also answers a KVP GetTile with the tile
WMTS: dict[int | str, dict[str, Any]] = {
    **TILE,
    200: {
        "description": "WMTS 1.0.0 capabilities, or the tile a KVP GetTile names",
        "content": {"application/xml": {}, **TILE[200]["content"]},
    },
}
# the crop routes (app.crops): a tile's answers, plus the pixel cap
CROP: dict[int | str, dict[str, Any]] = {
    **TILE,
    200: {
        "description": "The crop, in the format asked for (GeoTIFF carries the grid's CRS and "
        "transform); Content-Bbox and Content-Crs name the output grid",
        "content": TILE[200]["content"],
    },
    204: {"description": "No item has data in this area"},
    304: {"description": "Not modified (If-None-Match; GET only)"},
    404: _error("No item asset or collection by that name"),
    413: _error("width x height is over the server's pixel limit (TERRAZZO_MAX_CHUNK_PIXELS)"),
}
