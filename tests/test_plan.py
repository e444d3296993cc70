"""The planner: overview choice, clipped windows, internal tiles, grids of any TMS."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import Resampling

from core.cogs import write_cog
from core.plan import Grid, Header, Level, TileError, plan_asset, tile_grid


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


def gdal_read_level(path: Path, out: int, resampling: str) -> int:
    """The level GDAL's RasterIO reads for the whole image at `out` x `out` (same CRS: no
    warping, GDALBandGetBestOverviewLevel2), found as the level whose own read at that shape
    gives the same pixels."""
    with rasterio.open(path) as src:
        want = src.read(1, out_shape=(out, out), resampling=Resampling[resampling])
        count = len(src.overviews(1))
    for k in range(count + 1):  # each level alone: no overviews of its own to fall back on
        with rasterio.open(path, OVERVIEW_LEVEL=f"{k - 1} only" if k else "NONE") as level:
            got = level.read(1, out_shape=(out, out), resampling=Resampling[resampling])
        if np.array_equal(got, want):
            return k
    raise AssertionError("no level reproduces GDAL's read")


@pytest.mark.parametrize(
    ("resampling", "threshold"),
    [("nearest", None), ("bilinear", None), ("cubic", None), ("average", None), ("nearest", "1.5")],
)
def test_level_in_the_images_own_crs_is_gdals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resampling: str, threshold: str | None
) -> None:
    """Swept across every switch point; GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD set for both."""
    if threshold:
        monkeypatch.setenv("GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD", threshold)
    data = np.random.default_rng(0).integers(0, 60000, (1, 1024, 1024)).astype("uint16")
    transform = Affine(10, 0, 500000, 0, -10, 5000000)
    path = write_cog(tmp_path / "a.tif", data, crs="EPSG:32632", transform=transform, blocksize=128)
    with rasterio.open(path) as src:
        levels = [src.width] + [src.width // f for f in src.overviews(1)]
    h = header(width=1024, levels=len(levels))
    ours, gdals = [], []
    for out in range(1000, 60, -11):  # reductions from 1.02 to 16, across every switch
        grid = Grid(h.crs, Affine(10 * 1024 / out, 0, 500000, 0, -10 * 1024 / out, 5e6), out, out)
        read = plan_asset("a", h, grid, resampling)
        assert read is not None
        ours.append(read.level)
        gdals.append(gdal_read_level(path, out, resampling))
    assert ours == gdals
    assert len(set(gdals)) == len(levels)


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


def test_web_mercator_lonlat_bounds_are_projs() -> None:
    """The closed form for EPSG:3857 grids gives PROJ's densified transform_bounds (to 1e-9
    degree) from z0 (the whole world) to z22, so every tile's search asks the same bbox."""
    import random

    import morecantile

    from core.plan import Grid, mercator_lonlat, reproject_bounds

    tms = morecantile.tms.get("WebMercatorQuad")
    rng = random.Random(3)
    for _ in range(2000):
        z = rng.randint(0, 22)
        x, y = rng.randrange(2**z), rng.randrange(2**z)
        bounds = tuple(tms.xy_bounds(x, y, z))
        ours = mercator_lonlat(bounds)
        proj = reproject_bounds(bounds, "EPSG:3857", "EPSG:4326")
        assert max(abs(a - b) for a, b in zip(ours, proj, strict=True)) < 1e-9, (z, x, y)
    grid = Grid.from_bounds("EPSG:3857", tuple(tms.xy_bounds(0, 0, 0)), 256, 256)
    assert grid.lonlat_bounds() == mercator_lonlat(grid.bounds)
    assert abs(grid.lonlat_bounds()[3] - 85.0511287798) < 1e-9
