"""Terrazzo's Python client against odc-stac: the same items, the same grid, in one run.

Why: a notebook user choosing between `terrazzo.Client(url).read(...)` and
`odc.stac.load(items, ...)` asks one question, "which gets my array faster?". This answers it
on equal terms and shows where the Terrazzo client's time goes, so the gap can be closed.

What it does:
- builds (once, cached under data/bench-sdk/) the demo catalog (real COGs in UTM zones 31-33,
  two dates) and K copies of it: hard links of the same COGs under other paths, each copy its
  own collection. Every measured read uses a copy nobody has read yet, so neither side is
  served from a cache (Terrazzo's decoded-tile and header caches, GDAL's /vsicurl/ and block
  caches): distinct-but-equivalent areas, the same pixels and the same work each time. The
  local files are in the OS page cache for both sides (they are hard links of one inode).
- starts a real `terrazzo serve` on 127.0.0.1 and waits for /readyz.
- terrazzo: `Client(url, chunks_per_request=N).read(bbox, crs=EPSG:32632, shape=(h, w),
  assets=[...], group_by="datetime", collections=[copy], chunk_size=S)`.
- odc-stac: the same copy's items (the GeoParquet read with stac_geoparquet, made pystac
  Items, kept when they intersect the area, as a STAC search would) through
  `odc.stac.load(items, bands, geobox=GeoBox(shape, affine, crs), resampling="nearest",
  chunks=None, groupby="time", pool=T)`. The geobox is the Terrazzo grid; the script checks
  both arrays have the same affine transform, shape, x/y and time coordinates, and reports the
  share of valid pixels on which the two agree exactly (reported, not asserted).
- warm: round 0 is a warm-up read for every configuration (connections, worker processes,
  imports), then N measured rounds; the configurations are interleaved within each round so a
  background load spreads over all of them. Medians are reported.
- case local (COGs on disk) and case remote (the COGs behind bench/cogserver.py, a fixed
  delay per request, default 20 ms; Terrazzo's range store and GDAL /vsicurl/ with TiTiler's
  recommended settings read the same http:// hrefs).
- where Terrazzo's time goes: server seconds per chunk (each frame header's "seconds"), bytes
  on the wire, the client's frame parsing (`terrazzo.framing._Parser.feed`) and
  `terrazzo.layout.assemble` (both wrapped here, timed separately), first and last byte,
  client and server CPU, the server's cache counters (GET /stats) and the store requests
  each side made (the range server's counter).
- a sweep over chunk_size x chunks_per_request, and odc-stac over thread pool sizes.

    .venv/bin/python -m bench.sdk               # full run (~10 min on 2 cores)
    .venv/bin/python -m bench.sdk --repeats 5 --cases local --chunk-sizes 512
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.procstats import cpu_seconds
from bench.remote import TITILER_GDAL, cog_server, remote_catalog, server
from bench.tiles import source_items, write_catalog

CRS = "EPSG:32632"


def _client_defaults() -> tuple[int, int]:
    """The client's own defaults (Client.read's chunk_size, Config.chunks_per_request)."""
    import inspect

    from terrazzo import AsyncClient, Config

    size = inspect.signature(AsyncClient.read).parameters["chunk_size"].default
    return size, Config("").chunks_per_request


DEFAULT_TZ = _client_defaults()


# -- the catalogs ------------------------------------------------------------------------------


def demo_catalog(root: Path, size: int) -> Path:
    """The demo catalog at `size` pixels per scene side, built once."""
    from core.demo import build_demo

    index = root / f"demo-{size}" / "items.parquet"
    if not index.exists():
        print(f"building the demo catalog (size {size}) in {index.parent} ...", flush=True)
        build_demo(index.parent, size=size)
    return index


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: a real copy (same bytes)
        import shutil

        shutil.copyfile(src, dst)


def copies_catalog(root: Path, size: int, copies: int) -> Path:
    """`copies` copies of the demo catalog in one index, copy k = collection ck (COGs hard-linked
    under cogs/ck/): the same area read once per copy is never a cache hit."""
    demo = demo_catalog(root, size)
    out = root / f"copies-{size}"
    index, marker = out / "items.parquet", out / "copies.json"
    if index.exists() and marker.exists() and json.loads(marker.read_text())["copies"] >= copies:
        return index
    print(f"writing {copies} copies of the demo catalog in {out} ...", flush=True)
    items = source_items(demo)
    copied = []
    for k in range(copies):
        tag = f"c{k:03d}"
        for item in items:
            new = json.loads(json.dumps(item))
            new["id"], new["collection"] = f"{item['id']}~{tag}", tag
            for asset in new["assets"].values():
                src = demo.parent / asset["href"]
                rel = Path("cogs") / tag / src.name
                _link(src, out / rel)
                asset["href"] = rel.as_posix()
            copied.append(new)
    write_catalog(copied, index)
    marker.write_text(json.dumps({"copies": copies}))
    return index


def stac_items(index: Path) -> dict[str, list]:
    """The index's items as pystac Items (relative hrefs made absolute), by collection."""
    import pyarrow.parquet as pq
    import pystac
    from stac_geoparquet.arrow import stac_table_to_items

    out: dict[str, list] = {}
    for d in stac_table_to_items(pq.read_table(index)):
        for asset in d["assets"].values():
            if "://" not in asset["href"] and not asset["href"].startswith("/"):
                asset["href"] = str(index.parent.absolute() / asset["href"])
        item = pystac.Item.from_dict(d)
        out.setdefault(item.collection_id, []).append(item)
    return out


