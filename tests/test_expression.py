"""Band math (`expression`, TiTiler's syntax) on the read path: a mosaic's expression equals
numpy on rio-tiler's tiles of the same items; POST /chunks and the SDK equal the same
expression applied to a raw read; bad expressions are 400s naming the fix, never evaluated."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from terrazzo import Client

from core.process import Expression, ProcessError, band_variables
from tests.conftest import Server, utm_area
from tests.test_correctness import near_edges, rio_tiler_tile

TMS = morecantile.tms.get("WebMercatorQuad")
NDVI_LIKE = "(b2-b1)/(b2+b1)"


def numpy_ndvi(data: np.ndarray) -> np.ndarray:
    red, green = data[0].astype("float64"), data[1].astype("float64")
    with np.errstate(all="ignore"):
        return ((green - red) / (green + red)).astype("float32")


def same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b) | (np.isnan(a) & np.isnan(b))


@pytest.mark.parametrize(("lon", "lat", "z"), [(6.0, 45.0, 12), (12.1, 45.1, 11)])
def test_mosaic_expression_equals_numpy_on_rio_tilers_tiles(
    http: httpx.Client, demo_catalog: Path, lon: float, lat: float, z: int
) -> None:
    tile = TMS.tile(lon, lat, z)
    r = http.get(
        f"/tiles/{z}/{tile.x}/{tile.y}.npy",
        params={"assets": "visual", "expression": NDVI_LIKE},
    )
    assert r.status_code == 200, r.text
    ours = np.load(io.BytesIO(r.content))
    data, valid = ours[:-1], ours[-1] == 255
    assert data.dtype == np.float32 and data.shape[0] == 1
    theirs, their_valid, n_items = rio_tiler_tile(demo_catalog, z, tile.x, tile.y, "visual")
    assert n_items >= 2
    assert not ((valid != their_valid) & ~near_edges(their_valid)).any(), "masks differ"
    both = valid & their_valid
    assert both.mean() > 0.05
    equal = same(data[0], numpy_ndvi(theirs))[both].mean()
    assert equal >= 0.999, f"only {equal:.4f} of valid pixels equal"


def test_several_blocks_and_asset_names(http: httpx.Client) -> None:
    tile = TMS.tile(6.45, 45.0, 11)
    path = f"/tiles/{tile.z}/{tile.x}/{tile.y}.npy"
    raw = np.load(io.BytesIO(http.get(path, params={"assets": "visual,dem"}).content))
    r = http.get(path, params={"assets": "visual,dem", "expression": "visual_b3*2; dem-b1"})
    out = np.load(io.BytesIO(r.content))
    assert out.shape[0] == 3  # two bands and the mask
    valid = raw[-1] == 255
    assert valid.mean() > 0.5 and (out[-1] == raw[-1]).all()
    values = raw[:-1].astype("float64")
    np.testing.assert_array_equal(out[0][valid], (values[2] * 2).astype("float32")[valid])
    np.testing.assert_array_equal(out[1][valid], (values[3] - values[0]).astype("float32")[valid])


def test_chunks_and_the_sdk_apply_the_expression_to_the_raw_read(server: Server) -> None:
    bbox = utm_area(512, 30, 6.45, 45.0)
    read = {"crs": "EPSG:32632", "resolution": 30, "assets": ["visual"], "progress": False}
    with Client(server.url) as client:
        raw = client.read(bbox, **read)
        ndvi = client.read(bbox, expression=NDVI_LIKE, **read)
    assert ndvi.dtype == np.float32 and ndvi.sizes["band"] == 1
    assert ndvi.sizes["time"] == raw.sizes["time"] >= 1
    assert str(ndvi.band.values[0]) == NDVI_LIKE  # the band is named by its block
    expected = numpy_ndvi(raw.values.reshape(-1, *raw.shape[2:])[:3])  # the first layer
    got = ndvi.values[0, 0]
    valid = ~np.isnan(raw.values[0, 0].astype("float32")) & (raw.values[0].sum(axis=0) > 0)
    assert valid.mean() > 0.3
    assert same(got, expected)[valid].mean() == 1.0


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("b9*2", "unknown band 'b9'"),
        ("__import__('os').system('true')", "unknown function"),
        ("b1.real", "attribute is not allowed"),
        ("b1[0]", "subscript is not allowed"),
        ("b1 if b2 else b3", "ifexp is not allowed"),
        ("where(b1)", "does not evaluate"),
        ("(" * 400 + "b1" + ")" * 400, "cannot parse"),
        ("b1;" * 40, "at most 32"),
        ("x" * 3000, "longer than"),
    ],
)
def test_bad_expressions_are_400s_on_tiles_tilejson_and_chunks(
    http: httpx.Client, expression: str, needle: str
) -> None:
    params = {"assets": "visual", "expression": expression, "format": "npy"}
    for response in (
        http.get("/tiles/11/1058/736", params=params),
        http.get("/tilejson.json", params=params),
        http.post(
            "/chunks",
            json={
                "crs": "EPSG:32632",
                "chunks": [{"id": "a", "bbox": utm_area(64, 30, 6.45, 45.0), "resolution": 30}],
                "assets": ["visual"],
                "expression": expression,
            },
        ),
    ):
        if len(expression) > 2000 and response.request.method == "POST":
            assert response.status_code == 422  # the body schema's own max_length
            continue
        assert response.status_code == 400, (response.request.url, response.text[:300])
        assert needle in response.json()["detail"], response.json()["detail"]


def test_expression_and_bidx_are_exclusive(http: httpx.Client) -> None:
    r = http.get("/tiles/11/1058/736.npy", params={"expression": "b1", "bidx": "1"})
    assert r.status_code == 400 and "choose one" in r.json()["detail"]


def test_names_for_bands() -> None:
    names = band_variables([("B08", 1), ("visual", 3), ("nir-08", 1)])
    assert names[0] == ("b1", "B08_b1", "B08")
    assert names[3] == ("b4", "visual_b3")
    assert names[4] == ("b5", "nir_08_b1", "nir_08")  # not an identifier: _ for the dash
    data = np.stack([np.full((2, 2), v, dtype="uint16") for v in (10, 1, 2, 3, 30)])
    out, _ = Expression("(nir_08-B08)/(nir_08+B08)", tuple(names)).apply(
        data, np.ones((2, 2), dtype=bool)
    )
    np.testing.assert_array_equal(out[0], np.float32(0.5))
    with pytest.raises(ProcessError, match="unknown band"):
        Expression("B04", tuple(names)).check()


def test_point_gives_each_items_expression_of_its_own_values(http: httpx.Client) -> None:
    params = {"assets": "visual", "expression": f"{NDVI_LIKE};b3"}
    items = http.get("/point/6.45,45.0", params=params).json()["items"]
    assert items
    for item in items:
        red, green, blue = item["assets"]["visual"]["values"]
        assert item["band_names"] == [NDVI_LIKE, "b3"]
        expected = np.float32((green - red) / (green + red))
        assert item["values"] == [float(expected), float(blue)]
