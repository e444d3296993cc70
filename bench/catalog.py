"""Catalog scale: start-up time, server RSS, search and tile latency at 10k .. 10M items.

For each size it writes (once, cached under OUT/<n>/items.parquet) a synthetic
STAC-GeoParquet catalog shaped like a real Sentinel-2 L2A archive, then starts a fresh
`terrazzo serve` for it in each mode — in memory (TERRAZZO_CATALOG_IN_MEMORY=true) and not
(false; started twice: "first" with an empty TERRAZZO_CATALOG_CACHE, "second" with the cache
the first start left) — and measures:

- startup_s: spawn to the first 200 of GET /readyz (polled every 50 ms, at most --timeout s);
- rss_mb: summed VmRSS of the server's process tree (server and compute workers), the larger
  of after start-up and after the requests (rss_ready and peak = summed VmHWM are shown too);
- search p50/p95: 200 sequential GET /items?bbox=...&limit=20 for random z8..z12
  WebMercatorQuad tiles over land (after 10 warm-up searches). /items also counts every
  match (numberMatched), so the catalog's own search is timed as well, in a separate process:
  `Catalog.search_sync(SearchQuery(bbox, intersects, limit=20, assets=visual))`
  (sync_p50/p95: as the engine asks) and `Catalog.footprints`
  (what /items runs: the page and the count; fp_p50), with that process's open/load time;
- tile_p50: 30 GET /tiles/{z}/{x}/{y}.png?assets=visual at z10..13 over the real spot (see
  below), each tile once, after 10 warm-up tiles (other tiles, also over the spot): the
  service caches decoded COG tiles, so a tile asked twice would not search or read again.

One row is printed per (size, mode, start) as soon as it is done, then the tile latency at the
largest size over that at 10k, and each of the issue's targets, met or not. Each server's
output is kept, time-stamped from spawn, in OUT/logs/ (the lines it prints at start-up show
where start-up goes: settings = imports and check_catalog; access report = the engine built,
catalog loaded and href directories grouped; catalog report = the content checks).

    .venv/bin/python -m bench.catalog --sizes 10000,200000,1000000 --modes memory,disk
    terrazzo bench catalog -- --sizes 10000,200000,1000000,10000000

The catalogs. A seed of 2,000 synthetic items plus the 20 real ones (pystac-shaped dicts:
projection/eo/raster extensions, `proj:code` of the UTM zone, 8 assets B02 B03 B04 B08 B11 B12
SCL visual, each a cloud-optimized GeoTIFF with `raster:bands`) goes through stac-geoparquet's
own writer (`parse_stac_items_to_arrow` + `to_parquet`) once (OUT/seed/items.parquet). Each
size is that Arrow table replicated in batches of 131,072 rows with pyarrow.compute — new ids,
datetimes, bbox, WKB geometry, `proj:code`, and every asset href rewritten so each scene has
its own folder, `s3://bench-bucket/sentinel-2/<zone>/<yyyy>/<mm>/<scene-id>/B02.tif` —
streamed with pyarrow.parquet.ParquetWriter under the writer's schema and metadata, in row
groups of 65,536 rows: the writer's default (`parse_stac_items_to_arrow` yields record
batches of chunk_size=65,536 items and `to_parquet` writes one row group per batch), and its
default compression (snappy). Scenes are ~1 degree of latitude tall and 1/cos(lat) wide (a
Sentinel-2 tile, ~110 km), their centres uniform over a few rough land boxes between -60 and
70 degrees latitude, their datetimes over 2017..2025 in file order (as an archive exported in
time order: row-group statistics prune on time, never on space).

The real spot. Every size holds the same 20 real items at one place (SPOT, 0.5 degree in the
Po valley) whose assets are real local COGs (OUT/cogs/, 4 scenes of ~370x510 pixels in UTM
32N with overviews, GDAL's COG driver, referenced as relative ../cogs/... hrefs and allowed
with TERRAZZO_ALLOW), and no synthetic item comes near it. So a tile over the spot reads the
same pixels at every size and its latency differs only by what the catalog costs; the s3
hrefs of all other items are never read.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import morecantile
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench import procstats

ROOT = Path(__file__).resolve().parents[1]
TMS = morecantile.tms.get("WebMercatorQuad")
VERSION = 3  # of the generated catalogs: a cached one of another version is written again
SEED_ITEMS = 2000
ROW_GROUP = 65_536  # stac_geoparquet.arrow.parse_stac_items_to_arrow's chunk_size default
BATCH = 2 * ROW_GROUP  # rows generated and written at once (memory stays bounded)
COLLECTION = "sentinel-2-l2a"
BANDS = ("B02", "B03", "B04", "B08", "B11", "B12", "SCL", "visual")
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
EXTENSIONS = [
    "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
]
SPOT = (10.0, 45.0, 10.5, 45.5)  # the real items' area (lon/lat)


def _keep_out(margin: float = 0.1) -> tuple[float, float, float, float]:
    """The z10 tiles over SPOT (the largest tiles measured) and `margin` degrees around."""
    b = [TMS.bounds(t) for t in TMS.tiles(*SPOT, zooms=[10])]
    return (
        min(t.left for t in b) - margin,
        min(t.bottom for t in b) - margin,
        max(t.right for t in b) + margin,
        max(t.top for t in b) + margin,
    )


KEEP_OUT = _keep_out()  # no synthetic item's bbox touches this: spot tiles read real items only
SPOT_RES = 55.0  # metres: 0.25 degree scenes of ~370x510 pixels
# rough land boxes (west, south, east, north), lat -60..70: scene centres and search boxes
LAND = (
    (-125.0, 25.0, -65.0, 55.0),  # North America
    (-165.0, 55.0, -60.0, 68.0),  # Alaska, Canada
    (-105.0, 10.0, -80.0, 25.0),  # Central America
    (-80.0, -55.0, -35.0, 10.0),  # South America
    (-10.0, 36.0, 40.0, 68.0),  # Europe
    (-17.0, -35.0, 50.0, 36.0),  # Africa
    (40.0, 10.0, 145.0, 68.0),  # Asia
    (95.0, -10.0, 150.0, 10.0),  # South-East Asia
    (113.0, -39.0, 154.0, -11.0),  # Australia
)
T0, T1 = np.datetime64("2017-01-01", "s"), np.datetime64("2026-01-01", "s")
TARGETS = {  # items: (start-up s, RSS MB, search p50 ms) at most; None: no target
    10_000_000: (30.0, 2048.0, 10.0),
    1_000_000: (5.0, 1024.0, None),
    200_000: (3.0, None, None),
}
TILE_RATIO = 1.3


# -- the catalogs ------------------------------------------------------------------------------


def band_meta(name: str) -> list[dict]:
    if name == "visual":
        return [{"data_type": "uint8", "nodata": 0, "spatial_resolution": 10.0}] * 3
    if name == "SCL":
        return [{"data_type": "uint8", "nodata": 0, "spatial_resolution": 20.0}]
    res = 10.0 if name in ("B02", "B03", "B04", "B08") else 20.0
    return [
        {
            "data_type": "uint16",
            "nodata": 0,
            "spatial_resolution": res,
            "scale": 0.0001,
            "offset": -0.1,
        }
    ]


def stac_item(
    item_id: str,
    box: tuple[float, float, float, float],
    when: str,
    folder: str,
    *,
    epsg: int,
    cloud: float,
    platform: str,
) -> dict:
    """One pystac-shaped Sentinel-2 L2A item whose 8 assets are `folder`/<band>.tif."""
    west, south, east, north = box
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": EXTENSIONS,
        "id": item_id,
        "collection": COLLECTION,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [west, south, east, north],
        "properties": {
            "datetime": when,
            "platform": platform,
            "constellation": "sentinel-2",
            "eo:cloud_cover": cloud,
            "proj:code": f"EPSG:{epsg}",
        },
        "links": [
            {
                "rel": "collection",
                "href": f"s3://bench-bucket/sentinel-2/{COLLECTION}.json",
                "type": "application/json",
            }
        ],
        "assets": {
            name: {
                "href": f"{folder}/{name}.tif",
                "type": COG_TYPE,
                "roles": ["data"],
                "raster:bands": band_meta(name),
            }
            for name in BANDS
        },
    }


def land_points(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = np.array(LAND)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    which = rng.choice(len(boxes), size=n, p=area / area.sum())
    b = boxes[which]
    return rng.uniform(b[:, 0], b[:, 2]), rng.uniform(b[:, 1], b[:, 3])


def scene_boxes(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 4) Sentinel-2-tile-sized boxes over land, none touching KEEP_OUT."""
    out = np.empty((0, 4))
    while len(out) < n:
        x, y = land_points(rng, int(1.1 * (n - len(out))) + 16)
        h = rng.uniform(0.9, 1.0, len(x))
        w = np.minimum(h / np.cos(np.radians(y)), 3.0)
        b = np.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], 1)
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], -180.0, 180.0)
        near = (
            (b[:, 0] <= KEEP_OUT[2])
            & (b[:, 2] >= KEEP_OUT[0])
            & (b[:, 1] <= KEEP_OUT[3])
            & (b[:, 3] >= KEEP_OUT[1])
        )
        out = np.concatenate([out, b[~near]])
    return out[:n]


