"""POST /chunks under faults: a corrupt COG loses nothing else; a disconnect stops the reads."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from affine import Affine
from fastapi import FastAPI
from obstore.store import LocalStore
from terrazzo.framing import Chunk, iter_frames, parse_frames

from app.chunks import StallSafeStream
from app.main import create_app
from core.bounded import run_bounded
from core.catalog import SearchQuery
from core.chunks import ChunkSpec, read_chunk
from core.cogs import write_cog
from core.engine import Engine, ReadParams
from core.faults import FaultyStore
from core.fetch import Fetcher
from core.plan import Grid, plan_asset
from core.settings import Settings
from core.stores import Stores
from tests.conftest import Server, href_catalog, serve_in_thread
from tests.test_chunks_api import chunk_grid

CORRUPT = "demo-32632-2024-06-01-05"  # an item in the middle of the strip, ~6.6–6.9°E


@pytest.fixture(scope="module")
def corrupt_catalog(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo catalog with one COG cut short: its header opens, its pixels do not."""
    root = tmp_path_factory.mktemp("corrupt")
    shutil.copytree(demo_catalog.parent, root, dirs_exist_ok=True)
    cog = root / "cogs" / f"{CORRUPT}_visual.tif"
    cog.write_bytes(cog.read_bytes()[:8192])
    return root / "items.parquet"


def test_corrupt_cog_loses_no_other_chunk(corrupt_catalog: Path) -> None:
    server = Server(corrupt_catalog)
    try:
        specs = chunk_grid("EPSG:32632", 6.75, 45.0, n=6, size=64, res=240)
        r = httpx.post(
            server.url + "/chunks", json={"crs": "EPSG:32632", "chunks": specs}, timeout=120
        )
        frames = parse_frames(r.content)
        chunks = {f.id: f for f in frames[:-1]}
        assert set(chunks) == {s["id"] for s in specs}, "every chunk comes back"
        assert frames[-1].header["chunks"] == len(specs)
        named = [
            c
            for c in chunks.values()
            if CORRUPT in (c.error or "")
            or any(e["id"] == CORRUPT for e in c.header["item_errors"])
        ]
        assert named, "the failing item is named in the chunks it touched"
        assert any(c.status == "ok" and c.mask.any() for c in named), (
            "a chunk with another item still covering it is served from that item"
        )
        others = [c for c in chunks.values() if c not in named]
        assert others and all(c.status in ("ok", "empty") for c in others)
        # and the service keeps serving
        again = httpx.post(
            server.url + "/chunks", json={"crs": "EPSG:32632", "chunks": specs[:2]}, timeout=60
        )
        assert again.status_code == 200
    finally:
        server.stop()


@pytest.fixture
def slow_server(demo_catalog: Path) -> Iterator[tuple[str, FaultyStore]]:
    """A real uvicorn server in this process, reading through a store that adds 400 ms."""
    store = FaultyStore(LocalStore(), delay=0.4)
    settings = Settings(catalog=demo_catalog, chunk_concurrency=8, compute_workers=1)
    engine = Engine(settings, fetcher=Fetcher(stores=Stores(lambda key: store)))
    try:
        with serve_in_thread(create_app(settings, engine=engine)) as url:
            yield url, store
    finally:
        engine.close()


def test_disconnect_cancels_the_remaining_work(slow_server: tuple[str, FaultyStore]) -> None:
    url, store = slow_server
    # 64 small chunks spread along the strip: each needs COG tiles no other chunk has read
    specs = [
        chunk_grid("EPSG:32632", lon, 45.0, n=1, size=16, res=120)[0] | {"id": f"c{i}"}
        for i, lon in enumerate(np.linspace(5.3, 12.7, 64))
    ]
    with (
        httpx.Client(timeout=60) as client,
        client.stream(
            "POST", url + "/chunks", json={"crs": "EPSG:32632", "chunks": specs}
        ) as response,
    ):
        assert response.status_code == 200
        first = next(iter_frames(response.iter_bytes()))
        assert first.status == "ok"
        # leaving the block closes the connection mid-stream
    time.sleep(0.3)  # cancellation reaches the in-flight reads
    settled = store.requests
    time.sleep(2.0)  # uncancelled, the other 7 chunks in flight would keep reading here
    assert store.requests == settled, "no store reads after the disconnect"
    assert settled < 64, "most of the 64 chunks were never read"


