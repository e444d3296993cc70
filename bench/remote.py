"""Tiles over a slow network: Terrazzo's HTTP range store against GDAL's /vsicurl/, same run.

The demo COGs are served over HTTP from 127.0.0.1 by bench/cogserver.py with a fixed delay per
request (default 20 and 100 ms). A copy of the catalog points at them. Then, as bench/tiles.py:
- terrazzo: `Engine.read` + PNG (no-redirect HTTP range store, header cache, coalesced reads).
- baseline: rio-tiler's mosaic_reader over /vsicurl/ with TiTiler's recommended GDAL settings,
  a thread per request (titiler-pgstac's shape), the same DuckDB search.
Prints tiles/s, p50/p95 and ratios at 1 and 16 clients, and store requests per warm tile.

    .venv/bin/python -m bench.remote --catalog data/demo/items.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

from bench.procstats import children, cpu_seconds
from bench.tiles import (
    HEADER,
    pick_tiles,
    print_pair,
    run_baseline,
    run_terrazzo,
    source_items,
    write_catalog,
)
from core.engine import Engine
from core.fetch import TileCache
from core.settings import Settings

TITILER_GDAL = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
    "GDAL_HTTP_MULTIPLEX": "YES",
    "VSI_CACHE": "TRUE",
    "VSI_CACHE_SIZE": "5000000",
    "GDAL_CACHEMAX": "200",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff",
    "GDAL_BAND_BLOCK_CACHE": "HASHSET",
    "PROJ_NETWORK": "OFF",
}


def remote_catalog(catalog: Path, base_url: str, out: Path) -> Path:
    """The catalog with every asset href rewritten to the HTTP server."""
    items = source_items(catalog)
    for item in items:
        for asset in item["assets"].values():
            asset["href"] = f"{base_url}/{asset['href']}"
    return write_catalog(items, out / "items.parquet")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def cog_server(directory: Path, delay_ms: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """bench/cogserver.py serving `directory` on a free port: (base URL, process)."""
    port = free_port()
    script = Path(__file__).with_name("cogserver.py")
    server = subprocess.Popen(
        [sys.executable, str(script), str(directory), str(port), str(delay_ms)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(url + "/_requests", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=10)


@contextmanager
def server(cmd: list[str], env: dict[str, str], ready: str, log: Path) -> Iterator[tuple]:
    """A server on a free port ({port} in cmd), up when `ready` answers 200: (url, process)."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    out = log.open("w")
    proc = subprocess.Popen(
        [c.format(port=port) for c in cmd],
        env={**os.environ, **env},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
            with suppress(httpx.HTTPError):
                if httpx.get(url + ready, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd[0]} not ready in 120 s; see {log}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def run_both(engine: Engine, served_by: list[int], label: str, tiles: list, conc: int) -> None:
    """Run both sides on `tiles`; print rows, ratios and the range server's CPU."""
    s0 = cpu_seconds(served_by)
    ours = asyncio.run(run_terrazzo(engine, tiles, conc, "visual"))
    s1 = cpu_seconds(served_by)
    base = run_baseline(engine.catalog, tiles, conc, "visual", threads=os.cpu_count())
    s2 = cpu_seconds(served_by)
    print(label)
    print_pair(conc, ours, base)
    # The range server shares these cores: its CPU lowers what the machine can reach.
    for side, r, spent in (("terrazzo", ours, s1 - s0), ("baseline", base, s2 - s1)):
        server_ms = 1000 * spent / len(tiles)
        bound = (os.cpu_count() or 1) * 1000 / (r["cpu_ms"] + server_ms)
        print(
            f"{'':>7} {side:>9} range server {server_ms:.1f} CPU ms/tile; "
            f"bound with it {bound:.1f} tiles/s ({r['tiles_s'] / bound:.0%})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", default="data/demo/items.parquet")
    ap.add_argument("--delays", default="20,100", help="ms per request")
    ap.add_argument("--tiles", type=int, default=48)
    ap.add_argument("--zooms", default="10,11,12")
    ap.add_argument("--concurrency", default="1,16")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.update(TITILER_GDAL)
    catalog = Path(args.catalog).resolve()
    zooms = tuple(int(z) for z in args.zooms.split(","))
    for delay in (float(d) for d in args.delays.split(",")):
        with cog_server(catalog.parent, delay) as (url, server):
            remote = remote_catalog(catalog, url, Path(f"/tmp/terrazzo-remote-{server.pid}"))
            engine = Engine(Settings(catalog=remote, allow=url + "/"))
            engine.compute.warm()
            print(f"\n--- store latency {delay:g} ms per request ---")
            print(HEADER + "   (CPU: this process tree, not the range server)")
            served_by = children(server.pid)

            conc_list = [int(c) for c in args.concurrency.split(",")]
            # First contact: no header is cached on either side.
            run_both(
                engine,
                served_by,
                "cold start (no header cached)",
                pick_tiles(engine.catalog, args.tiles, zooms, seed=9),
                max(conc_list),
            )
            # Steady state, as a server that has run a while: both sides warmed on other tiles at
            # a lower zoom (Terrazzo's header cache; GDAL's /vsicurl/ block cache holds the
            # headers too), the measured tiles' full-resolution pixels still cold.
            warm = pick_tiles(engine.catalog, args.tiles, (min(zooms) - 1,), seed=50)
            asyncio.run(run_terrazzo(engine, warm, max(conc_list), "visual"))
            run_baseline(engine.catalog, warm, max(conc_list), "visual", threads=os.cpu_count())
            for n, conc in enumerate(conc_list):
                tiles = pick_tiles(engine.catalog, args.tiles, zooms, seed=10 + n)
                label = "steady state (headers cached, pixels cold)"
                run_both(engine, served_by, label, tiles, conc)
            # warm single tile: headers cached, decoded tiles not: store requests and time
            tile = pick_tiles(engine.catalog, 1, (12,), seed=99)
            asyncio.run(run_terrazzo(engine, tile, 1, "visual"))  # opens the headers
            engine.fetcher.tiles = TileCache(engine.fetcher.tiles.max_bytes)  # pixels cold
            before = httpx.get(url + "/_requests").json()["requests"]
            started = time.perf_counter()
            asyncio.run(run_terrazzo(engine, tile, 1, "visual"))
            took = time.perf_counter() - started
            after = httpx.get(url + "/_requests").json()["requests"]
            print(
                f"warm tile (headers cached, pixels not): {after - before} store requests, "
                f"{took * 1000:.0f} ms = {took * 1000 / delay:.1f} x {delay:g} ms"
            )
            engine.close()


if __name__ == "__main__":
    main()