# -- the grid ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Area:
    bbox: tuple[float, float, float, float]
    shape: tuple[int, int]  # (height, width)
    res: float

    @classmethod
    def make(cls, size: int, shape: tuple[int, int], lon: float, top_km: float) -> Area:
        """`shape` native demo pixels in EPSG:32632 from `lon` east, top `top_km` north of
        45°N, aligned on the zone-32 items' pixel grid (nearest is exact for them)."""
        from pyproj import Transformer

        from core.demo import BASE_PIXEL, BASE_SIZE, LAT

        res = BASE_PIXEL * BASE_SIZE / size
        x, y = Transformer.from_crs(4326, CRS, always_xy=True).transform(lon, LAT)
        minx = round(x / res) * res
        maxy = round((y + top_km * 1000) / res) * res
        h, w = shape
        return cls((minx, maxy - h * res, minx + w * res, maxy), shape, res)

    def chunks(self, size: int) -> Iterator[tuple[int, int, tuple, int, int]]:
        """size² chunks, row-major, smaller at the right and bottom edges, as the client cuts
        them: (row, col, bbox, width, height)."""
        minx, _, _, maxy = self.bbox
        h, w = self.shape
        for r0 in range(0, h, size):
            for c0 in range(0, w, size):
                cw, ch = min(size, w - c0), min(size, h - r0)
                x0, y1 = minx + c0 * self.res, maxy - r0 * self.res
                yield r0, c0, (x0, y1 - ch * self.res, x0 + cw * self.res, y1), cw, ch

    def geobox(self) -> Any:
        from affine import Affine
        from odc.geo.geobox import GeoBox

        minx, _, _, maxy = self.bbox
        return GeoBox(self.shape, Affine(self.res, 0, minx, 0, -self.res, maxy), CRS)

    def lonlat(self) -> Any:
        import shapely
        from pyproj import Transformer

        t = Transformer.from_crs(CRS, 4326, always_xy=True)
        return shapely.box(*t.transform_bounds(*self.bbox, densify_pts=21))


# -- Terrazzo: the server and the probes around the client --------------------------------------


def process_tree(pid: int) -> list[int]:
    """The process and its descendants, through every thread's children (the server starts its
    compute pool's forkserver from a thread, which bench.procstats.children, reading the main
    thread's list only, misses)."""
    kids: list[str] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            kids += (task / "children").read_text().split()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [pid] + [p for kid in kids for p in process_tree(int(kid))]


@contextmanager
def terrazzo_server(catalog: Path, log: Path, allow: str | None = None) -> Iterator[tuple]:
    """`terrazzo serve --catalog CATALOG` on a free port, ready: (url, process)."""
    exe = Path(sys.executable).with_name("terrazzo")
    cmd = [str(exe) if exe.exists() else "terrazzo", "serve", "--catalog", str(catalog)]
    cmd += ["--port", "{port}", "--log-level", "warning"]
    if allow:
        cmd += ["--allow", allow]
    with server(cmd, {}, "/readyz", log) as running:
        yield running


