"""Shared fixtures: a real demo catalog (COGs + GeoParquet) and a real uvicorn server."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from core.cogs import stac_item
from core.demo import build_demo
from core.indexing import index_items

# On-disk catalog snapshots and downloaded remote catalogs go to a cache directory of this
# run (inherited by the servers the tests start), never the user's ~/.cache/terrazzo.
os.environ.setdefault("TERRAZZO_CATALOG_CACHE", tempfile.mkdtemp(prefix="terrazzo-cache-"))


@pytest.fixture(scope="session")
def demo_catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo catalog: several UTM zones, two dates, nodata, a mask, no-overview COGs."""
    return build_demo(tmp_path_factory.mktemp("demo"), size=256)


def utm_area(
    size: int, res: float, lon: float = 6.0, lat: float = 45.0, crs: str = "EPSG:32632"
) -> list[float]:
    """A `size` x `size` pixel bbox in `crs` around (lon, lat), on the grid of multiples of
    `res` (the client snaps reads to it, as odc-stac does: an unaligned box would gain a
    pixel)."""
    from pyproj import Transformer

    cx, cy = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    x0, y0 = (cx // res - size // 2) * res, (cy // res - size // 2) * res
    return [x0, y0, x0 + size * res, y0 + size * res]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """`terrazzo serve` in a subprocess on 127.0.0.1, as a user would start it."""

    def __init__(
        self, catalog: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A file, not a pipe: a long session logs more than a pipe buffers, and a full pipe
        # would block the server.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            "w+", prefix="terrazzo-server-", suffix=".log"
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--catalog",
                str(catalog),
                "--port",
                str(self.port),
                *args,
            ],
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.output()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not start in 60 s")

    def output(self) -> str:
        """Everything the server printed and logged so far."""
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        return out


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1") -> Iterator[str]:
    """A real uvicorn server on `host` (any 127.0.0.0/8 address) in this process (to reach its
    engine or wrap its app with a fault injector); yields its URL."""
    port = free_port(host)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


# Query parameters that plan every item under a tile (skipcovered/exitwhenfull off): for tests
# that check each item's fate where all items share one footprint (href_catalog's).
EVERY_ITEM = {"skipcovered": "false", "exitwhenfull": "false"}


def href_catalog(good: Path, hrefs: dict[str, str], out: Path) -> Path:
    """A STAC-GeoParquet catalog at `out` of one item per (id, href): geometry and projection
    from the real COG `good`, its asset href replaced (how the access tests plant hostile
    hrefs in an otherwise honest catalog)."""
    items = []
    for n, (item_id, href) in enumerate(hrefs.items()):
        item = stac_item(
            item_id, {"visual": good}, datetime=f"2024-01-{n + 1:02d}T00:00:00Z", collection="t"
        )
        item["assets"]["visual"]["href"] = href
        items.append(item)
    ndjson = out.with_suffix(".ndjson")
    ndjson.write_text("\n".join(json.dumps(i) for i in items))
    index_items(ndjson, out)
    return out


def assert_clear_error(response: httpx.Response, status: int, needle: str) -> None:
    """A 4xx with a JSON body whose `detail` names what to fix."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert needle in response.json()["detail"]


@pytest.fixture(scope="session")
def server(demo_catalog: Path) -> Iterator[Server]:
    srv = Server(demo_catalog)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


SETUP_HINT = "run `make setup` (installs Debian's chromium and playwright into .venv)"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")  # per module: playwright's sync API and the asyncio tests
def browser() -> Iterator[Any]:
    """A real headless Chromium (Debian's, launched by playwright: no browser download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the playwright package is missing: {SETUP_HINT}")
    executable = (
        os.environ.get("TERRAZZO_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )
    if not executable:
        pytest.fail(f"Chromium is not installed: {SETUP_HINT}")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()
