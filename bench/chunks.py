"""Bulk chunk reads: Terrazzo's chunk stream against per-chunk rasterio warps, same run.

256 chunks of 512² (15 m pixels, EPSG:32632) laid along the demo strip, method first, nearest.
- terrazzo: `core.chunks.stream_chunks` (what POST /chunks runs) with N chunks in flight,
  each result framed as the server frames it.
- baseline: what a notebook does without Terrazzo (odc-stac/stackstac style): the same DuckDB
  search per chunk, then a rasterio WarpedVRT read per item, first-valid mosaic, N threads.
- both again with the COGs served over HTTP from 127.0.0.1 with a delay per request
  (bench/cogserver.py): Terrazzo's range store against GDAL's /vsicurl/ with TiTiler's settings.
Prints chunks/s, MB/s (output array bytes), CPU ms per chunk (this process tree) and the ratios.

    .venv/bin/python -m bench.chunks --catalog data/demo/items.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rasterio
import shapely
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT

from app.encoders import chunk_frame
from bench.procstats import cpu_seconds, peak_rss_mb
from bench.remote import TITILER_GDAL, cog_server, remote_catalog
from core.catalog import Catalog, SearchQuery
from core.chunks import ChunkSpec, stream_chunks
from core.engine import Engine, ReadParams
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
    pids = [os.getpid(), *engine.compute.pids()]
    cpu0, t0 = cpu_seconds(pids), time.perf_counter()
    async for result in stream_chunks(engine, specs, CRS, SearchQuery(), ReadParams()):
        chunk_frame(result)
        statuses[result.status] = statuses.get(result.status, 0) + 1
        out_bytes += 0 if result.data is None else result.data.nbytes
    await engine.fetcher.stores.aclose()  # this loop's HTTP sessions
    wall = time.perf_counter() - t0
    cpu_ms = 1000 * (cpu_seconds(pids) - cpu0) / len(specs)
    return {
        "chunks_s": len(specs) / wall,
        "mb_s": out_bytes / wall / 1e6,
        "cpu_ms": cpu_ms,
        "status": statuses,
    }


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
    cpu0, t0 = cpu_seconds([os.getpid()]), time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out_bytes = sum(pool.map(lambda s: baseline_chunk(catalog, s, asset), specs))
    wall = time.perf_counter() - t0
    cpu_ms = 1000 * (cpu_seconds([os.getpid()]) - cpu0) / len(specs)
    return {"chunks_s": len(specs) / wall, "mb_s": out_bytes / wall / 1e6, "cpu_ms": cpu_ms}


def compare(engine: Engine, specs: list[ChunkSpec], conc: int, where: str) -> None:
    """Both sides on the same chunks; one row each and the ratio."""
    asset = engine.catalog.default_assets[0]
    ours = asyncio.run(run_terrazzo(engine, specs, conc))
    base = run_baseline(engine.catalog, specs, conc, asset)
    for side, r in ((f"terrazzo {where}", ours), (f"baseline {where}", base)):
        print(f"{conc:>9} {side:>26} {r['chunks_s']:>9.1f} {r['mb_s']:>8.1f} {r['cpu_ms']:>12.1f}")
    print(
        f"{conc:>9} {'ratio ' + where:>26} {ours['chunks_s'] / base['chunks_s']:>8.2f}x"
        f"   chunk status {ours['status']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", default="data/demo/items.parquet")
    ap.add_argument("--chunks", type=int, default=256)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--res", type=float, default=15.0)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="latency per HTTP request")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    specs = chunk_specs(args.chunks, args.size, args.res)
    catalog = Path(args.catalog).resolve()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    print(f"{len(specs)} chunks of {args.size}² at {args.res} m in {CRS}")
    print(f"{'in flight':>9} {'side':>26} {'chunks/s':>9} {'MB/s':>8} {'CPU ms/chunk':>12}")
    engines = []
    try:
        local = Engine(Settings(catalog=catalog))
        engines.append(local)
        local.compute.warm()
        for conc in concurrency:
            compare(local, specs, conc, "local")
        os.environ.update(TITILER_GDAL)
        with cog_server(catalog.parent, args.delay_ms) as (url, server):
            remote_path = remote_catalog(catalog, url, Path(f"/tmp/terrazzo-remote-{server.pid}"))
            remote = Engine(Settings(catalog=remote_path, allow=url + "/"))
            engines.append(remote)
            remote.compute.warm()
            for conc in concurrency:
                compare(remote, specs, conc, f"+{args.delay_ms:g} ms HTTP")
        pids = [os.getpid(), *(p for e in engines for p in e.compute.pids())]
        print(
            f"peak RSS: this process {peak_rss_mb(pids[:1]):.0f} MB (both sides), "
            f"compute workers {peak_rss_mb(pids[1:]):.0f} MB"
        )
    finally:
        for engine in engines:
            engine.close()


if __name__ == "__main__":
    main()
