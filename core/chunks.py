"""Bulk array reads: many output grids ("chunks") in one request, each its own result.

Each chunk goes through the same engine as a tile (plan → search → fetch → compute). Chunks of
one request share decoded COG tiles (the fetcher's tile cache), run at most `concurrency` at a
time, and are yielded as they finish. A chunk that fails becomes a result with its error; it
never stops the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyproj

from core.bounded import run_bounded
from core.catalog import SearchQuery
from core.catalog.prefilter import Prefilter
from core.engine import Engine, ParamError, ReadFailed, ReadParams, band_layout
from core.plan import Grid, ItemRead, ReadPlan, describe_error
from core.statistics import StatsOptions, area_statistics
from core.timing import StageClock

log = logging.getLogger("terrazzo.chunks")

# time axes: one layer per label. odc-stac's spellings too: time (= datetime), id (= item),
# solar_day (the local solar date at the item's longitude: one pass of a sun-synchronous
# satellite is one layer, even when it crosses UTC midnight)
GROUP_BY = ("day", "month", "year", "datetime", "item", "time", "id", "solar_day")


@dataclass(frozen=True)
class ChunkSpec:
    """One output grid: an id echoed back, a bbox in the request CRS, and its size."""

    id: str
    bbox: tuple[float, float, float, float]
    width: int
    height: int

    @classmethod
    def make(
        cls,
        id: str,
        bbox: tuple[float, float, float, float],
        *,
        width: int | None = None,
        height: int | None = None,
        resolution: float | tuple[float, float] | None = None,
    ) -> ChunkSpec:
        """From width/height, or from a resolution (pixel size in CRS units)."""
        minx, miny, maxx, maxy = bbox
        if not all(math.isfinite(v) for v in (*bbox, maxx - minx, maxy - miny)):
            raise ParamError(f"chunks[{id}].bbox: needs finite coordinates and size, got {bbox}")
        if not (maxx > minx and maxy > miny):
            raise ParamError(f"chunks[{id}].bbox: needs minx < maxx and miny < maxy, got {bbox}")
        if resolution is not None:
            rx, ry = resolution if isinstance(resolution, tuple) else (resolution, resolution)
            if not (rx > 0 and ry > 0 and math.isfinite(rx) and math.isfinite(ry)):
                raise ParamError(f"chunks[{id}].resolution: must be positive, got {resolution}")
            across, down = (maxx - minx) / rx, (maxy - miny) / ry
            if not (math.isfinite(across) and math.isfinite(down)):
                raise ParamError(
                    f"chunks[{id}].resolution: {resolution} makes a grid too large to count"
                )
            width = max(1, round(across))
            height = max(1, round(down))
        if not width or not height or width < 1 or height < 1:
            raise ParamError(f"chunks[{id}]: give width and height (pixels) or a resolution")
        return cls(id=id, bbox=bbox, width=int(width), height=int(height))

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass
class ChunkResult:
    """A finished chunk. data is (time, band, y, x), valid is (time, y, x)."""

    id: str
    status: str  # "ok", "empty" (no item has data there) or "error"
    grid: Grid
    data: np.ndarray | None = None
    valid: np.ndarray | None = None
    time: list[str | None] = field(default_factory=list)
    time_items: list[list[str]] = field(default_factory=list)  # the items of each time layer
    error: str | None = None
    # whether asking again may succeed: a timeout or a read cancelled from inside may; a bad
    # parameter, an unreadable item (the server already retried its store) or a bug will not
    retry: bool = False
    items: int = 0
    item_errors: list[tuple[str, str]] = field(default_factory=list)
    truncated: str = ""  # which search limit left matching items out ("" when none did)
    seconds: float = 0.0
    plan: dict[str, Any] | None = None  # dry runs only
    layout: dict[str, Any] | None = None  # dry runs only: bands and dtype of the data
    # per time layer, rio-tiler's statistics of each band (with `statistics` asked)
    statistics: list[dict[str, Any]] | None = None


def group_key(item: ItemRead, group_by: str | None) -> str | None:
    """The time label an item falls under (None: one layer for all items)."""
    if group_by is None:
        return None
    if group_by in ("item", "id"):
        return f"{item.datetime or ''}/{item.item_id}"
    if item.datetime is None:
        return None
    if group_by == "solar_day":
        when = dt.datetime.fromisoformat(item.datetime)
        return (when + dt.timedelta(hours=(item.lon or 0.0) / 15)).date().isoformat()
    if group_by == "time":
        return item.datetime
    return {
        "day": item.datetime[:10],
        "month": item.datetime[:7],
        "year": item.datetime[:4],
        "datetime": item.datetime,
    }[group_by]


def split_plan(plan: ReadPlan, group_by: str | None) -> list[tuple[str | None, ReadPlan]]:
    """One sub-plan per time label, labels ascending; mosaic order kept inside each."""
    if group_by is None:
        return [(None, plan)]
    groups: dict[str | None, list[ItemRead]] = {}
    for item in plan.items:
        groups.setdefault(group_key(item, group_by), []).append(item)
    return [
        (label, dataclasses.replace(plan, items=tuple(items)))
        for label, items in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))
    ]


async def read_chunk(
    engine: Engine,
    spec: ChunkSpec,
    crs: str,
    query: SearchQuery,
    params: ReadParams,
    *,
    group_by: str | None = None,
    dtype: str | None = None,
    dry_run: bool = False,
    statistics: StatsOptions | None = None,
) -> ChunkResult:
    """Read one chunk; every failure is captured in the result, this chunk's own cancellation
    is not (the client went away, or the stream is closing: all work must stop).

    A CancelledError that reaches here while this task was not cancelled comes from inside
    (a shared read cancelled by another, a library cancelling its own futures): that is this
    chunk's error, never the end of the stream for every other chunk."""
    started = time.perf_counter()
    grid = Grid.from_bounds(crs, spec.bbox, spec.width, spec.height)
    result = ChunkResult(id=spec.id, status="ok", grid=grid)
    if group_by is not None:  # each time layer is its own mosaic: no item covers another
        query = dataclasses.replace(query, skipcovered=False, exitwhenfull=False)
    try:
        async with asyncio.timeout(engine.settings.chunk_timeout_s):
            # an algorithm that looks at neighbours reads `buffer` pixels more on every side
            # (as tiles do) and crops them back in _fill
            buffer = getattr(params.algorithm, "buffer", 0) if params.algorithm else 0
            plan = await engine.plan(grid.buffered(buffer), query, params)
            result.items = len(plan.items)
            result.truncated = plan.truncated_why
            if dry_run:
                result.plan = plan.to_dict()
                result.status = "ok" if plan.items else "empty"
                groups = split_plan(plan, group_by)
                result.time = [label for label, _ in groups]
                result.time_items = [[i.item_id for i in p.items] for _, p in groups]
                result.layout = output_layout(plan, params, dtype)
                return result
            await _fill(engine, result, plan, query, params, group_by, dtype)
            if statistics is not None and result.data is not None:
                result.statistics = await _statistics(engine, result, plan, params, statistics)
    except TimeoutError:
        result.status = "error"
        result.error = f"timeout: not done in {engine.settings.chunk_timeout_s} s"
        result.retry = True
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is None or task.cancelling():
            raise  # this chunk was cancelled
        result.status = "error"
        result.error = f"cancelled inside the read, not by this request ({describe_error(exc)})"
        result.retry = True
    except ReadFailed as exc:
        result.status = "error"
        result.error = str(exc)
        result.item_errors = exc.errors
    except Exception as exc:  # a bad COG or an unexpected bug: this chunk only
        result.status = "error"
        result.error = describe_error(exc)
    finally:
        result.seconds = time.perf_counter() - started
    return result


