"""The client SDK against the real service on 127.0.0.1: tiles, reads, retries, resume, Dask."""

from __future__ import annotations

import _thread
import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from terrazzo import AsyncClient, Client, ReadInterrupted, ReadTooLarge, ServerError

from app.main import create_app
from core.catalog import SearchQuery
from core.engine import Engine, ReadParams
from core.plan import Grid
from core.settings import Settings
from tests.conftest import Server, serve_in_thread, utm_area

TMS = morecantile.tms.get("WebMercatorQuad")
TILE = TMS.tile(6.0, 45.0, 11)


class Flaky:
    """ASGI wrapper: answers 503 to chosen /chunks requests (a fault at the HTTP boundary)."""

    def __init__(
        self,
        app,
        *,
        fail_first: int = 0,
        fail_after: int | None = None,
        retry_after: str | None = None,
        delay: float = 0.0,
    ) -> None:
        self.app = app
        self.fail_first = fail_first
        self.fail_after = fail_after  # fail every request after this many, while set
        self.retry_after = retry_after
        self.delay = delay
        self.requests = 0
        self.failed = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] == "/chunks":
            self.requests += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            late = self.fail_after is not None and self.requests > self.fail_after
            if self.requests <= self.fail_first or late:
                self.failed += 1
                headers = [(b"content-type", b"application/json")]
                if self.retry_after:
                    headers.append((b"retry-after", self.retry_after.encode()))
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": b'{"detail": "busy"}'})
                return
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def engine(demo_catalog: Path) -> Iterator[Engine]:
    eng = Engine(Settings(catalog=demo_catalog, compute_workers=2))
    yield eng
    eng.close()


@pytest.fixture
def flaky(engine: Engine) -> Iterator[tuple[str, Flaky]]:
    app = Flaky(create_app(engine.settings, engine=engine))
    with serve_in_thread(app) as url:
        yield url, app


area = utm_area


def test_tile_equals_the_servers_npy(server: Server) -> None:
    with Client(server.url) as client:
        tile = client.tile(TILE.z, TILE.x, TILE.y, assets="visual")
        raw = client.tile_bytes(TILE.z, TILE.x, TILE.y, format="npy")
    direct = np.load(
        io.BytesIO(
            httpx.get(f"{server.url}/tiles/WebMercatorQuad/{TILE.z}/{TILE.x}/{TILE.y}.npy").content
        )
    )
    assert (
        raw
        == httpx.get(f"{server.url}/tiles/WebMercatorQuad/{TILE.z}/{TILE.x}/{TILE.y}.npy").content
    )
    assert isinstance(tile, np.ma.MaskedArray) and tile.shape == (3, 256, 256)
    assert np.array_equal(tile.data, direct[:-1])
    assert np.array_equal(~tile.mask[0], direct[-1] == 255)


def test_errors_carry_the_servers_message(server: Server) -> None:
    with Client(server.url) as client, pytest.raises(ServerError, match="method") as info:
        client.tile(TILE.z, TILE.x, TILE.y, method="loudest")
    assert info.value.status == 400
    with Client(server.url) as client:
        assert client.tile(11, 100, 100) is None  # 204: no item there


async def test_read_2048_in_512_chunks_equals_core(server: Server, engine: Engine) -> None:
    bbox = area(2048, 30)
    with Client(server.url, concurrency=4) as client:
        da = client.read(
            bbox,
            crs="EPSG:32632",
            resolution=30,
            chunk_size=512,
            assets=["visual"],
            dtype="float32",
            progress=False,
        )
    assert da.dims == ("time", "band", "y", "x") and da.shape == (1, 3, 2048, 2048)
    assert da.x[1] - da.x[0] == 30 and float(da.x[0]) == bbox[0] + 15
    assert da.spatial_ref.attrs["crs_wkt"] == "EPSG:32632"
    grid = Grid.from_bounds("EPSG:32632", tuple(bbox), 2048, 2048)
    core = await engine.read(grid, SearchQuery(), ReadParams(assets=("visual",)))
    ours = da.values[0]
    valid = ~np.isnan(ours[0])
    assert (valid == core.valid).mean() > 0.999
    both = valid & core.valid
    assert both.mean() > 0.2
    # GDAL's approximate transformer (0.125 px) depends on the row span it interpolates over,
    # so a 512-pixel chunk and the 2048-pixel grid may pick a neighbouring source pixel for a
    # few pixels; everything else is identical.
    same = (ours[:, both] == core.data[:, both].astype("float32")).mean()
    assert same > 0.995, same


