"""`terrazzo overviews`: build (or bring up to date) an overview pyramid for low zooms.

Zooms 0..Z of WebMercatorQuad are rendered through the engine's own read path — `Engine.plan`
for a block's layout, then `core.chunks.stream_chunks` with one 256-px `ChunkSpec` per tile
that item bboxes touch, so a pyramid tile is the dynamic tile of the same request, pixel for
pixel — and written as one COG per block and asset (`core.pyramid` says what a block is).
The build never drops items: its settings and query lift every search limit, and a plan that
says it was truncated, a chunk that failed or an item that failed to read fails the build.

Incremental: each block carries a fingerprint of the source items whose bbox touches it
(`Catalog.tile_fingerprints`, computed in DuckDB); a rebuild over an existing directory
re-renders only the blocks whose fingerprint changed and removes the blocks that became empty.
A different recipe (assets, method, search) re-renders everything.

Renders run on the engine's compute pool, one block after another (the chunks of a block run
`chunk_concurrency` at a time); with `dask` each block is a task on a dask.distributed
cluster, whose workers each build one engine and keep it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from core.catalog import Catalog, SearchQuery, parse_datetime_range
from core.chunks import ChunkSpec, output_layout, stream_chunks
from core.cogs import stac_item, write_cog
from core.engine import Engine, ReadParams
from core.filters import parse as parse_filter
from core.indexing import index_items
from core.plan import Grid, matrix_set, matrix_set_crs
from core.pyramid import (
    CATALOG,
    FORMAT,
    RECIPE,
    TILESIZE,
    TMS,
    block_id,
    block_key,
    block_of,
    block_zoom,
    utc_now,
)
from core.settings import Settings

AUTO_ITEMS = 50  # auto max zoom: the coarsest zoom whose tiles each touch at most this many
MAX_AUTO_ZOOM = 12  # auto never goes finer (a zoom-12 pyramid of a continent is big already)
UNLIMITED = 1_000_000  # search limits of a build: nothing is ever left out
_VALUE_METHODS = ("first", "last")  # output pixels are one item's pixel: nodata stays honest
COLLECTION = "terrazzo-pyramid"


class BuildError(RuntimeError):
    """A block could not be rendered completely; the pyramid is left as it was."""


@dataclass(frozen=True)
class Recipe:
    """What a pyramid is a rendering of (pyramid.json without its blocks)."""

    catalog: str
    assets: tuple[str, ...]
    method: str = "first"
    datetime: str | None = None
    collections: tuple[str, ...] = ()
    filter: dict[str, Any] | None = None
    sortby: tuple[str, ...] = ("-datetime",)
    max_zoom: int = 0

    def query(self) -> SearchQuery:
        """The build's search: the recipe's filters, every limit lifted, no shortcuts."""
        query = SearchQuery(
            datetime=parse_datetime_range(self.datetime) if self.datetime else None,
            collections=self.collections,
            filter=self.filter,
            sortby=self.sortby,
            limit=UNLIMITED,
        )
        # the search limits being added to SearchQuery (scan_limit, time_limit, exitwhenfull,
        # skipcovered): lifted or off when present, so no item is ever left out of a block
        lifted = {"scan_limit": UNLIMITED, "time_limit": 3600.0 * 24}
        lifted |= {"exitwhenfull": False, "skipcovered": False}
        names = {f.name for f in dataclasses.fields(SearchQuery)}
        return dataclasses.replace(query, **{k: v for k, v in lifted.items() if k in names})

    def params(self) -> ReadParams:
        return ReadParams(assets=self.assets, method=self.method, resampling="nearest")

    def same_rendering(self, other: dict[str, Any]) -> bool:
        """Whether blocks rendered for `other` (an older pyramid.json) are valid for this."""
        mine = self.to_json()
        keys = ("assets", "method", "resampling", "unscale", "datetime", "collections")
        keys += ("filter", "sortby", "tms", "tilesize", "format")
        return all(other.get(k) == mine.get(k) for k in keys)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "catalog": self.catalog,
            "assets": list(self.assets),
            "method": self.method,
            "resampling": "nearest",
            "unscale": False,
            "datetime": self.datetime,
            "collections": list(self.collections),
            "filter": self.filter,
            "sortby": list(self.sortby),
            "tms": TMS,
            "tilesize": TILESIZE,
            "max_zoom": self.max_zoom,
        }


def build_settings(catalog: Path | str, **overrides: Any) -> Settings:
    """Settings of a build engine: `max_items` (and the other search caps, where they exist)
    huge, so no search is ever cut; the pyramid is never used to build a pyramid."""
    values: dict[str, Any] = {"catalog": catalog, "pyramid": None, "max_items": UNLIMITED}
    for name, value in (("max_scan", UNLIMITED), ("max_search_s", 3600.0 * 24)):
        if name in Settings.model_fields:
            values[name] = value
    values.update(overrides)
    return Settings(**values)


@dataclass(frozen=True)
class BlockJob:
    """One block to render: zoom, block tile, the zoom-z tiles item bboxes touch, and the
    fingerprint of the items touching it."""

    z: int
    bx: int
    by: int
    tiles: tuple[tuple[int, int], ...]
    fingerprint: str
    items: int
    start: str | None = None
    end: str | None = None

    @property
    def key(self) -> str:
        return block_key(self.z, self.bx, self.by)


@dataclass
class BlockResult:
    key: str
    status: str  # "written" or "empty"
    item: dict[str, Any] | None = None  # the block's STAC item (written blocks)
    files: dict[str, str] = field(default_factory=dict)  # asset -> path relative to the dir
    seconds: float = 0.0


@dataclass
class BuildReport:
    out: Path
    max_zoom: int
    max_zoom_reason: str
    rendered: list[str]  # blocks rendered this run ("z/x/y")
    kept: list[str]  # unchanged blocks left as they were
    removed: list[str]  # blocks that became empty (files deleted)
    empty: list[str]  # blocks rendered with nothing valid
    blocks: int  # blocks with data now

    def lines(self) -> list[str]:
        return [
            f"max zoom {self.max_zoom}: {self.max_zoom_reason}",
            f"rendered {len(self.rendered)} blocks: {' '.join(self.rendered) or '-'}",
            f"unchanged {len(self.kept)}, removed {len(self.removed)}"
            + (f": {' '.join(self.removed)}" if self.removed else "")
            + f", empty {len(self.empty)}",
            f"pyramid: {self.blocks} blocks in {self.out / CATALOG}",
        ]


# -- planning the build ---------------------------------------------------------------------


def choose_max_zoom(
    catalog: Catalog, query: SearchQuery, assets: tuple[str, ...]
) -> tuple[int, str]:
    """Z when none is given: the coarsest zoom at which every 256-px tile's bbox touches at most
    AUTO_ITEMS items (from there on a dynamic tile reads few items), or the catalog's native
    zoom (its finest pixel, `Catalog.resolution_stats`) if that comes first; at most
    MAX_AUTO_ZOOM."""
    native = MAX_AUTO_ZOOM
    stats = catalog.resolution_stats(assets, query.collections)
    if stats and stats["res_deg"]:
        # the coarsest zoom whose pixel (360 / 256 / 2^z degrees) is no coarser than native
        native = max(0, math.ceil(math.log2(360 / TILESIZE / stats["res_deg"]) - 1e-9))
    for z in range(0, min(native, MAX_AUTO_ZOOM) + 1):
        busiest = max((c for _, _, c, *_ in catalog.tile_fingerprints(query, z)), default=0)
        if busiest <= AUTO_ITEMS:
            return z, f"the coarsest zoom whose tiles touch at most {AUTO_ITEMS} items ({busiest})"
    if native <= MAX_AUTO_ZOOM:
        return native, "the catalog's native resolution (its finest pixel)"
    return MAX_AUTO_ZOOM, f"the auto cap ({MAX_AUTO_ZOOM})"


def plan_blocks(catalog: Catalog, query: SearchQuery, max_zoom: int) -> list[BlockJob]:
    """Every block of zooms 0..max_zoom that an item bbox touches, with its fingerprint."""
    jobs = []
    per_block_zoom: dict[int, dict[tuple[int, int], tuple]] = {}
    for z in range(max_zoom + 1):
        bz = block_zoom(z)
        if bz not in per_block_zoom:
            per_block_zoom[bz] = {
                (x, y): rest for x, y, *rest in catalog.tile_fingerprints(query, bz)
            }
        touched = (
            list(per_block_zoom[bz])
            if z == bz
            else [(x, y) for x, y, *_ in catalog.tile_fingerprints(query, z)]
        )
        tiles: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for x, y in touched:
            tiles.setdefault(block_of(z, x, y), []).append((x, y))
        for (bx, by), members in sorted(tiles.items()):
            count, fingerprint, start, end = per_block_zoom[bz][(bx, by)]
            jobs.append(
                BlockJob(
                    z=z,
                    bx=bx,
                    by=by,
                    tiles=tuple(sorted(members)),
                    fingerprint=fingerprint,
                    items=count,
                    start=_iso(start),
                    end=_iso(end),
                )
            )
    return jobs


def _iso(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


# -- rendering one block ----------------------------------------------------------------------


def block_grid(z: int, bx: int, by: int) -> Grid:
    """The block's grid: the bounds of tile bx/by at `block_zoom(z)`, zoom-z pixels."""
    bz = block_zoom(z)
    size = TILESIZE * 2 ** (z - bz)
    bounds = tuple(matrix_set(TMS).xy_bounds(bx, by, bz))
    return Grid.from_bounds(matrix_set_crs(TMS), bounds, size, size)


