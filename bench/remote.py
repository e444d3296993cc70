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
from pathlib import Path

import httpx

from bench.tiles import pick_tiles, run_baseline, run_terrazzo, source_items, write_catalog
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
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("cogserver.py")),
                str(catalog.parent),
                str(port),
                str(delay),
            ]
        )
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    httpx.get(url + "/_requests", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            remote = remote_catalog(catalog, url, Path(f"/tmp/terrazzo-remote-{port}"))
            engine = Engine(Settings(catalog=remote, allow=url + "/"))
            engine.compute.warm()
            print(f"\n--- store latency {delay:g} ms per request ---")
            print(f"{'clients':>7} {'side':>9} {'tiles/s':>8} {'p50 ms':>8} {'p95 ms':>8}")
            for n, conc in enumerate(int(c) for c in args.concurrency.split(",")):
                tiles = pick_tiles(engine.catalog, args.tiles, zooms, seed=10 + n)
                ours = asyncio.run(run_terrazzo(engine, tiles, conc, "visual"))
                base = run_baseline(engine.catalog, tiles, conc, "visual", threads=os.cpu_count())
                for side, r in (("terrazzo", ours), ("baseline", base)):
                    print(
                        f"{conc:>7} {side:>9} {r['tiles_s']:>8.1f} {r['p50_ms']:>8.1f} "
                        f"{r['p95_ms']:>8.1f}"
                    )
                print(f"{conc:>7} {'ratio':>9} {ours['tiles_s'] / base['tiles_s']:>7.2f}x")
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
        finally:
            server.terminate()
            server.wait(timeout=10)


if __name__ == "__main__":
    main()
