"""The overview pyramid (issue 13): `terrazzo overviews` builds it through the engine's read
path, the engine serves low-zoom tiles from it, a rebuild re-renders only what changed, and a
dask build equals a local one. Real COGs, real catalogs, a real server; no mocks."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from affine import Affine

from app.cli import main as cli
from core.catalog import SearchQuery
from core.cogs import stac_item, write_cog
from core.engine import Engine, Mosaic, ReadParams
from core.indexing import index_items
from core.overviews import Recipe, build, build_settings
from core.plan import Grid, tile_grid
from core.pyramid import Pyramid
from tests.conftest import Server

TMS = morecantile.tms.get("WebMercatorQuad")
DEMO_ZOOM = 7


@pytest.fixture(scope="module")
def demo_pyramid(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pyramid")
    args = ["overviews", str(demo_catalog), "--out", str(out), "--max-zoom", str(DEMO_ZOOM)]
    assert cli(args) == 0
    return out


def _tiles(bbox: list[float], zooms: range) -> list[morecantile.Tile]:
    return [t for z in zooms for t in TMS.tiles(*bbox, zooms=[z])]


async def test_pyramid_tiles_equal_dynamic_reads(demo_catalog: Path, demo_pyramid: Path) -> None:
    """Every tile of zooms 0..Z: the pyramid's pixels are those of a dynamic read with no
    item limit (method first, nearest)."""
    recipe = json.loads((demo_pyramid / "pyramid.json").read_text())
    assert recipe["max_zoom"] == DEMO_ZOOM and recipe["assets"] == ["visual"]
    assert recipe["catalog"] == str(demo_catalog.resolve())
    assert any(b["status"] == "written" for b in recipe["blocks"].values())
    everything = Recipe(catalog=str(demo_catalog), assets=("visual",)).query()
    engine = Engine(build_settings(demo_catalog, pyramid=demo_pyramid))
    compared = 0
    try:
        bbox = engine.catalog.summary()["bbox"]
        for t in _tiles(bbox, range(DEMO_ZOOM + 1)):
            grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y)
            assert (await engine.plan_read(grid, SearchQuery(), ReadParams())).source == "pyramid"
            served = await engine.read(grid, SearchQuery(), ReadParams())
            dynamic = await engine.execute(
                await engine.plan(grid, everything, ReadParams()), ReadParams()
            )
            assert (served is None) == (dynamic is None), t
            if served is None or dynamic is None:
                continue
            assert served.plan.source == "pyramid" and dynamic.plan.source == "dynamic"
            assert (served.valid == dynamic.valid).mean() >= 0.99, t
            both = served.valid & dynamic.valid
            same = (served.data[:, both] == dynamic.data[:, both]).all(axis=0)
            assert same.mean() >= 0.99, t
            compared += 1
    finally:
        engine.close()
    assert compared >= 10  # tiles with data at zooms 2..7


def test_server_says_where_pixels_come_from(demo_catalog: Path, demo_pyramid: Path) -> None:
    server = Server(demo_catalog, args=("--pyramid", str(demo_pyramid)))
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            lon, lat = 9.6, 45.05  # inside the demo strip

            def tile(z: int) -> str:
                t = TMS.tile(lon, lat, z)
                return f"{z}/{t.x}/{t.y}"

            low = http.get(f"/tiles/{tile(6)}")
            assert low.status_code == 200 and low.headers["X-Terrazzo-Source"] == "pyramid"
            plan = http.get(f"/plan/WebMercatorQuad/{tile(6)}").json()
            assert plan["source"] == "pyramid" and plan["items"][0]["id"].startswith("pyramid-")
            # applied after the read: still the pyramid
            stretched = http.get(f"/tiles/{tile(6)}", params={"bidx": "1", "rescale": "0,200"})
            assert stretched.headers["X-Terrazzo-Source"] == "pyramid"
            # another search or method, or above the max zoom: dynamic
            for params in ({"method": "last"}, {"datetime": "2024-06-01"}, {"filter": "id = 'x'"}):
                other = http.get(f"/plan/WebMercatorQuad/{tile(6)}", params=params).json()
                assert other["source"] == "dynamic", params
            other = http.get(f"/tiles/{tile(6)}", params={"method": "last"})
            assert other.headers["X-Terrazzo-Source"] == "dynamic"
            high = http.get(f"/tiles/{tile(DEMO_ZOOM + 2)}")
            assert high.status_code == 200 and high.headers["X-Terrazzo-Source"] == "dynamic"
    finally:
        server.stop()


# -- a tiny catalog of our own: incremental rebuilds and dask -----------------------------------


def _scene(root: Path, name: str, lon: float, lat: float, value: int) -> dict:
    """A 64x64 EPSG:4326 COG of ~0.5 degrees at (lon, lat), nodata 0 on one corner."""
    data = np.full((1, 64, 64), value, dtype=np.uint8)
    data[0, :8, :8] = 0
    path = write_cog(
        root / "cogs" / f"{name}.tif",
        data,
        crs="EPSG:4326",
        transform=Affine(0.5 / 64, 0, lon, 0, -0.5 / 64, lat),
        nodata=0,
    )
    return stac_item(
        name, {"data": path}, datetime="2024-01-01T00:00:00Z", collection="t", href_base=root
    )


def _catalog(root: Path, items: list[dict]) -> Path:
    ndjson = root / "items.ndjson"
    ndjson.write_text("".join(json.dumps(i) + "\n" for i in items))
    index_items(ndjson, root / "items.parquet")
    return root / "items.parquet"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("tiny")
    items = [_scene(root, f"s{i}", 10 + i * 0.7, 50.0, 40 + i) for i in range(3)]
    return root, items


async def _read(catalog: Path, pyramid: Path, grid: Grid) -> Mosaic | None:
    engine = Engine(build_settings(catalog, pyramid=pyramid))
    try:
        return await engine.read(grid, SearchQuery(), ReadParams())
    finally:
        engine.close()


def _mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / "blocks").rglob("*.tif")}


def test_rebuild_renders_only_changed_blocks(tiny: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, items = tiny
    catalog = _catalog(root, items)
    out = tmp_path / "pyr"
    first = build(catalog, out, max_zoom=6)
    assert first.rendered and not first.removed
    before = _mtimes(out)
    again = build(catalog, out, max_zoom=6)
    assert again.rendered == [] and _mtimes(out) == before  # nothing changed: nothing done

    added = _scene(root, "far", -70.0, -30.0, 99)  # another block from zoom 5 on
    catalog = _catalog(root, [*items, added])
    t = TMS.tile(10.25, 49.75, 6)
    stale = asyncio.run(_read(catalog, out, tile_grid("WebMercatorQuad", 6, t.x, t.y)))
    assert stale is not None and stale.plan.source == "dynamic"  # built from another catalog
    report = build(catalog, out, max_zoom=6)
    touched = {f"{z}/0/0" for z in range(5)}  # zooms 0..4: one world block each
    for z in (5, 6):
        t = TMS.tile(-69.75, -30.25, z - 4)
        touched.add(f"{z}/{t.x}/{t.y}")
    assert set(report.rendered) == touched, report.lines()
    after = _mtimes(out)
    unchanged = [k for k in before if int(k.split("/")[1]) >= 5]  # blocks/z/...
    assert unchanged and all(after[k] == before[k] for k in unchanged)

    t = TMS.tile(-69.75, -30.25, 6)
    mosaic = asyncio.run(_read(catalog, out, tile_grid("WebMercatorQuad", 6, t.x, t.y)))
    assert mosaic is not None and mosaic.plan.source == "pyramid"
    assert set(np.unique(mosaic.data[:, mosaic.valid])) == {99}

    catalog = _catalog(root, items)  # removed again: its own blocks go
    report = build(catalog, out, max_zoom=6)
    gone = {k for k in touched if int(k.split("/")[0]) >= 5}
    world = {f"{z}/0/0" for z in range(5)}  # at z0 the scenes are sub-pixel: only 'far' drew
    assert gone <= set(report.removed) <= gone | world
    assert set(report.rendered) | set(report.empty) == world
    assert not any("far" in json.dumps(b) for b in Pyramid.open(out).recipe["blocks"].values())
    for key in gone:
        z, bx, by = key.split("/")
        assert not (out / "blocks" / z / f"{bx}_{by}_data.tif").exists()


def test_dask_build_equals_local_build(tiny: tuple[Path, list[dict]], tmp_path: Path) -> None:
    pytest.importorskip("distributed")
    root, items = tiny
    catalog = _catalog(root, items)
    local = build(catalog, tmp_path / "local", max_zoom=5)
    dask = build(
        catalog, tmp_path / "dask", max_zoom=5, dask="local", settings={"compute_workers": 1}
    )
    assert dask.rendered == local.rendered and local.rendered
    a = json.loads((tmp_path / "local" / "pyramid.json").read_text())["blocks"]
    b = json.loads((tmp_path / "dask" / "pyramid.json").read_text())["blocks"]
    assert a == b
    for entry in a.values():
        for rel in entry["files"].values():
            with (
                rasterio.open(tmp_path / "local" / rel) as x,
                rasterio.open(tmp_path / "dask" / rel) as y,
            ):
                assert x.profile == y.profile
                assert np.array_equal(x.read(), y.read())
                assert np.array_equal(x.dataset_mask(), y.dataset_mask())
    assert os.listdir(tmp_path / "dask")
