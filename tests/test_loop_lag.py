"""The event loop stays responsive while searches and warps run (they are off the loop)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import morecantile
import numpy as np
import pytest

from core import compute
from core.catalog import SearchQuery
from core.engine import Engine, ReadParams
from core.plan import tile_grid
from core.settings import Settings

# its lag bars measure the engine alone, not beside another test (`make test`'s 2nd pass)
pytestmark = pytest.mark.serial

TMS = morecantile.tms.get("WebMercatorQuad")


async def probe_lag(stop: asyncio.Event, interval: float = 0.005) -> list[float]:
    """How late the loop wakes up from short sleeps: the loop's lag, sampled."""
    lags = []
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(interval)
        lags.append(time.perf_counter() - t0 - interval)
    return lags


@pytest.fixture(scope="module")
def engine(demo_catalog: Path):
    eng = Engine(Settings(catalog=demo_catalog, compute_workers=2))
    eng.compute.warm()
    yield eng
    eng.close()


def tiles(n: int) -> list:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        lon, lat = rng.uniform(5.2, 12.8), rng.uniform(44.9, 45.15)
        out.append(TMS.tile(lon, lat, int(rng.integers(9, 13))))
    return out


async def test_loop_lag_stays_low_under_tile_load(engine: Engine) -> None:
    stop = asyncio.Event()
    probe = asyncio.ensure_future(probe_lag(stop))
    sem = asyncio.Semaphore(16)

    async def one(t) -> None:
        async with sem:
            grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y, 512)
            await engine.read(grid, SearchQuery(), ReadParams(resampling="bilinear"))

    started = time.perf_counter()
    await asyncio.gather(*(one(t) for t in tiles(48)))
    busy = time.perf_counter() - started
    stop.set()
    lags = await probe
    p99 = float(np.percentile(lags, 99))
    assert busy > 0.3, "the load must last long enough to mean something"
    assert len(lags) > 20
    assert p99 < 0.05, f"loop lag p99 {p99 * 1000:.1f} ms"


async def test_probe_detects_a_blocked_loop(engine: Engine) -> None:
    """Control: the same warp run on the loop itself shows up as lag, so the probe can fail."""
    t = TMS.tile(6.0, 45.0, 11)
    grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y, 512)
    plan = await engine.plan(grid, SearchQuery(), ReadParams())
    item = plan.items[0]
    pixels = [await engine.fetcher.read(r) for r in item.reads]
    sources = [
        compute.Source.of(p.data, p.valid, r) for p, r in zip(pixels, item.reads, strict=True)
    ]
    target = compute.Target(grid.crs, tuple(grid.transform)[:6], grid.width, grid.height)
    stop = asyncio.Event()
    probe = asyncio.ensure_future(probe_lag(stop))
    await asyncio.sleep(0.02)
    for _ in range(20):
        compute.warp_item(sources, target, "cubic")  # on the loop: blocks it
        await asyncio.sleep(0)
    stop.set()
    lags = await probe
    assert max(lags) > 0.005