class HangOnceStore(FaultyStore):
    """The real store, except one pixel read once `armed`: it never answers, and once
    cancelled it takes `unwind` seconds to stop (as a network request being torn down does)."""

    def __init__(self, inner: LocalStore, *, unwind: float) -> None:
        super().__init__(inner)
        self.unwind = unwind
        self.armed = False
        self.cancelled = 0

    async def get_ranges_async(self, path: str, **kw) -> list:
        if self.armed:
            self.armed = False
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                await asyncio.sleep(self.unwind)
                raise
        return await super().get_ranges_async(path, **kw)


PACKBITS_DATA = (np.arange(256 * 256) % 250 + 1).astype("uint8").reshape(1, 256, 256)
BBOX = (501000, 4998840, 501160, 4999000)  # its pixels 100..116 (x and y), in one block


@pytest.fixture(scope="module")
def packbits_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One item, one PackBits COG: its blocks are fetched by our own code (the GDAL decode
    path), so a store that is slow to stop holds up the cancelled fetch itself."""
    root = tmp_path_factory.mktemp("packbits")
    cog = write_cog(
        root / "p.tif",
        PACKBITS_DATA,
        crs="EPSG:32632",
        transform=Affine(10, 0, 500000, 0, -10, 5000000),
        nodata=0,
        overviews=False,
        compress="PACKBITS",
    )
    return href_catalog(cog, {"p": str(cog)}, root / "items.parquet")


def _two_chunks(settings: Settings, store: Any) -> tuple[dict, dict[str, Chunk]]:
    """Chunks `a` and `b` over one COG tile through a real server: a dry run first (opens the
    header), then `store.armed` and the real read. Returns the dry-run plans and the chunks;
    asserts the stream ended with its end frame counting both (a cut stream raises)."""
    engine = Engine(settings, fetcher=Fetcher(stores=Stores(lambda key: store)))
    body = {
        "crs": "EPSG:32632",
        "chunks": [{"id": i, "bbox": BBOX, "width": 16, "height": 16} for i in ("a", "b")],
    }
    try:
        with serve_in_thread(create_app(settings, engine=engine)) as url:
            plans = httpx.post(url + "/chunks", json=body | {"dry_run": True}, timeout=30).json()
            store.armed = True
            r = httpx.post(url + "/chunks", json=body, timeout=30)
            frames = parse_frames(r.content)  # a cut stream raises (no end frame)
    finally:
        engine.close()
    chunks = {f.id: f for f in frames[:-1]}
    assert frames[-1].header["chunks"] == 2 and set(chunks) == {"a", "b"}
    return plans, chunks


def test_a_chunk_joining_an_abandoned_tile_fetch_gets_its_pixels(packbits_catalog: Path) -> None:
    """The CI flake (stream cut mid-body): chunk `a` gives up (its timeout) while it alone
    waits for a COG tile, so that shared fetch is cancelled; chunk `b` wants the same tile
    while the cancelled fetch is still stopping. `b` joined the dying fetch, got its
    CancelledError though nobody cancelled `b`, and that ended the whole stream. Now `b`
    fetches afresh and gets its pixels, and the stream ends with its end frame."""
    store = HangOnceStore(LocalStore(), unwind=1.5)
    settings = Settings(
        catalog=packbits_catalog, chunk_concurrency=1, chunk_timeout_s=3.0, compute_workers=1
    )
    plans, chunks = _two_chunks(settings, store)
    assert [len(c["plan"]["items"]) for c in plans["chunks"]] == [1, 1]  # headers open
    assert chunks["a"].status == "error" and "timeout" in chunks["a"].error
    assert store.cancelled == 1, "a's tile fetch was cancelled when a gave up"
    assert chunks["b"].status == "ok", chunks["b"].error
    assert chunks["b"].mask.all()
    assert (chunks["b"].data[0] == PACKBITS_DATA[:, 100:116, 100:116]).all()


async def test_a_read_never_gets_another_reads_cancellation(tmp_path: Path) -> None:
    """The same race without any injected slowness, one event-loop step wide (the COG is read
    by async-tiff): read `a` is cancelled while it alone waits for its tiles, and read `b` of
    the same tiles starts in that step. `b` was never cancelled, so it gets its pixels (it
    used to get a's CancelledError)."""
    cog = write_cog(
        tmp_path / "d.tif",
        PACKBITS_DATA,
        crs="EPSG:32632",
        transform=Affine(10, 0, 500000, 0, -10, 5000000),
        nodata=0,
        overviews=False,
    )
    store = FaultyStore(LocalStore())
    fetcher = Fetcher(stores=Stores(lambda key: store))
    header = await fetcher.header(str(cog))
    read = plan_asset("a", header, Grid.from_bounds("EPSG:32632", BBOX, 16, 16), "nearest")
    assert read is not None and header.decoder == "async-tiff"
    store.delay = 0.3  # the tile fetch is in flight when `a` is cancelled
    a = asyncio.ensure_future(fetcher.read(read))
    await asyncio.sleep(0.1)
    a.cancel()
    b = asyncio.ensure_future(fetcher.read(read))
    await asyncio.gather(a, return_exceptions=True)
    assert a.cancelled()
    pixels = await b
    col, row, w, h = read.window
    assert (pixels.data == PACKBITS_DATA[:, row : row + h, col : col + w]).all()


class CancelsOnceStore(FaultyStore):
    """The real store, except one pixel read once `armed`: it raises CancelledError, as a
    library that cancels its own futures can leak it to a caller nobody cancelled."""

    armed = False

    async def get_ranges_async(self, path: str, **kw) -> list:
        if self.armed:
            self.armed = False
            raise asyncio.CancelledError
        return await super().get_ranges_async(path, **kw)


def test_a_cancellation_from_inside_a_chunk_is_that_chunks_error(packbits_catalog: Path) -> None:
    """A CancelledError that is not the request's own (here leaked by the store) fails only
    the chunk that met it: the other chunk is read and the stream ends with its end frame
    (it used to end the stream with no end frame, as in the CI flake)."""
    store = CancelsOnceStore(LocalStore())
    settings = Settings(catalog=packbits_catalog, chunk_concurrency=1, compute_workers=1)
    _, chunks = _two_chunks(settings, store)
    assert chunks["a"].status == "error" and "cancelled inside the read" in chunks["a"].error
    assert chunks["b"].status == "ok", chunks["b"].error
    assert (chunks["b"].data[0] == PACKBITS_DATA[:, 100:116, 100:116]).all()


class _Planner:
    """An engine whose plan step does `step` (read_chunk needs nothing else to get there)."""

    def __init__(self, step) -> None:
        self.settings = Settings(chunk_timeout_s=30)
        self.step = step

    async def plan(self, *args) -> None:
        await self.step()


def _read_chunk(engine: _Planner):
    spec = ChunkSpec.make("c", BBOX, width=16, height=16)
    return read_chunk(engine, spec, "EPSG:32632", SearchQuery(), ReadParams())  # type: ignore[arg-type]


async def test_read_chunk_turns_an_inner_cancellation_into_its_error() -> None:
    async def leaks() -> None:
        raise asyncio.CancelledError

    result = await asyncio.ensure_future(_read_chunk(_Planner(leaks)))
    assert result.status == "error" and "cancelled inside the read" in (result.error or "")


async def test_read_chunk_lets_its_own_cancellation_through() -> None:
    """A client that goes away (or the stream closing) cancels the chunk: that must stop it,
    never become a result."""
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.sleep(3600)

    task = asyncio.ensure_future(_read_chunk(_Planner(hangs)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_a_timeout_error_from_the_body_is_an_error_not_a_stalled_client(caplog) -> None:
    """StallSafeStream cuts a client whose sends wait `stall_timeout_s`; it caught every
    TimeoutError under it, so one from the body was logged as "client read nothing" and the
    stream ended quietly. Now only its own deadline is a stall; anything else is an error."""

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        raise TimeoutError("from the body")

    app = FastAPI()

    @app.get("/s")
    async def stream() -> StallSafeStream:
        return StallSafeStream(body(), media_type="application/octet-stream", stall_timeout_s=30)

    errors: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = errors.append  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="terrazzo.chunks"), serve_in_thread(app) as url:
        logging.getLogger("uvicorn.error").addHandler(handler)
        try:
            with pytest.raises(httpx.RemoteProtocolError):
                httpx.get(url + "/s", timeout=10)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert "read nothing" not in caplog.text
    assert any(r.exc_info and r.exc_info[0] is TimeoutError for r in errors), errors


async def test_run_bounded_never_passes_a_tasks_cancellation_off_as_the_consumers() -> None:
    async def fn(x: int) -> int:
        if x == 1:
            raise asyncio.CancelledError  # from inside fn: nobody cancelled anything
        return x

    got = []
    with pytest.raises(RuntimeError, match="ended cancelled"):
        async for r in run_bounded([0, 1, 2], fn, 1):
            got.append(r)
    assert got == [0]
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_run_bounded_cancels_its_tasks_when_the_consumer_is_cancelled() -> None:
    """The other half: a consumer that goes away (a client disconnect) stops all work."""
    stopped: list[int] = []

    async def fn(x: int) -> int:
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append(x)
        return x

    async def consume() -> None:
        async for _ in run_bounded(range(10), fn, 3):
            pass

    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await asyncio.sleep(0)
    assert sorted(stopped) == [0, 1, 2]  # the three in flight; the other seven never started