async def render_block(
    engine: Engine, job: BlockJob, recipe: Recipe, out: Path, stamp: str
) -> BlockResult:
    """Render one block through the engine and write its COGs (one per asset) under `out`."""
    started = asyncio.get_running_loop().time()
    query, params = recipe.query(), recipe.params()
    tms = matrix_set(TMS)
    grid = block_grid(job.z, job.bx, job.by)
    plan = await engine.plan(grid, query, params)  # layout, nodata; opens (caches) headers
    if plan.truncated:
        raise BuildError(f"block {job.key}: the item search was cut ({plan.to_dict()['search']})")
    if plan.errors:
        raise BuildError(f"block {job.key}: items failed to open: {list(plan.errors)[:5]}")
    result = BlockResult(key=job.key, status="empty")
    if not plan.items:
        return result
    layout = output_layout(plan, params, None)
    assert layout is not None
    dtype = np.dtype(layout["dtype"])
    counts = [r.count for r in plan.items[0].reads]
    data = np.zeros((sum(counts), grid.height, grid.width), dtype=dtype)
    valid = np.zeros((grid.height, grid.width), dtype=bool)
    x0, y0 = job.bx << (job.z - block_zoom(job.z)), job.by << (job.z - block_zoom(job.z))
    specs = [
        ChunkSpec.make(
            f"{x}/{y}", tuple(tms.xy_bounds(x, y, job.z)), width=TILESIZE, height=TILESIZE
        )
        for x, y in job.tiles
    ]
    async for chunk in stream_chunks(engine, specs, grid.crs, query, params):
        if chunk.status == "error" or chunk.item_errors:
            why = chunk.error or "; ".join(f"{i}: {e}" for i, e in chunk.item_errors[:5])
            raise BuildError(f"block {job.key}: tile {job.z}/{chunk.id} failed: {why}")
        if getattr(chunk, "truncated", False):  # a field the chunk may carry one day
            raise BuildError(f"block {job.key}: tile {job.z}/{chunk.id}: the search was cut")
        if chunk.status != "ok":
            continue
        assert chunk.data is not None and chunk.valid is not None
        x, y = (int(v) for v in chunk.id.split("/"))
        rows = slice((y - y0) * TILESIZE, (y - y0 + 1) * TILESIZE)
        cols = slice((x - x0) * TILESIZE, (x - x0 + 1) * TILESIZE)
        data[:, rows, cols] = chunk.data[0]
        valid[rows, cols] = chunk.valid[0]
    if not valid.any():
        return result
    files: dict[str, str] = {}
    band = 0
    for asset, count in zip(plan.assets, counts, strict=True):
        reads = [r for item in plan.items for r in item.reads if r.asset == asset]
        nodata = _common_nodata(reads, recipe.method, dtype)
        layer = data[band : band + count]
        band += count
        relative = f"blocks/{job.z}/{job.bx}_{job.by}_{asset}.tif"
        await asyncio.to_thread(_write_block, out / relative, layer, valid, grid, nodata)
        files[asset] = relative
    properties: dict[str, Any] = {
        "terrazzo:zoom": job.z,
        "terrazzo:block": job.key,
        "terrazzo:block_zoom": block_zoom(job.z),
        "terrazzo:items": job.items,
        "terrazzo:fingerprint": job.fingerprint,
    }
    if job.start and job.end:
        properties |= {"start_datetime": job.start, "end_datetime": job.end}
    item = stac_item(
        block_id(job.z, job.bx, job.by),
        {asset: out / rel for asset, rel in files.items()},
        datetime=job.end or stamp,
        collection=COLLECTION,
        href_base=out,
        properties=properties,
    )
    result.status, result.item, result.files = "written", item, files
    result.seconds = asyncio.get_running_loop().time() - started
    return result


