"""Search latency at 1,000,000 items, and tile latency at 1M items against 10k.

Builds (once, cached beside the demo catalog) STAC-GeoParquet files of N synthetic items
spread over the world — away from the demo strip, so the demo's 37 real items stay the only
ones under demo tiles — plus those real items, Hilbert-sorted in row groups of 5,000 items as
`terrazzo index` writes them. Then times `Catalog.search_sync` for random z12-sized boxes and
`Engine.read` for demo tiles, at 10k and at 1M items.

    .venv/bin/python -m bench.search --catalog data/demo/items.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import duckdb
import morecantile
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from core.catalog import Catalog, SearchQuery
from core.engine import Engine, ReadParams
from core.indexing import spatial_keys
from core.plan import tile_grid
from core.settings import Settings

TMS = morecantile.tms.get("WebMercatorQuad")
STRIP = (4.0, 44.0, 14.0, 46.5)  # the demo's area: synthetic items stay out of it


def wkb_boxes(b: np.ndarray) -> list[bytes]:
    """WKB polygons (little-endian, 5 points) for (n, 4) boxes."""
    head = np.array([1], "u1").tobytes() + np.array([3, 1, 5], "<u4").tobytes()
    rings = np.stack([b[:, [0, 1]], b[:, [2, 1]], b[:, [2, 3]], b[:, [0, 3]], b[:, [0, 1]]], 1)
    return [head + r.astype("<f8").tobytes() for r in rings]


def build(demo: Path, n: int) -> Path:
    out = demo.parent / f"bench-{n}.parquet"
    if out.exists():
        return out
    real = (
        duckdb.connect()
        .execute(
            "SELECT id, collection, datetime, bbox, geometry::BLOB AS geometry, assets "
            "FROM read_parquet(?)",
            [str(demo)],
        )
        .to_arrow_table()
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(-180, 179.5, n * 2)
    y = rng.uniform(-80, 79.5, n * 2)
    away = ~((x > STRIP[0] - 0.6) & (x < STRIP[2]) & (y > STRIP[1] - 0.4) & (y < STRIP[3]))
    x, y = x[away][:n], y[away][:n]
    boxes = np.stack([x, y, x + 0.4, y + 0.3], 1)
    example = real.column("assets")[0].as_py()
    synthetic = pa.table(
        {
            "id": pa.array([f"synthetic-{i:07d}" for i in range(n)]),
            "collection": pa.array(["synthetic"] * n),
            "datetime": pa.array(
                np.datetime64("2020-01-01T00:00:00", "s") + rng.integers(0, 5 * 365 * 86400, n),
                pa.timestamp("us", tz="UTC"),
            ).cast(real.schema.field("datetime").type),
            "bbox": pa.StructArray.from_arrays(
                [pa.array(boxes[:, i]) for i in range(4)], names=["xmin", "ymin", "xmax", "ymax"]
            ).cast(real.schema.field("bbox").type),
            "geometry": pa.array(wkb_boxes(boxes), pa.binary()),
            "assets": pa.array([example] * n, real.schema.field("assets").type),
        },
        schema=real.schema,
    )
    table = pa.concat_tables([synthetic, real])
    bbox = table.column("bbox").combine_chunks()
    keys = spatial_keys(
        np.stack([bbox.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")], 1)
    )
    table = table.take(np.argsort(keys, kind="stable"))
    pq.write_table(table, out, row_group_size=5000, compression="zstd")
    return out


def search_ms(catalog: Catalog, boxes: list[tuple[float, ...]]) -> list[float]:
    times = []
    for box in boxes:
        started = time.perf_counter()
        catalog.search_sync(SearchQuery(bbox=box, limit=100))
        times.append(1000 * (time.perf_counter() - started))
    return times


async def tile_ms(engine: Engine, tiles: list) -> list[float]:
    times = []
    for t in tiles:
        started = time.perf_counter()
        await engine.read(tile_grid("WebMercatorQuad", t.z, t.x, t.y), SearchQuery(), ReadParams())
        times.append(1000 * (time.perf_counter() - started))
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", default="data/demo/items.parquet")
    ap.add_argument("--sizes", default="10000,1000000")
    args = ap.parse_args()
    demo = Path(args.catalog).resolve()
    rng = np.random.default_rng(1)
    world = []
    for _ in range(300):
        x, y = rng.uniform(-179, 179), rng.uniform(-79, 79)
        world.append((x, y, x + 0.09, y + 0.07))  # ~ a z12 tile
    tiles = [TMS.tile(rng.uniform(5.3, 12.7), rng.uniform(44.9, 45.15), 12) for _ in range(40)]
    print(f"{'items':>9} {'search p50':>10} {'p95':>7} {'tile p50':>9} {'p95':>7}  (ms)")
    results = {}
    for n in (int(v) for v in args.sizes.split(",")):
        started = time.perf_counter()
        path = build(demo, n)
        built = time.perf_counter() - started
        catalog = Catalog(path, threads=1, in_memory=True)  # as the service loads it
        search_ms(catalog, world[:20])  # warm the file cache
        s = sorted(search_ms(catalog, world))
        catalog.close()
        engine = Engine(Settings(catalog=path))
        engine.compute.warm()
        asyncio.run(tile_ms(engine, tiles))  # warm headers and tiles: measure the search side
        t = sorted(asyncio.run(tile_ms(engine, tiles)))
        engine.close()
        results[n] = (statistics.median(s), statistics.median(t))
        print(
            f"{n:>9} {statistics.median(s):>10.2f} {s[int(0.95 * len(s))]:>7.2f} "
            f"{statistics.median(t):>9.1f} {t[int(0.95 * len(t))]:>7.1f}"
            f"   (built in {built:.1f} s, {path.stat().st_size / 1e6:.0f} MB)"
        )
    if len(results) == 2:
        (small, big) = sorted(results)
        print(
            f"tile latency at {big} items / at {small}: "
            f"{results[big][1] / results[small][1]:.2f}x; search p50 {results[big][0]:.2f} ms"
        )


if __name__ == "__main__":
    main()