def utm_zone(lon: np.ndarray) -> np.ndarray:
    return np.clip(np.floor((lon + 180) / 6).astype(int) + 1, 1, 60)


def spot_scenes() -> list[tuple[str, tuple[float, float, float, float]]]:
    """The real spot's 4 scenes: (name, lon/lat box), 2x2 over SPOT."""
    w, s, e, n = SPOT
    dx, dy = (e - w) / 2, (n - s) / 2
    return [
        (f"spot-{i}{j}", (w + i * dx, s + j * dy, w + (i + 1) * dx, s + (j + 1) * dy))
        for i in range(2)
        for j in range(2)
    ]


def write_spot_cogs(cogs: Path) -> None:
    """OUT/cogs/<scene>/<band>.tif for the real spot: visual by bench.continent.write_cog
    (RGB uint8, UTM, overviews), the other bands one of its channels (uint16 x40, SCL uint8)."""
    import rasterio

    from bench.continent import write_cog

    for name, box in spot_scenes():
        folder = cogs / name
        if (folder / "done").exists():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        write_cog(folder / "visual.tif", box, SPOT_RES)
        with rasterio.open(folder / "visual.tif") as src:
            rgb = src.read()
            base = {
                "driver": "COG",
                "width": src.width,
                "height": src.height,
                "count": 1,
                "crs": src.crs,
                "transform": src.transform,
                "nodata": 0,
                "compress": "deflate",
                "blocksize": 256,
                "overview_resampling": "nearest",
            }
        for k, band in enumerate(BANDS[:-1]):
            channel = rgb[k % 3]
            if band == "SCL":
                data = np.where(channel > 0, 4, 0).astype("uint8")  # 4: vegetation
            else:
                data = channel.astype("uint16") * 40
            with rasterio.open(folder / f"{band}.tif", "w", dtype=data.dtype, **base) as dst:
                dst.write(data, 1)
        (folder / "done").write_text("")


