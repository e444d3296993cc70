"""GET/POST /statistics against rio-tiler on the same items at the same resolution.

rio-tiler reads the same area (`Reader.part` / `Reader.feature`, nearest) from the one item
that covers it and computes `ImageData.statistics()`; Terrazzo's answer over real HTTP must
agree: mean and percentiles within 1e-6 relative, histogram counts and valid/masked pixel
counts equal. An expression's statistics equal numpy on rio-tiler's pixels; bad inputs are
400s (413 for areas over the pixel cap) whose detail names the fix.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from rasterio.crs import CRS
from rio_tiler.io import Reader
from rio_tiler.models import ImageData

from core.catalog import Catalog, SearchQuery
from tests.conftest import assert_clear_error

UTM32 = "EPSG:32632"
RES = 120.0  # the demo's native pixel (size=256)
# Inside demo-32632-2024-06-01-05 only (x 308280..339000, y 4970040..5000760), on its pixels:
# its neighbours end at x 314400 and start at x 333000, the September pass is far east.
SINGLE_ITEM = "demo-32632-2024-06-01-05"
BBOX = (316800.0, 4975200.0, 331200.0, 4995600.0)  # 120 x 170 pixels at 120 m
WIDTH, HEIGHT = 120, 170
PERCENTILES = [2, 25, 50, 75, 98]
TRIANGLE = {
    "type": "Polygon",
    "coordinates": [
        [[317000.0, 4975500.0], [330900.0, 4976000.0], [323000.0, 4995100.0], [317000.0, 4975500.0]]
    ],
}


@pytest.fixture(scope="module")
def hrefs(demo_catalog: Path) -> dict[str, str]:
    cat = Catalog(demo_catalog, threads=1)
    try:
        (item,) = cat.search_sync(SearchQuery(ids=(SINGLE_ITEM,)))
    finally:
        cat.close()
    return item.assets


def rio_part(href: str, **kwargs) -> ImageData:
    with Reader(href) as src:
        return src.part(
            BBOX,
            dst_crs=CRS.from_string(UTM32),
            bounds_crs=CRS.from_string(UTM32),
            resampling_method="nearest",
            **kwargs,
        )


def assert_same_stats(ours: dict, theirs: dict, names: list[str]) -> None:
    """Band by band (in order): rio-tiler's figures, at the issue's tolerances."""
    assert list(ours) == names
    assert len(theirs) == len(names)
    for name, expected in zip(names, theirs.values(), strict=True):
        got = ours[name]
        exp = expected.model_dump() if hasattr(expected, "model_dump") else dict(expected)
        exp.pop("description", None)
        assert set(got) == set(exp), (sorted(got), sorted(exp))
        assert got["valid_pixels"] == exp["valid_pixels"] > 0
        assert got["masked_pixels"] == exp["masked_pixels"]
        assert got["valid_percent"] == exp["valid_percent"]
        assert got["histogram"][0] == exp["histogram"][0]  # counts equal
        np.testing.assert_allclose(got["histogram"][1], exp["histogram"][1], rtol=1e-12)
        for key in ("mean", "median", *(k for k in exp if k.startswith("percentile_"))):
            assert got[key] == pytest.approx(exp[key], rel=1e-6, abs=1e-12), key
        for key in ("min", "max", "majority", "minority", "unique"):
            assert got[key] == exp[key], key
        for key in ("count", "sum", "std"):
            assert got[key] == pytest.approx(exp[key], rel=1e-9), key


def test_bbox_statistics_equal_rio_tiler(http: httpx.Client, hrefs: dict[str, str]) -> None:
    params = {
        "bbox": ",".join(map(str, BBOX)),
        "bbox_crs": UTM32,
        "width": WIDTH,
        "height": HEIGHT,
        "assets": "visual",
        "p": ",".join(map(str, PERCENTILES)),
        "histogram_bins": 17,
    }
    r = http.get("/statistics", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["X-Terrazzo-Items"] == "1"  # a one-item area: the mosaic is that item
    img = rio_part(hrefs["visual"], width=WIDTH, height=HEIGHT)
    theirs = img.statistics(percentiles=PERCENTILES, hist_options={"bins": 17})
    assert_same_stats(r.json(), theirs, ["visual.1", "visual.2", "visual.3"])


def test_dem_at_a_coarser_resolution_and_histogram_range(
    http: httpx.Client, hrefs: dict[str, str]
) -> None:
    """`resolution` in dst_crs units (here 2x the native pixel) and a histogram range; the
    dem has nodata (-9999) and float32 values."""
    params = {
        "bbox": ",".join(map(str, BBOX)),
        "bbox_crs": UTM32,
        "resolution": 2 * RES,
        "assets": "dem",
        "percentiles": "5,95",
        "histogram_range": "300,900",
        "histogram_bins": 6,
    }
    r = http.get("/statistics", params=params)
    assert r.status_code == 200, r.text
    img = rio_part(hrefs["dem"], width=WIDTH // 2, height=HEIGHT // 2)
    theirs = img.statistics(percentiles=[5, 95], hist_options={"bins": 6, "range": [300, 900]})
    assert_same_stats(r.json(), theirs, ["dem"])
    assert r.json()["dem"]["histogram"][1] == [300, 400, 500, 600, 700, 800, 900]


def test_expression_statistics_equal_numpy_on_rio_tilers_pixels(
    http: httpx.Client, hrefs: dict[str, str]
) -> None:
    expression = "(b2-b1)/(b2+b1)"
    params = {
        "bbox": ",".join(map(str, BBOX)),
        "bbox_crs": UTM32,
        "width": WIDTH,
        "height": HEIGHT,
        "assets": "visual",
        "expression": expression,
    }
    r = http.get("/statistics", params=params)
    assert r.status_code == 200, r.text
    (name,) = r.json()
    ours = r.json()[name]
    img = rio_part(hrefs["visual"], width=WIDTH, height=HEIGHT)
    red, green = img.data[0].astype("float64"), img.data[1].astype("float64")
    with np.errstate(all="ignore"):
        ndvi = ((green - red) / (green + red)).astype("float32")
    valid = ~np.ma.getmaskarray(img.array).any(axis=0)
    values = ndvi[valid & np.isfinite(ndvi)].astype("float64")
    assert values.size > 1000
    assert ours["valid_pixels"] == values.size
    assert ours["mean"] == pytest.approx(values.mean(), rel=1e-6)
    assert ours["min"] == values.min() and ours["max"] == values.max()
    assert ours["std"] == pytest.approx(values.std(), rel=1e-6)
    assert ours["sum"] == pytest.approx(values.sum(), rel=1e-6)


def feature_body(properties: dict | None = None) -> dict:
    return {"type": "Feature", "geometry": TRIANGLE, "properties": properties or {"name": "t"}}


@pytest.mark.parametrize("coverage", [False, True])
def test_feature_statistics_equal_rio_tilers_feature(
    http: httpx.Client, hrefs: dict[str, str], coverage: bool
) -> None:
    """The pixels the triangle touches (all-touched), coverage-weighted when asked, as
    TiTiler's POST /statistics computes them with rio-tiler."""
    params = {
        "coord_crs": UTM32,
        "width": 100,
        "height": 150,
        "assets": "dem",
        "p": "10,50,90",
        "histogram_bins": 12,
    }
    if coverage:
        params["coverage"] = "true"
    r = http.post("/statistics", params=params, json=feature_body({"name": "t", "n": 1}))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/geo+json"
    body = r.json()
    assert body["type"] == "Feature" and body["geometry"] == TRIANGLE
    assert body["properties"]["name"] == "t" and body["properties"]["n"] == 1
    ours = body["properties"]["statistics"]
    utm = CRS.from_string(UTM32)
    with Reader(hrefs["dem"]) as src:
        img = src.feature(
            TRIANGLE, shape_crs=utm, dst_crs=utm, width=100, height=150, resampling_method="nearest"
        )
    weights = img.get_coverage_array(TRIANGLE, shape_crs=utm) if coverage else None
    theirs = img.statistics(percentiles=[10, 50, 90], hist_options={"bins": 12}, coverage=weights)
    assert_same_stats(ours, theirs, ["dem"])
    whole = 100 * 150
    assert ours["dem"]["valid_pixels"] < 0.6 * whole  # the triangle, not its bbox
    if coverage:  # fractional weights: the weighted count is below the touched pixels
        assert ours["dem"]["count"] < ours["dem"]["valid_pixels"]
    else:
        assert ours["dem"]["count"] == ours["dem"]["valid_pixels"]


