"""TileJSON, TileMatrixSets and WMTS capabilities over a real server: documents a map client
can follow to real tiles, with the request's parameters carried through."""

from __future__ import annotations

import io
import math
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET

import httpx
import morecantile
import pytest
from PIL import Image

from app.ogc import MIN_ITEM_PIXELS, zoom_range
from tests.conftest import assert_clear_error

WMTS = "{http://www.opengis.net/wmts/1.0}"
OWS = "{http://www.opengis.net/ows/1.1}"
XLINK = "{http://www.w3.org/1999/xlink}"
TMS = morecantile.tms.get("WebMercatorQuad")
TILE_PARAMS = {
    "assets": "dem",
    "datetime": "2024-06-01/2024-09-30",
    "method": "mean",
    "rescale": "0,3000",
    "colormap_name": "terrain",
}


def covered_tile(tms: morecantile.TileMatrixSet, z: int) -> morecantile.Tile:
    """A tile in the middle of the demo strip (both dates overlap there)."""
    return tms.tile(10.0, 45.12, z)


def fill(template: str, z: int, x: int, y: int) -> str:
    return template.replace("{z}", str(z)).replace("{x}", str(x)).replace("{y}", str(y))


def test_tilejson_describes_the_catalog(http: httpx.Client) -> None:
    r = http.get("/tilejson.json")
    assert r.status_code == 200, r.text
    tj = r.json()
    assert tj["tilejson"] == "3.0.0" and tj["scheme"] == "xyz"
    info = http.get("/info").json()
    assert tj["bounds"] == pytest.approx(info["bbox"])
    # demo at size=256: 120 m pixels, ~170 m in Web Mercator at 45°N: closest is z10 (153 m);
    # the largest item spans ~45 km in Web Mercator, ≥ 8 pixels of 4.9 km from z5 on
    assert (tj["minzoom"], tj["maxzoom"]) == (5, 10)
    lon, lat, zoom = tj["center"]
    assert info["bbox"][0] < lon < info["bbox"][2] and info["bbox"][1] < lat < info["bbox"][3]
    assert zoom == tj["minzoom"]
    assert tj["tiles"] == [f"{http.base_url}/tiles/WebMercatorQuad/{{z}}/{{x}}/{{y}}"]


def test_tilejson_template_carries_the_parameters_and_serves_png(http: httpx.Client) -> None:
    tj = http.get("/tilejson.json", params={**TILE_PARAMS, "format": "png"}).json()
    template = tj["tiles"][0]
    query = parse_qs(urlsplit(template).query)
    assert query == {k: [v] for k, v in {**TILE_PARAMS, "format": "png"}.items()}
    tile = covered_tile(TMS, tj["maxzoom"])
    r = httpx.get(fill(template, tile.z, tile.x, tile.y), timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.size == (256, 256)


def test_tilejson_for_another_matrix_set(http: httpx.Client) -> None:
    tj = http.get("/WGS1984Quad/tilejson.json", params={"assets": "visual"}).json()
    assert "/tiles/WGS1984Quad/{z}/{x}/{y}?assets=visual" in tj["tiles"][0]
    wgs = morecantile.tms.get("WGS1984Quad")
    tile = covered_tile(wgs, tj["maxzoom"])
    r = httpx.get(fill(tj["tiles"][0], tile.z, tile.x, tile.y), timeout=60)
    assert r.status_code == 200, r.text


def test_tilejson_honours_forwarded_headers(http: httpx.Client) -> None:
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "maps.example.org, proxy"}
    tj = http.get("/tilejson.json", headers=headers).json()
    assert tj["tiles"][0].startswith("https://maps.example.org/tiles/WebMercatorQuad/")


def test_tilesize_shifts_the_zooms(http: httpx.Client) -> None:
    normal = http.get("/tilejson.json").json()
    big = http.get("/tilejson.json", params={"tilesize": 512}).json()
    assert big["maxzoom"] == normal["maxzoom"] - 1
    assert "tilesize=512" in big["tiles"][0]


