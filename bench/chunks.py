"""Bulk chunk reads: Terrazzo's chunk stream against per-chunk rasterio warps, same run.

256 chunks of 512² (15 m pixels, EPSG:32632) laid along the demo strip, method first, nearest.
- terrazzo: `core.chunks.stream_chunks` (what POST /chunks runs) with N chunks in flight,
  each result framed as the server frames it.
- baseline: what a notebook does without Terrazzo (odc-stac/stackstac style): the same DuckDB
  search per chunk, then a rasterio WarpedVRT read per item, first-valid mosaic, N threads.
- terrazzo again through a store that adds 20 ms to every range request (simulated network);
  GDAL has no such hook, so the remote baseline waits for bench work on /vsicurl/.
Prints chunks/s and MB/s (output array bytes) and the ratios.

    .venv/bin/python -m bench.chunks --catalog data/demo/items.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import rasterio
import shapely
from obstore.store import LocalStore
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from app.encoders import chunk_frame
from core.catalog import Catalog, SearchQuery
from core.chunks import ChunkSpec, stream_chunks
from core.engine import Engine, ReadParams
from core.faults import FaultyStore
from core.fetch import Fetcher, Stores
from core.plan import Grid, transformer
from core.settings import Settings

CRS = "EPSG:32632"


def chunk_specs(n: int, size: int, res: float) -> list[ChunkSpec]:
    """n chunks in 4 rows along the strip (45°N, from 5.3°E eastwards)."""
    x0, y0 = transformer("EPSG:4326", CRS).transform(5.3, 45.0)
    span = size * res
    cols = -(-n // 4)
    return [
        ChunkSpec(
            f"c{r}-{c}",
            (x0 + c * span, y0 + (r - 2) * span, x0 + (c + 1) * span, y0 + (r - 1) * span),
            size,
            size,
        )
        for r in range(4)
        for c in range(cols)
    ][:n]


async def run_terrazzo(engine: Engine, specs: list[ChunkSpec], concurrency: int) -> dict:
    engine.settings.chunk_concurrency = concurrency
    out_bytes = 0
    statuses: dict[str, int] = {}
    t0 = time.perf_counter()
    async for result in stream_chunks(engine, specs, CRS, SearchQuery(), ReadParams()):
        chunk_frame(result)
        statuses[result.status] = statuses.get(result.status, 0) + 1
        out_bytes += 0 if result.data is None else result.data.nbytes
    wall = time.perf_counter() - t0
    return {"chunks_s": len(specs) / wall, "mb_s": out_bytes / wall / 1e6, "status": statuses}


def baseline_chunk(catalog: Catalog, spec: ChunkSpec, asset: str) -> int:
    grid = Grid.from_bounds(CRS, spec.bbox, spec.width, spec.height)
    lonlat = grid.lonlat_bounds()
    items = catalog.search_sync(SearchQuery(bbox=lonlat, intersects=shapely.box(*lonlat)))
    out = None
    filled = np.zeros((spec.height, spec.width), dtype=bool)
    for item in items:
        with (
            rasterio.open(item.assets[asset]) as src,
            WarpedVRT(
                src,
                crs=CRS,
                transform=grid.transform,
                width=spec.width,
                height=spec.height,
                resampling=Resampling.nearest,
            ) as vrt,
        ):
            data = vrt.read()
            valid = vrt.dataset_mask() > 0
        if out is None:
            out = np.zeros_like(data)
        take = valid & ~filled
        out[:, take] = data[:, take]
        filled |= valid
        if filled.all():
            break
    return 0 if out is None else out.nbytes


def run_baseline(catalog: Catalog, specs: list[ChunkSpec], concurrency: int, asset: str) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out_bytes = sum(pool.map(lambda s: baseline_chunk(catalog, s, asset), specs))
    wall = time.perf_counter() - t0
    return {"chunks_s": len(specs) / wall, "mb_s": out_bytes / wall / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", default="data/demo/items.parquet")
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--res", type=float, default=15.0)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="simulated latency per request")
    args = ap.parse_args()

    specs = chunk_specs(args.chunks, args.size, args.res)
    local = Engine(Settings(catalog=args.catalog))
    local.compute.warm()
    slow_store = FaultyStore(LocalStore(), delay=args.delay_ms / 1000)
    remote = Engine(
        Settings(catalog=args.catalog), fetcher=Fetcher(stores=Stores(lambda key: slow_store))
    )
    remote.compute.warm()
    asset = local.catalog.default_assets[0]
    print(f"{len(specs)} chunks of {args.size}² at {args.res} m in {CRS}; asset {asset}")
    print(f"{'in flight':>9} {'side':>22} {'chunks/s':>9} {'MB/s':>8}")
    try:
        for conc in (int(c) for c in args.concurrency.split(",")):
            ours = asyncio.run(run_terrazzo(local, specs, conc))
            base = run_baseline(local.catalog, specs, conc, asset)
            slow = asyncio.run(run_terrazzo(remote, specs, conc))
            rows = (
                ("terrazzo local", ours),
                ("baseline local", base),
                (f"terrazzo +{args.delay_ms:g} ms/request", slow),
            )
            for side, r in rows:
                print(f"{conc:>9} {side:>22} {r['chunks_s']:>9.1f} {r['mb_s']:>8.1f}")
            print(
                f"{conc:>9} {'ratio local':>22} {ours['chunks_s'] / base['chunks_s']:>8.2f}x"
                f"   chunk status {ours['status']}; store requests so far "
                f"{slow_store.requests}"
            )
    finally:
        local.close()
        remote.close()


if __name__ == "__main__":
    main()
