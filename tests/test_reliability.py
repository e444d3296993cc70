"""Guards and faults on a real uvicorn server: auth, limits, overload, deadlines, dead
workers, failing stores. The service answers and keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from obstore.store import LocalStore

from app.main import create_app
from core.engine import Engine
from core.faults import FaultyStore
from core.fetch import Fetcher
from core.settings import Settings
from core.stores import Stores
from tests.conftest import serve_in_thread

TMS = morecantile.tms.get("WebMercatorQuad")
T = TMS.tile(6.0, 45.0, 11)
TILE = f"/tiles/{T.z}/{T.x}/{T.y}.npy"


@contextmanager
def running(catalog: Path, store: FaultyStore | None = None, **options) -> Iterator[str]:
    settings = Settings(catalog=catalog, compute_workers=1, **options)
    fetcher = Fetcher(stores=Stores(lambda key: store), retry_base=0.001) if store else None
    engine = Engine(settings, fetcher=fetcher)
    try:
        with serve_in_thread(create_app(settings, engine=engine)) as url:
            yield url
    finally:
        engine.close()


def test_api_key_and_cors(demo_catalog: Path) -> None:
    with running(demo_catalog, api_key="s3cret", cors_origins="https://map.example") as url:
        denied = httpx.get(url + TILE)
        assert denied.status_code == 401 and "X-API-Key" in denied.json()["detail"]
        assert httpx.get(url + TILE, headers={"X-API-Key": "wrong"}).status_code == 401
        ok = httpx.get(url + TILE, headers={"X-API-Key": "s3cret", "Origin": "https://map.example"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "https://map.example"
        bearer = httpx.post(
            url + "/chunks",
            headers={"Authorization": "Bearer s3cret"},
            json={"crs": "EPSG:3857", "chunks": []},
        )
        assert bearer.status_code == 422  # past the guard, refused for its content
        assert httpx.get(url + "/healthz").status_code == 200  # never guarded


def test_size_limits(demo_catalog: Path) -> None:
    with running(demo_catalog, max_body_bytes=2048, max_query_bytes=300) as url:
        long = httpx.get(url + TILE, params={"ids": "x" * 400})
        assert long.status_code == 414 and "TERRAZZO_MAX_QUERY_BYTES" in long.json()["detail"]
        chunks = [{"id": str(i), "bbox": [0, 0, 1, 1], "width": 1, "height": 1} for i in range(100)]
        big = httpx.post(url + "/chunks", json={"crs": "EPSG:3857", "chunks": chunks})
        assert big.status_code == 413 and "TERRAZZO_MAX_BODY_BYTES" in big.json()["detail"]


def test_overload_answers_503_fast_and_health_stays_fast(demo_catalog: Path) -> None:
    store = FaultyStore(LocalStore(), delay=0.5)
    with running(demo_catalog, store, max_inflight=2) as url:

        async def burst() -> tuple[list[httpx.Response], float]:
            async with httpx.AsyncClient(timeout=30) as client:
                tiles = [client.get(url + f"/tiles/{T.z}/{T.x + i}/{T.y}.npy") for i in range(8)]
                started = time.monotonic()
                health = asyncio.ensure_future(client.get(url + "/healthz"))
                responses = await asyncio.gather(*tiles)
                h = await health
                assert h.status_code == 200
                return responses, time.monotonic() - started

        responses, _ = asyncio.run(burst())
    busy = [r for r in responses if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "1" for r in busy)
    assert any(r.status_code in (200, 204) for r in responses)


def test_deadline_gives_504_and_cancels_the_work(demo_catalog: Path) -> None:
    store = FaultyStore(LocalStore(), delay=1.0)
    with running(demo_catalog, store, tile_timeout_s=0.3) as url:
        started = time.monotonic()
        r = httpx.get(url + TILE, timeout=30)
        took = time.monotonic() - started
        time.sleep(0.2)
        settled = store.requests
        time.sleep(1.5)
        assert store.requests == settled, "no reads after the deadline"
    assert r.status_code == 504 and "TERRAZZO_TILE_TIMEOUT_S" in r.json()["detail"]
    assert took < 1.0


def test_killed_worker_is_replaced(demo_catalog: Path) -> None:
    """The only worker SIGKILLed between jobs: the very next tile is served (the job goes to
    the replacement), never a 502 or 500; more in tests/test_pool_crash.py."""
    settings = Settings(catalog=demo_catalog, compute_workers=1)
    engine = Engine(settings)
    try:
        with serve_in_thread(create_app(settings, engine=engine)) as url:
            first = httpx.get(url + TILE, timeout=30)
            assert first.status_code == 200
            (pid,) = engine.compute.pids()
            os.kill(pid, signal.SIGKILL)
            after = httpx.get(url + TILE, timeout=30)  # at once: the death is not noticed yet
            assert after.status_code == 200 and after.content == first.content
            assert engine.compute.pids() != [pid]
            assert engine.compute.deaths == 1 and engine.compute.restarts == 1
            assert httpx.get(url + "/readyz", timeout=30).json()["ready"] is True
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ({"fail_every": 10}, "served"),  # 1 request in 10 fails: retries absorb it
        ({"truncate": True}, "failed"),  # every answer cut short: items fail, clear 502
    ],
)
def test_store_faults(demo_catalog: Path, fault: dict, expect: str) -> None:
    store = FaultyStore(LocalStore(), **fault)
    with running(demo_catalog, store) as url:
        rng = np.random.default_rng(0)
        statuses = []
        for _ in range(12):
            t = TMS.tile(rng.uniform(5.3, 12.7), rng.uniform(44.9, 45.1), 11)
            statuses.append(httpx.get(url + f"/tiles/{t.z}/{t.x}/{t.y}.npy", timeout=30))
        assert httpx.get(url + "/healthz").status_code == 200
    codes = {r.status_code for r in statuses}
    if expect == "served":
        assert codes <= {200, 204} and 200 in codes
    else:
        assert codes <= {204, 502} and 502 in codes
        failed = next(r for r in statuses if r.status_code == 502).json()
        assert failed["items"] and all(i["error"] for i in failed["items"])


def test_missing_file_fails_its_item_only(demo_catalog: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "demo"
    shutil.copytree(demo_catalog.parent, copy)
    (copy / "cogs" / "demo-32631-2024-06-01-02_visual.tif").unlink()
    with running(copy / "items.parquet") as url:
        r = httpx.get(url + TILE, timeout=30)
    assert r.status_code == 200
    assert "demo-32631-2024-06-01-02" in r.headers["X-Terrazzo-Errors"]
    data = np.load(__import__("io").BytesIO(r.content))
    assert (data[-1] == 255).any()