def test_feature_collection_gives_each_feature_its_statistics(http: httpx.Client) -> None:
    square = {
        "type": "Polygon",
        "coordinates": [
            [
                [318000.0, 4980000.0],
                [322000.0, 4980000.0],
                [322000.0, 4984000.0],
                [318000.0, 4980000.0],
            ]
        ],
    }
    fc = {
        "type": "FeatureCollection",
        "features": [
            feature_body({"k": "a"}),
            {"type": "Feature", "geometry": square, "properties": None},
        ],
    }
    params = {"coord_crs": UTM32, "resolution": RES, "assets": "dem"}
    r = http.post("/statistics", params=params, json=fc)
    assert r.status_code == 200, r.text
    a, b = r.json()["features"]
    assert a["properties"]["k"] == "a"
    sa, sb = a["properties"]["statistics"]["dem"], b["properties"]["statistics"]["dem"]
    assert sa["valid_pixels"] > sb["valid_pixels"] > 0
    # the same feature alone gives the same figures (each feature is its own read)
    alone = http.post("/statistics", params=params, json=feature_body({"k": "a"})).json()
    assert alone["properties"]["statistics"]["dem"] == sa


@pytest.mark.parametrize("coverage", [False, True])
def test_each_feature_of_a_collection_equals_rio_tilers_feature(
    http: httpx.Client, hrefs: dict[str, str], coverage: bool
) -> None:
    """A FeatureCollection (TiTiler's POST /statistics answer: the collection, each feature
    with `properties.statistics`): each feature's figures equal rio-tiler's `Reader.feature`
    statistics of that feature alone, on its own grid (its bounds, width x height), all-touched
    or coverage-weighted; a polygon, a square and a two-part MultiPolygon of different sizes."""
    x0, y0, x1, y1 = 320000.0, 4980000.0, 326000.0, 4986000.0
    square = [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]
    parts = [  # two triangles far apart: one grid over both bounds, each part masked in
        [
            [
                [317500.0, 4990000.0],
                [319900.0, 4990000.0],
                [319900.0, 4993000.0],
                [317500.0, 4990000.0],
            ]
        ],
        [
            [
                [327000.0, 4976000.0],
                [330500.0, 4976500.0],
                [329000.0, 4979000.0],
                [327000.0, 4976000.0],
            ]
        ],
    ]
    geometries = [TRIANGLE, {"type": "Polygon", "coordinates": square}]
    geometries.append({"type": "MultiPolygon", "coordinates": parts})
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "geometry": g, "properties": {"n": n}}
            for n, g in enumerate(geometries)
        ],
    }
    params = {"coord_crs": UTM32, "width": 60, "height": 70, "assets": "dem", "p": "5,50,95"}
    params |= {"histogram_bins": 9, "coverage": str(coverage).lower()}
    r = http.post("/statistics", params=params, json=fc)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["type"] == "FeatureCollection" and len(body["features"]) == 3
    utm = CRS.from_string(UTM32)
    counts = []
    for n, (feature, geometry) in enumerate(zip(body["features"], geometries, strict=True)):
        assert feature["properties"]["n"] == n and feature["geometry"] == geometry
        with Reader(hrefs["dem"]) as src:
            img = src.feature(
                geometry,
                shape_crs=utm,
                dst_crs=utm,
                width=60,
                height=70,
                resampling_method="nearest",
            )
        weights = img.get_coverage_array(geometry, shape_crs=utm) if coverage else None
        theirs = img.statistics(percentiles=[5, 50, 95], hist_options={"bins": 9}, coverage=weights)
        ours = feature["properties"]["statistics"]
        assert_same_stats(ours, theirs, ["dem"])
        counts.append(ours["dem"]["valid_pixels"])
    assert len(set(counts)) == 3  # three different areas, not one read three times


