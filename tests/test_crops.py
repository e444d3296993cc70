"""Crops (issue 17): GET /bbox and POST /feature on the session server. A UTM GeoTIFF crop
equals rio-tiler's `Reader.part` of the one covering item, on the grid asked for (CRS and
transform read back with rasterio); max_size keeps the aspect; a feature masks exactly what
`rasterio.features.geometry_mask` (all_touched, rio-tiler's rule) leaves outside and equals
rio-tiler's `Reader.feature` inside; an expression works on crops; bad requests are 400s."""

from __future__ import annotations

import io
import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
from rasterio.features import geometry_mask
from rasterio.transform import from_bounds
from rasterio.warp import transform_bounds, transform_geom
from rio_tiler.io import Reader

from tests.conftest import assert_clear_error, utm_area
from tests.test_correctness import near_edges

UTM = "EPSG:32632"
# 6.97..7.18°E at 45°N lies in demo-32632-2024-06-01-06 alone (its neighbours end at 6.962
# and begin at 7.189; the second pass starts at 9.2°E): a crop there is one item's pixels
PLACE = (7.08, 45.0)
ITEM = "demo-32632-2024-06-01-06"
TRIANGLE = {
    "type": "Feature",
    "properties": {},
    "geometry": {
        "type": "Polygon",
        "coordinates": [[[7.02, 44.96], [7.15, 44.97], [7.06, 45.04], [7.02, 44.96]]],
    },
}


def href(catalog: Path, asset: str = "visual") -> str:
    return str(catalog.parent / "cogs" / f"{ITEM}_{asset}.tif")


def path_bbox(bbox: list[float]) -> str:
    return ",".join(repr(float(v)) for v in bbox)


