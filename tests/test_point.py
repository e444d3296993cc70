"""GET /point/{lon},{lat} and the tile /assets routes, checked against rasterio on the same COGs."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from tests.test_tiles_api import TWO_DATES

POINT = (10.0, 45.12)  # June and September items overlap here


def sample(href: str, lon: float, lat: float) -> list[float | None]:
    """The COG's own pixel at lon/lat, None where its mask or nodata says invalid."""
    with rasterio.open(href) as ds:
        x, y = Transformer.from_crs("EPSG:4326", ds.crs, always_xy=True).transform(lon, lat)
        row, col = ds.index(x, y)
        window = ((row, row + 1), (col, col + 1))
        values = ds.read(window=window)[:, 0, 0]
        valid = ds.read_masks(1, window=window)[0, 0] > 0
    return [float(v) if valid else None for v in values]


@pytest.mark.parametrize("asset", ["visual", "dem"])
def test_point_values_equal_each_items_own_pixel(http: httpx.Client, asset: str) -> None:
    lon, lat = POINT
    r = http.get(f"/point/{lon},{lat}", params={"assets": asset})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["coordinates"] == [lon, lat]
    assert len(body["items"]) >= 2, "two dates overlap here"
    hrefs = {
        i["id"]: i["assets"][asset]
        for i in http.get(
            f"/tiles/{TWO_DATES.z}/{TWO_DATES.x}/{TWO_DATES.y}/assets",
            # every item under the tile, not only those the footprint shortcuts plan
            params={"assets": asset, "skipcovered": "false", "exitwhenfull": "false"},
        ).json()
    }
    for item in body["items"]:
        got = item["assets"][asset]["values"]
        want = sample(hrefs[item["id"]], lon, lat)
        assert got == pytest.approx(want), item["id"]
        assert len(item["assets"][asset]["band_names"]) == len(want)
    dates = [i["datetime"] for i in body["items"]]
    assert dates == sorted(dates, reverse=True), "mosaic order: newest first"


def test_masked_pixel_is_none(http: httpx.Client) -> None:
    item_id = "demo-32632-2024-06-01-03"  # the demo item with an internal mask
    href = http.get("/tiles/WebMercatorQuad/0/0/0/assets", params={"ids": item_id}).json()[0][
        "assets"
    ]["visual"]
    with rasterio.open(href) as ds:
        rows, cols = np.nonzero(ds.read_masks(1) == 0)
        assert len(rows), "the demo item should have masked pixels"
        x, y = ds.xy(rows[len(rows) // 2], cols[len(cols) // 2])
        lon, lat = Transformer.from_crs(ds.crs, "EPSG:4326", always_xy=True).transform(x, y)
    r = http.get(f"/point/{lon},{lat}", params={"ids": item_id})
    assert r.status_code == 200, r.text
    (item,) = r.json()["items"]
    assert item["assets"]["visual"]["values"] == [None, None, None]


def test_point_outside_the_catalog_has_no_items(http: httpx.Client) -> None:
    r = http.get("/point/-40,-40")
    assert r.status_code == 200 and r.json()["items"] == []


@pytest.mark.parametrize("path", ["/point/200,10", "/point/10,95", "/point/abc,10"])
def test_point_bad_coordinates(http: httpx.Client, path: str) -> None:
    r = http.get(path)
    assert r.status_code in (400, 422)
    assert "lon" in r.text or "lat" in r.text


def test_tile_assets_list_the_plan_items(http: httpx.Client) -> None:
    t = f"{TWO_DATES.z}/{TWO_DATES.x}/{TWO_DATES.y}"
    listed = http.get(f"/tiles/WebMercatorQuad/{t}/assets").json()
    plan = http.get(f"/plan/WebMercatorQuad/{t}").json()
    assert [i["id"] for i in listed] == [i["id"] for i in plan["items"]]
    assert len(listed) >= 2 and all(i["assets"]["visual"].endswith(".tif") for i in listed)
    assert http.get(f"/tiles/{t}/assets").json() == listed