def test_categorical_counts_equal_rio_tiler(http: httpx.Client, hrefs: dict[str, str]) -> None:
    params = {
        "bbox": ",".join(map(str, BBOX)),
        "bbox_crs": UTM32,
        "width": WIDTH,
        "height": HEIGHT,
        "assets": "visual",
        "bidx": "3",
        "categorical": "true",
        "c": "0,1,2,200,255",
    }
    r = http.get("/statistics", params=params)
    assert r.status_code == 200, r.text
    img = rio_part(hrefs["visual"], width=WIDTH, height=HEIGHT, indexes=3)
    theirs = img.statistics(categorical=True, categories=[0, 1, 2, 200, 255])
    assert_same_stats(r.json(), theirs, ["visual.3"])


def test_lonlat_bbox_and_an_empty_area(http: httpx.Client) -> None:
    """bbox in lon/lat (the default) read on a lon/lat grid, and an area without items:
    every pixel masked, the figures null (JSON has no NaN)."""
    r = http.get(
        "/statistics", params={"bbox": "6.0,44.875,6.25,45.0", "max_size": 64, "assets": "dem"}
    )
    assert r.status_code == 200, r.text
    stats = r.json()["dem"]
    assert stats["valid_pixels"] + stats["masked_pixels"] == 64 * 32
    assert stats["valid_pixels"] > 0 and 200 < stats["mean"] < 3000
    empty = http.get("/statistics", params={"bbox": "-40,10,-39,11", "max_size": 16})
    assert empty.status_code == 200, empty.text
    for band in empty.json().values():
        assert band["valid_pixels"] == 0 and band["masked_pixels"] == 16 * 16
        assert band["mean"] is None and band["percentile_2"] is None


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        ({"bbox": "1,2,3"}, 400, "bbox: expected 4"),
        ({"bbox": "3,2,1,4"}, 400, "minx < maxx"),
        ({"bbox": "6,45,6.1,45.1", "p": "120"}, 400, "outside 0..100"),
        ({"bbox": "6,45,6.1,45.1", "histogram_bins": "0"}, 400, "histogram_bins"),
        ({"bbox": "6,45,6.1,45.1", "histogram_bins": "5,3,9"}, 400, "increasing"),
        ({"bbox": "6,45,6.1,45.1", "histogram_range": "5,1"}, 400, "min <= max"),
        ({"bbox": "6,45,6.1,45.1", "c": "1"}, 400, "categorical=true"),
        ({"bbox": "6,45,6.1,45.1", "resolution": "1", "width": "3"}, 400, "either resolution"),
        ({"bbox": "6,45,6.1,45.1", "dst_crs": "EPSG:999999"}, 400, "dst_crs"),
        ({"bbox": "6,45,6.1,45.1", "expression": "b9*2"}, 400, "unknown band"),
        ({"bbox": "6,45,6.1,45.1", "bbox_crsx": "x"}, 400, "did you mean 'bbox_crs'"),
        ({"bbox": "0,40,20,50", "crs": UTM32, "resolution": "10"}, 413, "max_size"),
        ({"bbox": "6,45,6.1,45.1", "width": "5000", "height": "5000"}, 413, "PIXELS"),
    ],
)
def test_bad_bbox_requests_name_the_fix(
    http: httpx.Client, params: dict, status: int, needle: str
) -> None:
    assert_clear_error(http.get("/statistics", params=params), status, needle)


