"""/map in a real headless Chromium against a real server: the mosaic draws, a click shows
/point's values, the controls reach the tile URLs, the view lives in the URL's fragment, a
legend explains the colours, a phone-size screen works, refused parameters and failing tiles
are reported with the server's message, the page works under a proxy's path prefix, and
every request it makes goes to the server it came from (no CDN).

Needs Chromium (Debian's `chromium`) and the `playwright` package; `make setup` installs both.
Playwright's own browser download is not used: it launches the system Chromium.
"""

from __future__ import annotations

import io
import os
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import morecantile
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server, serve_in_thread

READY = "() => window.terrazzo && window.terrazzo.idle && window.terrazzo.map.areTilesLoaded()"
BACKGROUND = np.array([0xDD, 0xE3, 0xE8])  # the page's map background, no base map
DOCS_SHOT = Path(__file__).resolve().parent.parent / "docs" / "viewer.png"
TWO_DATES = (10.05, 45.1)  # two June items (one masked there) and a September one


def local_only(urls: list[str], origin: str) -> list[str]:
    """The requests among `urls` that leave `origin` (data: and blob: URLs stay in the page)."""
    return [u for u in urls if not u.startswith((f"{origin}/", "data:", "blob:"))]


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    """/map at 1280x720, ready; afterwards: no script error, no request off the server."""
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    page.goto(f"{server.url}/map")
    page.wait_for_function(READY, timeout=60_000)
    yield page
    page.close()
    assert not errors, errors
    assert not local_only(page.requests, server.url)


def map_pixels(page: Any) -> np.ndarray:
    shot = page.locator("#map").screenshot()
    return np.asarray(Image.open(io.BytesIO(shot)).convert("RGB")).astype(int)


def painted(pixels: np.ndarray) -> tuple[float, int]:
    """(share of pixels that are not the background, distinct colours among them)."""
    drawn = np.abs(pixels - BACKGROUND).sum(axis=-1) > 40
    colours = np.unique(pixels[drawn].reshape(-1, 3), axis=0)
    return float(drawn.mean()), len(colours)


def go_to(page: Any, lon: float, lat: float, zoom: float) -> None:
    page.evaluate(f"window.terrazzo.map.jumpTo({{center: [{lon}, {lat}], zoom: {zoom}}})")
    page.wait_for_timeout(200)  # let the move start its tile requests
    page.wait_for_function(READY, timeout=60_000)


def test_map_draws_the_mosaic_fitted_to_the_catalog(page: Any, server: Server) -> None:
    info = httpx.get(f"{server.url}/info").json()
    west, south, east, north = page.evaluate(
        "() => { const b = window.terrazzo.map.getBounds();"
        " return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]; }"
    )
    minx, miny, maxx, maxy = info["bbox"]
    assert west <= minx and east >= maxx and south <= miny and north >= maxy
    assert (east - west) < 3 * (maxx - minx), "fitted to the catalog, not the world"
    share, colours = painted(map_pixels(page))
    assert share > 0.03 and colours > 300, (share, colours)
    urls = page.evaluate("() => window.terrazzo.tileUrls")
    assert urls and all(u.startswith(f"{server.url}/tiles/WebMercatorQuad/") for u in urls)
    assert "items in view" in page.inner_text("#status")
    assert page.evaluate("() => document.querySelector('#date').options.length") == 3


def test_click_shows_point_values(page: Any, server: Server) -> None:
    go_to(page, *TWO_DATES, 9)
    box = page.locator("#map").bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#inspect td.value[data-value]", timeout=60_000)
    shown = [
        float(v)
        for v in page.eval_on_selector_all(
            "#inspect td.value[data-value]", "cells => cells.map(c => c.dataset.value)"
        )
    ]
    assert len(shown) >= 3  # RGB of at least one item
    lon, lat = page.evaluate("() => window.terrazzo.lastPoint.coordinates")
    direct = httpx.get(f"{server.url}/point/{lon},{lat}", params={"assets": "visual"}, timeout=60)
    assert direct.status_code == 200, direct.text
    expected = [
        float(v)
        for item in direct.json()["items"]
        for read in item.get("assets", {}).values()
        for v in read["values"]
        if v is not None
    ]
    assert shown == expected
    assert len(direct.json()["items"]) >= 2, "two dates overlap here"
    text = page.inner_text("#inspect")
    assert all(item["id"] in text for item in direct.json()["items"])
    if os.environ.get("TERRAZZO_UPDATE_DOCS") or not DOCS_SHOT.exists():
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS_SHOT))


