"""POST /chunks under faults: a corrupt COG loses nothing else; a disconnect stops the reads."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from obstore.store import LocalStore
from terrazzo.framing import iter_frames, parse_frames

from app.main import create_app
from core.engine import Engine
from core.faults import FaultyStore
from core.fetch import Fetcher
from core.settings import Settings
from core.stores import Stores
from tests.conftest import Server, serve_in_thread
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
