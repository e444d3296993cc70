"""The landing page (`/`), `/conformance`, and the API docs served offline.

Why: a user's first request is `GET /`, and a tile server behind a firewall must document
itself without a CDN. Swagger UI and ReDoc come from the `fastapi-offline` package's vendored
assets (mounted at /static/docs), not from jsDelivr as FastAPI's defaults do. The landing page
is OGC API's: links by relation (self, service-desc, service-doc, conformance, tiles, map,
collections), JSON by default and a small HTML page for browsers. The JSON is also a STAC API
landing page (a STAC Catalog with `conformsTo` and the `search` links), so
`pystac_client.Client.open(url)` works against it (app.stac_api).
"""

from __future__ import annotations

import html
from pathlib import Path

import fastapi_offline
from fastapi import Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app.ogc import public_base_url
from app.params import api_router
from app.stac_api import CONFORMANCE as STAC_CONFORMANCE
from app.stac_api import STAC_VERSION
from core.engine import ParamError

router = api_router("landing")
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
router.mount("/static/docs", StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

# what this service implements, and nothing it does not: its tile paths are
# /tiles/{tms}/{z}/{x}/{y} (TiTiler's order), not OGC API - Tiles' {tileRow}/{tileCol}
CONFORMANCE = [
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/json",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/html",
    "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/oas30",
    "http://www.opengis.net/spec/tms/2.0/conf/tilematrixset",
    "http://www.opengis.net/spec/tms/2.0/conf/json-tilematrixset",
    *STAC_CONFORMANCE,
]

LINKS = [  # (rel, path, media type, title)
    ("self", "/", "application/json", "This page"),
    ("root", "/", "application/json", "This page"),
    ("service-desc", "/openapi.json", "application/vnd.oai.openapi+json;version=3.0", "OpenAPI"),
    ("service-doc", "/docs", "text/html", "API documentation (Swagger UI)"),
    ("service-doc", "/redoc", "text/html", "API documentation (ReDoc)"),
    ("conformance", "/conformance", "application/json", "Conformance classes"),
    ("data", "/collections", "application/json", "Collections"),
    ("search", "/search", "application/geo+json", "STAC item search"),
    (
        "http://www.opengis.net/def/rel/ogc/1.0/queryables",
        "/queryables",
        "application/schema+json",
        "Queryables (filter properties)",
    ),
    (
        "http://www.opengis.net/def/rel/ogc/1.0/tiling-schemes",
        "/tileMatrixSets",
        "application/json",
        "Tile matrix sets",
    ),
    ("tiles", "/tilejson.json", "application/json", "TileJSON (WebMercatorQuad)"),
    ("tiles", "/WMTSCapabilities.xml", "application/xml", "WMTS capabilities"),
    ("items", "/items", "application/geo+json", "Item footprints"),
    ("alternate", "/map", "text/html", "Map viewer"),
]


@router.get("/", summary="Landing page: what this service offers, as links")
async def landing(
    request: Request,
    f: str | None = Query(None, description="json or html (default: by the Accept header)."),
) -> Response:
    base = public_base_url(request).rstrip("/")  # root path and forwarded prefix kept
    links = [
        {"rel": rel, "href": base + path, "type": kind, "title": title}
        for rel, path, kind, title in LINKS
    ]
    for link in links:  # STAC API: search is GET and POST, one link each
        if link["rel"] == "search":
            link["method"] = "GET"
    links.append({**next(x for x in links if x["rel"] == "search"), "method": "POST"})
    if f not in (None, "json", "html"):
        raise ParamError(f"f: expected json or html, got {f!r}")
    if f == "html" or (f is None and "text/html" in request.headers.get("accept", "")):
        rows = "".join(
            f'<li><a href="{html.escape(link["href"])}">{html.escape(link["title"])}</a> '
            f"<code>{html.escape(link['rel'])}</code></li>"
            for link in links
        )
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>Terrazzo</title>"
            "<meta name='viewport' content='width=device-width, initial-scale=1'></head>"
            f"<body><h1>Terrazzo</h1><p>{html.escape(request.app.summary or '')}</p>"
            f"<ul>{rows}</ul></body></html>"
        )
        return HTMLResponse(page)
    return JSONResponse(
        {
            "type": "Catalog",
            "stac_version": STAC_VERSION,
            "id": "terrazzo",
            "title": request.app.title,
            "description": request.app.summary,
            "conformsTo": CONFORMANCE,
            "links": links,
        }
    )


@router.get("/conformance", summary="The OGC conformance classes this service implements")
async def conformance() -> dict:
    return {"conformsTo": CONFORMANCE}


@router.get("/docs", include_in_schema=False)
async def swagger(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json",
        title=f"{request.app.title} - API",
        swagger_js_url=f"{root}/static/docs/swagger-ui-bundle.js",
        swagger_css_url=f"{root}/static/docs/swagger-ui.css",
        swagger_favicon_url=f"{root}/static/docs/favicon.png",
    )


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    page = get_redoc_html(
        openapi_url=f"{root}/openapi.json",
        title=f"{request.app.title} - API",
        redoc_js_url=f"{root}/static/docs/redoc.standalone.js",
        redoc_favicon_url=f"{root}/static/docs/favicon.png",
        with_google_fonts=False,
    )
    # ReDoc's bundle draws a "powered by" logo from cdn.redoc.ly: images from this server only
    page.headers["Content-Security-Policy"] = "img-src 'self' data:"
    return page
