"""/map in a real headless Chromium against a real server: the mosaic draws, a click shows
/point's values, and the controls reach the tile URLs.

Needs Chromium (Debian's `chromium`) and the `playwright` package; `make setup` installs both.
Playwright's own browser download is not used: it launches the system Chromium.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import morecantile
import numpy as np
import pytest
from PIL import Image

from tests.conftest import Server

READY = "() => window.terrazzo && window.terrazzo.idle && window.terrazzo.map.areTilesLoaded()"
BACKGROUND = np.array([0xDD, 0xE3, 0xE8])  # the page's map background, no base map
DOCS_SHOT = Path(__file__).resolve().parent.parent / "docs" / "viewer.png"
TWO_DATES = (10.05, 45.1)  # two June items (one masked there) and a September one


@pytest.fixture
def page(browser: Any, server: Server) -> Iterator[Any]:
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{server.url}/map")
    page.wait_for_function(READY, timeout=60_000)
    yield page
    page.close()
    assert not errors, errors


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
    assert "method=mean" in page.evaluate("() => location.search")
    assert "error" not in (page.get_attribute("#status", "class") or "")


def test_float_asset_gets_a_rescale_and_colormap(page: Any) -> None:
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
        # method=mean: `first` would stop once a tile is covered (exitwhenfull)
        page.goto(f"{srv.url}/map?method=mean")
        page.wait_for_function(READY, timeout=60_000)
        go_to(page, (area_a[0] + area_b[2]) / 2, (area_a[1] + area_a[3]) / 2, tj["maxzoom"] - 1)
        page.wait_for_timeout(300)  # marks are drawn 50 ms after the last tile
        page.wait_for_function(READY, timeout=60_000)
        shown = page.evaluate(
            "() => { const m = window.terrazzo.map; const f ="
            " m.querySourceFeatures('incomplete');"
            " return {keys: window.terrazzo.incomplete, z: window.terrazzo.tileZoom,"
            " features: [...new Set(f.map(x => x.properties.key))].sort()}; }"
        )
        z = shown["z"]
        assert z == tj["maxzoom"]
        # the tiles in view at that zoom, fetched by the test with httpx
        b = page.evaluate(
            "() => { const b = window.terrazzo.map.getBounds();"
            " return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()]; }"
        )
        truncated, complete = set(), set()
        tms = morecantile.tms.get("WebMercatorQuad")
        for t in tms.tiles(*b, [z]):
            r = httpx.get(
                f"{srv.url}/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}",
                params={"method": "mean", "assets": "visual"},
                timeout=60,
            )
            assert r.status_code in (200, 204), r.text
            key = f"{t.z}/{t.x}/{t.y}"
            if "x-terrazzo-truncated" in r.headers:
                truncated.add(key)
            elif r.status_code == 200:
                complete.add(key)
        assert truncated and complete, (truncated, complete)
        assert sorted(shown["keys"]) == sorted(truncated)
        assert shown["features"] == sorted(truncated)
        text = page.inner_text("#tile-status")
        assert f"{len(truncated)} tiles incomplete: item limit reached" in text, text
        assert "zoom in or narrow the filter" in text
        # the outline is drawn: red pixels on the map
        pixels = map_pixels(page)
        red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 100)
        assert red.sum() > 500, red.sum()
        # a filter that leaves 3 items (within the limit): nothing is marked
        page.select_option("#date", "2024-05-03")
        page.wait_for_timeout(300)
        page.wait_for_function(READY, timeout=60_000)
        page.wait_for_timeout(200)
        assert page.evaluate("() => window.terrazzo.incomplete") == []
        assert not page.is_visible("#tile-status")
    finally:
        page.close()
        srv.stop()
    assert not errors, errors