async def test_sync_client_inside_a_running_loop(server: Server) -> None:
    asyncio.get_running_loop()  # like Jupyter: a loop is already running in this thread
    with Client(server.url) as client:
        da = client.read(
            area(256, 120), crs="EPSG:32632", resolution=120, chunk_size=64, progress=False
        )
    assert da.shape == (1, 3, 256, 256) and len(client.config.url) > 0


async def test_async_client_reads_concurrently(server: Server) -> None:
    async with AsyncClient(server.url) as client:
        tiles = await asyncio.gather(*(client.tile(TILE.z, TILE.x + i, TILE.y) for i in range(4)))
    assert sum(t is not None for t in tiles) >= 2


def test_503_twice_then_success_is_retried(flaky: tuple[str, Flaky]) -> None:
    url, app = flaky
    app.fail_first = 2
    with Client(url, backoff=0.01, chunks_per_request=100) as client:
        da = client.read(
            area(128, 120), crs="EPSG:32632", resolution=120, chunk_size=64, progress=False
        )
    assert app.failed == 2 and app.requests == 3
    assert da.shape == (1, 3, 128, 128) and np.isfinite(da.values).any()


def test_retry_after_is_honoured(flaky: tuple[str, Flaky]) -> None:
    url, app = flaky
    app.fail_first, app.retry_after = 1, "0.6"
    with Client(url, backoff=0.001) as client:
        started = time.monotonic()
        client.read(area(64, 120), crs="EPSG:32632", resolution=120, progress=False)
    assert time.monotonic() - started >= 0.6


def test_interrupted_read_resumes_only_the_missing_chunks(flaky: tuple[str, Flaky]) -> None:
    url, app = flaky
    bbox = area(256, 60)
    with Client(url, backoff=0.01, retries=2, chunks_per_request=1, concurrency=1) as client:
        clean = client.read(
            bbox, crs="EPSG:32632", resolution=60, chunk_size=64, progress=False
        )  # 16 chunks
        app.requests, app.fail_after = 0, 5
        with pytest.raises(ReadInterrupted) as info:
            client.read(bbox, crs="EPSG:32632", resolution=60, chunk_size=64, progress=False)
        interrupted = info.value
        assert len(interrupted.finished) == 5 and len(interrupted.missing) == 11
        app.fail_after, app.requests = None, 0  # the server recovers
        resumed = interrupted.resume()
    assert app.requests == 11, "only the missing chunks are fetched"
    np.testing.assert_array_equal(resumed.values, clean.values)


async def test_cancel_propagates(flaky: tuple[str, Flaky]) -> None:
    url, app = flaky
    app.delay = 2.0
    async with AsyncClient(url, retries=5) as client:
        task = asyncio.ensure_future(
            client.read(area(128, 120), crs="EPSG:32632", resolution=120, progress=False)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 1.0


def test_ctrl_c_propagates_from_the_sync_client(flaky: tuple[str, Flaky]) -> None:
    url, app = flaky
    app.delay = 2.0
    client = Client(url, retries=5)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            client.read(area(128, 120), crs="EPSG:32632", resolution=120, progress=False)
        assert time.monotonic() - started < 1.5
        pending = asyncio.run_coroutine_threadsafe(_pending(), client._loop).result(5)
        assert pending == 0, "the work on the client's loop was cancelled"
    finally:
        timer.cancel()
        client.close()


async def _pending() -> int:
    await asyncio.sleep(0.1)
    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())


def test_dask_backed_open_computes_on_a_local_cluster(server: Server) -> None:
    distributed = pytest.importorskip("distributed")
    bbox = area(256, 120, lon=12.1, lat=45.1)
    with Client(server.url) as client:
        lazy = client.open(
            bbox,
            crs="EPSG:32632",
            resolution=120,
            chunk_size=128,
            group_by="day",
        )
        eager = client.read(
            bbox, crs="EPSG:32632", resolution=120, chunk_size=128, group_by="day", progress=False
        )
    assert lazy.chunks is not None and len(lazy.data.chunks[2]) == 2
    assert list(lazy.time.values) == list(eager.time.values)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster),
    ):
        computed = lazy.compute()
    np.testing.assert_array_equal(computed.values, eager.values)