@pytest.mark.parametrize(
    ("body", "params", "status", "needle"),
    [
        (
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [6, 45]}},
            {},
            400,
            "Polygon or MultiPolygon",
        ),
        (
            {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[1, 2]]]}},
            {},
            400,
            "not a valid Polygon",
        ),
        (feature_body(), {}, 400, "lon/lat out of range"),  # UTM coordinates, no coord_crs
        (feature_body(), {"coord_crs": UTM32, "coverage": "maybe"}, 400, "coverage"),
        (
            feature_body(),
            {"coord_crs": UTM32, "coverage": "true", "max_size": 2000, "cover_scale": 100},
            413,
            "cover_scale",
        ),
    ],
)
def test_bad_feature_requests_name_the_fix(
    http: httpx.Client, body: dict, params: dict, status: int, needle: str
) -> None:
    assert_clear_error(http.post("/statistics", params=params, json=body), status, needle)


def rio_mosaic(catalog: Path, bbox: tuple, crs: str, width: int, height: int, asset: str):
    """rio-tiler's mosaic of the same items (the catalog's search, mosaic order) over bbox."""
    import shapely
    from rio_tiler.mosaic import mosaic_reader
    from rio_tiler.mosaic.methods import FirstMethod

    from core.plan import Grid

    bounds = Grid.from_bounds(crs, bbox, width, height).lonlat_bounds()
    cat = Catalog(catalog, threads=1)
    try:
        items = cat.search_sync(SearchQuery(bbox=bounds, intersects=shapely.box(*bounds)))
    finally:
        cat.close()

    def read(href: str, bbox: tuple, **kwargs) -> ImageData:
        with Reader(href) as src:
            return src.part(bbox, **kwargs)

    img, _ = mosaic_reader(
        [i.assets[asset] for i in items],
        read,
        bbox,
        dst_crs=CRS.from_string(crs),
        bounds_crs=CRS.from_string(crs),
        width=width,
        height=height,
        resampling_method="nearest",
        pixel_selection=FirstMethod(),
        threads=0,
    )
    return img, len(items)


def test_mosaic_across_utm_zones_equals_rio_tilers_mosaic(
    http: httpx.Client, demo_catalog: Path
) -> None:
    """An area over items of zones 31 and 32 (both warped or copied to UTM 32N at 120 m):
    the statistics of Terrazzo's mosaic equal those of rio-tiler's mosaic_reader (first)."""
    bbox = (255000.0, 4975200.0, 286200.0, 4995600.0)  # 260 x 170 pixels
    params = {
        "bbox": ",".join(map(str, bbox)),
        "bbox_crs": UTM32,
        "resolution": RES,
        "assets": "dem",
        "p": ",".join(map(str, PERCENTILES)),
    }
    r = http.get("/statistics", params=params)
    assert r.status_code == 200, r.text
    img, n_items = rio_mosaic(demo_catalog, bbox, UTM32, 260, 170, "dem")
    assert n_items >= 2 and int(r.headers["X-Terrazzo-Items"]) >= 2
    theirs = img.statistics(percentiles=PERCENTILES)
    assert_same_stats(r.json(), theirs, ["dem"])