async def _fill(
    engine: Engine,
    result: ChunkResult,
    plan: ReadPlan,
    query: SearchQuery,
    params: ReadParams,
    group_by: str | None,
    dtype: str | None,
) -> None:
    if not plan.items:
        if plan.errors:
            raise ReadFailed(list(plan.errors))
        result.status = "empty"
        return
    groups = split_plan(plan, group_by)
    layout = output_layout(plan, params, dtype)
    assert layout is not None  # the plan has items
    size = len(groups) * layout["bands"] * plan.grid.width * plan.grid.height
    size *= np.dtype(layout["dtype"]).itemsize
    limit = engine.settings.max_chunk_mb * 2**20
    if size > limit:
        raise LimitError(
            f"chunks[{result.id}]: the output would be {size / 2**20:.0f} MiB "
            f"({len(groups)} times x {layout['bands']} bands x {plan.grid.width}x"
            f"{plan.grid.height}); the limit is {engine.settings.max_chunk_mb} MiB per chunk "
            "(TERRAZZO_MAX_CHUNK_MB): use smaller chunks, fewer bands or a coarser group_by"
        )
    if group_by is None:  # one layer: holes the footprint shortcuts left are filled
        mosaics = [await engine.complete(plan, query, params, StageClock())]
    else:
        mosaics = await asyncio.gather(*(engine.execute(p, params) for _, p in groups))
    if params.algorithm is not None:  # on each layer's mosaic, in the pool (crops any buffer)
        for mosaic in mosaics:
            if mosaic is not None:
                mosaic.data, mosaic.valid = await engine.compute.run(
                    params.algorithm.apply, mosaic.data, mosaic.valid
                )
    if all(m is None or not m.valid.any() for m in mosaics):  # (truncated: valid all False)
        result.status = "empty"
        return
    template = next(m for m in mosaics if m is not None)
    out_dtype = np.dtype(dtype) if dtype else template.data.dtype
    g = result.grid
    data = np.zeros((len(groups), template.data.shape[0], g.height, g.width), dtype=out_dtype)
    valid = np.zeros((len(groups), g.height, g.width), dtype=bool)
    for t, mosaic in enumerate(mosaics):
        if mosaic is not None:
            data[t] = mosaic.data.astype(out_dtype, copy=False)
            valid[t] = mosaic.valid
            result.item_errors += mosaic.errors
    result.data, result.valid = data, valid
    result.time = [label for label, _ in groups]
    result.time_items = [[i.item_id for i in p.items] for _, p in groups]
    result.layout = layout