def test_client_package_is_light() -> None:
    import subprocess
    import sys
    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "client" / "pyproject.toml").read_text())
    deps = " ".join(meta["project"]["dependencies"]).lower()
    for heavy in ("fastapi", "rasterio", "gdal", "duckdb", "xarray", "dask"):
        assert heavy not in deps
    code = (
        "import sys, terrazzo; from terrazzo import Client, AsyncClient; "
        "bad = [m for m in ('fastapi', 'rasterio', 'duckdb', 'osgeo', 'core', 'app') "
        "if m in sys.modules]; print(bad); assert not bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr


async def test_open_is_load_async_friendly(server: Server) -> None:
    bbox = area(256, 120)
    with Client(server.url) as client:
        lazy = client.open(bbox, crs="EPSG:32632", resolution=120, chunk_size=128)
        eager = client.read(bbox, crs="EPSG:32632", resolution=120, chunk_size=128, progress=False)
    loaded = await lazy.load_async()  # xarray's async load, from inside a running loop
    np.testing.assert_array_equal(loaded.values, eager.values)


async def test_resume_inside_a_running_loop_is_awaitable(flaky: tuple[str, Flaky]) -> None:
    """An AsyncClient's interrupted read in a notebook: `await exc.resume()` (it used to call
    asyncio.run() inside the running loop and fail)."""
    url, app = flaky
    bbox = area(128, 60)
    async with AsyncClient(url, backoff=0.01, retries=1, chunks_per_request=1) as client:
        read = {"crs": "EPSG:32632", "resolution": 60, "chunk_size": 64, "progress": False}
        clean = await client.read(bbox, **read)  # 4 chunks
        app.requests, app.fail_after = 0, 2
        with pytest.raises(ReadInterrupted) as info:
            await client.read(bbox, **read)
        app.fail_after = None
        resumed = await info.value.resume()
    np.testing.assert_array_equal(resumed.values, clean.values)


def _connections_to(url: str) -> int:
    import psutil

    port = int(url.rsplit(":", 1)[1])
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_dropped_clients_close_their_connections(server: Server) -> None:
    import gc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        base = _connections_to(server.url)  # other tests' cached Dask-block clients
        client = Client(server.url)
        client.info()
        assert _connections_to(server.url) == base + 1
        thread = client._thread
        del client
        gc.collect()
        thread.join(timeout=5)
        assert not thread.is_alive(), "the loop thread stops"
        assert _connections_to(server.url) == base

        async def drop_async() -> None:
            client = AsyncClient(server.url)
            await client.info()
            assert _connections_to(server.url) == base + 1
            del client
            gc.collect()
            await asyncio.sleep(0.2)  # the finalizer's aclose runs on this loop
            assert _connections_to(server.url) == base

        asyncio.run(drop_async())


def test_dask_worker_clients_are_per_configuration(server: Server) -> None:
    """Two configurations (another API key) never share a worker's cached client."""
    from terrazzo import layout
    from terrazzo.client import Config

    spec = layout.chunk_specs(
        layout.Grid.make(area(64, 120), crs="EPSG:32632", resolution=120), 64
    )[0]
    before = set(layout._CLIENTS)
    for key in ("a", "b", "a"):
        config = Config(url=server.url, headers={"x-api-key": key})
        layout.fetch_block(
            config, layout.wire([spec])[0], {"crs": "EPSG:32632"}, [None], 3, "|u1", 0
        )
    made = [layout._CLIENTS[k] for k in set(layout._CLIENTS) - before]
    assert sorted(c.config.headers["x-api-key"] for c in made) == ["a", "b"]
    for c in made:
        c.close()


def test_a_read_too_large_for_memory_fails_before_any_request(flaky: tuple[str, Flaky]) -> None:
    url, app = flaky
    app.requests = 0
    huge = area(200_000, 1)  # 40 gigapixels: a 40 GB read at one byte per pixel
    with Client(url) as client:
        with pytest.raises(ReadTooLarge, match=r"client\.open"):
            client.read(huge, crs="EPSG:32632", resolution=1, progress=False)
        with pytest.raises(ReadTooLarge, match="max_bytes=1000"):
            client.read(area(64, 120), crs="EPSG:32632", resolution=120, max_bytes=1000)
        assert app.requests == 0
        small = client.read(
            area(64, 120), crs="EPSG:32632", resolution=120, max_bytes=10**6, progress=False
        )
    assert small.shape[-2:] == (64, 64)


def test_open_dry_runs_in_batches_with_a_progress_bar(
    flaky: tuple[str, Flaky], capsys: pytest.CaptureFixture[str]
) -> None:
    url, app = flaky
    app.requests = 0
    with Client(url) as client:
        lazy = client.open(
            area(1280, 30), crs="EPSG:32632", resolution=30, chunk_size=40, progress=True
        )  # 32 x 32 = 1024 chunks
    assert lazy.data.npartitions == 1024
    assert app.requests == 3, "1024 chunks planned in 3 requests of up to 500"
    assert "terrazzo plan" in capsys.readouterr().err
