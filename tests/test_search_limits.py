"""Searches that never lose a covering item, TiTiler-pgstac's search limits, and truncation that
is never silent (issue 13's three holes).

The catalogs are made by tools nobody here wrote: COGs by GDAL's COG driver (through rasterio),
items by rio-stac and pystac, the GeoParquet by stac-geoparquet's arrow writer. The pixels are
checked against rio-tiler reading the same COGs. A real `terrazzo serve` answers every request.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pystac
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from rio_stac import create_stac_item
from rio_tiler.io import Reader
from rio_tiler.mosaic import mosaic_reader
from terrazzo.framing import parse_frames

from core.catalog import SearchQuery
from core.cover import Coverage
from core.engine import Engine, ReadParams
from core.plan import tile_grid
from core.settings import Settings
from tests.conftest import Server
from tests.corpus.writers import write_one

TMS = morecantile.tms.get("WebMercatorQuad")
TILE = TMS.tile(10.02, 45.02, 10)  # a z10 tile, ~0.35° wide
NEWER = "2024-06-01T00:00:00Z"


def cog(
    path: Path, west: float, north: float, size: int, res: float, seed: int, collar: bool = False
) -> Path:
    """A one-band uint8 COG in EPSG:4326 (GDAL's COG driver), nodata 0, a noisy ramp; with
    `collar`, its north-west half is nodata."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    data = ((x + 2 * y + seed * 37) % 250 + 1).astype(np.uint8)
    data ^= rng.integers(0, 4, data.shape, dtype=np.uint8)
    data[data == 0] = 1
    if collar:
        rows, cols = np.indices(data.shape)
        data[rows + cols < size] = 0
    profile = {
        "driver": "COG",
        "width": size,
        "height": size,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": from_origin(west, north, res, res),
        "nodata": 0,
        "blocksize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data[None])
    return path


def rio_item(path: Path, item_id: str, when: str) -> dict:
    """rio-stac's item for a COG: footprint = the raster's bounds."""
    item = create_stac_item(
        str(path),
        input_datetime=pystac.utils.str_to_datetime(when),
        id=item_id,
        collection="c",
        asset_name="data",
        asset_roles=["data"],
        with_proj=True,
    )
    return item.to_dict()


def pystac_item(item_id: str, when: str, geometry: dict, href: Path) -> dict:
    """A hand-made pystac item with an exact (non-rectangular) footprint."""
    shape = np.asarray(geometry["coordinates"][0])
    bbox = [*shape.min(axis=0).tolist(), *shape.max(axis=0).tolist()]
    item = pystac.Item(
        item_id,
        geometry,
        bbox,
        pystac.utils.str_to_datetime(when),
        {},
        collection="c",
    )
    item.add_asset("data", pystac.Asset(str(href), media_type=pystac.MediaType.COG))
    return item.to_dict()


def catalog(items: list[dict], out: Path) -> Path:
    return write_one("arrow", items, out)


def tile_array(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    arr = np.load(io.BytesIO(response.content))
    return arr[:-1], arr[-1] > 0


def tile_url(tile: morecantile.Tile = TILE, fmt: str = "npy") -> str:
    return f"/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}.{fmt}"


@pytest.fixture(scope="module")
def serve() -> Iterator:
    """Start `terrazzo serve` on a catalog (settings as TERRAZZO_* variables), once per module."""
    servers: dict[tuple, tuple[Server, httpx.Client]] = {}

    def start(cat: Path, **env: str) -> httpx.Client:
        key = (cat, tuple(sorted(env.items())))
        if key not in servers:
            server = Server(cat, env={f"TERRAZZO_{k.upper()}": v for k, v in env.items()})
            servers[key] = (server, httpx.Client(base_url=server.url, timeout=60))
        return servers[key][1]

    yield start
    for server, client in servers.values():
        client.close()
        server.stop()


async def engine_tile(cat: Path, query: SearchQuery, params: ReadParams, **settings):
    """The tile read in-process, for settings a test varies (the server's caps)."""
    engine = Engine(Settings(catalog=cat, compute_workers=1, **settings))
    try:
        return await engine.read(
            tile_grid("WebMercatorQuad", TILE.z, TILE.x, TILE.y), query, params
        )
    finally:
        engine.close()


# -- hole 1: bbox candidates whose footprint misses the tile hid the item that covers it -------


@pytest.fixture(scope="module")
def decoys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 newer items whose bbox covers TILE but whose L-shaped footprint (an orbit edge, a
    half-empty scene) does not, and one older item that truly covers it."""
    root = tmp_path_factory.mktemp("decoys")
    west, south, east, north = TMS.bounds(TILE)
    cover = cog(root / "cover.tif", west - 0.2, north + 0.2, 512, 0.0015, seed=1)
    strip = cog(root / "strip.tif", west - 0.3, south - 0.05, 64, 0.001, seed=2)
    items = [rio_item(cover, "old-cover", "2020-01-01T00:00:00Z")]
    x0, y0, x1, y1, e = west - 0.05, south - 0.05, east + 0.05, north + 0.05, 0.01
    ell = [[x0, y0], [x1, y0], [x1, y0 + e], [x0 + e, y0 + e], [x0 + e, y1], [x0, y1], [x0, y0]]
    for n in range(300):
        geometry = {"type": "Polygon", "coordinates": [ell]}
        items.append(
            pystac_item(
                f"edge-{n:03d}", f"2024-01-01T{n // 60:02d}:{n % 60:02d}:00Z", geometry, strip
            )
        )
    return catalog(items, root / "decoys.parquet")


def test_an_older_item_under_300_footprint_misses_is_found(decoys: Path, serve) -> None:
    http = serve(decoys)
    r = http.get(tile_url())
    data, valid = tile_array(r)
    assert r.headers["X-Terrazzo-Items"] == "1"
    assert "X-Terrazzo-Truncated" not in r.headers
    assert r.headers["Cache-Control"].startswith("public")
    cover = decoys.parent / "cover.tif"
    with Reader(cover) as src:
        ref = src.tile(TILE.x, TILE.y, TILE.z)
    assert valid.all() and (ref.mask > 0).all()
    assert (data[0] == ref.data[0]).mean() > 0.99
    plan = http.get(f"/plan/WebMercatorQuad/{TILE.z}/{TILE.x}/{TILE.y}").json()
    assert [i["id"] for i in plan["items"]] == ["old-cover"]
    assert plan["search"]["scanned"] == 301 and not plan["truncated"]


def test_scan_limit_truncates_and_says_so(decoys: Path, serve) -> None:
    http = serve(decoys)
    r = http.get(tile_url(), params={"scan_limit": 100})
    assert r.status_code == 204  # nothing among the 100 newest candidates
    assert "scan_limit" in r.headers["X-Terrazzo-Truncated"]
    assert r.headers["Cache-Control"] == "no-store"


async def test_the_servers_caps_win_over_larger_limits(decoys: Path, stack: Path) -> None:
    mosaic = await engine_tile(decoys, SearchQuery(scan_limit=100_000), ReadParams(), max_scan=50)
    assert mosaic is not None and not mosaic.valid.any()
    assert "50 candidates" in mosaic.plan.truncated_why
    mean = ReadParams(method="mean")
    mosaic = await engine_tile(stack, SearchQuery(limit=1000), mean, max_items=120)
    assert mosaic is not None and len(mosaic.plan.items) == 120
    assert "more than 120 items" in mosaic.plan.truncated_why


# -- hole 2: TERRAZZO_MAX_ITEMS above 100 had no effect -----------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """150 acquisitions of one scene that covers TILE (one COG shared by every item)."""
    root = tmp_path_factory.mktemp("stack")
    west, _, _, north = TMS.bounds(TILE)
    scene = cog(root / "scene.tif", west - 0.2, north + 0.2, 512, 0.0015, seed=3)
    first = rio_item(scene, "t000", "2024-01-01T00:00:00Z")
    items = []
    for n in range(150):
        item = dict(first, id=f"t{n:03d}")
        item["properties"] = dict(
            first["properties"], datetime=f"2024-01-01T00:{n // 60:02d}:{n % 60:02d}Z"
        )
        items.append(item)
    return catalog(items, root / "stack.parquet")


def test_max_items_above_100_takes_effect(stack: Path, serve) -> None:
    http = serve(stack, max_items="200")
    every = {"skipcovered": "false", "exitwhenfull": "false"}
    listed = http.get(f"/tiles/{TILE.z}/{TILE.x}/{TILE.y}/assets", params=every).json()
    assert len(listed) == 150
    r = http.get(tile_url(), params={"method": "mean"})  # mean: every item counts
    tile_array(r)
    assert r.headers["X-Terrazzo-Items"] == "150"
    assert "X-Terrazzo-Truncated" not in r.headers
    # a request's items_limit below the server's: truncated, and said
    r = http.get(tile_url(), params={"method": "mean", "items_limit": 120})
    tile_array(r)
    assert r.headers["X-Terrazzo-Items"] == "120"
    assert "items_limit" in r.headers["X-Terrazzo-Truncated"]
    assert r.headers["Cache-Control"] == "no-store"


def test_first_skips_covered_items_and_stops_when_full(stack: Path, serve) -> None:
    http = serve(stack, max_items="200")
    r = http.get(tile_url(), params={"items_limit": 20})  # far fewer than the 150 here
    data, valid = tile_array(r)
    assert r.headers["X-Terrazzo-Items"] == "1", "the newest covers the tile"
    assert "X-Terrazzo-Truncated" not in r.headers, "nothing was lost: all are covered"
    plan = http.get(f"/plan/WebMercatorQuad/{TILE.z}/{TILE.x}/{TILE.y}").json()
    assert plan["search"]["full"] and plan["search"]["scanned"] == 1
    with Reader(stack.parent / "scene.tif") as src:
        ref = src.tile(TILE.x, TILE.y, TILE.z)
    assert valid.all() and (data[0] == ref.data[0]).mean() > 0.99


def test_bad_search_limits_are_clear_400s(stack: Path, serve) -> None:
    http = serve(stack, max_items="200")
    for params, needle in (
        ({"items_limit": "0"}, "items_limit"),
        ({"items_limit": "many"}, "items_limit"),
        ({"scan_limit": "-1"}, "scan_limit"),
        ({"time_limit": "0"}, "time_limit"),
        ({"skipcovered": "maybe"}, "skipcovered"),
        ({"exitwhenfull": "2"}, "exitwhenfull"),
    ):
        r = http.get(tile_url(), params=params)
        assert r.status_code == 400, (params, r.text)
        assert needle in r.json()["detail"]


# -- hole 3: past max_items the tile lost the older items: holes ---------------------------------


@pytest.fixture(scope="module")
def grid_of_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16x16 grid of small scenes under TILE, each its own COG, newest in the north-west."""
    root = tmp_path_factory.mktemp("grid")
    west, south, east, north = TMS.bounds(TILE)
    n = 16
    step_x, step_y = (east - west) / n, (north - south) / n
    items = []
    for row in range(n):
        for col in range(n):
            k = row * n + col
            # a pixel of overlap between neighbours, so that the mosaic has no seams
            res = step_x / 15
            path = cog(
                root / f"s{k:03d}.tif",
                west + col * step_x - res / 2,
                north - row * step_y + res / 2,
                17,
                res,
                seed=k,
            )
            when = f"2024-01-{1 + k // 24:02d}T{k % 24:02d}:00:00Z"
            items.append(rio_item(path, f"s{k:03d}", when))
    return catalog(items, root / "grid.parquet")


def _reference(cat_dir: Path, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """rio-tiler's mosaic_reader over `items` (mosaic order), method first."""

    def read(path: str, x: int, y: int, z: int):
        with Reader(path) as src:
            return src.tile(x, y, z)

    img, _ = mosaic_reader([str(cat_dir / f"{i}.tif") for i in items], read, TILE.x, TILE.y, TILE.z)
    return img.data, ~np.ma.getmaskarray(img.array)[0]


def test_a_tile_over_256_scenes_is_complete(grid_of_scenes: Path, serve) -> None:
    http = serve(grid_of_scenes)
    r = http.get(tile_url())
    data, valid = tile_array(r)
    assert "X-Terrazzo-Truncated" not in r.headers
    listed = [i["id"] for i in http.get(f"/tiles/{TILE.z}/{TILE.x}/{TILE.y}/assets").json()]
    ref, ref_valid = _reference(grid_of_scenes.parent, listed)
    assert len(listed) > 200
    assert (valid == ref_valid).mean() > 0.99 and valid.mean() > 0.99
    both = valid & ref_valid
    assert (data[0][both] == ref[0][both]).mean() > 0.99


def test_past_the_item_limit_the_tile_is_marked_incomplete(grid_of_scenes: Path, serve) -> None:
    http = serve(grid_of_scenes)
    r = http.get(tile_url(), params={"items_limit": 100})
    _, valid = tile_array(r)
    assert r.headers["X-Terrazzo-Items"] == "100"
    assert "items_limit" in r.headers["X-Terrazzo-Truncated"]
    assert r.headers["Cache-Control"] == "no-store"
    assert not valid.all(), "the older scenes are missing: the header says so"


# -- footprints drawn around nodata: the shortcuts must not leave a hole ----------------------


@pytest.fixture(scope="module")
def collar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A newer scene whose footprint (rio-stac: the raster's bounds) covers TILE but whose
    north-west half is nodata (a collar), over an older scene with data everywhere."""
    root = tmp_path_factory.mktemp("collar")
    west, _, _, north = TMS.bounds(TILE)
    old = cog(root / "old.tif", west - 0.2, north + 0.2, 512, 0.0015, seed=5)
    new = cog(root / "new.tif", west - 0.2, north + 0.2, 512, 0.0015, seed=6, collar=True)
    items = [rio_item(new, "new", NEWER), rio_item(old, "old", "2020-01-01T00:00:00Z")]
    return catalog(items, root / "collar.parquet")


def test_a_nodata_collar_inside_a_footprint_is_filled_from_older_items(collar: Path, serve) -> None:
    http = serve(collar)
    r = http.get(tile_url())
    data, valid = tile_array(r)
    ref, ref_valid = _reference(collar.parent, ["new", "old"])
    assert valid.all() and ref_valid.all()
    assert (data[0] == ref[0]).mean() > 0.99
    assert r.headers["X-Terrazzo-Items"] == "2"
    assert "X-Terrazzo-Truncated" not in r.headers


def test_a_chunk_says_when_a_search_limit_left_items_out(decoys: Path, serve) -> None:
    http = serve(decoys)
    west, south, east, north = TMS.bounds(TILE)
    body = {
        "crs": "EPSG:4326",
        "chunks": [{"id": "a", "bbox": [west, south, east, north], "width": 64, "height": 64}],
    }
    for extra, status, truncated in (({}, "ok", None), ({"scan_limit": 100}, "empty", "scan")):
        r = http.post("/chunks", json={**body, **extra})
        assert r.status_code == 200, r.text
        chunk = parse_frames(r.content)[0]
        assert chunk.status == status, chunk.header
        if truncated is None:
            assert chunk.truncated is None and chunk.mask.all()
        else:
            assert "scan_limit" in chunk.truncated
    r = http.post("/chunks", json={**body, "items_limit": 0})
    assert r.status_code in (400, 422) and "items_limit" in r.text


def test_coverage_samples_rotated_footprints() -> None:
    """skipcovered's decision on non-rectangular footprints (rotated scenes): a diamond inside
    the newer footprints adds nothing; one poking out adds; abutting halves fill the area."""
    area = shapely.box(0, 0, 1, 1)
    cover = Coverage(area)
    assert cover.adds(cover.points(shapely.box(-1, -1, 0.5, 2)))
    cover.add(cover.points(shapely.box(-1, -1, 0.5, 2)))  # the west half
    assert not cover.full
    inside = shapely.Polygon([(0.25, 0.1), (0.45, 0.5), (0.25, 0.9), (0.05, 0.5)])
    poking = shapely.Polygon([(0.4, 0.1), (0.7, 0.5), (0.4, 0.9), (0.1, 0.5)])
    assert not cover.adds(cover.points(inside))
    assert cover.adds(cover.points(poking))
    cover.add(cover.points(shapely.box(0.5, -1, 2, 2)))  # the east half, abutting
    assert cover.full
    tiny = shapely.box(0.306, 0.306, 0.318, 0.318)  # between samples: never skipped
    assert cover.points(tiny) is None and cover.adds(None)


async def test_items_that_share_a_cog_are_read_once_where_repeats_cannot_matter(
    stack: Path,
) -> None:
    """150 items, one COG: `first` and `highest` read it once, `mean` reads every item (each
    counts); the pixels are the same either way."""
    engine = Engine(Settings(catalog=stack, compute_workers=1))
    grid = tile_grid("WebMercatorQuad", TILE.z, TILE.x, TILE.y)
    every = SearchQuery(skipcovered=False, exitwhenfull=False)
    try:
        results = {}
        for method in ("first", "highest", "mean"):
            before = engine.fetcher.stats["reads"]
            mosaic = await engine.read(grid, every, ReadParams(method=method))
            assert mosaic is not None and len(mosaic.plan.items) == 150
            results[method] = (mosaic, engine.fetcher.stats["reads"] - before)
    finally:
        engine.close()
    assert results["first"][1] == results["highest"][1] == 1
    assert results["mean"][1] == 150
    first = results["first"][0]
    for method in ("highest", "mean"):
        other = results[method][0]
        assert (other.valid == first.valid).all()
        assert (np.rint(other.data) == first.data).all()