def npy(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-binary"
    out = np.load(io.BytesIO(response.content))
    return out[:-1], out[-1] == 255


def agree(ours: np.ndarray, ours_valid: np.ndarray, img) -> None:
    """Masks equal away from mask edges, pixels equal on >= 99.9% of the common valid ones."""
    theirs, their_valid = img.data, ~np.ma.getmaskarray(img.array).all(axis=0)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    assert not ((ours_valid != their_valid) & ~near_edges(their_valid)).any(), "masks differ"
    both = ours_valid & their_valid
    assert both.mean() > 0.3
    equal = (ours == theirs).all(axis=0)[both].mean()
    assert equal >= 0.999, f"only {equal:.4f} of valid pixels equal"


@pytest.mark.parametrize(
    ("pixels", "size"),
    [((96, 64), (96, 64)), ((120, 80), (150, 100))],  # native 120 m pixels; resampled
)
def test_utm_bbox_geotiff_equals_rio_tilers_part(
    http: httpx.Client, demo_catalog: Path, pixels: tuple[int, int], size: tuple[int, int]
) -> None:
    square = utm_area(pixels[0], 120, *PLACE)
    bbox = [square[0], square[1], square[2], square[1] + pixels[1] * 120]
    width, height = size
    r = http.get(
        f"/bbox/{path_bbox(bbox)}/{width}x{height}.tif",
        params={"coord_crs": UTM, "assets": "visual"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/tiff; application=geotiff"
    assert r.headers["X-Terrazzo-Items"] == "1"
    assert r.headers["Content-Crs"] == "<http://www.opengis.net/def/crs/EPSG/0/32632>"
    with rasterio.MemoryFile(r.content) as mem, mem.open() as tif:
        assert tif.crs.to_string() == UTM
        assert (tif.width, tif.height, tif.count) == (width, height, 4)  # RGB + alpha
        assert tif.transform.almost_equals(from_bounds(*bbox, width, height), precision=1e-6)
        data, valid = tif.read()[:3], tif.read(4) == 255
    with Reader(href(demo_catalog)) as src:
        img = src.part(bbox, dst_crs=UTM, bounds_crs=UTM, width=width, height=height)
    agree(data, valid, img)


def test_lonlat_bbox_in_a_utm_output_crs_equals_rio_tiler(
    http: httpx.Client, demo_catalog: Path
) -> None:
    bbox = [7.01, 44.96, 7.16, 45.04]
    r = http.get(
        f"/bbox/{path_bbox(bbox)}/160x120.npy", params={"dst_crs": UTM, "assets": "visual"}
    )
    data, valid = npy(r)
    expected = transform_bounds("EPSG:4326", UTM, *bbox, densify_pts=21)  # rio-tiler's rule
    got = [float(v) for v in r.headers["Content-Bbox"].split(",")]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    with Reader(href(demo_catalog)) as src:
        img = src.part(bbox, dst_crs=UTM, bounds_crs="EPSG:4326", width=160, height=120)
    agree(data, valid, img)


@pytest.mark.parametrize(("span", "shape"), [((2, 1), (50, 100)), ((1, 3), (100, 33))])
def test_max_size_gives_the_longer_side_and_keeps_the_aspect(
    http: httpx.Client, span: tuple[int, int], shape: tuple[int, int]
) -> None:
    x0, y0, _, _ = utm_area(64, 120, *PLACE)
    bbox = [x0, y0, x0 + span[0] * 6000, y0 + span[1] * 6000]
    r = http.get(f"/bbox/{path_bbox(bbox)}.tif", params={"coord_crs": UTM, "max_size": 100})
    assert r.status_code == 200, r.text
    with rasterio.MemoryFile(r.content) as mem, mem.open() as tif:
        assert (tif.height, tif.width) == shape
        assert tif.transform.almost_equals(from_bounds(*bbox, shape[1], shape[0]), 1e-6)
    # without max_size: 1024 on the longer side (TiTiler's default)
    data, _ = npy(http.get(f"/bbox/{path_bbox(bbox)}.npy", params={"coord_crs": UTM}))
    assert max(data.shape[1:]) == 1024
    assert data.shape[1:] == tuple(round(1024 * s / max(span)) for s in reversed(span))


def test_feature_masks_what_geometry_mask_leaves_out_and_equals_rio_tiler_inside(
    http: httpx.Client, demo_catalog: Path
) -> None:
    size = (128, 96)
    params = {"dst_crs": UTM, "assets": "visual"}
    r = http.post(f"/feature/{size[0]}x{size[1]}.npy", params=params, json=TRIANGLE)
    data, valid = npy(r)
    # the same grid as a bbox crop of the feature's bounds: the feature's validity is the
    # bbox's AND the pixels the polygon touches, its data the bbox's
    lonlat = [7.02, 44.96, 7.15, 45.04]
    box, box_valid = npy(http.get(f"/bbox/{path_bbox(lonlat)}/128x96.npy", params=params))
    bounds = [float(v) for v in r.headers["Content-Bbox"].split(",")]
    transform = from_bounds(*bounds, *size)
    shape = transform_geom("EPSG:4326", UTM, TRIANGLE["geometry"])
    outside = geometry_mask([shape], (size[1], size[0]), transform, all_touched=True)
    assert 0.2 < outside.mean() < 0.8
    assert box_valid[~outside].mean() > 0.95  # the polygon lies over data
    assert not valid[outside].any(), "pixels outside the polygon are not masked"
    np.testing.assert_array_equal(valid, box_valid & ~outside)
    np.testing.assert_array_equal(data[:, valid], box[:, valid])
    with Reader(href(demo_catalog)) as src:
        img = src.feature(
            TRIANGLE, dst_crs=UTM, shape_crs="EPSG:4326", width=size[0], height=size[1]
        )
    agree(data, valid, img)


def test_feature_without_a_size_or_suffix_is_a_png_at_max_size(http: httpx.Client) -> None:
    r = http.post("/feature", params={"max_size": 64}, json=TRIANGLE)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"  # masked outside the polygon: not JPEG
    assert r.headers["Cache-Control"] == "no-store"
    with rasterio.MemoryFile(r.content) as mem, mem.open() as png:
        assert (png.width, png.height) == (64, round(64 * 0.08 / 0.13))
        alpha = png.read(png.count)
    assert 0 < (alpha == 255).mean() < 1


def test_expression_on_a_bbox_and_a_feature(http: httpx.Client) -> None:
    bbox = utm_area(64, 120, *PLACE)
    url = f"/bbox/{path_bbox(bbox)}/64x64.npy"
    common = {"coord_crs": UTM, "assets": "visual"}
    raw, raw_valid = npy(http.get(url, params=common))
    ndvi, ndvi_valid = npy(http.get(url, params={**common, "expression": "(b2-b1)/(b2+b1)"}))
    assert ndvi.dtype == np.float32 and ndvi.shape == (1, 64, 64)
    assert raw_valid.mean() > 0.9 and (ndvi_valid == raw_valid).all()
    red, green = raw[0].astype("float64"), raw[1].astype("float64")
    with np.errstate(all="ignore"):
        expected = ((green - red) / (green + red)).astype("float32")
    np.testing.assert_array_equal(ndvi[0][raw_valid], expected[raw_valid])
    feature, feature_valid = npy(
        http.post(
            "/feature.npy",
            params={"assets": "visual", "expression": "b3*2", "max_size": 32},
            json=TRIANGLE,
        )
    )
    assert feature.dtype == np.float32 and feature.shape[0] == 1
    assert 0 < feature_valid.mean() < 1
    # a float crop in PNG is refused once, before any read, with the fix
    assert_clear_error(
        http.get(url.replace(".npy", ".png"), params={**common, "expression": "b1/b2"}),
        400,
        "ask for npy or tif",
    )


def test_revalidation_and_an_empty_area(http: httpx.Client) -> None:
    url = f"/bbox/{path_bbox(utm_area(32, 120, *PLACE))}/32x32.png"
    first = http.get(url, params={"coord_crs": UTM})
    assert first.status_code == 200 and first.headers["ETag"]
    again = http.get(
        url, params={"coord_crs": UTM}, headers={"If-None-Match": first.headers["ETag"]}
    )
    assert again.status_code == 304
    assert http.get("/bbox/1.0,1.0,1.1,1.1.png").status_code == 204  # the Gulf of Guinea


BAD = [
    ("/bbox/7.15,44.95,7.0,45.05.png", {}, 400, "minx < maxx"),
    ("/bbox/nan,44.95,7.0,45.05.png", {}, 400, "finite"),
    ("/bbox/7,44.9,7.1,inf.png", {}, 400, "finite"),
    ("/bbox/7,44.9,7.1,x.png", {}, 400, "four numbers"),
    ("/bbox/7,95,7.1,96.png", {}, 400, "-180..180, -90..90"),
    ("/bbox/7,44.9,7.1,45.gif", {}, 400, "format: unknown 'gif'"),
    ("/bbox/7,44.9,7.1,45/0x5.tif", {}, 400, "at least 1"),
    ("/bbox/7,44.9,7.1,45/ax5.tif", {}, 400, "{width}x{height}"),
    ("/bbox/7,44.9,7.1,45/5000x5000.tif", {}, 413, "TERRAZZO_MAX_CHUNK_PIXELS"),
    ("/bbox/7,44.9,7.1,45.tif", {"max_size": "99999"}, 413, "max_size"),
    ("/bbox/7,44.9,7.1,45.tif", {"max_size": "0"}, 400, "max_size: must be at least 1"),
    ("/bbox/7,44.9,7.1,45.tif", {"coord_crs": "+proj=utm +zone=32"}, 400, "EPSG:32632"),
    ("/bbox/7,44.9,7.1,45.tif", {"coord_crs": "EPSG:2056"}, 400, "area of use"),
    ("/bbox/7,44.9,7.1,45.tif", {"dst_crs": "EPSG:32601"}, 400, "choose a dst_crs"),
    ("/bbox/7,44.9,7.1,45.tif", {"dts_crs": UTM}, 400, "did you mean 'dst_crs'"),
    ("/bbox/7,44.9,7.1,45.tif", {"bidx": "9"}, 400, "bidx"),
]


@pytest.mark.parametrize(("path", "params", "status", "needle"), BAD)
def test_bad_bboxes_and_sizes_are_refused_with_the_fix(
    http: httpx.Client, path: str, params: dict, status: int, needle: str
) -> None:
    assert_clear_error(http.get(path, params=params), status, needle)


def polygon(coordinates: list) -> dict:
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": coordinates}}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (TRIANGLE["geometry"], "wrap a bare geometry in a Feature"),
        ([1, 2], "expected a GeoJSON Feature"),
        (None, "expected a GeoJSON Feature"),  # JSON null
        # TiTiler's /feature takes one Feature; a collection is for POST /statistics
        ({"type": "FeatureCollection", "features": [TRIANGLE]}, "one Feature per request"),
        ({"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 45]}}, "Polygon"),
        (polygon([[[7, 45], [7.1, 45]]]), "not valid GeoJSON"),
        (polygon([]), "empty"),
        (polygon([[[7, 45], [7.1, 45], [7.1, "x"], [7, 45]]]), "not valid GeoJSON"),
        (polygon([[[7, 45], [7.1, 45], [7.1, 45], [7, 45]]]), "miny < maxy"),
        (polygon([[[700000, 4.98e6], [710000, 4.98e6], [7e5, 4.99e6], [7e5, 4.98e6]]]), "-90"),
    ],
)
def test_bad_feature_bodies_are_400s(http: httpx.Client, body: object, needle: str) -> None:
    content = json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    assert_clear_error(http.post("/feature.png", content=content, headers=headers), 400, needle)
