"""Read grids the odc-stac way: exact resolution on a grid aligned to it, areas in any CRS,
unit mistakes refused before any request. Checked against odc-geo's own GeoBox."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from odc.geo.geobox import GeoBox
from pyproj import Transformer
from terrazzo import Client
from terrazzo.grid import Grid, utm_zone

from tests.conftest import Server, utm_area

BOXES = [
    (500_000.0, 5_000_000.0, 501_000.0, 5_001_000.0),  # 1000 m: 30 m does not divide it
    (291_337.2, 4_978_401.9, 306_690.4, 4_993_779.5),  # nothing aligned
    (300_000.0, 4_980_000.0, 300_015.0, 4_980_015.0),  # one 15 m pixel
]


@pytest.mark.parametrize("bbox", BOXES)
@pytest.mark.parametrize("resolution", [10, 15, 30, 60.5])
@pytest.mark.parametrize("anchor", ["edge", "center", "floating"])
def test_the_grid_is_odc_geos_geobox(bbox: tuple, resolution: float, anchor: str) -> None:
    grid = Grid.make(bbox, crs="EPSG:32632", resolution=resolution, anchor=anchor)
    box = GeoBox.from_bbox(bbox, "EPSG:32632", resolution=resolution, anchor=anchor)
    assert (grid.height, grid.width) == box.shape
    np.testing.assert_allclose(grid.transform, tuple(box.transform)[:6], rtol=0, atol=1e-6)
    assert grid.res == (resolution, resolution)  # exactly: never stretched to the bbox


def test_resolution_30_over_1000_m_is_30_m_on_multiples_of_30() -> None:
    grid = Grid.make(BOXES[0], crs="EPSG:32632", resolution=30)
    assert grid.res == (30.0, 30.0)
    assert grid.minx % 30 == 0 and grid.maxy % 30 == 0
    assert grid.minx <= BOXES[0][0] and grid.maxx >= BOXES[0][2]  # snapped outwards


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"bbox": (6.0, 45.0, 6.5, 45.3), "resolution": 30}, "bbox_crs='EPSG:4326'"),
        ({"bbox": BOXES[0], "resolution": 0}, "positive"),
        ({"bbox": BOXES[0], "resolution": -30}, "positive"),
        ({"bbox": BOXES[0], "resolution": "30"}, "pixel size"),
        ({"bbox": BOXES[0], "resolution": (30, 30, 30)}, "pixel size"),
        ({"bbox": (1, 2, 0, 3), "resolution": 30}, "minx < maxx"),
        ({"bbox": BOXES[0]}, "exactly one of resolution"),
        ({"bbox": BOXES[0], "shape": (0, 5)}, "at least one pixel"),
        ({"bbox": BOXES[0], "resolution": 30, "anchor": "middle"}, "anchor"),
    ],
)
def test_unit_mistakes_are_refused_naming_the_fix(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Grid.make(crs="EPSG:32632", **kwargs)


def test_metres_with_a_geographic_crs_are_refused() -> None:
    with pytest.raises(ValueError, match="metres"):
        Grid.make(BOXES[0], crs="EPSG:4326", resolution=0.001)


def test_resolution_pairs_and_a_negative_y_are_odc_stacs_spellings() -> None:
    a = Grid.make(BOXES[0], crs="EPSG:32632", resolution=[30, 30])
    b = Grid.make(BOXES[0], crs="EPSG:32632", resolution=(30, -30))
    c = Grid.make(BOXES[0], crs="EPSG:32632", resolution=30)
    assert a == b == c
    assert Grid.make(BOXES[0], crs="EPSG:32632", resolution=(10, 20)).res == (10.0, 20.0)


def test_lonlat_areas_utm_and_geopolygon() -> None:
    lonlat = (9.0, 45.0, 9.2, 45.1)
    grid = Grid.make(lonlat, bbox_crs="EPSG:4326", crs="utm", resolution=30)
    assert grid.crs == "EPSG:32632" == utm_zone(9.1, 45.05)
    assert utm_zone(-70.5, -33.4) == "EPSG:32719"
    to_utm = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True)
    west, south = to_utm.transform(9.0, 45.0)
    assert grid.minx <= west and grid.miny <= south and grid.res == (30.0, 30.0)
    polygon = Grid.make(geopolygon=shapely.box(*lonlat), crs="EPSG:32632", resolution=30)
    geojson = Grid.make(
        geopolygon={"type": "Feature", "geometry": shapely.geometry.mapping(shapely.box(*lonlat))},
        crs="EPSG:32632",
        resolution=30,
    )
    assert (
        polygon
        == geojson
        == Grid.make(lonlat, bbox_crs="EPSG:4326", crs="EPSG:32632", resolution=30)
    )


def test_a_read_has_the_exact_grid_and_like_repeats_it(server: Server) -> None:
    """resolution=15 over the demo: 15.0 m pixels exactly (was 14.999837 x 14.997928 m), the
    x/y coordinates on pixel centres of multiples of 15; like= reads the same grid again."""
    bbox = [b + 3.3 for b in utm_area(300, 15, lon=7.2)]  # not aligned to 15
    read = {"assets": ["visual"], "progress": False}
    with Client(server.url) as client:
        da = client.read(bbox, crs="EPSG:32632", resolution=15, **read)
        again = client.read(like=da, **read)
        lonlat = client.read(
            Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform_bounds(*bbox),
            bbox_crs="EPSG:4326",
            crs="EPSG:32632",
            resolution=15,
            **read,
        )
    assert set(np.diff(da.x.values)) == {15.0} and set(np.diff(da.y.values)) == {-15.0}
    assert (da.x.values[0] - 7.5) % 15 == 0 and (da.y.values[0] - 7.5) % 15 == 0
    assert da.spatial_ref.attrs["GeoTransform"].split()[1] == "15.0"
    np.testing.assert_array_equal(again.x, da.x)
    np.testing.assert_array_equal(again.y, da.y)
    np.testing.assert_array_equal(again.values, da.values)
    assert lonlat.x.values[0] <= da.x.values[0] and lonlat.x.values[-1] >= da.x.values[-1]