def test_method_selector_reaches_the_tile_urls(page: Any) -> None:
    with page.expect_request(
        lambda r: "/tiles/" in r.url and "method=mean" in r.url, timeout=30_000
    ):
        page.select_option("#method", "mean")
    page.wait_for_function(READY, timeout=60_000)
    assert "method=mean" in page.get_attribute("#tilejson-link", "href")
    assert "method=mean" in page.evaluate("() => location.hash")
    assert "error" not in (page.get_attribute("#status", "class") or "")


def legend(page: Any) -> dict[str, Any]:
    """What #legend shows: its text, and the colours its bar draws at 0, 128 and 255."""
    page.wait_for_selector("#legend:not([hidden])", timeout=30_000)
    return page.evaluate(
        """() => {
          const bar = document.querySelector('#legend-bar');
          const px = bar.getContext('2d').getImageData(0, 0, 256, 1).data;
          const at = (i) => '#' + [0, 1, 2].map((k) => px[4 * i + k].toString(16)
            .padStart(2, '0')).join('');
          return {text: document.querySelector('#legend').innerText,
                  colormap: document.querySelector('#legend').dataset.colormap,
                  min: document.querySelector('#legend-min').textContent,
                  max: document.querySelector('#legend-max').textContent,
                  bar: [at(0), at(128), at(255)],
                  barShown: !bar.hidden,
                  steps: [...document.querySelectorAll('#legend-steps span')]
                    .map((s) => [s.textContent, s.dataset.colour])};
        }"""
    )


def rio_colours(name: str, *at: int) -> list[str]:
    from rio_tiler.colormap import cmap

    table = cmap.get(name)
    return ["#" + "".join(f"{int(v):02x}" for v in table[i][:3]) for i in at]


def test_float_asset_gets_a_rescale_colormap_and_legend(page: Any) -> None:
    """dem (float32, one band) gets a rescale from a sampled tile and a colormap; the legend
    draws rio-tiler's table for it with the rescale's numbers."""
    assert page.is_hidden("#legend")  # visual: three bands, nothing to explain
    with page.expect_request(
        lambda r: "/tiles/" in r.url and "assets=dem" in r.url and "rescale=" in r.url,
        timeout=30_000,
    ) as request:
        page.select_option("#asset", "dem")
    assert "colormap_name=terrain" in request.value.url
    low, high = (float(v) for v in page.input_value("#rescale").split(","))
    assert low < high
    page.wait_for_timeout(200)
    page.wait_for_function(READY, timeout=60_000)
    assert "error" not in (page.get_attribute("#status", "class") or ""), page.inner_text("#status")
    share, colours = painted(map_pixels(page))
    assert share > 0.03 and colours > 100, (share, colours)
    shown = legend(page)
    assert shown["colormap"] == "terrain" and "dem" in shown["text"]
    assert (float(shown["min"]), float(shown["max"])) == (low, high)
    assert shown["bar"] == rio_colours("terrain", 0, 128, 255)
    # the user's numbers and colormap: the legend follows
    page.fill("#rescale", "100,900")
    page.dispatch_event("#rescale", "change")
    page.select_option("#colormap", "magma")
    page.wait_for_function(
        "() => document.querySelector('#legend').dataset.colormap === 'magma'", timeout=30_000
    )
    shown = legend(page)
    assert (shown["min"], shown["max"]) == ("100", "900")
    assert shown["bar"] == rio_colours("magma", 0, 128, 255)
    assert "rescale=100,900&colormap_name=magma" in page.evaluate("() => location.hash")


