"""What a web or GIS client meets first: `/`, the API docs with no internet (real Chromium,
every request off 127.0.0.1 refused), CORS by default and on the guard's errors, a query
token for <img> clients, HEAD on GET routes."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.conftest import Server

TILE = "/tiles/WebMercatorQuad/11/1058/736.png"


def test_landing_page_links_and_conformance(http: httpx.Client) -> None:
    landing = http.get("/")
    assert landing.status_code == 200 and landing.headers["content-type"] == "application/json"
    links = {link["rel"]: link for link in landing.json()["links"]}
    for rel in ("self", "service-desc", "service-doc", "conformance", "data", "tiles"):
        assert rel in links, rel
    for link in landing.json()["links"]:  # every link resolves
        assert http.get(urlparse(link["href"]).path).status_code == 200, link
    page = http.get("/", headers={"accept": "text/html"})
    assert page.headers["content-type"].startswith("text/html") and "/docs" in page.text
    conformance = http.get("/conformance").json()["conformsTo"]
    assert "http://www.opengis.net/spec/ogcapi-common-1/1.0/conf/core" in conformance


@pytest.mark.parametrize(
    ("path", "ready"), [("/docs", ".swagger-ui .info .title"), ("/redoc", ".api-info h1")]
)
def test_api_docs_render_offline_in_chromium(
    browser: Any, server: Server, path: str, ready: str
) -> None:
    page = browser.new_page()
    elsewhere: list[str] = []

    def only_local(route: Any) -> None:
        host = urlparse(route.request.url).hostname
        if host == "127.0.0.1":
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(server.url + path)
    title = page.wait_for_selector(ready, timeout=30_000)
    assert "Terrazzo" in title.inner_text()
    page.close()
    assert not elsewhere, f"the docs asked the internet for {elsewhere}"


def test_cors_by_default_for_any_origin(http: httpx.Client) -> None:
    origin = {"Origin": "https://maps.example.org"}
    tile = http.get(TILE, headers=origin)
    assert tile.headers["access-control-allow-origin"] == "*"
    preflight = http.options(
        "/tilejson.json",
        headers={**origin, "Access-Control-Request-Method": "GET"},
    )
    assert preflight.status_code == 200
    assert "GET" in preflight.headers["access-control-allow-methods"]
    assert "access-control-allow-credentials" not in preflight.headers


def test_guard_errors_carry_cors_and_a_query_token_authenticates(demo_catalog: Path) -> None:
    srv = Server(demo_catalog, env={"TERRAZZO_API_KEY": "s3cret"})
    try:
        origin = {"Origin": "https://maps.example.org"}
        denied = httpx.get(srv.url + TILE, headers=origin)
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == "*"  # not a "CORS failure"
        assert "access_token" in denied.json()["detail"]
        ok = httpx.get(srv.url + TILE, params={"access_token": "s3cret"}, headers=origin)
        assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
        assert httpx.get(srv.url + TILE, params={"access_token": "wrong"}).status_code == 401
    finally:
        log = srv.stop()
    assert "s3cret" not in log, "the token never reaches the log"


@pytest.mark.parametrize("path", [TILE, "/tilejson.json", "/WMTSCapabilities.xml", "/"])
def test_head_answers_like_get_without_a_body(http: httpx.Client, path: str) -> None:
    get = http.get(path)
    head = http.head(path)
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers.get("content-length") == get.headers.get("content-length")


PAGE = """<!doctype html><html><head><meta charset="utf-8">
<script src="{base}/static/vendor/maplibre-gl.js"></script></head>
<body style="margin:0"><div id="map" style="width:512px;height:512px"></div><script>
window.errors = []; window.idle = false;
const map = new maplibregl.Map({{
  container: "map", center: [6.45, 45.0], zoom: 11, canvasContextAttributes: {{
    preserveDrawingBuffer: true }},
  style: {{ version: 8, sources: {{ mosaic: {{
    type: "raster", tileSize: 256, url: "{base}/tilejson.json?assets=visual" }} }},
    layers: [{{ id: "mosaic", type: "raster", source: "mosaic" }}] }},
}});
map.on("error", (e) => window.errors.push(String(e.error && e.error.message)));
map.on("idle", () => {{ window.idle = true; }});
</script></body></html>"""


def test_maplibre_on_another_origin_draws_the_mosaic_from_tilejson(
    browser: Any, server: Server
) -> None:
    """A MapLibre page served from another origin (another port), as a user's own web map
    is: MapLibre fetches the TileJSON and the tiles with fetch(), which CORS must allow."""
    import http.server
    import threading

    body = PAGE.format(base=server.url).encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    page = browser.new_page()
    tiles: list[tuple[int, str | None]] = []
    page.on(
        "response",
        lambda r: (
            "/tiles/" in r.url
            and tiles.append((r.status, r.headers.get("access-control-allow-origin")))
        ),
    )
    try:
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
        page.wait_for_function("window.idle || window.errors.length > 0", timeout=60_000)
        errors = page.evaluate("window.errors")
        drawn = page.evaluate(
            """() => { const c = document.querySelector('canvas');
            const g = document.createElement('canvas'); g.width = c.width; g.height = c.height;
            const x = g.getContext('2d'); x.drawImage(c, 0, 0);
            const d = x.getImageData(0, 0, g.width, g.height).data; let n = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0 && d[i - 1] + d[i - 2] > 0) n++;
            return n / (g.width * g.height); }"""
        )
    finally:
        page.close()
        other.shutdown()
    assert not errors, errors
    assert tiles and all(status == 200 for status, _ in tiles), tiles
    assert all(allow == "*" for _, allow in tiles)
    assert drawn > 0.3, f"only {drawn:.0%} of the map has mosaic pixels"
