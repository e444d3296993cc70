"""POST /chunks: many array chunks in one request, streamed back as they finish."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, model_validator

from app import responses
from app.encoders import CHUNKS_MEDIA_TYPE, chunk_frame_parts, frame
from app.params import algorithm_step, api_router
from core.algorithms import for_grid
from core.catalog import SearchQuery, parse_datetime_range
from core.chunks import (
    GROUP_BY,
    ChunkSpec,
    check_crs,
    check_dtype,
    check_limits,
    stream_chunks,
)
from core.engine import ParamError, ReadParams
from core.filters import parse as parse_filter
from core.plan import Grid
from core.statistics import StatisticsError, StatsOptions

router = api_router("chunks")
log = logging.getLogger("terrazzo.chunks")

FRAMING = """
The response (`application/x-terrazzo-chunks`) is a stream of frames, one per chunk in completion
order, then an end frame. Each frame is `b"TZCH"`, a little-endian uint32 header length, a UTF-8
JSON header, and the payload. The header carries `id`, `status` (`ok`, `empty`, `error`), `error`,
`retry` (true when asking again may succeed: a timeout; false when the request must change),
`item_errors`, `truncated` (which search limit left items out, or null), `dtype`, `shape` `[time,
band, y, x]`, `transform`, `crs`, `time` labels and `payload` = `{"data": [offset, length], "mask":
[offset, length]}`: data in C order, little-endian; mask `(time, y, x)` packed with `numpy.packbits`
(1 = data). The end frame has status `end` and the counts. Why framed raw arrays: the client needs
only numpy (no Arrow), the frames stream one by one without base64, and a cut stream is detected (no
end frame).
`dry_run: true` returns JSON plans instead (items, COG levels, internal tiles, bytes).
"""


class ChunkIn(BaseModel):
    id: str = Field(description="Echoed back to match results.")
    bbox: tuple[float, float, float, float] = Field(description="minx, miny, maxx, maxy in `crs`.")
    width: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=1)
    resolution: float | tuple[float, float] | None = Field(
        None, description="Pixel size in `crs` units (instead of width/height)."
    )


class ChunksRequest(BaseModel):
    crs: str = Field(
        description="CRS of the chunk bboxes and of the output grids, e.g. EPSG:32632."
    )
    chunks: list[ChunkIn] = Field(min_length=1)
    collections: list[str] = []
    datetime: str | None = None
    ids: list[str] = []
    filter: str | dict[str, Any] | None = Field(None, description="CQL2-text or CQL2-JSON.")
    sortby: list[str] | str = "-datetime"
    # TiTiler-pgstac's search limits, as on GET /tiles (capped by the server's maxima)
    items_limit: int | None = Field(None, ge=1, description="Items per chunk at most.")
    scan_limit: int | None = Field(None, ge=1, description="Candidate items looked at.")
    time_limit: float | None = Field(None, gt=0, description="Seconds one search may take.")
    exitwhenfull: bool | None = Field(None, description="Default: on for method first.")
    skipcovered: bool | None = Field(None, description="Default: on for method first.")
    assets: list[str] = []
    bidx: list[int] = []
    expression: str | None = Field(
        None,
        max_length=2000,
        description="Band math per item (as on the tile routes), float32 out.",
    )
    algorithm: str | None = Field(
        None, description="On each layer's mosaic: hillshade, contours, terrarium, ... (tiles')."
    )
    algorithm_params: dict[str, Any] | str | None = Field(
        None, description='The algorithm\'s parameters, e.g. {"azimuth": 315}.'
    )
    statistics: bool | dict[str, Any] = Field(
        False,
        description="true, or options {percentiles, histogram_bins, histogram_range, "
        "categorical, categories}: each chunk's frame carries rio-tiler's statistics of each "
        "band, per time layer (`statistics` in its header).",
    )
    method: str = "first"
    resampling: str = "nearest"
    dtype: str | None = Field(None, description="Output dtype, e.g. float32 (default: the data's).")
    nodata: float | None = Field(None, description="Override the files' nodata value.")
    unscale: bool = Field(
        False, description="Apply each band's scale/offset (the file's, else raster:bands)."
    )
    group_by: Literal[GROUP_BY] | None = Field(  # type: ignore[valid-type]
        None,
        description="A time axis: one layer per day, month, year, datetime (= time), item "
        "(= id) or solar_day (the local solar date at the item's longitude).",
    )
    dry_run: bool = False
    plans: bool = Field(
        True,
        description="Dry runs: each chunk's read plan (items, levels, tiles); false: "
        "only its status, items, time labels and layout (what a lazy client needs).",
    )

    @model_validator(mode="after")
    def _unique_ids(self) -> ChunksRequest:
        seen: set[str] = set()
        for chunk in self.chunks:
            if chunk.id in seen:
                raise ValueError(f"chunks: id {chunk.id!r} appears twice; ids must be unique")
            seen.add(chunk.id)
        return self


def _specs(body: ChunksRequest) -> list[ChunkSpec]:
    return [
        ChunkSpec.make(c.id, c.bbox, width=c.width, height=c.height, resolution=c.resolution)
        for c in body.chunks
    ]


def _on_chunks(step: Any, crs: str, specs: list[ChunkSpec]) -> Any:
    """The algorithm as it runs on these chunks: one in ground units (slope) takes their pixel
    size, here, since core.chunks hands one ReadParams to every chunk (a tile's read binds
    its own in Engine.read). Chunks of different pixel sizes are a 400, not a wrong slope."""
    if step is None or getattr(step, "on_grid", None) is None:
        return step
    grids = [Grid.from_bounds(crs, s.bbox, s.width, s.height) for s in specs]
    first = (abs(grids[0].transform.a), abs(grids[0].transform.e))
    for grid in grids[1:]:
        size = (abs(grid.transform.a), abs(grid.transform.e))
        if any(abs(a - b) > 1e-9 * max(a, b) for a, b in zip(size, first, strict=True)):
            raise ParamError(
                f"algorithm: {type(step).__name__.lower()} needs one pixel size for every chunk "
                f"of a request (got {first} and {size}); send each resolution in its own request"
            )
    return for_grid(step, grids[0])


def _stats_options(asked: bool | dict[str, Any]) -> StatsOptions | None:
    """The chunk statistics asked for, as core.statistics options (a bad one: a 400)."""
    if asked is False:
        return None
    options = {} if asked is True else dict(asked)
    names = {"percentiles", "histogram_bins", "histogram_range", "categorical", "categories"}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ParamError(f"statistics: unknown {unknown}; it takes {sorted(names)}")
    try:
        return StatsOptions(
            categorical=bool(options.get("categorical", False)),
            categories=tuple(float(c) for c in options.get("categories", ())),
            percentiles=tuple(int(p) for p in options.get("percentiles", (2, 98))),
            bins=(
                b
                if isinstance(b := options.get("histogram_bins", 10), int)
                else tuple(float(e) for e in b)
            ),
            range=tuple(options["histogram_range"]) if "histogram_range" in options else None,
        )
    except (StatisticsError, TypeError, ValueError) as exc:
        raise ParamError(f"statistics: {exc}") from exc


@router.post(
    "/chunks",
    summary="Read many array chunks; streamed as they finish",
    description=FRAMING,
    response_class=StreamingResponse,
    responses=responses.CHUNKS,
)
async def chunks(request: Request, body: ChunksRequest) -> Any:
    engine = request.app.state.engine
    check_dtype(body.dtype)
    check_crs(body.crs)
    specs = _specs(body)
    check_limits(
        specs,
        max_chunks=engine.settings.max_chunks,
        max_pixels=engine.settings.max_chunk_pixels,
    )
    query = SearchQuery(
        datetime=parse_datetime_range(body.datetime) if body.datetime else None,
        collections=tuple(body.collections),
        ids=tuple(body.ids),
        filter=parse_filter(body.filter) if body.filter else None,
        sortby=tuple(body.sortby.split(",") if isinstance(body.sortby, str) else body.sortby),
        limit=body.items_limit,
        scan_limit=body.scan_limit,
        time_limit=body.time_limit,
        exitwhenfull=body.exitwhenfull,
        skipcovered=body.skipcovered,
    )
    params = ReadParams(
        assets=engine.resolve_assets(tuple(body.assets)),
        bidx=tuple(body.bidx),
        expression=(body.expression or "").strip() or None,
        algorithm=_on_chunks(
            algorithm_step(body.algorithm, body.algorithm_params), body.crs, specs
        ),
        method=body.method.lower(),
        resampling=body.resampling.lower(),
        nodata=body.nodata,
        unscale=body.unscale,
    )
    # a bad sortby, filter, bidx or expression: one 400 for the request, not an error per chunk
    # (headers opened only when bands can refuse it: no serial round trip before the reads)
    await engine.check(query, params, headers=False)
    results = stream_chunks(
        engine,
        specs,
        body.crs,
        query,
        params,
        group_by=body.group_by,
        dtype=body.dtype,
        dry_run=body.dry_run,
        statistics=_stats_options(body.statistics),
    )
    if body.dry_run:
        plans = [
            {
                "id": r.id,
                "status": r.status,
                "error": r.error,
                "items": r.items,
                "time": r.time,
                "time_items": r.time_items,
                "layout": r.layout,
                "plan": r.plan if body.plans else None,
                "bytes": r.plan["bytes"] if r.plan else 0,
            }
            async for r in results
        ]
        return JSONResponse({"chunks": plans, "bytes": sum(p["bytes"] for p in plans)})
    return StallSafeStream(
        _frames(results),
        media_type=CHUNKS_MEDIA_TYPE,
        stall_timeout_s=engine.settings.stream_stall_timeout_s,
    )


class StallSafeStream(StreamingResponse):
    """A stream that gives up on a client that stops reading.

    uvicorn applies backpressure (a send waits while the socket buffer is full), so a client
    that never reads would hold this request, its chunks in flight and their arrays forever.
    After `stall_timeout_s` without progress the stream ends, its chunk reads are cancelled and
    the connection is closed; a reading client never waits that long for one frame.
    """

    def __init__(self, content: AsyncIterator[Any], *, stall_timeout_s: float, **kw: Any):
        super().__init__(content, **kw)
        self.stall_timeout_s = stall_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def timed_send(message: Any) -> None:
            timeout = asyncio.timeout(self.stall_timeout_s)
            try:
                async with timeout:
                    await send(message)
            except TimeoutError:
                if timeout.expired():  # this send's own deadline, not a TimeoutError from below
                    raise _Stalled from None
                raise

        try:
            await super().__call__(scope, receive, timed_send)
        except _Stalled:
            log.warning("chunks stream: client read nothing for %s s; closed", self.stall_timeout_s)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


class _Stalled(Exception):
    """A send waited `stall_timeout_s` (only that: any other TimeoutError, e.g. from the body,
    is an error of the stream, logged as one, never passed off as a client that stopped)."""


async def _frames(results: AsyncIterator) -> AsyncIterator[bytes | memoryview]:
    counts = {"ok": 0, "empty": 0, "error": 0}
    async for result in results:
        counts[result.status] += 1
        for part in chunk_frame_parts(result):  # the pixels as they are, never joined
            yield part
    yield frame({"id": None, "status": "end", "chunks": sum(counts.values()), **counts})