async def _statistics(
    engine: Engine,
    result: ChunkResult,
    plan: ReadPlan,
    params: ReadParams,
    options: StatsOptions,
) -> list[dict[str, Any]]:
    """Each time layer's statistics per band, computed in the pool (core.statistics)."""
    assert result.data is not None and result.valid is not None
    layout = output_layout(plan, params, None)
    names = tuple(layout["names"]) if layout else ()
    g = result.grid
    return [
        await engine.compute.run(
            area_statistics,
            result.data[t],
            result.valid[t],
            names,
            options,
            g.crs,
            tuple(g.transform)[:6],
        )
        for t in range(result.data.shape[0])
    ]


def output_layout(plan: ReadPlan, params: ReadParams, dtype: str | None) -> dict[str, Any] | None:
    """Bands and dtype a read of `plan` returns, without reading (for lazy clients)."""
    return band_layout(plan.items[0].reads, params, dtype) if plan.items else None


def check_limits(specs: list[ChunkSpec], *, max_chunks: int, max_pixels: int) -> None:
    """Refuse a request beyond the server's limits before any work starts."""
    if len(specs) > max_chunks:
        raise LimitError(
            f"chunks: {len(specs)} chunks in one request; the limit is {max_chunks} "
            "(TERRAZZO_MAX_CHUNKS): split the request"
        )
    for spec in specs:
        if spec.pixels > max_pixels:
            side = int(math.sqrt(max_pixels))
            raise LimitError(
                f"chunks[{spec.id}]: {spec.width}x{spec.height} = {spec.pixels} pixels; the limit "
                f"is {max_pixels} per chunk (TERRAZZO_MAX_CHUNK_PIXELS, e.g. {side}x{side})"
            )


class LimitError(ParamError):
    """A request larger than a configured limit."""


# Output dtypes a chunk may be cast to: numbers only. Anything else numpy accepts would be a
# way in: `V100000` (a 100 kB void per pixel), `O` (raw heap pointers), structured `i4,i4`.
OUTPUT_DTYPES = frozenset(
    f"{kind}{bits}"
    for kind, sizes in (
        ("uint", (8, 16, 32, 64)),
        ("int", (8, 16, 32, 64)),
        ("float", (16, 32, 64)),
    )
    for bits in sizes
)