def seed_items() -> list[dict]:
    """SEED_ITEMS synthetic items (s3 hrefs, one folder per scene) and the 20 real ones
    (relative hrefs to OUT/cogs, as seen from OUT/<n>/items.parquet)."""
    rng = np.random.default_rng(7)
    boxes = scene_boxes(rng, SEED_ITEMS)
    seconds = rng.integers(0, int((T1 - T0).astype(int)), SEED_ITEMS)
    items = []
    for k, b in enumerate(boxes):
        when = (T0 + seconds[k]).astype("datetime64[s]").item()
        cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
        zone = int(utm_zone(np.array([cx]))[0])
        scene = f"S2_MSIL2A_{when:%Y%m%dT%H%M%S}_T{zone:02d}_seed{k:05d}"
        items.append(
            stac_item(
                scene,
                tuple(float(v) for v in b),
                f"{when:%Y-%m-%dT%H:%M:%S}Z",
                f"s3://bench-bucket/sentinel-2/{zone:02d}/{when:%Y}/{when:%m}/{scene}",
                epsg=(32600 if cy >= 0 else 32700) + zone,
                cloud=round(float(rng.uniform(0, 100)), 2),
                platform=str(rng.choice(["sentinel-2a", "sentinel-2b"])),
            )
        )
    for j, (name, (w, s, e, n)) in enumerate(spot_scenes()):
        for k in range(5):  # 5 items per real scene: insets of its box, distinct dates
            fx, fy = rng.uniform(0.0, 0.3, 2) * [(e - w), (n - s)]
            box = (w + fx / 2, s + fy / 2, e - fx / 2, n - fy / 2)
            day = 1 + 5 * j + k  # 2024-01-02 .. 2024-01-21
            items.append(
                stac_item(
                    f"bench-spot-{5 * j + k:02d}",
                    box,
                    f"2024-01-{1 + day:02d}T10:20:00Z",
                    f"../cogs/{name}",
                    epsg=32632,
                    cloud=5.0,
                    platform="sentinel-2a",
                )
            )
    return items