class Probe:
    """What one client read did, filled by the wrappers `instrument` installs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.parse_s = 0.0
        self.assemble_s = 0.0
        self.bytes = 0
        self.streams = 0
        self.first: float | None = None
        self.last: float | None = None
        self.headers: list[dict] = []


PROBE = Probe()


def instrument() -> None:
    """Wrap (in this process only) the client's frame parser, its byte stream and assemble."""
    import terrazzo.client as tclient
    import terrazzo.framing as tframing
    import terrazzo.layout as tlayout

    feed = tframing._Parser.feed

    def timed_feed(self: Any, piece: bytes) -> Iterator[Any]:
        frames = feed(self, piece)
        while True:
            t = time.perf_counter()
            try:
                chunk = next(frames)
            except StopIteration:
                PROBE.parse_s += time.perf_counter() - t
                return
            PROBE.parse_s += time.perf_counter() - t
            yield chunk

    tframing._Parser.feed = timed_feed  # type: ignore[method-assign]

    aiter_frames = tclient.aiter_frames

    def counted_frames(stream: Any) -> Any:
        PROBE.streams += 1

        async def counted() -> Any:
            async for piece in stream:
                now = time.perf_counter() - PROBE.t0
                PROBE.first = now if PROBE.first is None else PROBE.first
                PROBE.last = now
                PROBE.bytes += len(piece)
                yield piece

        return aiter_frames(counted())

    tclient.aiter_frames = counted_frames

    assemble = tlayout.assemble

    def timed_assemble(grid: Any, specs: Any, chunks: dict, params: dict, *rest: Any) -> Any:
        t = time.perf_counter()
        try:
            return assemble(grid, specs, chunks, params, *rest)
        finally:
            PROBE.assemble_s += time.perf_counter() - t
            PROBE.headers = [c.header for c in chunks.values()]

    tlayout.assemble = timed_assemble


def _get_json(url: str) -> dict:
    return httpx.get(url, timeout=10).json()


def _store_requests(store: str | None) -> int:
    return _get_json(store + "/_requests")["requests"] if store else 0


def terrazzo_read(
    client: Any, url: str, pids: list[int], area: Area, copy: str, size: int, assets: list[str],
    store: str | None,
) -> tuple[Any, dict]:  # fmt: skip
    s0, r0 = _get_json(url + "/stats"), _store_requests(store)
    cpu_c0, cpu_s0 = cpu_seconds([os.getpid()]), cpu_seconds(pids)
    PROBE.reset()
    da = client.read(
        area.bbox,
        crs=CRS,
        shape=area.shape,
        assets=assets,
        group_by="datetime",
        collections=[copy],
        chunk_size=size,
        progress=False,
    )
    wall = time.perf_counter() - PROBE.t0
    cpu_c, cpu_s = cpu_seconds([os.getpid()]) - cpu_c0, cpu_seconds(pids) - cpu_s0
    s1, r1 = _get_json(url + "/stats"), _store_requests(store)
    seconds = [h.get("seconds", 0.0) for h in PROBE.headers]
    return da, {
        "wall": wall,
        "chunks": len(PROBE.headers),
        "errors": sum(h["status"] == "error" for h in PROBE.headers),
        "requests": PROBE.streams,
        "srv_chunk_s": statistics.mean(seconds) if seconds else 0.0,
        "srv_sum_s": sum(seconds),
        "mb": PROBE.bytes / 1e6,
        "parse_s": PROBE.parse_s,
        "assemble_s": PROBE.assemble_s,
        "first_s": PROBE.first or 0.0,
        "last_s": PROBE.last or 0.0,
        "client_cpu": cpu_c,
        "server_cpu": cpu_s,
        "store_requests": r1 - r0,
        "tile_hits": s1["tile_cache"]["hits"] - s0["tile_cache"]["hits"],
        "tile_misses": s1["tile_cache"]["misses"] - s0["tile_cache"]["misses"],
        "header_hits": s1["fetch"]["header_hits"] - s0["fetch"]["header_hits"],
        "header_misses": s1["fetch"]["header_misses"] - s0["fetch"]["header_misses"],
    }