@functools.lru_cache(maxsize=64)
def check_crs(crs: str) -> None:
    """Refuse a CRS pyproj cannot read, once per request (not as an error in every chunk)."""
    try:
        pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as exc:
        reason = str(exc).splitlines()[0][:200]
        raise ParamError(
            f"crs: {crs[:80]!r} is not a CRS ({reason}); e.g. EPSG:32632, an OGC URN or WKT"
        ) from None


def check_dtype(dtype: str | None) -> None:
    """Refuse an output dtype outside OUTPUT_DTYPES, naming the choices."""
    if dtype is None:
        return
    try:
        name = np.dtype(dtype).name if "," not in dtype else ""
    except TypeError:
        name = ""
    if name not in OUTPUT_DTYPES:
        raise ParamError(f"dtype: {dtype!r} is not one of {sorted(OUTPUT_DTYPES)}")


SEARCH_AHEAD_MAX_CHUNKS = 256  # a request's chunks searched as one area at most
SEARCH_AHEAD_SPREAD = 2.0  # ... when their union's area is at most this times their sum


async def _search_ahead(
    engine: Engine, specs: Sequence[ChunkSpec], crs: str, query: SearchQuery, params: ReadParams
) -> None:
    """One search over the union of the request's chunks before they start, for the rows it
    converts: the catalog's prefilter keeps them (`core.catalog.prefilter`), so each chunk's
    own search finds its items in memory (0.1 ms) instead of running a cold DuckDB query
    (3-4 ms, most of it turning nested asset structs into Python) -- a 1024×4096 read's four
    chunks ran four, one after another on two threads, 8-28 ms before their headers started.

    Only for a few compact chunks (the union at most SEARCH_AHEAD_SPREAD times their summed
    area: elsewhere it holds items no chunk reads) and a search the prefilter serves. Nothing
    depends on it: a failure here is logged and every chunk searches (and reports) anyway."""
    if not 1 < len(specs) <= SEARCH_AHEAD_MAX_CHUNKS:
        return
    union = (
        min(s.bbox[0] for s in specs),
        min(s.bbox[1] for s in specs),
        max(s.bbox[2] for s in specs),
        max(s.bbox[3] for s in specs),
    )
    area = (union[2] - union[0]) * (union[3] - union[1])
    summed = sum((s.bbox[2] - s.bbox[0]) * (s.bbox[3] - s.bbox[1]) for s in specs)
    if area > SEARCH_AHEAD_SPREAD * summed:
        return
    ahead = dataclasses.replace(
        query,
        assets=engine.resolve_assets(params.assets),  # the rows' key in the cache, as plan's
        skipcovered=False,
        exitwhenfull=False,
    )
    try:
        grid = Grid.from_bounds(crs, union, 1, 1)
        if Prefilter.serves(dataclasses.replace(ahead, bbox=grid.lonlat_bounds())):
            await engine.search(grid, ahead, params.method)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the chunks' own searches will say what is wrong
        log.debug("search ahead of %d chunks skipped: %s", len(specs), exc)


async def stream_chunks(
    engine: Engine,
    specs: Iterable[ChunkSpec],
    crs: str,
    query: SearchQuery,
    params: ReadParams,
    *,
    group_by: str | None = None,
    dtype: str | None = None,
    dry_run: bool = False,
    statistics: StatsOptions | None = None,
) -> AsyncIterator[ChunkResult]:
    """Results in completion order, at most `chunk_concurrency` chunks in flight."""
    if isinstance(specs, Sequence):
        await _search_ahead(engine, specs, crs, query, params)

    def one(spec: ChunkSpec):
        return read_chunk(
            engine,
            spec,
            crs,
            query,
            params,
            group_by=group_by,
            dtype=dtype,
            dry_run=dry_run,
            statistics=statistics,
        )

    async for result in run_bounded(specs, one, engine.settings.chunk_concurrency):
        yield result