def view_of(page: Any) -> dict[str, Any]:
    """The view on screen: the map's center and zoom, and every control's value."""
    return page.evaluate(
        """() => { const m = window.terrazzo.map; const c = m.getCenter();
          const v = (id) => document.getElementById(id).value;
          return {lng: c.lng, lat: c.lat, zoom: m.getZoom(), asset: v('asset'), date: v('date'),
                  method: v('method'), rescale: v('rescale'), colormap: v('colormap'),
                  bidx: v('bidx')}; }"""
    )


def same_place(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        abs(a["lng"] - b["lng"]) < 1e-3
        and abs(a["lat"] - b["lat"]) < 1e-3
        and abs(a["zoom"] - b["zoom"]) < 0.01
    )


def test_view_round_trips_through_the_url_fragment(page: Any, browser: Any, server: Server) -> None:
    """A view set with the controls and the map is in the fragment; the link opens the same
    view in another tab; editing the fragment and going back change the view."""
    page.evaluate(f"window.terrazzo.map.jumpTo({{center: {list(TWO_DATES)}, zoom: 8.5}})")
    page.select_option("#date", "2024-06-01")
    page.select_option("#asset", "dem")
    page.select_option("#method", "mean")
    page.wait_for_function(
        "() => ['method=mean', 'colormap_name=terrain'].every((s) => location.hash.includes(s))",
        timeout=30_000,
    )
    before = view_of(page)
    assert before["rescale"] and before["colormap"] == "terrain"
    link = page.url
    fragment = urllib.parse.parse_qs(urllib.parse.urlsplit(link).fragment)
    assert fragment["zoom"] == ["8.50"] and fragment["datetime"] == ["2024-06-01"]
    assert fragment["assets"] == ["dem"] and fragment["method"] == ["mean"]
    assert fragment["rescale"] == [before["rescale"]] and "?" not in link

    other = browser.new_page(viewport={"width": 1280, "height": 720})
    try:
        with other.expect_request(lambda r: "/tiles/" in r.url, timeout=30_000) as first:
            other.goto(link)
        after = view_of(other)
        assert same_place(before, after), (before, after)
        assert {k: after[k] for k in after if k not in ("lng", "lat", "zoom")} == {
            k: before[k] for k in before if k not in ("lng", "lat", "zoom")
        }
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(first.value.url).query)
        assert query["datetime"] == ["2024-06-01"] and query["method"] == ["mean"]
        assert query["rescale"] == [before["rescale"]] and query["colormap_name"] == ["terrain"]
    finally:
        other.close()

    # an edited fragment (a new history entry) moves the map and changes the tiles
    edited = "center=10.2,45.0&zoom=7&assets=visual&method=median"
    with page.expect_request(lambda r: "/tiles/" in r.url and "method=median" in r.url):
        page.evaluate(f"() => {{ location.hash = '{edited}'; }}")
    now = view_of(page)
    assert same_place(now, {"lng": 10.2, "lat": 45.0, "zoom": 7}), now
    assert (now["asset"], now["method"], now["date"], now["rescale"]) == (
        "visual",
        "median",
        "",
        "",
    )
    # back: the view before the edit, as it was
    page.go_back()
    page.wait_for_function(
        "() => document.getElementById('method').value === 'mean'", timeout=30_000
    )
    back = view_of(page)
    assert same_place(back, before), (back, before)
    assert {k: back[k] for k in back if k not in ("lng", "lat", "zoom")} == {
        k: before[k] for k in before if k not in ("lng", "lat", "zoom")
    }