def write_seed(out: Path) -> Path:
    """The seed and real items through stac-geoparquet's writer (cached)."""
    import stac_geoparquet.arrow as sga

    path = out / "seed" / "items.parquet"
    stamp = out / "seed" / "version"
    if path.exists() and stamp.exists() and stamp.read_text() == str(VERSION):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    sga.to_parquet(sga.parse_stac_items_to_arrow(seed_items()), path)
    stamp.write_text(str(VERSION))
    return path


def _join(*parts: object) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def synthetic_batch(
    seed: pa.Table, start: int, k: int, span: tuple[int, int], rng: np.random.Generator
) -> pa.Table:
    """Rows start..start+k: the seed's rows in turn with new ids, datetimes (sorted, within
    `span` seconds from T0), boxes, geometries, proj:code and per-scene asset hrefs."""
    from bench.search import wkb_boxes

    t = seed.take(np.arange(start, start + k) % seed.num_rows)
    schema = seed.schema
    boxes = scene_boxes(rng, k)
    seconds = np.sort(rng.integers(span[0], span[1], k)) + int(T0.astype(int))
    when = pa.array(seconds * 1_000_000, pa.timestamp("us", tz="UTC"))
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    zone = utm_zone(cx)
    zone_s = pc.utf8_lpad(pa.array(zone).cast(pa.string()), 2, "0")
    number = pc.utf8_lpad(pa.array(np.arange(start, start + k)).cast(pa.string()), 9, "0")
    whole = when.cast(pa.timestamp("s", tz="UTC"))  # strftime's %S has no fraction then
    ids = _join("S2_MSIL2A_", pc.strftime(whole, "%Y%m%dT%H%M%S"), "_T", zone_s, "_", number)
    folder = _join(
        "s3://bench-bucket/sentinel-2/",
        zone_s,
        "/",
        pc.strftime(whole, "%Y"),
        "/",
        pc.strftime(whole, "%m"),
        "/",
        ids,
        "/",
    )
    epsg = np.where(cy >= 0, 32600, 32700) + zone
    assets = t.column("assets").combine_chunks()
    rebuilt = []
    for field, child in zip(assets.type, assets.flatten(), strict=True):
        parts = child.flatten()
        names = [f.name for f in child.type]
        parts[names.index("href")] = _join(folder, f"{field.name}.tif")
        rebuilt.append(pa.StructArray.from_arrays(parts, fields=list(child.type)))
    new = {
        "id": ids,
        "datetime": when.cast(schema.field("datetime").type),
        "bbox": pa.StructArray.from_arrays(
            [pa.array(boxes[:, i]) for i in range(4)], fields=list(schema.field("bbox").type)
        ),
        "geometry": pa.array(wkb_boxes(boxes), schema.field("geometry").type),
        "proj:code": _join("EPSG:", pa.array(epsg).cast(pa.string())),
        "assets": pa.StructArray.from_arrays(rebuilt, fields=list(assets.type)),
    }
    for name, column in new.items():
        i = schema.get_field_index(name)
        t = t.set_column(i, schema.field(name), column)
    return t


