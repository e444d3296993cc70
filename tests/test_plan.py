"""The planner: overview choice, clipped windows, internal tiles, grids of any TMS."""

from __future__ import annotations

import pytest
from affine import Affine

from core.plan import Grid, Header, Level, TileError, choose_level, plan_asset, tile_grid


def header(width: int = 2048, res: float = 10.0, levels: int = 3) -> Header:
    out = []
    for i in range(levels):
        f = 2**i
        out.append(
            Level(
                Affine(res * f, 0, 500000, 0, -res * f, 5000000), width // f, width // f, 256, 256
            )
        )
    return Header(
        href="/x.tif",
        crs="EPSG:32632",
        count=3,
        dtype="uint8",
        nodata=0,
        has_mask=False,
        levels=tuple(out),
    )


def test_choose_level_coarsest_not_coarser_than_target() -> None:
    levels = header().levels  # 10, 20, 40 m
    assert choose_level(levels, 5) == 0
    assert choose_level(levels, 10) == 0
    assert choose_level(levels, 19.9) == 0
    assert choose_level(levels, 20) == 1
    assert choose_level(levels, 39) == 1
    assert choose_level(levels, 1000) == 2


def test_window_is_clipped_and_tiles_listed() -> None:
    h = header()
    # a grid straddling the image's top-left corner, at 20 m
    grid = Grid.from_bounds("EPSG:32632", (499000, 4999000, 501000, 5001000), 100, 100)
    read = plan_asset("visual", h, grid, "nearest")
    assert read is not None
    assert read.level == 1
    col, row, width, height = read.window
    assert (col, row) == (0, 0)  # clipped at the image edge: no boundless reads
    assert 50 <= width <= 52 and 50 <= height <= 52
    assert read.tiles == ((0, 0),)
    assert read.transform.c == 500000 and read.transform.f == 5000000


def test_grid_outside_image_plans_nothing() -> None:
    grid = Grid.from_bounds("EPSG:32632", (400000, 4000000, 401000, 4001000), 64, 64)
    assert plan_asset("visual", header(), grid, "nearest") is None


def test_window_spanning_tiles() -> None:
    grid = Grid.from_bounds("EPSG:32632", (502000, 4995000, 507000, 4998000), 500, 300)
    read = plan_asset("visual", header(), grid, "bilinear")
    assert read is not None and read.level == 0
    col, row, _, _ = read.window
    assert col == 198 and row == 198  # 2 px bilinear margin
    xs = {x for x, _ in read.tiles}
    ys = {y for _, y in read.tiles}
    assert xs == {0, 1, 2} and ys == {0, 1}


def test_tile_grid_webmercator_and_geographic() -> None:
    g = tile_grid("WebMercatorQuad", 1, 0, 0, 256)
    assert g.crs == "EPSG:3857" and g.width == 256
    assert g.bounds[0] == pytest.approx(-20037508.34, rel=1e-6)
    geo = tile_grid("WGS1984Quad", 1, 3, 0, 512)
    assert geo.crs == "EPSG:4326" and geo.bounds == pytest.approx((90, 0, 180, 90))


@pytest.mark.parametrize(
    ("tms", "z", "x", "y", "needle"),
    [
        ("WebMercatorQuad", 2, 4, 0, "x must be in 0..3"),
        ("Nope", 0, 0, 0, "unknown"),
        ("WebMercatorQuad", 99, 0, 0, "zoom range"),
    ],
)
def test_tile_errors_say_what_is_wrong(tms: str, z: int, x: int, y: int, needle: str) -> None:
    with pytest.raises(TileError, match=needle):
        tile_grid(tms, z, x, y)
