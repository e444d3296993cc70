"""One request model: what every tile would refuse, TileJSON and WMTS refuse too (with the same
message); a misspelled parameter is a 400 naming the nearest known one; WMTS KVP requests as
OWSLib and GDAL send them; URLs behind a proxy prefix. Against the real demo server."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import httpx
import numpy as np
import pytest
import rasterio
from PIL import Image

from tests.conftest import Server

TILE = "10/537/368"  # over the demo's UTM 32N items: every asset has data here
KEY = "s3cret"
WMTS_NS = {"w": "http://www.opengis.net/wmts/1.0", "ows": "http://www.opengis.net/ows/1.1"}

REFUSED = [
    ({"assets": "dem"}, "png holds 8- or 16-bit"),  # float32 without rescale
    ({"colormap_name": "viridis"}, "needs one band"),  # visual has 3
    ({"bidx": "5"}, "band 5 does not exist; assets visual have 3 band(s)"),
    ({"assets": "visual,dem", "bidx": "1,5"}, "band 5 does not exist; assets visual, dem have 4"),
    ({"assets": "dem", "colormap_name": "viridis"}, "8-bit"),
    ({"assets": "nope"}, "unknown ['nope']"),
    ({"sortby": "-cloudiness"}, "cloudiness"),
]
ACCEPTED = [
    {},
    {"assets": "dem", "rescale": "0,3000", "colormap_name": "terrain"},
    {"bidx": "1", "colormap_name": "viridis"},
    {"assets": "dem", "format": "npy"},
]


@pytest.mark.parametrize(("params", "needle"), REFUSED)
def test_tilejson_and_wmts_refuse_what_every_tile_refuses(
    http: httpx.Client, params: dict, needle: str
) -> None:
    tile = http.get(f"/tiles/{TILE}", params=params)
    tilejson = http.get("/tilejson.json", params=params)
    wmts = http.get("/WMTSCapabilities.xml", params=params)
    for response in (tile, tilejson, wmts):
        assert response.status_code == 400, (response.request.url, response.text[:300])
        assert needle in response.json()["detail"]
    # one rule: the same words whichever route is asked
    assert tilejson.json()["detail"] == tile.json()["detail"]


@pytest.mark.parametrize("params", ACCEPTED)
def test_what_tilejson_accepts_the_tiles_serve(http: httpx.Client, params: dict) -> None:
    doc = http.get("/tilejson.json", params=params)
    assert doc.status_code == 200, doc.text
    z, x, y = TILE.split("/")
    url = doc.json()["tiles"][0].format(z=z, x=x, y=y)
    tile = http.get(url)
    assert tile.status_code == 200, tile.text[:300]
    assert tile.headers["content-type"].startswith(("image/", "application/x-binary"))


def test_tile_format_sets_the_suffix_and_is_checked(http: httpx.Client) -> None:
    doc = http.get("/tilejson.json", params={"tile_format": "webp", "bidx": "1,2,3"}).json()
    assert re.search(r"/\{y\}\.webp\?bidx=1%2C2%2C3$", doc["tiles"][0]), doc["tiles"][0]
    refused = http.get("/tilejson.json", params={"tile_format": "jpeg", "assets": "dem"})
    assert refused.status_code == 400 and "jpeg holds 8-bit" in refused.json()["detail"]
    unknown = http.get("/tilejson.json", params={"tile_format": "gif"})
    assert unknown.status_code == 400 and "tile_format" in unknown.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        f"/tiles/{TILE}",
        f"/tiles/WebMercatorQuad/{TILE}.png",
        "/tilejson.json",
        "/WMTSCapabilities.xml",
        f"/tiles/{TILE}/assets",
        f"/plan/WebMercatorQuad/{TILE}",
        "/point/6.45,45.0",
    ],
)
def test_a_misspelled_parameter_names_the_nearest_known_one(http: httpx.Client, path: str) -> None:
    response = http.get(path, params={"asets": "dem"})
    assert response.status_code == 400
    assert "'asets' (did you mean 'assets'?)" in response.json()["detail"]
    # the declared name (and the API key parameter every route takes) passes
    assert http.get(path, params={"assets": "visual", "access_token": "x"}).status_code == 200


def test_filter_lang_is_declared_and_checked(http: httpx.Client) -> None:
    ok = http.get(
        f"/tiles/{TILE}.npy", params={"filter-lang": "cql2-text", "filter": "id LIKE 'demo%'"}
    )
    assert ok.status_code == 200
    bad = http.get(f"/tiles/{TILE}.npy", params={"filter-lang": "ecql", "filter": "id = 'x'"})
    assert bad.status_code == 400 and "filter-lang" in bad.json()["detail"]


def _template(capabilities: bytes) -> str:
    root = ET.fromstring(capabilities)
    return root.find(".//w:Layer/w:ResourceURL", WMTS_NS).get("template")


def test_owslib_style_capabilities_url_stays_out_of_the_tile_urls(http: httpx.Client) -> None:
    kvp = {"service": "WMTS", "request": "GetCapabilities", "version": "1.0.0"}
    response = http.get("/WMTSCapabilities.xml", params={**kvp, "assets": "visual"})
    assert response.status_code == 200
    template = _template(response.content)
    assert template.endswith(".png?assets=visual"), template
    hrefs = re.findall(rb'xlink:href="([^"]+)"', response.content)
    assert hrefs and all(b"request=" not in h.lower() for h in hrefs)
    # KVP keys in any case: OGC says they are case-insensitive
    upper = http.get("/WMTSCapabilities.xml", params={k.upper(): v for k, v in kvp.items()})
    assert upper.status_code == 200


def test_kvp_gettile_is_the_restful_tile(http: httpx.Client) -> None:
    z, x, y = TILE.split("/")
    kvp = {
        "SERVICE": "WMTS",
        "REQUEST": "GetTile",
        "VERSION": "1.0.0",
        "LAYER": "terrazzo",
        "STYLE": "default",
        "TILEMATRIXSET": "WebMercatorQuad",
        "TILEMATRIX": z,
        "TILECOL": x,
        "TILEROW": y,
        "FORMAT": "image/png",
    }
    kvp_tile = http.get("/WMTSCapabilities.xml", params={**kvp, "assets": "visual"})
    rest = http.get(f"/tiles/WebMercatorQuad/{TILE}.png", params={"assets": "visual"})
    assert kvp_tile.status_code == 200 and kvp_tile.headers["content-type"] == "image/png"
    assert kvp_tile.content == rest.content
    for change, needle in [
        ({"TILEMATRIX": "99"}, "TILEMATRIX"),
        ({"LAYER": "other"}, "LAYER"),
        ({"FORMAT": "image/gif"}, "FORMAT"),
        ({"TILEMATRIXSET": "WorldCRS84Quad"}, "TILEMATRIXSET"),
        ({"REQUEST": "GetFeatureInfo"}, "GetFeatureInfo"),
    ]:
        bad = http.get("/WMTSCapabilities.xml", params={**kvp, **change})
        assert bad.status_code == 400 and needle in bad.json()["detail"], bad.text
    missing = http.get(
        "/WMTSCapabilities.xml", params={k: v for k, v in kvp.items() if k != "TILEROW"}
    )
    assert missing.status_code == 400 and "TILEROW" in missing.json()["detail"]


def test_owslib_reads_the_capabilities_and_gets_the_tile(
    server: Server, http: httpx.Client
) -> None:
    """OWSLib as a user calls it: it asks for the capabilities with its own KVP keys, then
    GetTile as KVP on the operation's href, and must get the RESTful tile's bytes."""
    from owslib.wmts import WebMapTileService

    z, x, y = TILE.split("/")
    wmts = WebMapTileService(f"{server.url}/WMTSCapabilities.xml?assets=visual")
    layer = wmts.contents["terrazzo"]
    assert "WebMercatorQuad" in layer.tilematrixsetlinks
    assert layer.resourceURLs[0]["template"].endswith(".png?assets=visual")
    tile = wmts.gettile(
        layer="terrazzo",
        tilematrixset="WebMercatorQuad",
        tilematrix=z,
        row=int(y),
        column=int(x),
        format="image/png",
    )
    assert "REQUEST=GetTile" in tile.geturl()
    rest = http.get(f"/tiles/WebMercatorQuad/{TILE}.png", params={"assets": "visual"})
    assert tile.read() == rest.content


def test_gdal_wmts_driver_reads_the_same_pixels(server: Server, http: httpx.Client) -> None:
    """GDAL's WMTS driver, pointed at the capabilities as a GIS user would (zoom 10 chosen
    with its TILEMATRIX option), reads back the tile Terrazzo serves, bit for bit. Its
    dataset spans the layer's bounding box, so the tile's part inside it is compared."""
    import morecantile

    z, x, y = (int(v) for v in TILE.split("/"))
    bounds = morecantile.tms.get("WebMercatorQuad").xy_bounds(x, y, z)
    png = http.get(f"/tiles/{TILE}.png", params={"assets": "visual"}).content
    tile = np.asarray(Image.open(io.BytesIO(png)))
    url = f"{server.url}/WMTSCapabilities.xml?assets=visual"
    with rasterio.open(f"WMTS:{url}", TILEMATRIX=str(z)) as ds:
        window = ds.window(bounds.left, bounds.bottom, bounds.right, bounds.top).round()
        assert (window.width, window.height) == (256, 256)
        out = ds.read(window=window)  # rows past the layer's bbox are not in the dataset
    rows = out.shape[1]
    assert rows > 128
    np.testing.assert_array_equal(np.moveaxis(out, 0, -1), tile[:rows])


@pytest.fixture(scope="module")
def rooted(demo_catalog: Path) -> Iterator[Server]:
    srv = Server(demo_catalog, env={"TERRAZZO_API_KEY": KEY}, args=("--root-path", "/maps"))
    yield srv
    srv.stop()


def test_root_path_and_forwarded_prefix_in_every_generated_url(
    server: Server, http: httpx.Client, rooted: Server
) -> None:
    """A proxy serving Terrazzo under /maps strips the prefix: the URLs handed out carry it
    (so the client's next request goes through the proxy), and with it stripped they serve."""
    z, x, y = TILE.split("/")
    for base, headers in [
        (rooted.url, {"X-API-Key": KEY}),
        (server.url, {"X-Forwarded-Prefix": "/maps"}),
    ]:
        doc = httpx.get(f"{base}/tilejson.json", headers=headers).json()
        assert doc["tiles"][0].startswith(f"{base}/maps/tiles/"), doc["tiles"][0]
        stripped = doc["tiles"][0].format(z=z, x=x, y=y).replace("/maps/", "/", 1)
        assert httpx.get(stripped, headers=headers).status_code == 200
        caps = httpx.get(f"{base}/WMTSCapabilities.xml", headers=headers).content
        assert _template(caps).startswith(f"{base}/maps/tiles/")
        landing = httpx.get(f"{base}/", headers={**headers, "Accept": "application/json"})
        links = [link["href"] for link in landing.json()["links"]]
        assert links and all(h.startswith(f"{base}/maps/") for h in links), links
        docs = httpx.get(f"{base}/docs", headers=headers).text
        assert "/maps/openapi.json" in docs
    # under a root path the guard still knows its open paths (and only those)
    assert httpx.get(f"{rooted.url}/healthz").status_code == 200
    assert httpx.get(f"{rooted.url}/docs").status_code == 200
    assert httpx.get(f"{rooted.url}/tilejson.json").status_code == 401
    # a header that is not a plain path is ignored, not echoed into URLs
    odd = httpx.get(f"{server.url}/tilejson.json", headers={"X-Forwarded-Prefix": "/a/../b"})
    assert odd.json()["tiles"][0].startswith(f"{server.url}/tiles/")