def test_phone_layout(browser: Any, server: Server) -> None:
    """At 390x844 the map fills the screen, the controls are a drawer behind one button, and
    nothing is wider than the screen, drawer open or shut; count's legend says what it counts."""
    phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        phone.goto(f"{server.url}/map")
        phone.wait_for_function(READY, timeout=60_000)
        overflow = (
            "() => [document.documentElement.scrollWidth, document.body.scrollWidth,"
            " ...[...document.querySelectorAll('body *')].filter((e) => e.offsetParent)"
            ".map((e) => e.getBoundingClientRect().right)].filter((w) => w > 390.5)"
        )
        box = phone.locator("#map").bounding_box()
        assert (box["x"], box["y"], box["width"], box["height"]) == (0, 0, 390, 844), box
        assert phone.is_hidden("#panel") and phone.is_visible("#panel-toggle")
        assert phone.evaluate(overflow) == []
        share, colours = painted(map_pixels(phone))
        assert share > 0.01 and colours > 100, (share, colours)
        phone.click("#panel-toggle")
        assert phone.is_visible("#asset") and phone.is_visible("#method")
        assert phone.evaluate(overflow) == []
        panel = phone.locator("#panel").bounding_box()
        assert panel["width"] <= 390 and panel["height"] < 844  # the map still shows below
        with phone.expect_request(lambda r: "/tiles/" in r.url and "method=count" in r.url):
            phone.select_option("#method", "count")
        phone.click("#panel-toggle")  # shut: the map and its legend
        assert phone.is_hidden("#panel")
        # count: one swatch per number of items, coloured as the tiles are (0..4 -> 0..255)
        shown = legend(phone)
        assert "count: items with data at each pixel" in shown["text"]
        assert phone.input_value("#rescale") == "0,4" and phone.input_value("#bidx") == "1"
        expected = rio_colours(phone.input_value("#colormap"), 63, 127, 191, 255)
        assert shown["steps"] == [
            list(s) for s in zip(["1", "2", "3", "4+"], expected, strict=True)
        ]
        assert not shown["barShown"]
        assert phone.evaluate(overflow) == []
        legend_box = phone.locator("#legend").bounding_box()
        assert legend_box["x"] >= 0 and legend_box["x"] + legend_box["width"] <= 390
    finally:
        phone.close()


def test_refused_parameters_show_the_servers_message(page: Any, http: httpx.Client) -> None:
    """A rescale the server refuses: its TileJSON answer's detail is shown over the map and
    the mosaic is taken away (not left drawing the previous parameters)."""
    expected = http.get("/tilejson.json", params={"assets": "visual", "rescale": "9,1"})
    assert expected.status_code == 400
    detail = expected.json()["detail"]
    page.fill("#rescale", "9,1")
    page.dispatch_event("#rescale", "change")
    page.wait_for_selector("#message:not([hidden])", timeout=30_000)
    assert detail in page.inner_text("#message")
    assert page.evaluate("() => window.terrazzo.map.getSource('mosaic')") is None
    assert "rescale=9,1" in page.evaluate("() => location.hash")  # the link says what failed
    # fixed: the message goes, the mosaic comes back
    page.fill("#rescale", "")
    page.dispatch_event("#rescale", "change")
    page.wait_for_selector("#message", state="hidden", timeout=30_000)
    tiles = page.wait_for_function(
        "() => { const s = window.terrazzo.map.getStyle().sources.mosaic;"
        " return s && s.tiles[0]; }",
        timeout=30_000,
    ).json_value()
    assert tiles.endswith("?assets=visual&method=first"), tiles


def test_only_valid_combinations_are_offered(browser: Any, server: Server) -> None:
    """A colormap is offered for one band only: a link asking one for the three-band asset
    gets none (and no error); picking one band offers it again."""
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        page.goto(f"{server.url}/map#assets=visual&colormap_name=viridis&rescale=0,200")
        page.wait_for_function(READY, timeout=60_000)
        assert page.is_disabled("#colormap") and page.input_value("#colormap") == ""
        assert "one band" in page.inner_text("#colormap-hint")
        urls = page.evaluate("() => window.terrazzo.tileUrls")
        assert urls and not any("colormap_name" in u for u in urls)
        assert all(
            urllib.parse.parse_qs(urllib.parse.urlsplit(u).query)["rescale"] == ["0,200"]
            for u in urls
        )
        assert page.is_hidden("#message") and page.is_hidden("#legend")
        with page.expect_request(lambda r: "/tiles/" in r.url and "bidx=2" in r.url):
            page.select_option("#bidx", "2")
        assert page.is_enabled("#colormap")
        with page.expect_request(lambda r: "bidx=2" in r.url and "colormap_name=gray" in r.url):
            page.select_option("#colormap", "gray")
        page.wait_for_function(READY, timeout=60_000)
        assert page.is_hidden("#message")
        assert legend(page)["colormap"] == "gray"
    finally:
        page.close()


