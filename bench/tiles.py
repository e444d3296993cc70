"""Tile throughput: Terrazzo's engine against rio-tiler's mosaic reader, same items, same run.

Both sides get the same tiles, the same DuckDB search (Terrazzo's catalog), method `first`,
nearest resampling, 256² PNG output, and run in this process tree:
- terrazzo: `Engine.read` (search threads → async fetch → process-pool warp/mosaic) + encode.
- baseline: titiler-pgstac's shape: a thread per request (as a sync FastAPI endpoint runs), the
  same search, then `rio_tiler.mosaic.mosaic_reader` with one rasterio Reader per asset and
  `threads` reader threads, then rio-tiler's render.
It prints tiles/s, p50/p95 latency, CPU per tile, the CPU bound and the peak RSS while each
side ran (Terrazzo: this process and its compute workers; the baseline: this process, which
also holds Terrazzo's caches) at each concurrency, and Terrazzo/baseline as ratios.

    .venv/bin/python -m bench.tiles --catalog data/demo/items.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import morecantile
import numpy as np
import shapely

from app.encoders import encode, plain_png
from bench.procstats import cpu_seconds, peak_rss_mb, reset_peak
from core.catalog import Catalog, SearchQuery
from core.engine import Engine, ReadParams
from core.indexing import index_items
from core.plan import tile_grid
from core.settings import Settings

TMS = morecantile.tms.get("WebMercatorQuad")


def pick_tiles(catalog: Catalog, n: int, zooms: tuple[int, ...], seed: int = 0) -> list:
    """n tiles inside the catalog's extent, distinct while there are enough (cold for both
    sides); at low zooms a small area has few tiles, and then they repeat."""
    minx, miny, maxx, maxy = catalog.summary()["bbox"]
    rng = np.random.default_rng(seed)
    seen: set = set()
    out: list = []
    for _ in range(100 * n):
        if len(out) == n:
            break
        z = int(rng.choice(zooms))
        t = TMS.tile(rng.uniform(minx, maxx), rng.uniform(miny, maxy), z)
        if t not in seen:
            seen.add(t)
            out.append(t)
    return [out[i % len(out)] for i in range(n)]


def source_items(catalog: Path) -> list[dict]:
    """The STAC items a demo catalog was indexed from (its items.ndjson)."""
    text = (catalog.parent / "items.ndjson").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_catalog(items: list[dict], out: Path) -> Path:
    """Index `items` into `out` with `terrazzo index`'s code (NDJSON written beside it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    source = out.with_suffix(".ndjson")
    source.write_text("\n".join(json.dumps(i) for i in items))
    index_items(source, out)
    return out


def dense_catalog(catalog: Path, copies: int) -> Path:
    """The catalog with every item repeated `copies` times at other dates (same COGs): low
    zooms then cover 50+ items, as over a real archive."""
    out = catalog.parent / f"dense-{copies}.parquet"
    if out.exists():
        return out
    dense = []
    for k in range(copies):
        for item in source_items(catalog):
            item["id"] = f"{item['id']}-copy{k}"
            item["properties"]["datetime"] = f"{2020 + k % 5}-0{1 + k % 9}-15T10:00:00Z"
            dense.append(item)
    return write_catalog(dense, out)


def summarise(
    latencies: list[float], wall: float, cpu: float = 0.0, peak_mb: float = 0.0
) -> dict[str, float]:
    """Throughput, latency, CPU seconds per tile, the CPU bound (cores / CPU per tile) and
    the peak RSS of the processes during the run."""
    lat = sorted(latencies)
    per_tile = cpu / len(lat) if lat else 0.0
    bound = (os.cpu_count() or 1) / per_tile if per_tile else float("inf")
    return {
        "tiles_s": len(lat) / wall,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))],
        "cpu_ms": 1000 * per_tile,
        "bound": bound,
        "peak_mb": peak_mb,
    }


HEADER = (
    f"{'clients':>7} {'side':>9} {'tiles/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
    f"{'CPU ms/tile':>11} {'CPU bound':>9} {'of bound':>8} {'peak MB':>8}"
)


def print_pair(conc: int, ours: dict, base: dict) -> None:
    """Both sides' rows under HEADER, then the ratios (>1 = Terrazzo better)."""
    for side, r in (("terrazzo", ours), ("baseline", base)):
        print(
            f"{conc:>7} {side:>9} {r['tiles_s']:>8.1f} {r['p50_ms']:>8.1f} "
            f"{r['p95_ms']:>8.1f} {r['cpu_ms']:>11.1f} {r['bound']:>9.1f} "
            f"{r['tiles_s'] / r['bound']:>8.0%} {r['peak_mb']:>8.0f}"
        )
    print(
        f"{conc:>7} {'ratio':>9} {ours['tiles_s'] / base['tiles_s']:>7.2f}x "
        f"{base['p50_ms'] / ours['p50_ms']:>7.2f}x {base['p95_ms'] / ours['p95_ms']:>7.2f}x"
        "   (terrazzo over baseline; >1 = terrazzo better)"
    )


