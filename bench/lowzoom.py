"""Low zooms over a big catalog: z0–z8 tiles with and without the overview pyramid, against
rio-tiler's mosaic_reader with the same item limit, side by side on this machine.

The catalog is bench/continent.py's synthetic continent (100,000 items over shared COGs in
several UTM zones); the pyramid is built with `terrazzo overviews` (its build time is printed).
Three sides get the same tiles, distinct and never requested before on that side (no server
cache serves them), at `--clients` concurrent clients:
- pyramid: `terrazzo serve --pyramid DIR` over HTTP on 127.0.0.1.
- dynamic: `terrazzo serve` without it (same settings, items_limit = TERRAZZO_MAX_ITEMS).
- rio-tiler: Terrazzo's catalog search with the same item limit, then
  `rio_tiler.mosaic.mosaic_reader` (method first) and PNG render, a thread per request
  (titiler-pgstac's shape), in this process.
It prints tiles/s, p50/p95 latency, and how many tiles were incomplete (truncated by the item
limit; rio-tiler has no such signal: its count is of tiles whose search hit the limit).

    .venv/bin/python -m bench.lowzoom --items 100000 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import morecantile
import numpy as np
import shapely

from bench.continent import EUROPE, build
from bench.load import start_server
from bench.remote import free_port
from bench.tiles import baseline_tile, summarise
from core.catalog import Catalog, SearchQuery

TMS = morecantile.tms.get("WebMercatorQuad")


def pick(bounds: tuple[float, float, float, float], zooms: range, per_zoom: int, seed: int):
    """Up to `per_zoom` distinct tiles per zoom inside `bounds`, shuffled."""
    rng = np.random.default_rng(seed)
    out = []
    for z in zooms:
        tiles = list(TMS.tiles(*bounds, zooms=[z]))
        rng.shuffle(tiles)
        out += tiles[:per_zoom]
    rng.shuffle(out)
    return out


async def run_http(url: str, tiles: list, clients: int) -> dict:
    """`clients` concurrent clients over `tiles`; latencies and incomplete counts."""
    sem = asyncio.Semaphore(clients)
    latencies: list[float] = []
    counts = {"truncated": 0, "pyramid": 0, "errors": 0}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:

        async def one(t) -> None:
            async with sem:
                started = time.perf_counter()
                r = await http.get(f"/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.png")
                latencies.append(time.perf_counter() - started)
                counts["errors"] += r.status_code >= 400
                counts["truncated"] += "x-terrazzo-truncated" in r.headers
                counts["pyramid"] += r.headers.get("x-terrazzo-source") == "pyramid"

        started = time.perf_counter()
        await asyncio.gather(*(one(t) for t in tiles))
        wall = time.perf_counter() - started
    return {**summarise(latencies, wall), **counts}


def run_rio_tiler(catalog: Path, tiles: list, clients: int, limit: int) -> dict:
    cat = Catalog(catalog, threads=1)
    latencies: list[float] = []
    truncated = 0

    def one(t) -> None:
        nonlocal truncated
        started = time.perf_counter()
        baseline_tile(cat, t, "visual", threads=os.cpu_count() or 2, limit=limit)
        latencies.append(time.perf_counter() - started)
        bounds = tuple(TMS.bounds(t))
        query = SearchQuery(bbox=bounds, intersects=shapely.box(*bounds), limit=limit)
        truncated += bool(cat.scan_sync(query).truncated)

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one, tiles))
    finally:
        cat.close()
    wall = time.perf_counter() - started
    return {**summarise(latencies, wall), "truncated": truncated, "pyramid": 0, "errors": 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/continent"))
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-zoom", type=int, default=8)
    ap.add_argument("--per-zoom", type=int, default=24, help="tiles per zoom in a run")
    ap.add_argument("--max-items", type=int, default=500, help="the item limit of all sides")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    data = args.data / f"{args.items}"
    catalog = data / "items.parquet"
    if not catalog.exists():
        started = time.perf_counter()
        build(data, items=args.items)
        print(f"catalog: {args.items} items written in {time.perf_counter() - started:.0f} s")
    pyramid = data / "pyramid"
    started = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "overviews",
            str(catalog),
            "--out",
            str(pyramid),
            "--max-zoom",
            str(args.max_zoom),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(
        f"pyramid z0-z{args.max_zoom}: built or brought up to date in "
        f"{time.perf_counter() - started:.0f} s"
    )

    zooms = range(args.max_zoom + 1)
    count = len(pick(EUROPE, zooms, args.per_zoom, seed=0))
    print(
        f"{args.items} items, z0-z{args.max_zoom}, {count} tiles per side, "
        f"{args.clients} clients, item limit {args.max_items}, {os.cpu_count()} cores"
    )
    print(
        f"{'side':>10} {'tiles/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'incomplete':>10} "
        f"{'from pyramid':>12}",
        flush=True,
    )

    def row(name: str, r: dict) -> None:
        print(
            f"{name:>10} {r['tiles_s']:>8.1f} {r['p50_ms']:>8.0f} {r['p95_ms']:>8.0f} "
            f"{r['truncated']:>10} {r['pyramid']:>12}",
            flush=True,
        )

    env = {"TERRAZZO_MAX_ITEMS": str(args.max_items), "TERRAZZO_MAX_INFLIGHT": "256"}
    sides = {}
    for n, (name, extra) in enumerate(
        (("pyramid", {"TERRAZZO_PYRAMID": str(pyramid)}), ("dynamic", {}))
    ):
        port = free_port()
        proc = start_server(str(catalog), port, {**env, **extra})
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(run_http(url, pick(EUROPE, range(9, 10), 8, seed=99), 4))  # warm-up
            tiles = pick(EUROPE, zooms, args.per_zoom, seed=n)
            sides[name] = asyncio.run(run_http(url, tiles, args.clients))
            row(name, sides[name])
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    tiles = pick(EUROPE, zooms, args.per_zoom, seed=2)
    sides["rio-tiler"] = run_rio_tiler(catalog, tiles, args.clients, args.max_items)
    row("rio-tiler", sides["rio-tiler"])
    p, d, b = sides["pyramid"], sides["dynamic"], sides["rio-tiler"]
    for other, r in (("dynamic", d), ("rio-tiler", b)):
        print(
            f"pyramid over {other}: {p['tiles_s'] / r['tiles_s']:.1f}x tiles/s, "
            f"{r['p95_ms'] / p['p95_ms']:.1f}x lower p95"
        )


if __name__ == "__main__":
    main()
