"""Fetch stage on real COGs: store choice, header cache, retries, cancellation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from affine import Affine
from obstore.store import LocalStore

from core.cogs import write_cog
from core.faults import FaultyStore
from core.fetch import (
    Fetcher,
    FetchError,
    ReadTooLarge,
    TileCache,
    _Batch,
    is_transient,
    with_retries,
)
from core.plan import Grid, plan_asset
from core.stores import Stores, split_href


@pytest.fixture(scope="module")
def cog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = np.arange(3 * 512 * 512, dtype="uint16").reshape(3, 512, 512) % 5000 + 1
    path = tmp_path_factory.mktemp("fetch") / "a.tif"
    return write_cog(
        path, data, crs="EPSG:32633", transform=Affine(10, 0, 400000, 0, -10, 5100000), nodata=0
    )


def fetcher_with(store: FaultyStore, **kw) -> Fetcher:
    return Fetcher(stores=Stores(lambda key: store), retry_base=0.001, retry_cap=0.01, **kw)


def test_split_href_by_scheme() -> None:
    assert split_href("/data/a.tif") == ("file", "/data/a.tif")
    assert split_href("file:///data/a.tif") == ("file", "/data/a.tif")
    assert split_href("s3://bucket/k/a.tif") == ("s3://bucket", "k/a.tif")
    assert split_href("https://h.example:8080/x/a.tif") == ("https://h.example:8080", "x/a.tif")


def test_transient_classification() -> None:
    assert is_transient(ConnectionError("reset"))
    assert is_transient(TimeoutError())
    assert is_transient(RuntimeError("HTTP 503 Service Unavailable"))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(RuntimeError("Object at location x not found: 503 files"))
    assert not is_transient(ValueError("corrupt"))


async def test_retries_transient_then_succeeds(cog: Path) -> None:
    store = FaultyStore(LocalStore(), fail_first=2)
    fetcher = fetcher_with(store, retries=3)
    header = await fetcher.header(str(cog))
    assert header.count == 3 and header.dtype == "uint16" and len(header.levels) >= 2
    assert store.requests > 2  # two injected failures, then real reads


async def test_gives_up_after_retries(cog: Path) -> None:
    store = FaultyStore(LocalStore(), fail_first=100)
    fetcher = fetcher_with(store, retries=2)
    with pytest.raises(Exception, match="injected fault"):
        await fetcher.open(str(cog))
    assert store.requests == 3  # first try + 2 retries, then the error surfaces


async def test_permanent_error_is_not_retried(tmp_path: Path) -> None:
    store = FaultyStore(LocalStore())
    fetcher = fetcher_with(store, retries=5)
    with pytest.raises(Exception, match="not found"):
        await fetcher.open(str(tmp_path / "missing.tif"))
    assert store.requests == 1


async def test_header_cache_shares_one_open(cog: Path) -> None:
    store = FaultyStore(LocalStore(), delay=0.02)
    fetcher = fetcher_with(store)
    await asyncio.gather(*(fetcher.open(str(cog)) for _ in range(20)))
    opened = store.requests
    await fetcher.open(str(cog))
    assert store.requests == opened  # cached: no new request
    assert fetcher.stats["header_misses"] == 1 and fetcher.stats["header_hits"] == 20


async def test_read_window_matches_file(cog: Path) -> None:
    import rasterio

    fetcher = Fetcher()
    header = await fetcher.header(str(cog))
    grid = Grid.from_bounds("EPSG:32633", (401000, 5095000, 403000, 5097000), 200, 200)
    read = plan_asset("a", header, grid, "nearest")
    assert read is not None and read.level == 0
    pixels = await fetcher.read(read)
    col, row, w, h = read.window
    with rasterio.open(cog) as ds:
        expected = ds.read(window=((row, row + h), (col, col + w)))
    assert np.array_equal(pixels.data, expected)
    assert pixels.valid.all()


async def test_cancellation_propagates_and_stops_reads(cog: Path) -> None:
    store = FaultyStore(LocalStore(), delay=0.5)
    fetcher = fetcher_with(store)
    task = asyncio.ensure_future(fetcher.open(str(cog)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert store.requests == 1


async def test_with_retries_does_not_swallow_cancellation() -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await with_retries(call, retries=5, base=0.001, cap=0.01)
    assert calls == 1


# -- bounds against hostile or hanging files (issue 11/19) ------------------------------------


async def test_header_open_has_a_deadline(cog: Path) -> None:
    """A store that never answers: the shared open gives up after header_timeout, as an error
    naming the file, and is not left in the cache."""
    store = FaultyStore(LocalStore(), delay=3600)
    fetcher = fetcher_with(store, header_timeout=0.2)
    started = asyncio.get_running_loop().time()
    with pytest.raises(FetchError, match=r"a\.tif: header not read within 0.2 s"):
        await fetcher.header(str(cog))
    assert asyncio.get_running_loop().time() - started < 1.0
    assert str(cog) not in fetcher._cache


async def test_shared_open_is_cancelled_when_its_last_waiter_leaves(cog: Path) -> None:
    """Two requests share a hanging open: one leaving keeps it; both leaving (their 504s)
    cancels it and forgets it, so the next request opens afresh instead of joining it."""
    store = FaultyStore(LocalStore(), delay=3600)
    fetcher = fetcher_with(store)
    first = asyncio.ensure_future(fetcher.header(str(cog)))
    second = asyncio.ensure_future(fetcher.header(str(cog)))
    await asyncio.sleep(0.05)
    shared = fetcher._cache[str(cog)].task
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await asyncio.sleep(0)
    assert not shared.done()  # the other request still waits for it
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await asyncio.sleep(0)
    assert shared.cancelled() and str(cog) not in fetcher._cache
    store.delay = 0
    assert (await fetcher.header(str(cog))).count == 3


async def test_tile_cache_never_holds_an_entry_above_its_cap() -> None:
    cache = TileCache(max_bytes=1000)
    batch = _Batch(asyncio.Future())  # an unfinished fetch: reusable
    assert not cache.put(("big",), batch, 1001)
    assert cache.bytes == 0 and cache.get(("big",)) is None
    assert cache.put(("a",), batch, 600) and cache.put(("b",), batch, 600)
    assert cache.bytes == 600 and cache.get(("a",)) is None  # "a" evicted, never over the cap


async def test_tiles_above_the_cache_cap_are_read_and_not_cached(cog: Path) -> None:
    """A cache smaller than one tile: reads are still right, the cache stays empty."""
    import rasterio

    fetcher = Fetcher(tile_cache_bytes=1000)
    header = await fetcher.header(str(cog))
    grid = Grid.from_bounds("EPSG:32633", (401000, 5095000, 403000, 5097000), 200, 200)
    read = plan_asset("a", header, grid, "nearest")
    assert read is not None
    pixels = await fetcher.read(read)
    col, row, w, h = read.window
    with rasterio.open(cog) as ds:
        assert np.array_equal(pixels.data, ds.read(window=((row, row + h), (col, col + w))))
    assert fetcher.tiles.bytes == 0 and fetcher.tiles.max_bytes == 1000


async def test_read_over_the_decoded_budget_is_refused_before_fetching(cog: Path) -> None:
    store = FaultyStore(LocalStore())
    # 3 bands of uint16 256² tiles: 384 KiB decoded per tile, so a 1 MiB budget takes 2
    fetcher = fetcher_with(store, max_read_bytes=2**20)
    header = await fetcher.header(str(cog))
    opened = store.requests
    grid = Grid.from_bounds("EPSG:32633", (400000, 5094880, 405120, 5100000), 512, 512)
    read = plan_asset("a", header, grid, "nearest")
    assert read is not None and len(read.tiles) == 4
    budget = r"4 tile\(s\) decoding to 2 MiB; the per-read budget is 1 MiB"
    with pytest.raises(ReadTooLarge, match=budget) as info:
        await fetcher.read(read)
    assert not is_transient(info.value)
    assert store.requests == opened  # no tile was fetched