def test_lonlat_feature_on_a_utm_grid_equals_rio_tiler(
    http: httpx.Client, hrefs: dict[str, str]
) -> None:
    """A lon/lat polygon (the default coord_crs) read on a UTM 32N grid (dst_crs),
    coverage-weighted: bounds densified and the geometry reprojected as rio-tiler does."""
    polygon = {
        "type": "Polygon",
        "coordinates": [
            [[6.67, 44.92], [6.84, 44.93], [6.80, 45.06], [6.69, 45.03], [6.67, 44.92]]
        ],
    }
    size = {"width": 110, "height": 128}
    params = {"dst_crs": UTM32, **size, "assets": "dem", "coverage": "true"}
    body = {"type": "Feature", "geometry": polygon, "properties": {}}
    r = http.post("/statistics", params=params, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["X-Terrazzo-Items"] == "1"
    ours = r.json()["properties"]["statistics"]
    utm = CRS.from_string(UTM32)
    with Reader(hrefs["dem"]) as src:
        img = src.feature(polygon, dst_crs=utm, **size, resampling_method="nearest")
    theirs = img.statistics(coverage=img.get_coverage_array(polygon))
    assert_same_stats(ours, theirs, ["dem"])


def test_sdk_statistics_sends_the_same_request_as_the_routes(server, http) -> None:
    """client.statistics: a bbox is GET /statistics, a shapely polygon is POST /statistics
    with its GeoJSON; the answers are the routes' own."""
    import shapely
    from terrazzo import Client

    box = [6.40, 44.97, 6.50, 45.03]
    params = {"assets": "dem", "width": 96, "height": 64, "p": "10,90"}
    polygon = shapely.Polygon([(6.40, 44.97), (6.50, 44.97), (6.50, 45.03)])
    with Client(server.url) as client:
        by_box = client.statistics(box, **params)
        by_shape = client.statistics(geometry=polygon, **params)
    assert (
        by_box == http.get("/statistics", params={**params, "bbox": "6.4,44.97,6.5,45.03"}).json()
    )
    feature = {"type": "Feature", "properties": {}, "geometry": polygon.__geo_interface__}
    routed = http.post("/statistics", params=params, json=feature).json()
    assert by_shape["properties"]["statistics"] == routed["properties"]["statistics"]
    assert "percentile_90" in by_box["dem"]
    assert (
        by_shape["properties"]["statistics"]["dem"]["valid_pixels"] < by_box["dem"]["valid_pixels"]
    )


def test_per_chunk_statistics_equal_the_routes_and_the_chunks_pixels(http) -> None:
    """POST /chunks with `statistics`: each frame's header has each time layer's statistics,
    equal to GET /statistics on the same grid and to numpy on the frame's own pixels."""
    from terrazzo.framing import parse_frames

    from tests.conftest import utm_area

    box = utm_area(64, 30, 6.45, 45.0)
    body = {
        "crs": "EPSG:32632",
        "chunks": [{"id": "a", "bbox": box, "width": 64, "height": 64}],
        "assets": ["dem"],
        "statistics": {"percentiles": [10, 90], "histogram_bins": 4},
    }
    chunk = parse_frames(http.post("/chunks", json=body).content)[0]
    assert chunk.status == "ok", chunk.error
    (layer,) = chunk.header["statistics"]
    values = chunk.data[0, 0][chunk.mask[0]].astype("float64")
    assert layer["dem"]["valid_pixels"] == values.size
    assert abs(layer["dem"]["mean"] - values.mean()) <= 1e-6 * abs(values.mean())
    assert "percentile_90" in layer["dem"] and len(layer["dem"]["histogram"][0]) == 4
    routed = http.get(
        "/statistics",
        params={
            "bbox": ",".join(map(str, box)),
            "bbox_crs": "EPSG:32632",
            "width": 64,
            "height": 64,
            "assets": "dem",
            "p": "10,90",
            "histogram_bins": 4,
        },
    ).json()
    assert routed["dem"] == layer["dem"]
    bad = http.post("/chunks", json={**body, "statistics": {"percentile": [5]}})
    assert bad.status_code == 400 and "statistics" in bad.json()["detail"]