def write_catalog(out: Path, n: int) -> tuple[Path, float, bool]:
    """OUT/<n>/items.parquet: n items (n-20 synthetic, then the 20 real ones); returns (path,
    seconds its writing took, whether it was written now)."""
    path = out / str(n) / "items.parquet"
    meta = out / str(n) / "meta.json"
    if path.exists() and meta.exists():
        info = json.loads(meta.read_text())
        if info.get("version") == VERSION and info.get("items") == n:
            return path, float(info["write_s"]), False
    write_spot_cogs(out / "cogs")
    started = time.perf_counter()
    seed_path = write_seed(out)
    table = pq.read_table(seed_path)
    schema = pq.read_schema(seed_path)  # the writer's schema and geo/stac-geoparquet metadata
    metadata = {k: v for k, v in (schema.metadata or {}).items() if k != b"ARROW:schema"}
    schema = schema.with_metadata(metadata)
    real = pc.starts_with(table.column("id"), "bench-spot-")
    spot, seed = table.filter(real), table.filter(pc.invert(real))
    synthetic = n - spot.num_rows
    if synthetic < 0:
        raise SystemExit(f"--sizes: at least {spot.num_rows} items (the real spot's)")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    rng = np.random.default_rng(n)
    total_s = int((T1 - T0).astype(int))
    done, last = 0, time.perf_counter()
    with pq.ParquetWriter(partial, schema) as writer:
        while done < synthetic:
            k = min(BATCH, synthetic - done)
            span = (done * total_s // synthetic, (done + k) * total_s // synthetic)
            batch = synthetic_batch(seed, done, k, span, rng)
            writer.write_table(batch.cast(schema), row_group_size=ROW_GROUP)
            done += k
            if time.perf_counter() - last > 5 or done == synthetic:
                last = time.perf_counter()
                print(
                    f"  writing {n:,} items: {done:,} rows, {last - started:.1f} s",
                    flush=True,
                )
        writer.write_table(spot.cast(schema), row_group_size=ROW_GROUP)
    partial.rename(path)
    seconds = time.perf_counter() - started
    meta.write_text(json.dumps({"version": VERSION, "items": n, "write_s": seconds}))
    return path, seconds, True


# -- what is measured --------------------------------------------------------------------------


def search_boxes(count: int, seed: int = 11) -> list[tuple[float, float, float, float]]:
    """Random z8..z12 WebMercatorQuad tiles over land, as lon/lat boxes."""
    rng = np.random.default_rng(seed)
    lon, lat = land_points(rng, count)
    zooms = rng.integers(8, 13, count)
    out = []
    for x, y, z in zip(lon, lat, zooms, strict=True):
        b = TMS.bounds(TMS.tile(float(x), float(y), int(z)))
        out.append((b.left, b.bottom, b.right, b.top))
    return out


def spot_tiles() -> tuple[list, list]:
    """(warm-up tiles, measured tiles) over the real spot, z10..13, all distinct."""
    rng = np.random.default_rng(3)
    per_zoom = {}
    for z in range(10, 14):
        tiles = list(TMS.tiles(*SPOT, zooms=[z]))
        per_zoom[z] = [tiles[i] for i in rng.permutation(len(tiles))]
    measured = per_zoom[10][:2] + per_zoom[11][:6] + per_zoom[12][:10] + per_zoom[13][:12]
    warm = per_zoom[11][6:8] + per_zoom[12][10:14] + per_zoom[13][12:16]
    return warm, measured


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`terrazzo serve` in a subprocess, its output kept with times from spawn."""

    def __init__(self, catalog: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        terrazzo = Path(sys.executable).parent / "terrazzo"
        command = [str(terrazzo)] if terrazzo.exists() else [sys.executable, "-m", "app.cli"]
        command += ["serve", "--catalog", str(catalog), "--host", "127.0.0.1"]
        command += ["--port", str(self.port)]
        self.lines: list[tuple[float, str, str]] = []
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            command,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        self.pids: set[int] = {self.proc.pid}
        self.readers = [
            threading.Thread(target=self._read, args=(stream, name), daemon=True)
            for stream, name in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self.lines.append((time.perf_counter() - self.started, name, line.rstrip("\n")))

    def tree(self) -> list[int]:
        pids = procstats.children(self.proc.pid)
        self.pids.update(pids)
        return pids

    def stop(self) -> None:
        self.tree()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        import psutil

        for pid in self.pids - {self.proc.pid}:  # compute workers left behind, if any
            with contextlib.suppress(psutil.Error):
                child = psutil.Process(pid)
                child.terminate()
                try:
                    child.wait(5)
                except psutil.TimeoutExpired:
                    child.kill()
        for reader in self.readers:
            reader.join(2)

    def tail(self, lines: int = 4, chars: int = 600) -> str:
        """The last lines of its stderr (else stdout); of a JSON log line, its message's last
        line (a traceback's exception)."""
        err = [text for _, name, text in self.lines if name == "err" and text.strip()]
        out = []
        for text in (err or [text for _, _, text in self.lines])[-lines:]:
            with contextlib.suppress(ValueError, AttributeError, IndexError):
                text = str(json.loads(text)["msg"]).strip().splitlines()[-1]
            out.append(text)
        return " | ".join(out)[-chars:]

    def phases(self) -> str:
        """When the start-up lines appeared (s from spawn)."""
        marks = (
            ("settings", "terrazzo settings:"),
            ("access report", "items refused by the access policy"),
            ("catalog report", "items that cannot be served"),
        )
        found = []
        for label, text in marks:
            hit = next((t for t, _, line in self.lines if text in line), None)
            if hit is not None:
                found.append(f"{label} {hit:.2f}")
        return ", ".join(found)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{t:9.3f} {n} {line}\n" for t, n, line in self.lines))


def run_server(
    catalog: Path, mode: str, cache: Path, allow: Path, timeout: float, log: Path
) -> dict:
    """One fresh server: start-up, RSS, /items and tile latency."""
    import httpx

    env = {
        "TERRAZZO_LOG_LEVEL": "warning",
        "TERRAZZO_CATALOG_IN_MEMORY": "true" if mode == "memory" else "false",
        "TERRAZZO_CATALOG_CACHE": str(cache),
        "TERRAZZO_ALLOW": str(allow),
    }
    row: dict = {"notes": []}
    server = Server(catalog, env)
    try:
        base = f"http://127.0.0.1:{server.port}"
        with httpx.Client(base_url=base, timeout=60) as client:
            listening = None
            while True:
                elapsed = time.perf_counter() - server.started
                if server.proc.poll() is not None:
                    row["notes"].append(f"server exited {server.proc.returncode}: {server.tail()}")
                    return row
                if elapsed > timeout:
                    row["startup_s"] = "timeout"
                    row["notes"].append(f"not ready in {timeout:.0f} s: {server.tail(3)}")
                    return row
                try:
                    r = client.get("/readyz", timeout=10)
                    if listening is None:
                        listening = time.perf_counter() - server.started
                    if r.status_code == 200:
                        row["startup_s"] = time.perf_counter() - server.started
                        break
                    row["last_readyz"] = r.text[:200]
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            row["listen_s"] = listening
            row["rss_ready"] = procstats.rss_mb(server.tree())
            row["phases"] = server.phases()
            boxes = search_boxes(210)
            times, matched, failed = [], [], 0
            for k, box in enumerate(boxes):
                started = time.perf_counter()
                r = client.get("/items", params={"bbox": ",".join(map(str, box)), "limit": 20})
                ms = 1000 * (time.perf_counter() - started)
                if r.status_code != 200:
                    failed += 1
                    if failed == 1:
                        row["notes"].append(f"/items {r.status_code}: {r.text[:200]}")
                    continue
                if k >= 10:  # the first 10 warm up
                    times.append(ms)
                    matched.append(r.json().get("numberMatched", 0))
            row["search_p50_ms"], row["search_p95_ms"] = pct(times, 0.5), pct(times, 0.95)
            row["matched_p50"] = statistics.median(matched) if matched else math.nan
            warm, measured = spot_tiles()
            tile_times, errors = [], 0
            for k, t in enumerate(warm + measured):
                started = time.perf_counter()
                r = client.get(f"/tiles/{t.z}/{t.x}/{t.y}.png", params={"assets": "visual"})
                ms = 1000 * (time.perf_counter() - started)
                bad = r.status_code != 200 or r.headers.get("x-terrazzo-errors", "0") != "0"
                if bad:
                    errors += 1
                    if errors == 1:
                        image = r.headers.get("content-type", "").startswith("image/")
                        body = "" if image else r.text
                        row["notes"].append(
                            f"tile {t.z}/{t.x}/{t.y} {r.status_code} "
                            f"errors={r.headers.get('x-terrazzo-errors')} {body[:200]}"
                        )
                if k >= len(warm) and r.status_code == 200:
                    tile_times.append(ms)
                if k == len(warm):
                    row["tile_items"] = r.headers.get("x-terrazzo-items")
            row["tile_p50_ms"] = pct(tile_times, 0.5)
            if row.get("tile_items") in (None, "0"):
                row["notes"].append(f"a spot tile read {row.get('tile_items')} items")
            if failed or errors:
                row["notes"].append(f"{failed} /items and {errors} tiles failed")
            pids = server.tree()
            row["rss_after"] = procstats.rss_mb(pids)
            row["peak_mb"] = procstats.peak_rss_mb(pids)
            row["rss_mb"] = max(row["rss_ready"], row["rss_after"])
        return row
    finally:
        server.stop()
        server.save(log)


def in_process(catalog: Path, mode: str, cache: Path, timeout: float) -> dict:
    """The catalog's own search, timed in a separate process (see `_in_process_main`)."""
    command = [sys.executable, "-m", "bench.catalog", "--in-process", str(catalog), "--mode", mode]
    env = {**os.environ, "TERRAZZO_CATALOG_CACHE": str(cache)}
    env["TERRAZZO_CATALOG_IN_MEMORY"] = "true" if mode == "memory" else "false"
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"in-process search: not done in {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": "in-process search failed: " + done.stderr.strip().splitlines()[-1][-400:]}
    return json.loads(lines[-1])


def _in_process_main(catalog: Path, mode: str) -> None:
    import shapely

    from core.catalog import Catalog, SearchQuery

    out: dict = {}
    started = time.perf_counter()
    cat = Catalog(catalog, threads=2, in_memory=mode == "memory")
    out["open_s"] = time.perf_counter() - started
    for name in ("href_groups", "summary", "problems"):  # what start-up runs besides the load
        fn = getattr(cat, name, None)
        if fn is not None:
            started = time.perf_counter()
            fn()
            out[f"{name}_s"] = time.perf_counter() - started
    boxes = search_boxes(210)
    for name in ("search_sync", "footprints"):
        fn = getattr(cat, name)
        times = []
        for k, box in enumerate(boxes):
            started = time.perf_counter()
            # as the engine asks: the box, its exact area, only the asset the tile reads
            fn(SearchQuery(bbox=box, intersects=shapely.box(*box), limit=20, assets=("visual",)))
            if k >= 10:
                times.append(1000 * (time.perf_counter() - started))
        out[f"{name}_p50"], out[f"{name}_p95"] = pct(times, 0.5), pct(times, 0.95)
    out["rss_mb"] = procstats.rss_mb([os.getpid()])
    cat.close()
    print(json.dumps(out), flush=True)


# -- the report --------------------------------------------------------------------------------

COLUMNS = (
    ("items", 9),
    ("mode", 6),
    ("start", 6),
    ("startup_s", 9),
    ("rss_mb", 7),
    ("search_p50_ms", 13),
    ("search_p95_ms", 13),
    ("tile_p50_ms", 11),
    ("listen_s", 8),
    ("rss_ready", 9),
    ("peak_mb", 7),
    ("matched_p50", 11),
    ("sync_p50", 8),
    ("sync_p95", 8),
    ("fp_p50", 7),
)


def fmt(value: object, width: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(width)
    if isinstance(value, float):
        return (f"{value:.0f}" if value >= 100 else f"{value:.2f}").rjust(width)
    return str(value).rjust(width)


def print_row(row: dict) -> None:
    print(" ".join(fmt(row.get(name), width) for name, width in COLUMNS), flush=True)
    if row.get("phases"):
        print(f"    start-up lines at (s): {row['phases']}", flush=True)
    for note in row.get("notes", []):
        print(f"    ! {note}", flush=True)


def judge(label: str, value: object, limit: float, unit: str) -> str:
    if not isinstance(value, int | float) or math.isnan(value):
        return f"{label} <= {limit:g} {unit}: not met ({value if value else 'no figure'})"
    ok = "met" if value <= limit else "NOT MET"
    return f"{label} <= {limit:g} {unit}: {ok} ({value:.2f} {unit})"


def report(rows: list[dict], sizes: list[int]) -> None:
    print("\ntile p50 at the largest size / at the smallest:", flush=True)
    small, big = min(sizes), max(sizes)
    ratios = {}
    for mode, start in sorted({(r["mode"], r["start"]) for r in rows}):
        mine = [r for r in rows if (r["mode"], r["start"]) == (mode, start)]
        pick = {r["items"]: r.get("tile_p50_ms") for r in mine}
        a, b = pick.get(small), pick.get(big)
        if isinstance(a, float) and isinstance(b, float) and a > 0:
            ratios[mode, start] = b / a
            print(f"  {mode} {start}: {b:.1f} / {a:.1f} ms = {b / a:.2f}x", flush=True)
        else:
            print(f"  {mode} {start}: no figure", flush=True)
    print("\ntargets:", flush=True)
    for n, (startup, rss, search) in TARGETS.items():
        mine = [r for r in rows if r["items"] == n]
        if not mine:
            print(f"  {n:,} items: not run", flush=True)
            continue
        for r in mine:
            label = f"  {n:,} items, {r['mode']} {r['start']}:"
            checks = [judge("start-up", r.get("startup_s"), startup, "s")]
            if rss is not None:
                checks.append(judge("RSS", r.get("rss_mb"), rss, "MB"))
            if search is not None:
                checks.append(judge("search p50", r.get("search_p50_ms"), search, "ms"))
            print(f"{label} " + "; ".join(checks), flush=True)
    if small == 10_000:
        what = f"tile p50 at {big:,} / at 10,000" + ("" if big == 10_000_000 else " (10M not run)")
        for (mode, start), ratio in ratios.items():
            print(f"  {what}, {mode} {start}: {judge('ratio', ratio, TILE_RATIO, 'x')}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="10000,200000,1000000")
    ap.add_argument("--modes", default="memory,disk")
    ap.add_argument("--out", type=Path, default=Path("data/bench-catalog"))
    ap.add_argument("--timeout", type=float, default=600, help="start-up wait, s")
    ap.add_argument("--no-in-process", action="store_true", help="skip the in-process search")
    ap.add_argument("--in-process", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.in_process:
        _in_process_main(args.in_process, args.mode)
        return
    sizes = sorted({int(v) for v in args.sizes.split(",")})
    modes = [m.strip() for m in args.modes.split(",")]
    if set(modes) - {"memory", "disk"}:
        raise SystemExit("--modes: memory and/or disk")
    out = args.out.resolve()
    cogs = out / "cogs"
    run = time.strftime("%Y%m%d-%H%M%S")
    rows: list[dict] = []
    header = True
    for n in sizes:
        path, write_s, written = write_catalog(out, n)
        size_mb = path.stat().st_size / 1e6
        print(
            f"catalog {n:,} items: {path} ({size_mb:.0f} MB, "
            f"{pq.ParquetFile(path).metadata.num_row_groups} row groups), "
            f"{'written in' if written else 'cached; it was written in'} {write_s:.1f} s",
            flush=True,
        )
        if header:
            print(" ".join(name.rjust(width) for name, width in COLUMNS), flush=True)
            header = False
        for mode in modes:
            cache = out / "cache" / f"{run}-{n}-{mode}"
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(parents=True)
            starts = ["first", "second"] if mode == "disk" else ["first"]
            last: dict = {}
            for start in starts:
                log = out / "logs" / f"{run}-{n}-{mode}-{start}.log"
                last = run_server(path, mode, cache, cogs, args.timeout, log)
                last.update(items=n, mode=mode, start=start)
                if not args.no_in_process and start == starts[-1]:
                    extra = in_process(path, mode, cache, args.timeout)
                    if "error" in extra:
                        last["notes"].append(extra["error"])
                    else:
                        last["sync_p50"] = extra["search_sync_p50"]
                        last["sync_p95"] = extra["search_sync_p95"]
                        last["fp_p50"] = extra["footprints_p50"]
                        steps = ", ".join(
                            f"{k.removesuffix('_s')} {v:.2f} s"
                            for k, v in extra.items()
                            if k.endswith("_s")
                        )
                        last["notes"].append(f"in-process: {steps}; RSS {extra['rss_mb']:.0f} MB")
                if mode == "disk" and start == "first":
                    files = [f for f in cache.rglob("*") if f.is_file()]
                    size = sum(f.stat().st_size for f in files) / 1e6
                    last["notes"].append(f"cache after it: {len(files)} files, {size:.1f} MB")
                rows.append(last)
                print_row(last)
    print(
        "\nsearch_p*_ms: GET /items over HTTP, which also counts every match (numberMatched;"
        " matched_p50 is its median); sync_p*: Catalog.search_sync in-process; fp_p50:"
        " Catalog.footprints in-process (the page and the count /items runs)",
        flush=True,
    )
    for r in rows:
        s, f = r.get("sync_p50"), r.get("fp_p50")
        http = r.get("search_p50_ms")
        if all(isinstance(v, float) for v in (s, f, http)):
            verdict = "dominates" if f > 1.5 * s else "does not dominate"
            print(
                f"  {r['items']:,} {r['mode']} {r['start']}: the count {verdict} /items"
                f" (footprints {f:.2f} ms, search_sync {s:.2f} ms, over HTTP {http:.2f} ms)",
                flush=True,
            )
    report(rows, sizes)


if __name__ == "__main__":
    main()
