"""The engine on catalogs built for one behaviour each: dtypes, masks, early exit, failures."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import morecantile
import numpy as np
import pytest
from affine import Affine
from obstore.store import LocalStore
from rio_tiler.io import Reader

from core.catalog import SearchQuery
from core.cogs import stac_item, write_cog
from core.engine import Engine, ParamError, ReadFailed, ReadParams
from core.faults import FaultyStore
from core.fetch import Fetcher
from core.indexing import index_items
from core.plan import tile_grid, transformer
from core.settings import Settings
from core.stores import Stores

TMS = morecantile.tms.get("WebMercatorQuad")
ORIGIN = (500000.0, 5000000.0)  # UTM 32N: 9°E, ~45.1°N


def ramp(dtype: str, bands: int = 1, size: int = 512) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    base = (x * 7 + y * 3) % 200 + 10
    if dtype == "int16":
        base = base * 50 - 3000
    elif dtype == "uint16":
        base = base * 300
    elif dtype == "float32":
        base = base * 0.37 - 20
    return np.stack([base] * bands).astype(dtype)


def catalog(tmp: Path, scenes: list[dict]) -> Path:
    """scenes: {id, dtype, date, shift (px), nodata, mask, overviews, bands}."""
    items = []
    for s in scenes:
        data = ramp(s["dtype"], s.get("bands", 1))
        x0 = ORIGIN[0] + s.get("shift", 0) * 30
        path = write_cog(
            tmp / f"{s['id']}.tif",
            data,
            crs="EPSG:32632",
            transform=Affine(30, 0, x0, 0, -30, ORIGIN[1]),
            nodata=s.get("nodata"),
            mask=s.get("mask"),
            overviews=s.get("overviews", True),
        )
        items.append(
            stac_item(
                s["id"],
                {"data": path},
                datetime=s.get("date", "2024-01-01") + "T00:00:00Z",
                collection="t",
                href_base=tmp,
            )
        )
    (tmp / "items.ndjson").write_text("\n".join(json.dumps(i) for i in items))
    out = tmp / "items.parquet"
    index_items(tmp / "items.ndjson", out)
    return out


def centre_tile(z: int) -> morecantile.Tile:
    """The tile at the centre of the 512² test images (UTM 32N)."""
    lon, lat = transformer("EPSG:32632", "EPSG:4326").transform(
        ORIGIN[0] + 256 * 30, ORIGIN[1] - 256 * 30
    )
    return TMS.tile(lon, lat, z)


async def read(engine: Engine, z: int, **params):
    t = centre_tile(z)
    grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y)
    return await engine.read(grid, SearchQuery(), ReadParams(**params))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
async def test_dtypes_match_rio_tiler(tmp_path: Path, dtype: str) -> None:
    nodata = {"uint8": 0, "uint16": 0, "int16": -32768, "float32": -9999.0}[dtype]
    data = ramp(dtype)
    data[:, :, :256] = nodata
    path = tmp_path / "a.tif"
    write_cog(
        path,
        data,
        crs="EPSG:32632",
        transform=Affine(30, 0, *ORIGIN[:1], 0, -30, ORIGIN[1]),
        nodata=nodata,
    )
    item = stac_item("a", {"data": path}, datetime="2024-01-01T00:00:00Z", collection="t")
    (tmp_path / "i.json").write_text(json.dumps(item))
    index_items(tmp_path / "i.json", tmp_path / "items.parquet")
    engine = Engine(Settings(catalog=tmp_path / "items.parquet", compute_workers=1))
    try:
        mosaic = await read(engine, 13)
    finally:
        engine.close()
    assert mosaic is not None and mosaic.data.dtype == np.dtype(dtype)
    t = centre_tile(13)
    with Reader(str(path)) as src:
        img = src.tile(t.x, t.y, t.z)
    valid = mosaic.valid & ~np.ma.getmaskarray(img.array)[0]
    assert valid.mean() > 0.3 and (~mosaic.valid).any(), "the tile must straddle the nodata edge"
    assert (mosaic.data[0][valid] == img.data[0][valid]).mean() > 0.99
    assert (mosaic.valid == ~np.ma.getmaskarray(img.array)[0]).mean() > 0.99


async def test_internal_mask_and_no_overviews(tmp_path: Path) -> None:
    mask = np.ones((512, 512), dtype=bool)
    mask[:, :256] = False
    cat = catalog(tmp_path, [{"id": "m", "dtype": "uint16", "mask": mask, "overviews": False}])
    engine = Engine(Settings(catalog=cat, compute_workers=1))
    try:
        plan_text = (
            await engine.plan(
                tile_grid("WebMercatorQuad", *(lambda t: (t.z, t.x, t.y))(centre_tile(10))),
                SearchQuery(),
                ReadParams(),
            )
        ).describe()
        mosaic = await read(engine, 12)
    finally:
        engine.close()
    assert "level 0" in plan_text  # no overviews: the full resolution is read even at z10
    assert mosaic is not None
    assert mosaic.valid.any() and not mosaic.valid.all()
    assert (mosaic.data[0][mosaic.valid] > 0).all()


async def test_first_stops_reading_when_the_tile_is_full(tmp_path: Path) -> None:
    scenes = [
        {"id": f"s{i}", "dtype": "uint8", "date": f"2024-01-0{i + 1}", "shift": i} for i in range(5)
    ]
    cat = catalog(tmp_path, scenes)
    store = FaultyStore(LocalStore())
    fetcher = Fetcher(stores=Stores(lambda key: store))
    settings = Settings(catalog=cat, compute_workers=1, request_concurrency=1)
    engine = Engine(settings, fetcher=fetcher)
    try:
        t = centre_tile(13)
        grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y)
        # every item planned (footprint shortcuts off): the pixel-level early exit is tested
        everything = SearchQuery(exitwhenfull=False, skipcovered=False)
        plan = await engine.plan(grid, everything, ReadParams())
        assert len(plan.items) == 5
        reads_before = fetcher.stats["reads"]
        first = await engine.read(grid, everything, ReadParams(method="first"))
        first_reads = fetcher.stats["reads"] - reads_before
        mean = await engine.read(grid, SearchQuery(), ReadParams(method="mean"))
        mean_reads = fetcher.stats["reads"] - reads_before - first_reads
    finally:
        engine.close()
    assert first is not None and first.valid.all()
    assert first_reads < 5, "the newest item covers the tile: older ones are not read"
    assert mean_reads == 5
    assert mean is not None


async def test_a_failing_item_does_not_lose_the_tile(tmp_path: Path) -> None:
    scenes = [
        {"id": "good", "dtype": "uint8", "date": "2024-01-01"},
        {"id": "bad", "dtype": "uint8", "date": "2024-01-02", "shift": 3},
    ]
    cat = catalog(tmp_path, scenes)
    engine = Engine(Settings(catalog=cat, compute_workers=1))
    try:
        await read(engine, 13)  # warm the header cache with the real file
        (tmp_path / "bad.tif").write_bytes(b"II*\x00" + b"\x00" * 64)  # corrupt its pixels
        engine.fetcher.clear_caches()
        mosaic = await read(engine, 13)
        (tmp_path / "good.tif").unlink()
        engine.fetcher.clear_caches()
        with pytest.raises(ReadFailed, match="every item failed"):
            await read(engine, 13)
    finally:
        engine.close()
    assert mosaic is not None and mosaic.valid.any()
    assert [item for item, _ in mosaic.errors] == ["bad"]


async def test_multi_asset_band_stacking_and_bad_bidx(demo_catalog: Path) -> None:
    engine = Engine(Settings(catalog=demo_catalog, compute_workers=1))
    try:
        t = TMS.tile(6.0, 45.0, 11)
        grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y)
        both = await engine.read(grid, SearchQuery(), ReadParams(assets=("visual", "dem")))
        visual = await engine.read(grid, SearchQuery(), ReadParams(assets=("visual",)))
        with pytest.raises(ParamError, match="bidx"):
            await engine.read(grid, SearchQuery(), ReadParams(bidx=(9,)))
    finally:
        engine.close()
    assert both is not None and visual is not None
    assert both.data.shape[0] == 4 and both.data.dtype == np.float32
    common = both.valid & visual.valid
    assert np.array_equal(both.data[:3, common], visual.data[:, common].astype("float32"))


async def test_reads_beyond_read_concurrency_wait_their_turn(tmp_path: Path) -> None:
    """At most `read_concurrency` reads run at once (their callbacks share one event loop);
    the others wait in the "queue" stage and are served after, none lost."""
    scenes = [{"id": "s0", "dtype": "uint8", "date": "2024-01-01"}]
    cat = catalog(tmp_path, scenes)
    store = FaultyStore(LocalStore(), delay=0.05)  # every store request takes 50 ms
    fetcher = Fetcher(stores=Stores(lambda key: store), tile_cache_bytes=0)
    engine = Engine(Settings(catalog=cat, compute_workers=1, read_concurrency=2), fetcher=fetcher)
    running = peak = 0
    inner = engine._read

    async def counted(*args: object) -> object:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await inner(*args)  # type: ignore[arg-type]
        finally:
            running -= 1

    engine._read = counted  # type: ignore[method-assign]
    try:
        t = centre_tile(13)
        grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y)
        mosaics = await asyncio.gather(
            *(engine.read(grid, SearchQuery(), ReadParams()) for _ in range(6))
        )
    finally:
        engine.close()
    assert peak == 2
    assert all(m is not None and m.valid.any() for m in mosaics)
    waited = sorted(m.clock.busy.get("queue", 0.0) for m in mosaics if m is not None)
    assert waited[0] < 0.01 and waited[-1] >= 0.05, "the last reads waited for the first ones"