# -- odc-stac ----------------------------------------------------------------------------------


def odc_bands(item: Any, assets: list[str]) -> list[str]:
    """odc-stac's names for the assets' bands: `visual.1..3` for a 3-band asset."""
    names = []
    for asset in assets:
        n = len(item.assets[asset].extra_fields.get("raster:bands") or [None])
        names += [f"{asset}.{i}" for i in range(1, n + 1)] if n > 1 else [asset]
    return names


def odc_read(
    items: list, area: Area, bands: list[str], pool: int, store: str | None
) -> tuple[Any, dict]:
    import odc.stac
    import shapely

    r0, cpu0 = _store_requests(store), cpu_seconds([os.getpid()])
    t0 = time.perf_counter()
    footprint = area.lonlat()
    chosen = [it for it in items if shapely.geometry.shape(it.geometry).intersects(footprint)]
    ds = odc.stac.load(
        chosen,
        bands=bands,
        geobox=area.geobox(),
        resampling="nearest",
        chunks=None,
        groupby="time",
        pool=pool if pool > 1 else None,
        progress=None,
    )
    wall = time.perf_counter() - t0
    return ds, {
        "wall": wall,
        "items": len(chosen),
        "client_cpu": cpu_seconds([os.getpid()]) - cpu0,
        "store_requests": _store_requests(store) - r0,
    }


# -- where a chunk's server time goes (in this process, one chunk at a time) ---------------------


def stage_breakdown(
    index: Path, area: Area, size: int, copies: list[str], assets: list[str], allow: str | None
) -> dict:
    """Every chunk of the area read serially by `core.chunks.read_chunk` (what POST /chunks
    runs) and framed by `app.encoders.chunk_frame`, with a StageClock slipped into the engine's
    plan/execute: busy seconds per stage summed over the chunks, the frame time and the CPU of
    this process plus the engine's compute workers. The first copy warms up; the last is timed.
    """
    import asyncio

    from app.encoders import chunk_frame
    from core.catalog import SearchQuery
    from core.chunks import ChunkSpec, read_chunk
    from core.engine import Engine, ReadParams
    from core.settings import Settings
    from core.timing import StageClock

    engine = Engine(Settings(catalog=index, **({"allow": allow} if allow else {})))
    engine.compute.warm()
    box: dict[str, StageClock] = {}
    plan, execute = engine.plan, engine.execute

    async def timed_plan(grid: Any, query: Any, params: Any, clock: Any = None, **kw: Any) -> Any:
        return await plan(grid, query, params, box["clock"], **kw)

    async def timed_execute(read_plan: Any, params: Any, clock: Any = None) -> Any:
        return await execute(read_plan, params, box["clock"])

    engine.plan, engine.execute = timed_plan, timed_execute  # type: ignore[method-assign]
    jobs: list[tuple] = []
    compute_run = engine.compute.run

    async def recorded_run(fn: Any, *job_args: Any) -> Any:
        t = time.perf_counter()
        out = await compute_run(fn, *job_args)
        jobs.append((fn, job_args, time.perf_counter() - t, _nbytes(job_args), _nbytes(out)))
        return out

    engine.compute.run = recorded_run  # type: ignore[method-assign]
    specs = [ChunkSpec(f"{r0}-{c0}", bbox, w, h) for r0, c0, bbox, w, h in area.chunks(size)]
    params = ReadParams(assets=engine.resolve_assets(tuple(assets)))

    async def run(copy: str) -> dict:
        busy: dict[str, float] = {}
        chunk_s = frame_s = 0.0
        query = SearchQuery(collections=(copy,))
        for spec in specs:
            box["clock"] = StageClock()
            result = await read_chunk(engine, spec, CRS, query, params, group_by="datetime")
            t = time.perf_counter()
            chunk_frame(result)
            frame_s += time.perf_counter() - t
            chunk_s += result.seconds
            for stage, seconds in box["clock"].busy.items():
                busy[stage] = busy.get(stage, 0.0) + seconds
        await engine.fetcher.stores.aclose()  # this loop's HTTP sessions
        return {"chunk_s": chunk_s, "frame_s": frame_s, "stages": busy}

    try:
        for copy in copies[:-1]:
            asyncio.run(run(copy))
        pids = [os.getpid(), *engine.compute.pids()]
        jobs.clear()
        cpu0, t0 = cpu_seconds(pids), time.perf_counter()
        out = asyncio.run(run(copies[-1]))
        out.update(wall=time.perf_counter() - t0, cpu=cpu_seconds(pids) - cpu0, chunks=len(specs))
    finally:
        engine.close()
    # The same compute jobs again, here, without the pool: what the work costs without the
    # pickling, the pipes and the queue.
    out["jobs"] = {}
    for fn, job_args, round_trip, sent, received in jobs:
        t = time.perf_counter()
        fn(*job_args)
        entry = out["jobs"].setdefault(
            fn.__name__, {"n": 0, "pool_s": 0.0, "inline_s": 0.0, "mb_sent": 0.0, "mb_back": 0.0}
        )
        entry["n"] += 1
        entry["pool_s"] += round_trip
        entry["inline_s"] += time.perf_counter() - t
        entry["mb_sent"] += sent / 1e6
        entry["mb_back"] += received / 1e6
    return out