async def run_terrazzo(engine: Engine, tiles: list, concurrency: int, asset: str) -> dict:
    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    params = ReadParams(assets=(asset,))

    async def one(t) -> None:
        async with sem:
            t0 = time.perf_counter()
            grid = tile_grid("WebMercatorQuad", t.z, t.x, t.y)
            mosaic = await engine.read(grid, SearchQuery(), params)
            if mosaic is not None:  # as app/tiles.py: a plain PNG in a thread
                if plain_png(mosaic.data, "png", {}):
                    await asyncio.to_thread(encode, mosaic.data, mosaic.valid, "png")
                else:
                    await engine.compute.run(encode, mosaic.data, mosaic.valid, "png")
            latencies.append(time.perf_counter() - t0)

    pids = [os.getpid(), *engine.compute.pids()]
    reset_peak(pids)
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    await asyncio.gather(*(one(t) for t in tiles))
    await engine.fetcher.stores.aclose()  # this loop's HTTP sessions
    wall = time.perf_counter() - t0
    return summarise(latencies, wall, cpu_seconds(pids) - cpu0, peak_rss_mb(pids))


def baseline_tile(catalog: Catalog, t, asset: str, threads: int, limit: int | None = None) -> None:
    from rio_tiler.errors import EmptyMosaicError, TileOutsideBounds
    from rio_tiler.io import Reader
    from rio_tiler.mosaic import mosaic_reader
    from rio_tiler.mosaic.methods import FirstMethod
    from rio_tiler.utils import render

    bounds = tile_grid("WebMercatorQuad", t.z, t.x, t.y).lonlat_bounds()
    query = SearchQuery(bbox=bounds, intersects=shapely.box(*bounds), limit=limit)
    hrefs = [i.assets[asset] for i in catalog.search_sync(query)]

    def read(href: str, x: int, y: int, z: int, **kwargs):
        with Reader(href) as src:
            return src.tile(x, y, z, **kwargs)

    try:
        img, _ = mosaic_reader(
            hrefs,
            read,
            t.x,
            t.y,
            t.z,
            pixel_selection=FirstMethod(),
            threads=threads,
            allowed_exceptions=(TileOutsideBounds,),
        )
    except EmptyMosaicError:
        return
    render(img.data, img.mask, img_format="PNG")


def run_baseline(catalog: Catalog, tiles: list, concurrency: int, asset: str, threads: int) -> dict:
    latencies: list[float] = []

    def one(t) -> None:
        t0 = time.perf_counter()
        baseline_tile(catalog, t, asset, threads)
        latencies.append(time.perf_counter() - t0)

    reset_peak([os.getpid()])
    cpu0, t0 = cpu_seconds([os.getpid()]), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, tiles))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds([os.getpid()]) - cpu0
    return summarise(latencies, wall, cpu, peak_rss_mb([os.getpid()]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", default="data/demo/items.parquet")
    ap.add_argument("--tiles", type=int, default=96, help="tiles per run")
    ap.add_argument("--zooms", default="9,10,11,12")
    ap.add_argument("--asset", default="visual")
    ap.add_argument(
        "--dense",
        type=int,
        default=0,
        help="repeat every item this many times at other dates (low-zoom workload)",
    )
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 2,
        help="baseline mosaic_reader threads (titiler-pgstac's MOSAIC_CONCURRENCY)",
    )
    args = ap.parse_args()

    warnings.filterwarnings("ignore", message=".*no Overviews.*")
    warnings.filterwarnings("ignore", message=".*no geotransform.*")
    zooms = tuple(int(z) for z in args.zooms.split(","))
    if args.dense:
        args.catalog = str(dense_catalog(Path(args.catalog), args.dense))
    engine = Engine(Settings(catalog=args.catalog))
    engine.compute.warm()
    os.environ.setdefault("GDAL_CACHEMAX", "200")
    os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")
    print(
        f"catalog {args.catalog}: {engine.catalog.summary()['items']} items; "
        f"{args.tiles} tiles per run at zooms {zooms}; {os.cpu_count()} cores"
    )
    print(HEADER)
    try:
        for n, conc in enumerate(int(c) for c in args.concurrency.split(",")):
            tiles = pick_tiles(engine.catalog, args.tiles, zooms, seed=n)
            warm = pick_tiles(engine.catalog, 8, zooms, seed=100 + n)
            asyncio.run(run_terrazzo(engine, warm, conc, args.asset))  # headers of other tiles
            ours = asyncio.run(run_terrazzo(engine, tiles, conc, args.asset))
            base = run_baseline(engine.catalog, tiles, conc, args.asset, args.threads)
            print_pair(conc, ours, base)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