def _common_nodata(reads: list[Any], method: str, dtype: np.dtype) -> float | None:
    """The sources' nodata when they all have the same one and no mask, and the method keeps
    one item's pixel (so a valid output pixel never equals nodata in every band); else None:
    the block gets an internal mask, which core.fetch.valid_mask reads first."""
    values = {r.nodata for r in reads}
    if method not in _VALUE_METHODS or any(r.has_mask for r in reads) or len(values) != 1:
        return None
    value = values.pop()
    if value is None or (dtype.kind in "iu" and not float(value).is_integer()):
        return None
    if isinstance(value, float) and math.isnan(value) and dtype.kind != "f":
        return None
    return value


def _write_block(path: Path, data: np.ndarray, valid: np.ndarray, grid: Grid, nodata: Any) -> None:
    """A DEFLATE COG of the block (overviews included), written beside and renamed into place so
    a server reading the pyramid never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tif")
    try:
        if nodata is not None:
            data = data.copy()
            data[:, ~valid] = nodata
            write_cog(staged, data, crs=grid.crs, transform=grid.transform, nodata=nodata)
        else:
            data = np.where(valid, data, 0).astype(data.dtype, copy=False)
            write_cog(staged, data, crs=grid.crs, transform=grid.transform, mask=valid)
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)


# -- running renders: the engine's pool, or a dask.distributed cluster -------------------------


async def _render_all(
    engine: Engine, jobs: list[BlockJob], recipe: Recipe, out: Path, stamp: str
) -> list[BlockResult]:
    return [await render_block(engine, job, recipe, out, stamp) for job in jobs]


_WORKER: dict[str, tuple[Engine, asyncio.AbstractEventLoop]] = {}
_WORKER_LOCK = threading.Lock()


def _worker_engine(settings_json: str) -> tuple[Engine, asyncio.AbstractEventLoop]:
    """This dask worker process's engine (built once) and the event loop it lives on.

    One loop for the engine's life, on a thread of its own: the fetcher's semaphores, shared
    fetches and header cache belong to the loop they were made on. Dask's worker processes are
    daemonic, and a daemonic process may not start children, which the engine's compute pool
    needs: the flag is cleared (the pool's workers exit when their pipe closes, so none
    outlives this process)."""
    with _WORKER_LOCK:
        if settings_json not in _WORKER:
            process = multiprocessing.current_process()
            if process.daemon:
                process._config["daemon"] = False  # type: ignore[attr-defined]
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="terrazzo-build", daemon=True).start()
            engine = Engine(Settings(**json.loads(settings_json)))
            _WORKER[settings_json] = (engine, loop)
        return _WORKER[settings_json]


def _dask_render(
    settings_json: str, job: BlockJob, recipe: Recipe, out: str, stamp: str
) -> BlockResult:
    """One block as a dask task (on a worker: same files, same paths as the client)."""
    engine, loop = _worker_engine(settings_json)
    future = asyncio.run_coroutine_threadsafe(
        render_block(engine, job, recipe, Path(out), stamp), loop
    )
    return future.result()


def _render_on_dask(
    address: str, settings: Settings, jobs: list[BlockJob], recipe: Recipe, out: Path, stamp: str
) -> list[BlockResult]:
    import distributed  # only builds on a cluster need it: `pip install 'dask[distributed]'`

    cluster = None
    if address == "local":
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = distributed.Client(cluster)
    else:
        client = distributed.Client(address)
    try:
        settings_json = settings.model_dump_json()
        futures = client.map(
            _dask_render,
            [settings_json] * len(jobs),
            jobs,
            [recipe] * len(jobs),
            [str(out)] * len(jobs),
            [stamp] * len(jobs),
            pure=False,
        )
        return client.gather(futures)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


# -- the build ----------------------------------------------------------------------------------


def build(
    catalog: Path | str,
    out: Path | str,
    *,
    assets: tuple[str, ...] = (),
    method: str = "first",
    max_zoom: int | None = None,
    datetime: str | None = None,
    collections: tuple[str, ...] = (),
    filter: str | None = None,
    sortby: tuple[str, ...] = ("-datetime",),
    dask: str | None = None,
    settings: dict[str, Any] | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> BuildReport:
    """Build or update the pyramid of `catalog` in `out` (see the module docstring)."""
    if "://" not in str(catalog):  # a local file, directory or glob; URLs stay as given
        catalog = str(Path(catalog).absolute())
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = build_settings(catalog, **(settings or {}))
    engine = Engine(config)
    try:
        version, digest = engine.catalog.version, engine.catalog.content_hash()
        recipe = Recipe(
            catalog=str(catalog),
            assets=engine.resolve_assets(tuple(assets)),
            method=method,
            datetime=datetime,
            collections=tuple(collections),
            filter=parse_filter(filter) if filter else None,
            sortby=tuple(s.strip() for s in sortby if s.strip()),
        )
        ReadParams(method=method)  # a bad method fails here, before any work
        query = recipe.query()
        if max_zoom is None:
            max_zoom, reason = choose_max_zoom(engine.catalog, query, recipe.assets)
        else:
            reason = "given (--max-zoom)"
        recipe = dataclasses.replace(recipe, max_zoom=max_zoom)
        jobs = plan_blocks(engine.catalog, query, max_zoom)
        old = _read_recipe(out)
        reuse = old is not None and recipe.same_rendering(old)
        previous: dict[str, dict[str, Any]] = (old or {}).get("blocks", {}) if reuse else {}
        todo = [j for j in jobs if previous.get(j.key, {}).get("fingerprint") != j.fingerprint]
        changed = {j.key for j in todo}
        kept = [j.key for j in jobs if j.key not in changed]
        if old is not None and not reuse:  # another recipe: none of its blocks is ours
            shutil.rmtree(out / "blocks", ignore_errors=True)
        echo(f"max zoom {max_zoom} ({reason}); {len(jobs)} blocks, {len(todo)} to render")
        stamp = utc_now()
        if dask:
            results = _render_on_dask(dask, config, todo, recipe, out, stamp)
        else:
            results = asyncio.run(_render_all(engine, todo, recipe, out, stamp))
    finally:
        engine.close()
    # what the directory holds now: kept blocks as they were, rendered ones as rendered
    items = _read_items(out) if reuse else {}
    blocks: dict[str, dict[str, Any]] = {}
    for job in jobs:
        if job.key in kept:
            blocks[job.key] = previous[job.key]
    for job, result in zip(todo, results, strict=True):
        entry = {"fingerprint": job.fingerprint, "items": job.items, "status": result.status}
        entry["files"] = result.files
        blocks[job.key] = entry
        bid = block_id(job.z, job.bx, job.by)
        if result.item is not None:
            items[bid] = result.item
        else:
            items.pop(bid, None)
    removed = []  # blocks that had data and have none now (no item touches them, or empty)
    for key, entry in previous.items():
        now = blocks.get(key)
        if entry.get("status") != "written" or (now and now["status"] == "written"):
            continue
        removed.append(key)
        for rel in entry.get("files", {}).values():
            (out / rel).unlink(missing_ok=True)
        z, bx, by = (int(v) for v in key.split("/"))
        items.pop(block_id(z, bx, by), None)
    live = {b: items[b] for b in sorted(items)}
    _write_catalog(out, list(live.values()))
    recipe_json = recipe.to_json() | {
        "catalog_version": version,
        "catalog_sha256": digest,
        "max_zoom_reason": reason,
        "block_zoom_offset": 4,
        "built": stamp,
        "blocks": dict(sorted(blocks.items(), key=lambda kv: _key_order(kv[0]))),
    }
    staged = out / f".{RECIPE}.{uuid.uuid4().hex}"
    staged.write_text(json.dumps(recipe_json, indent=1))
    os.replace(staged, out / RECIPE)  # last: a server takes the new recipe with the new blocks
    return BuildReport(
        out=out,
        max_zoom=max_zoom,
        max_zoom_reason=reason,
        rendered=[r.key for r in results if r.status == "written"],
        kept=kept,
        removed=sorted(removed, key=_key_order),
        empty=[r.key for r in results if r.status == "empty"],
        blocks=len(live),
    )


def _key_order(key: str) -> tuple[int, ...]:
    return tuple(int(v) for v in key.split("/"))


def _read_recipe(out: Path) -> dict[str, Any] | None:
    try:
        recipe = json.loads((out / RECIPE).read_text())
    except (OSError, ValueError):
        return None
    return recipe if recipe.get("format") == FORMAT else None


def _read_items(out: Path) -> dict[str, dict[str, Any]]:
    """The block items of the pyramid in `out` (its pyramid.ndjson, pyramid.parquet's source)."""
    path = out / "pyramid.ndjson"
    if not path.is_file():
        return {}
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {item["id"]: item for item in items}


def _write_catalog(out: Path, items: list[dict[str, Any]]) -> None:
    """pyramid.ndjson and pyramid.parquet (terrazzo index's writer); no block: no parquet."""
    source = out / "pyramid.ndjson"
    source.write_text("".join(json.dumps(item) + "\n" for item in items))
    if items:
        index_items(source, out / CATALOG)
    else:
        (out / CATALOG).unlink(missing_ok=True)
        shutil.rmtree(out / "blocks", ignore_errors=True)
