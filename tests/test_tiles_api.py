"""GET /tiles end to end over a real uvicorn server: formats, parameters, errors."""

from __future__ import annotations

import io

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from PIL import Image

from tests.conftest import assert_clear_error

TMS = morecantile.tms.get("WebMercatorQuad")
ZONE_EDGE = TMS.tile(6.0, 45.0, 11)  # items from zones 31 and 32 overlap here
TWO_DATES = TMS.tile(10.0, 45.12, 11)  # June and September items overlap here
EMPTY = TMS.tile(-40.0, -40.0, 11)  # the middle of the South Atlantic
T = f"{ZONE_EDGE.z}/{ZONE_EDGE.x}/{ZONE_EDGE.y}"


def npy(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    arr = np.load(io.BytesIO(response.content))
    return arr[:-1], arr[-1]


def test_png_tile(http: httpx.Client) -> None:
    r = http.get(f"/tiles/{T}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] in ("image/png", "image/jpeg")
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (256, 256)
    pixels = np.asarray(img)
    assert pixels[..., :3].std() > 5, "a landscape, not a flat colour"
    assert int(r.headers["X-Terrazzo-Items"]) >= 2
    assert "search;dur=" in r.headers["Server-Timing"]


def test_npy_layout_follows_titiler(http: httpx.Client) -> None:
    data, mask = npy(http.get(f"/tiles/WebMercatorQuad/{T}.npy"))
    assert data.shape == (3, 256, 256) and data.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    assert (data[:, mask == 0] == 0).all()
    assert (data[:, mask == 255].max(axis=0) > 0).all()


@pytest.mark.parametrize(("fmt", "kind"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_image_formats(http: httpx.Client, fmt: str, kind: str) -> None:
    r = http.get(f"/tiles/{T}.{fmt}")
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).format == kind


def test_geotiff_format_is_georeferenced(http: httpx.Client) -> None:
    r = http.get(f"/tiles/{T}", params={"format": "tif"})
    assert r.status_code == 200, r.text
    with rasterio.MemoryFile(r.content) as mem, mem.open() as ds:
        assert ds.crs.to_epsg() == 3857
        bounds = TMS.xy_bounds(ZONE_EDGE)
        assert ds.bounds.left == pytest.approx(bounds.left)
        assert ds.count == 4  # RGB + mask


def test_no_item_is_204(http: httpx.Client) -> None:
    r = http.get(f"/tiles/{EMPTY.z}/{EMPTY.x}/{EMPTY.y}")
    assert r.status_code == 204 and r.content == b""


@pytest.mark.parametrize(
    ("url", "params", "status", "needle"),
    [
        ("/tiles/3/8/0", {}, 404, "x must be in 0..7"),
        ("/tiles/NoSuchTMS/3/1/1", {}, 404, "tileMatrixSetId"),
        (f"/tiles/{T}", {"method": "loudest"}, 400, "method"),
        (f"/tiles/{T}", {"resampling": "magic"}, 400, "resampling"),
        (f"/tiles/{T}", {"assets": "nope"}, 400, "assets"),
        (f"/tiles/{T}", {"datetime": "last tuesday"}, 400, "datetime"),
        (f"/tiles/{T}", {"sortby": "-cloudiness"}, 400, "sortby"),
        (f"/tiles/{T}", {"rescale": "10"}, 400, "rescale"),
        (f"/tiles/{T}", {"colormap_name": "nope"}, 400, "colormap_name"),
        (f"/tiles/{T}", {"bidx": "0"}, 400, "bidx"),
        (f"/tiles/{T}", {"tilesize": "4096"}, 400, "tilesize"),
        (f"/tiles/{T}.gif", {}, 400, "format"),
        (f"/tiles/{T}", {"assets": "dem", "format": "jpeg"}, 400, "rescale"),
        ("/tiles/a/b/c", {}, 422, "z"),
        (f"/tiles/{T}", {"filter": "cloudiness < 3"}, 400, "filter"),
        (f"/tiles/{T}", {"filter": "id = "}, 400, "CQL2"),
    ],
)
def test_bad_input_is_a_clear_4xx(
    http: httpx.Client, url: str, params: dict, status: int, needle: str
) -> None:
    assert_clear_error(http.get(url, params=params), status, needle)


def test_float_asset_with_rescale_and_colormap(http: httpx.Client) -> None:
    r = http.get(
        f"/tiles/{T}.png", params={"assets": "dem", "rescale": "0,3000", "colormap_name": "terrain"}
    )
    assert r.status_code == 200, r.text
    img = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))
    assert img[..., 3].max() == 255
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 20


def test_dem_npy_is_float(http: httpx.Client) -> None:
    data, mask = npy(http.get(f"/tiles/{T}.npy", params={"assets": "dem"}))
    assert data.dtype == np.float32 and data.shape == (1, 256, 256)
    assert (data[0][mask == 255] > -9999).all()


def test_datetime_selects_items(http: httpx.Client) -> None:
    t = f"{TWO_DATES.z}/{TWO_DATES.x}/{TWO_DATES.y}.npy"
    june, june_mask = npy(http.get(f"/tiles/{t}", params={"datetime": "2024-06-01"}))
    sept, sept_mask = npy(http.get(f"/tiles/{t}", params={"datetime": "2024-09-01"}))
    both, _ = npy(http.get(f"/tiles/{t}"))
    common = (june_mask == 255) & (sept_mask == 255)
    assert common.mean() > 0.2
    assert not np.array_equal(june[:, common], sept[:, common]), "the two dates differ"
    # default order: newest on top
    assert np.array_equal(both[:, common], sept[:, common])
    oldest, _ = npy(http.get(f"/tiles/{t}", params={"sortby": "datetime"}))
    assert np.array_equal(oldest[:, common], june[:, common])


@pytest.mark.parametrize(
    "method", ["last", "highest", "lowest", "mean", "median", "stdev", "count"]
)
def test_methods_over_http(http: httpx.Client, method: str) -> None:
    t = f"{TWO_DATES.z}/{TWO_DATES.x}/{TWO_DATES.y}.npy"
    data, mask = npy(http.get(f"/tiles/{t}", params={"pixel_selection": method}))
    first, _ = npy(http.get(f"/tiles/{t}"))
    valid = mask == 255
    if method == "count":
        assert data.dtype == np.uint16 and data[:, valid].max() >= 2
    elif method == "stdev":
        assert data.dtype == np.float32 and data[:, valid].max() > 0
    elif method in ("highest", "lowest"):
        cmp = np.greater_equal if method == "highest" else np.less_equal
        assert cmp(data[:, valid], first[:, valid]).all()
        assert not np.array_equal(data, first)
    else:
        assert data.dtype == np.uint8 and not np.array_equal(data, first)


def test_other_tile_matrix_set_and_tilesize(http: httpx.Client) -> None:
    geo = morecantile.tms.get("WGS1984Quad").tile(6.0, 45.0, 9)
    data, mask = npy(
        http.get(f"/tiles/WGS1984Quad/{geo.z}/{geo.x}/{geo.y}.npy", params={"tilesize": 512})
    )
    assert data.shape == (3, 512, 512) and (mask == 255).any()


def test_bidx_selects_bands(http: httpx.Client) -> None:
    rgb, _ = npy(http.get(f"/tiles/{T}.npy"))
    band, _ = npy(http.get(f"/tiles/{T}.npy", params={"bidx": "3,1"}))
    assert band.shape[0] == 2
    assert np.array_equal(band[0], rgb[2]) and np.array_equal(band[1], rgb[0])


def test_plan_route_explains_the_tile(http: httpx.Client) -> None:
    r = http.get(f"/plan/WebMercatorQuad/{T}")
    assert r.status_code == 200, r.text
    plan = r.json()
    assert len(plan["items"]) >= 2
    epsgs = {read["crs"] for item in plan["items"] for read in item["reads"]}
    assert {"EPSG:32631", "EPSG:32632"} <= epsgs
    assert all(read["tiles"] for item in plan["items"] for read in item["reads"])
    assert "level" in plan["text"] and "window" in plan["text"]


def test_info(http: httpx.Client) -> None:
    info = http.get("/info").json()
    assert info["items"] >= 20 and info["default_assets"] == ["visual"]
    assert set(info["assets"]) >= {"visual", "dem"}


def test_cql2_filter_selects_items(http: httpx.Client) -> None:
    everything = http.get(f"/tiles/{T}.npy")
    zone31 = http.get(f"/tiles/{T}.npy", params={"filter": "\"proj:code\" = 'EPSG:32631'"})
    assert int(everything.headers["X-Terrazzo-Items"]) > int(zone31.headers["X-Terrazzo-Items"])
    assert int(zone31.headers["X-Terrazzo-Items"]) >= 1
    plan = http.get(f"/plan/WebMercatorQuad/{T}", params={"filter": "id LIKE 'demo-32632%'"})
    assert {r["crs"] for i in plan.json()["items"] for r in i["reads"]} == {"EPSG:32632"}