def prefix_proxy(upstream: str, prefix: str, broken: dict[str, bool]) -> Any:
    """A reverse proxy serving `upstream` under `prefix` (X-Forwarded-Prefix set). With
    broken["tiles"], it asks the server for tiles with bidx=9: the server's own refusal comes
    back, as from a tile route that disagrees with its TileJSON."""

    async def app(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path, query = scope["path"], scope["query_string"].decode()
        if not path.startswith(prefix + "/"):
            status, body, kind = 404, b'{"detail": "not under the prefix"}', "application/json"
        else:
            rest = path[len(prefix) :]
            if broken["tiles"] and rest.startswith("/tiles/"):
                query = f"{query}&bidx=9" if query else "bidx=9"
            headers = {k.decode(): v.decode() for k, v in scope["headers"] if k == b"x-api-key"}
            async with httpx.AsyncClient(timeout=60) as client:
                r = await client.get(
                    f"{upstream}{rest}?{query}" if query else f"{upstream}{rest}",
                    headers={**headers, "X-Forwarded-Prefix": prefix},
                )
            status, body = r.status_code, r.content
            kind = r.headers.get("content-type", "application/octet-stream")
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", kind.encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def test_behind_a_path_prefix_and_failing_tiles(browser: Any, server: Server) -> None:
    """Under a proxy's /pfx/ every request of the page stays under /pfx/ and the mosaic
    draws; when tiles fail, the server's detail for them is shown over the map."""
    broken = {"tiles": False}
    with serve_in_thread(prefix_proxy(server.url, "/pfx", broken)) as proxy:
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        try:
            page.goto(f"{proxy}/pfx/map")
            page.wait_for_function(READY, timeout=60_000)
            share, colours = painted(map_pixels(page))
            assert share > 0.03 and colours > 300, (share, colours)
            assert any("/pfx/tiles/WebMercatorQuad/" in u for u in requests)
            assert not local_only(requests, f"{proxy}/pfx")
            assert page.is_hidden("#message")

            broken["tiles"] = True
            with page.expect_response(lambda r: "/tiles/" in r.url and r.status == 400) as bad:
                page.select_option("#method", "last")
            direct = httpx.get(
                f"{server.url}/tiles/WebMercatorQuad/5/16/11",
                params={"assets": "visual", "method": "last", "bidx": "9"},
            )
            assert direct.status_code == 400
            page.wait_for_selector("#message:not([hidden])", timeout=30_000)
            text = page.inner_text("#message")
            assert direct.json()["detail"] in text and "(400)" in text, text
            assert bad.value.url.startswith(f"{proxy}/pfx/tiles/")
            assert not local_only(requests, f"{proxy}/pfx")
        finally:
            page.close()


def test_page_and_vendored_maplibre_are_served_locally(http: httpx.Client) -> None:
    page = http.get("/map")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    script = http.get("/static/vendor/maplibre-gl.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert len(script.content) > 500_000
    assert http.get("/static/vendor/maplibre-gl.css").status_code == 200
    assert http.get("/static/map.js").status_code == 200
    # nothing from a CDN or a tile provider: the machine may have no internet
    for text in (page.text, http.get("/static/map.js").text):
        assert "http://" not in text and "https://" not in text
    assert http.get("/static/../ogc.py").status_code == 404


def test_viewer_with_an_api_key(browser: Any, demo_catalog: Path) -> None:
    """With TERRAZZO_API_KEY set the page loads openly and sends the key from #key=."""
    keyed = Server(demo_catalog, env={"TERRAZZO_API_KEY": "k3y"})
    page = browser.new_page(viewport={"width": 800, "height": 600})
    try:
        assert httpx.get(f"{keyed.url}/tilejson.json").status_code == 401
        page.goto(f"{keyed.url}/map")  # no key: the page says how to give one
        page.wait_for_function(
            "() => document.querySelector('#status').textContent.includes('API key')",
            timeout=30_000,
        )
        page.goto(f"{keyed.url}/map#key=k3y")
        page.reload()  # the fragment alone does not reload the page
        page.wait_for_function(READY, timeout=60_000)
        share, colours = painted(map_pixels(page))
        assert share > 0.03 and colours > 300, (share, colours)
    finally:
        page.close()
        keyed.stop()


def test_incomplete_tiles_are_marked(browser: Any, tmp_path: Path) -> None:
    """A server taking at most 3 items per tile over a catalog with 5 items on area A and one
    on area B: the page outlines exactly the tiles whose own headers say truncated (A's),
    never B's complete tiles, and says so in #tile-status."""
    from tests.test_density import crowded_catalog

    catalog, area_a, area_b = crowded_catalog(tmp_path / "crowded", stack=5)
    srv = Server(catalog, env={"TERRAZZO_MAX_ITEMS": "3"})
    page = browser.new_page(viewport={"width": 1000, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        tj = httpx.get(f"{srv.url}/tilejson.json", timeout=60).json()
        # every tile over A has 5 candidates at any zoom: no zoom is complete
        assert tj["minzoom"] == tj["maxzoom"]
        # opened at the view to check (one load, not a fitted one and a move), with
        # method=mean: `first` would stop once a tile is covered (exitwhenfull)
        lon, lat = (area_a[0] + area_b[2]) / 2, (area_a[1] + area_a[3]) / 2
        page.goto(f"{srv.url}/map#center={lon},{lat}&zoom={tj['maxzoom'] - 1}&method=mean")
        page.wait_for_function(READY, timeout=60_000)
        z = page.evaluate("() => window.terrazzo.tileZoom")
        assert z == tj["maxzoom"]
        # the tiles in view at that zoom, fetched by the test with httpx (at once)
        b = page.evaluate(
            "() => { const b = window.terrazzo.map.getBounds();"
            " return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]; }"
        )
        tms = morecantile.tms.get("WebMercatorQuad")

        tiles = [f"{t.z}/{t.x}/{t.y}" for t in tms.tiles(*b, [z])]
        with httpx.Client(base_url=srv.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
            got = pool.map(
                lambda key: client.get(
                    f"/tiles/WebMercatorQuad/{key}", params={"method": "mean", "assets": "visual"}
                ),
                tiles,
            )
            responses = list(zip(tiles, got, strict=True))
        truncated, complete = set(), set()
        for key, r in responses:
            assert r.status_code in (200, 204), r.text
            if "x-terrazzo-truncated" in r.headers:
                truncated.add(key)
            elif r.status_code == 200:
                complete.add(key)
        assert truncated and complete, (truncated, complete)
        # marks are drawn 50 ms after the last tile: wait for them, then compare
        page.wait_for_function(
            "(n) => window.terrazzo.incomplete.length >= n", arg=len(truncated), timeout=10_000
        )
        shown = page.evaluate(
            "() => { const f = window.terrazzo.map.querySourceFeatures('incomplete');"
            " return {keys: window.terrazzo.incomplete,"
            " features: [...new Set(f.map(x => x.properties.key))].sort()}; }"
        )
        assert sorted(shown["keys"]) == sorted(truncated)
        if shown["features"] != sorted(truncated):  # the source's data reaches the map's tiles
            page.wait_for_function(
                "(n) => new Set(window.terrazzo.map.querySourceFeatures('incomplete')"
                ".map(x => x.properties.key)).size === n",
                arg=len(truncated),
                timeout=10_000,
            )
        text = page.inner_text("#tile-status")
        assert f"{len(truncated)} tiles incomplete: item limit reached" in text, text
        assert "zoom in or narrow the filter" in text
        # the outline is drawn: red pixels on the map
        pixels = map_pixels(page)
        red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 100)
        assert red.sum() > 500, red.sum()
        # a filter that leaves 3 items (within the limit): nothing is marked once its tiles
        # are in (past the marks' 50 ms)
        page.select_option("#date", "2024-05-03")
        page.wait_for_function(READY, timeout=60_000)
        page.wait_for_timeout(150)
        assert page.evaluate("() => window.terrazzo.incomplete") == []
        assert not page.is_visible("#tile-status")
        assert "datetime=2024-05-03" in page.evaluate("() => window.terrazzo.tileUrls.at(-1)")
    finally:
        page.close()
        srv.stop()
    assert not errors, errors