@pytest.mark.parametrize(
    ("url", "params", "status", "needle"),
    [
        ("/NoSuchTMS/tilejson.json", {}, 404, "WebMercatorQuad"),
        ("/NoSuchTMS/WMTSCapabilities.xml", {}, 404, "WebMercatorQuad"),
        ("/tileMatrixSets/NoSuchTMS", {}, 404, "WebMercatorQuad"),
        ("/tilejson.json", {"datetime": "yesterday"}, 400, "datetime"),
        ("/tilejson.json", {"assets": "nope"}, 400, "assets"),
        ("/tilejson.json", {"method": "loudest"}, 400, "method"),
        ("/tilejson.json", {"rescale": "1"}, 400, "rescale"),
        ("/WMTSCapabilities.xml", {"colormap_name": "nope"}, 400, "colormap_name"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    http: httpx.Client, url: str, params: dict, status: int, needle: str
) -> None:
    assert_clear_error(http.get(url, params=params), status, needle)


def test_tile_matrix_sets(http: httpx.Client) -> None:
    listing = http.get("/tileMatrixSets").json()
    ids = [t["id"] for t in listing["tileMatrixSets"]]
    assert set(ids) == set(morecantile.tms.list())
    entry = next(t for t in listing["tileMatrixSets"] if t["id"] == "WebMercatorQuad")
    assert entry["title"] == TMS.title
    (link,) = [x for x in entry["links"] if x["rel"] == "self"]
    doc = httpx.get(link["href"], timeout=30).json()
    assert doc["id"] == "WebMercatorQuad"
    assert len(doc["tileMatrices"]) == len(TMS.tileMatrices)
    assert morecantile.TileMatrixSet.model_validate(doc) == TMS


def wmts(http: httpx.Client, path: str, params: dict | None = None) -> ET.Element:
    r = http.get(path, params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/xml")
    return ET.fromstring(r.content)


@pytest.mark.parametrize("tms_id", ["WebMercatorQuad", "WGS1984Quad"])
def test_wmts_capabilities_structure(http: httpx.Client, tms_id: str) -> None:
    path = (
        "/WMTSCapabilities.xml"
        if tms_id == "WebMercatorQuad"
        else f"/{tms_id}/WMTSCapabilities.xml"
    )
    root = wmts(http, path, TILE_PARAMS)
    tms = morecantile.tms.get(tms_id)
    tj = http.get(f"/{tms_id}/tilejson.json", params=TILE_PARAMS).json()

    assert root.tag == f"{WMTS}Capabilities" and root.get("version") == "1.0.0"
    assert [c.tag for c in root] == [
        f"{OWS}ServiceIdentification",
        f"{OWS}OperationsMetadata",
        f"{WMTS}Contents",
        f"{WMTS}ServiceMetadataURL",
    ]
    assert root.findtext(f"{OWS}ServiceIdentification/{OWS}ServiceType") == "OGC WMTS"
    ops = root.findall(f"{OWS}OperationsMetadata/{OWS}Operation")
    assert {op.get("name") for op in ops} == {"GetCapabilities", "GetTile"}

    (layer,) = root.findall(f"{WMTS}Contents/{WMTS}Layer")
    assert layer.findtext(f"{OWS}Identifier") == "terrazzo"
    assert layer.findtext(f"{WMTS}Format") == "image/png"
    lower = layer.findtext(f"{OWS}WGS84BoundingBox/{OWS}LowerCorner").split()
    upper = layer.findtext(f"{OWS}WGS84BoundingBox/{OWS}UpperCorner").split()
    assert [float(v) for v in lower + upper] == pytest.approx(tj["bounds"])
    link = layer.findtext(f"{WMTS}TileMatrixSetLink/{WMTS}TileMatrixSet")
    assert link == tms_id

    (matrix_set,) = root.findall(f"{WMTS}Contents/{WMTS}TileMatrixSet")
    assert matrix_set.findtext(f"{OWS}Identifier") == link
    epsg = tms.rasterio_crs.to_epsg()
    assert matrix_set.findtext(f"{OWS}SupportedCRS") == f"urn:ogc:def:crs:EPSG::{epsg}"
    matrices = matrix_set.findall(f"{WMTS}TileMatrix")
    assert len(matrices) == tj["maxzoom"] - tj["minzoom"] + 1
    for element, z in zip(matrices, range(tj["minzoom"], tj["maxzoom"] + 1), strict=True):
        expected = tms.matrix(z)
        assert element.findtext(f"{OWS}Identifier") == str(z)
        scale = float(element.findtext(f"{WMTS}ScaleDenominator"))
        assert scale == pytest.approx(expected.scaleDenominator)
        corner = [float(v) for v in element.findtext(f"{WMTS}TopLeftCorner").split()]
        assert corner == pytest.approx(list(expected.pointOfOrigin))
        for tag in ("TileWidth", "TileHeight", "MatrixWidth", "MatrixHeight"):
            key = tag[0].lower() + tag[1:]
            assert int(element.findtext(f"{WMTS}{tag}")) == getattr(expected, key), tag

    resource = layer.find(f"{WMTS}ResourceURL")
    assert resource.get("resourceType") == "tile" and resource.get("format") == "image/png"
    template = resource.get("template")
    for key in ("{TileMatrix}", "{TileCol}", "{TileRow}"):
        assert key in template
    assert parse_qs(urlsplit(template).query) == {k: [v] for k, v in TILE_PARAMS.items()}
    tile = covered_tile(tms, tj["maxzoom"])
    url = (
        template.replace("{TileMatrix}", str(tile.z))
        .replace("{TileCol}", str(tile.x))
        .replace("{TileRow}", str(tile.y))
    )
    r = httpx.get(url, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).format == "PNG"


def test_wmts_with_a_tilesize(http: httpx.Client) -> None:
    root = wmts(http, "/WMTSCapabilities.xml", {"tilesize": 512})
    first = root.find(f"{WMTS}Contents/{WMTS}TileMatrixSet/{WMTS}TileMatrix")
    z = int(first.findtext(f"{OWS}Identifier"))
    assert first.findtext(f"{WMTS}TileWidth") == "512"
    scale = float(first.findtext(f"{WMTS}ScaleDenominator"))
    assert scale == pytest.approx(TMS.matrix(z).scaleDenominator / 2)


def test_zoom_range_rule() -> None:
    # a 10 m pixel at the equator is 10 m in Web Mercator: closest zoom 14 (9.55 m)
    stats = {
        "finest_bbox": (0.0, -0.05, 0.1, 0.05),
        "res_deg": 10 / 111_319.49,
        "largest_bbox": (0.0, -0.5, 1.0, 0.5),  # ~111 km
    }
    minzoom, maxzoom = zoom_range(TMS, stats)
    assert maxzoom == 14
    # lowest zoom whose pixel is at most 111 km / MIN_ITEM_PIXELS
    cell = 111_319.49 / MIN_ITEM_PIXELS
    assert TMS.matrix(minzoom).cellSize <= cell < TMS.matrix(minzoom - 1).cellSize
    assert zoom_range(TMS, stats, tilesize=512) == (minzoom - 1, maxzoom - 1)
    assert zoom_range(TMS, None) == (TMS.minzoom, TMS.maxzoom)
    # one huge item, a coarse pixel: minzoom never passes maxzoom
    coarse = {**stats, "res_deg": 1.0, "largest_bbox": (-170.0, -80.0, 170.0, 80.0)}
    low, high = zoom_range(TMS, coarse)
    assert low <= high and high == TMS.zoom_for_res(111_319.49 * math.sqrt(1.0))