def _nbytes(value: Any) -> int:
    """Bytes of the numpy arrays inside a job's arguments or result."""
    import dataclasses

    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, list | tuple):
        return sum(_nbytes(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(_nbytes(getattr(value, f.name)) for f in dataclasses.fields(value))
    return 0


# -- the comparison ----------------------------------------------------------------------------


def compare(da: Any, ds: Any, bands: list[str], area: Area) -> dict:
    """Same grid? (affine, shape, x/y, time) and the share of valid pixels that agree exactly."""
    from affine import Affine

    gt = [float(v) for v in da.coords["spatial_ref"].attrs["GeoTransform"].split()]
    tz_affine = Affine.from_gdal(*gt)
    gb = ds.odc.geobox
    same_affine = tz_affine.almost_equals(gb.affine, precision=1e-6)
    same_shape = tuple(da.shape[-2:]) == tuple(gb.shape) == area.shape
    same_xy = np.allclose(da.x.values, ds.x.values, rtol=0, atol=1e-6) and np.allclose(
        da.y.values, ds.y.values, rtol=0, atol=1e-6
    )
    tz_times = da.time.values.astype("datetime64[s]")
    odc_times = ds.time.values.astype("datetime64[s]")
    common = sorted(set(tz_times) & set(odc_times))
    t = np.stack([da.values[list(tz_times).index(v)] for v in common])
    o = np.stack(
        [np.stack([ds[b].values[list(odc_times).index(v)] for b in bands]) for v in common]
    )
    tz_fill = da.attrs.get("_FillValue", 0)
    odc_nodata = ds[bands[0]].attrs.get("nodata", 0)
    valid_t = (t != tz_fill).any(axis=1)
    valid_o = (o != odc_nodata).any(axis=1)
    valid = valid_t | valid_o
    agree = (t == o).all(axis=1) & valid
    return {
        "grid_same": bool(same_affine and same_shape and same_xy),
        "affine": tuple(round(v, 6) for v in tz_affine[:6]),
        "odc_affine": tuple(round(v, 6) for v in gb.affine[:6]),
        "times": (len(tz_times), len(odc_times), len(common)),
        "agree_pct": 100 * agree.sum() / max(1, valid.sum()),
        "valid_tz": int(valid_t.sum()),
        "valid_odc": int(valid_o.sum()),
        "valid_both": int((valid_t & valid_o).sum()),
    }


def tz_configs(area: Area, sizes: list[int], cprs: list[int]) -> list[tuple[int, int]]:
    """(chunk_size, chunks_per_request) pairs; a cpr that gives the same requests as a smaller
    one is left out (e.g. 4 chunks of 1024: cpr 4, 8 and 16 are all one request)."""
    out = []
    for size in sizes:
        n = math.ceil(area.shape[0] / size) * math.ceil(area.shape[1] / size)
        seen = set()
        for cpr in sorted(cprs):
            requests = math.ceil(n / cpr)
            if requests not in seen:
                seen.add(requests)
                out.append((size, cpr))
    if DEFAULT_TZ not in out and DEFAULT_TZ[0] in sizes:
        out.append(DEFAULT_TZ)
    return out


def run_case(
    case: str,
    index: Path,
    area: Area,
    args: argparse.Namespace,
    configs: list[tuple[int, int]],
    pools: list[int],
    store: str | None,
) -> dict:
    """Every configuration, interleaved: round 0 warms up, rounds 1..N are measured."""
    from terrazzo import Client

    allow = store + "/" if store else None
    log = args.data / "logs" / f"server-{case}.log"
    items_by_copy = stac_items(index)
    first_copy = items_by_copy[sorted(items_by_copy)[0]]
    bands = odc_bands(first_copy[0], args.assets)
    plan = [("tz", c) for c in configs] + [("odc", p) for p in pools]
    records: dict[Any, list[dict]] = {key: [] for key in plan}
    checks: dict[Any, dict] = {}
    reference = None  # an odc-stac array to compare every Terrazzo configuration with
    with terrazzo_server(index, log, allow) as (url, proc):
        pids = process_tree(proc.pid)
        clients = {cpr: Client(url, chunks_per_request=cpr) for _, cpr in configs}
        slot = 0
        try:
            for rnd in range(args.repeats + 1):
                for key in plan:
                    copy = f"c{slot:03d}"
                    slot += 1
                    side, cfg = key
                    if side == "tz":
                        size, cpr = cfg
                        da, rec = terrazzo_read(
                            clients[cpr], url, pids, area, copy, size, args.assets, store
                        )
                        if rnd >= 1 and key not in checks and reference is not None:
                            checks[key] = compare(da, reference, bands, area)
                    else:
                        ds, rec = odc_read(items_by_copy[copy], area, bands, cfg, store)
                        reference = ds if reference is None else reference
                    if rnd >= 1:
                        records[key].append(rec)
                    label = f"{cfg[0]}/{cfg[1]}" if side == "tz" else f"pool={cfg}"
                    print(
                        f"  {case} round {rnd} {side:>3} {label:>9} {copy}: {rec['wall']:.2f} s",
                        flush=True,
                    )
        finally:
            for client in clients.values():
                client.close()
    stages = {}
    for size in sorted({size for size, _ in configs}):  # the server is down: no contention
        copies = [f"c{slot + i:03d}" for i in range(2)]
        slot += 2
        stages[size] = stage_breakdown(index, area, size, copies, args.assets, allow)
        print(f"  {case} stages, {size}² chunks one at a time: {fmt_stages(stages[size])}")
    return {"records": records, "checks": checks, "bands": bands, "stages": stages}


def fmt_stages(s: dict) -> str:
    busy = ", ".join(f"{k} {v:.2f}" for k, v in sorted(s["stages"].items(), key=lambda kv: -kv[1]))
    jobs = "; ".join(
        f"{name} x{j['n']}: {j['pool_s']:.2f} s through the pool vs {j['inline_s']:.2f} s inline, "
        f"{j['mb_sent']:.0f} MB sent, {j['mb_back']:.0f} MB back"
        for name, j in s.get("jobs", {}).items()
    )
    return (
        f"{s['chunks']} chunks in {s['wall']:.2f} s (CPU {s['cpu']:.2f} s incl. compute workers); "
        f"busy s summed over chunks: {busy}; chunk_frame {s['frame_s']:.2f}; compute jobs: {jobs}"
    )


def median(records: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in records)


def summarise(case: str, result: dict) -> list[dict]:
    rows = []
    records, checks = result["records"], result["checks"]
    odc = {cfg: records[("odc", cfg)] for (side, cfg) in records if side == "odc"}
    best_pool = min(odc, key=lambda p: median(odc[p], "wall"))
    odc_s = median(odc[best_pool], "wall")
    for (side, cfg), recs in records.items():
        if side != "tz":
            continue
        row = {k: median(recs, k) for k in recs[0]}
        row.update(
            case=case,
            size=cfg[0],
            cpr=cfg[1],
            tz_s=row["wall"],
            odc_s=odc_s,
            odc_pool=best_pool,
            ratio=odc_s / row["wall"],
            spread=(min(r["wall"] for r in recs), max(r["wall"] for r in recs)),
            check=checks.get((side, cfg), {}),
            odc_store_requests=median(odc[best_pool], "store_requests"),
            odc_cpu=median(odc[best_pool], "client_cpu"),
        )
        rows.append(row)
    odc_rows = [
        {
            "case": case,
            "pool": p,
            "s": median(recs, "wall"),
            "cpu": median(recs, "client_cpu"),
            "requests": median(recs, "store_requests"),
            "items": recs[0]["items"],
        }
        for p, recs in odc.items()
    ]
    return [{"tz": rows, "odc": odc_rows, "stages": result.get("stages", {}), "case": case}]


COLUMNS = (
    ("case", 15, "{case}"),
    ("terrazzo s", 10, "{tz_s:.2f}"),
    ("odc-stac s", 10, "{odc_s:.2f}"),
    ("odc/tz", 6, "{ratio:.2f}"),
    ("agree %", 7, "{agree}"),
    ("chunks", 10, "{chunks:.0f}x{size}²"),
    ("cpr", 3, "{cpr}"),
    ("req", 3, "{requests:.0f}"),
    ("srv s/chunk", 11, "{srv_chunk_s:.3f}"),
    ("srv Σs", 6, "{srv_sum_s:.2f}"),
    ("MB", 5, "{mb:.1f}"),
    ("1st B s", 7, "{first_s:.2f}"),
    ("last B s", 8, "{last_s:.2f}"),
    ("parse s", 7, "{parse_s:.3f}"),
    ("asm s", 6, "{assemble_s:.3f}"),
    ("cli CPU", 7, "{client_cpu:.2f}"),
    ("srv CPU", 7, "{server_cpu:.2f}"),
    ("store req", 9, "{store_requests:.0f}/{odc_store_requests:.0f}"),
    ("tile hit/miss", 13, "{tile_hits:.0f}/{tile_misses:.0f}"),
    ("hdr hit/miss", 12, "{header_hits:.0f}/{header_misses:.0f}"),
)


def table(rows: list[dict]) -> list[str]:
    head = " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        check = row["check"]
        agree = f"{check['agree_pct']:.2f}" if check else "n/a"
        if check and not check["grid_same"]:
            agree += "!"
        cells = [fmt.format(**row, agree=agree) for _, _, fmt in COLUMNS]
        lines.append(" ".join(f"{c:>{w}}" for c, (_, w, _) in zip(cells, COLUMNS, strict=True)))
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/bench-sdk"), help="cache directory")
    ap.add_argument("--size", type=int, default=1024, help="demo scene side, pixels (30 m)")
    ap.add_argument("--shape", default="1024,4096", help="read height,width in native pixels")
    ap.add_argument("--lon", type=float, default=10.6, help="west edge of the read, °E")
    ap.add_argument("--top-km", type=float, default=20.0, help="top of the read north of 45°N")
    ap.add_argument("--assets", default="visual", help="comma-separated")
    ap.add_argument("--repeats", type=int, default=5, help="measured rounds (after a warm-up)")
    ap.add_argument("--chunk-sizes", default="256,512,1024")
    ap.add_argument("--cprs", default="1,4,8,16,64", help="Config.chunks_per_request values")
    ap.add_argument("--odc-pools", default="1,2,16", help="odc.stac.load pool= thread counts")
    ap.add_argument("--cases", default="local,remote")
    ap.add_argument("--delay-ms", type=float, default=20.0, help="remote store delay per request")
    args = ap.parse_args()
    try:
        import odc.stac
    except ImportError:
        sys.exit("bench.sdk needs odc-stac: pip install -e '.[test]' -c constraints.txt")
    warnings.filterwarnings("ignore")
    os.environ.update(TITILER_GDAL)
    # rasterio wants numbers for the numeric options: those come from the environment above
    odc.stac.configure_rio(
        cloud_defaults=True,
        **{k: v for k, v in TITILER_GDAL.items() if k not in ("GDAL_CACHEMAX", "VSI_CACHE_SIZE")},
    )
    instrument()

    args.assets = [a for a in args.assets.split(",") if a]
    args.data = args.data.absolute()
    h, w = (int(v) for v in args.shape.split(","))
    area = Area.make(args.size, (h, w), args.lon, args.top_km)
    sizes = [int(v) for v in args.chunk_sizes.split(",")]
    configs = tz_configs(area, sizes, [int(v) for v in args.cprs.split(",")])
    pools = [int(v) for v in args.odc_pools.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    copies = (args.repeats + 1) * (len(configs) + len(pools)) + 2 * len(sizes)
    index = copies_catalog(args.data, args.size, copies)
    load0 = os.getloadavg()
    print(
        f"read: {h}x{w} px at {area.res:g} m in {CRS}, bbox {tuple(round(v) for v in area.bbox)}, "
        f"assets {args.assets}, group_by=datetime; {args.repeats} measured rounds after a "
        f"warm-up, each read on an unread copy of the catalog ({copies} copies); "
        f"load average {load0[0]:.1f}"
    )
    summaries = []
    for case in cases:
        if case == "local":
            result = run_case(case, index, area, args, configs, pools, None)
            summaries += summarise("local", result)
        elif case == "remote":
            label = f"+{args.delay_ms:g} ms/req"
            with cog_server(index.parent, args.delay_ms) as (store, _server):
                remote = remote_catalog(index, store, args.data / "remote")
                result = run_case("remote", remote, area, args, configs, pools, store)
            summaries += summarise(label, result)
        else:
            sys.exit(f"unknown case {case!r}: local or remote")
        checks = next(iter(result["checks"].values()), None)
        if checks:
            print(f"  grid check ({case}): {checks}")

    tz_rows = [r for s in summaries for r in s["tz"]]
    main_rows = []
    for s in summaries:
        by_cfg = {(r["size"], r["cpr"]): r for r in s["tz"]}
        if DEFAULT_TZ in by_cfg:
            main_rows.append({**by_cfg[DEFAULT_TZ], "case": by_cfg[DEFAULT_TZ]["case"] + " dflt"})
        best = min(s["tz"], key=lambda r: r["tz_s"])
        main_rows.append({**best, "case": best["case"] + " best"})
    print()
    print(
        "Terrazzo client vs odc-stac (median; ratio = odc-stac s / terrazzo s, >1: Terrazzo "
        "faster; odc-stac at its fastest pool; 'dflt' = the client's defaults, chunk_size "
        f"{DEFAULT_TZ[0]}, chunks_per_request {DEFAULT_TZ[1]})"
    )
    print("\n".join(table(main_rows)))
    print("\nsweep: chunk_size x chunks_per_request (Config.concurrency 16)")
    print("\n".join(table(tz_rows)))
    print("\nodc-stac by pool (threads):")
    for s in summaries:
        for r in s["odc"]:
            print(
                f"  {r['case']:>15} pool={r['pool']:<3} {r['s']:.2f} s  CPU {r['cpu']:.2f} s  "
                f"store requests {r['requests']:.0f}  items {r['items']}"
            )
    print("\nserver stages (in this process, one chunk at a time, fresh copy, no contention):")
    for s in summaries:
        for size, st in s["stages"].items():
            print(f"  {s['case']:>15} {size}²: {fmt_stages(st)}")
    for s in summaries:
        best = min(s["tz"], key=lambda r: r["tz_s"])
        print(
            f"fastest Terrazzo config {best['case']}: chunk_size {best['size']}, "
            f"chunks_per_request {best['cpr']} ({best['requests']:.0f} requests): "
            f"{best['tz_s']:.2f} s (min..max {best['spread'][0]:.2f}..{best['spread'][1]:.2f})"
        )
    load1 = os.getloadavg()
    print(f"load average at start {load0[0]:.1f}, at end {load1[0]:.1f} (2 cores shared)")
    out = args.data / "results.json"
    out.write_text(json.dumps(summaries, indent=1, default=str))
    print(f"all figures: {out}")


if __name__ == "__main__":
    main()
