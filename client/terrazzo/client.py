"""AsyncClient (the one implementation) and Client (a blocking layer over it).

Why this shape (see the seeds in the project's shared notes):
- One shared httpx connection pool per client, bounded by `concurrency`; every fan-out is
  bounded by the same semaphore.
- Retries on 429/502/503/504 and transport errors with exponential backoff and full jitter,
  honouring Retry-After up to `retry_after_cap`; past the cap or the last retry, a
  multi-chunk read raises `ReadInterrupted` carrying what finished and a `resume()`.
- Cancellation (task cancel, Ctrl-C) is never caught as a transient: only `Exception`s are.
- `Client` runs the async code on its own event-loop thread, so it works the same from a
  script, from Jupyter (where a loop is already running) and from Dask workers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import random
import sys
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np

from terrazzo import layout
from terrazzo.errors import ChunkError, ReadInterrupted, ServerError, TransientError
from terrazzo.framing import MEDIA_TYPE, Chunk, FramingError, aiter_frames

T = TypeVar("T")
RETRY_STATUS = {429, 502, 503, 504}
AREA = ("bbox", "crs", "resolution", "shape", "anchor", "bbox_crs", "geopolygon", "like")
DRY_RUN_BATCH = 500  # chunks per dry-run request (the server takes up to 10,000)


@dataclass(frozen=True)
class Config:
    """Everything a client needs, picklable (Dask ships it to workers)."""

    url: str
    concurrency: int = 16
    retries: int = 4
    timeout: float = 120.0
    backoff: float = 0.5
    backoff_cap: float = 30.0
    retry_after_cap: float = 60.0
    chunks_per_request: int = 8
    headers: dict[str, str] = field(default_factory=dict)


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return "ipykernel" in sys.modules or sys.stderr.isatty()


class _Progress:
    """tqdm when there is one and it is wanted; otherwise nothing."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="chunk")
            except ImportError:
                self.bar = None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class AsyncClient:
    """Terrazzo client for asyncio code: `await client.read(...)`, `await client.tile(...)`."""

    def __init__(self, url: str, **options: Any) -> None:
        self.config = Config(url=url.rstrip("/"), **options)
        self._http: httpx.AsyncClient | None = None
        self._limit: asyncio.Semaphore | None = None
        self._finalizer: weakref.finalize | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
        if self._http is None or self._limit is None:
            c = self.config
            self._http = httpx.AsyncClient(
                base_url=c.url,
                timeout=c.timeout,
                headers=c.headers,
                limits=httpx.Limits(max_connections=c.concurrency),
            )
            self._limit = asyncio.Semaphore(c.concurrency)
            # a client dropped without aclose() still closes its connections (no leaked
            # sockets, no ResourceWarning): on its loop, when it is collected
            self._finalizer = weakref.finalize(
                self, _close_later, self._http, asyncio.get_running_loop()
            )
        return self._http, self._limit

    # -- retries -----------------------------------------------------------------------------

    def _delay(self, attempt: int, error: TransientError) -> float:
        """Full-jitter backoff; a server's Retry-After wins (it knows), up to the cap."""
        c = self.config
        if error.retry_after is not None:
            return error.retry_after
        return random.uniform(0, min(c.backoff_cap, c.backoff * 2**attempt))

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await call()
            except TransientError as exc:
                too_long = (exc.retry_after or 0) > self.config.retry_after_cap
                if attempt >= self.config.retries or too_long:
                    raise
                await asyncio.sleep(self._delay(attempt, exc))
                attempt += 1

    @staticmethod
    def _check(response: httpx.Response, body: bytes) -> None:
        if response.status_code < 400:
            return
        try:
            payload = httpx.Response(200, content=body).json()
            detail = payload.get("detail", body.decode(errors="replace"))
        except Exception:
            payload, detail = None, body.decode(errors="replace")[:500]
        if response.status_code in RETRY_STATUS:
            after = response.headers.get("Retry-After")
            raise TransientError(
                f"HTTP {response.status_code}: {detail}",
                retry_after=float(after) if after and after.replace(".", "", 1).isdigit() else None,
            )
        raise ServerError(response.status_code, str(detail), payload)

    async def _get(self, path: str, params: dict[str, Any]) -> httpx.Response:
        http, limit = self._client()

        async def once() -> httpx.Response:
            async with limit:
                try:
                    response = await http.get(path, params=_query(params))
                except httpx.TransportError as exc:
                    raise TransientError(f"{type(exc).__name__}: {exc}") from exc
            self._check(response, response.content)
            return response

        return await self._retrying(once)

    # -- tiles -------------------------------------------------------------------------------

    async def tile_bytes(
        self,
        z: int,
        x: int,
        y: int,
        *,
        tms: str = "WebMercatorQuad",
        format: str = "png",
        **params: Any,
    ) -> bytes:
        """The encoded tile image (png, jpeg, webp, npy, tif); b"" when no item covers it."""
        response = await self._get(f"/tiles/{tms}/{z}/{x}/{y}.{format}", params)
        return response.content

    async def tile(
        self, z: int, x: int, y: int, *, tms: str = "WebMercatorQuad", **params: Any
    ) -> np.ma.MaskedArray | None:
        """The tile as a (band, y, x) masked array; None when no item covers it."""
        body = await self.tile_bytes(z, x, y, tms=tms, format="npy", **params)
        if not body:
            return None
        stacked = np.load(io.BytesIO(body))
        data, mask = stacked[:-1], stacked[-1] == 0
        return np.ma.MaskedArray(data, mask=np.broadcast_to(mask, data.shape))

    async def info(self) -> dict[str, Any]:
        return (await self._get("/info", {})).json()

    async def statistics(
        self,
        bbox: Sequence[float] | None = None,
        *,
        geometry: Any = None,
        **params: Any,
    ) -> Any:
        """rio-tiler's statistics of the mosaic, per output band: over `bbox` (lon/lat, or in
        `bbox_crs`) as `{band: {...}}`, or inside `geometry` (a GeoJSON Feature, a
        FeatureCollection, a geometry dict or anything with `__geo_interface__`, e.g. shapely)
        as the server's Feature(Collection) with `properties.statistics`. `params` are the
        tile parameters (assets, expression, algorithm, datetime...) and the statistics
        options (`width`/`height`/`max_size`, `dst_crs`, `p`, `histogram_bins`, `coverage`...).
        """
        if (bbox is None) == (geometry is None):
            raise TypeError("give bbox or geometry")
        if bbox is not None:
            box = ",".join(str(float(v)) for v in bbox)
            return (await self._get("/statistics", {**params, "bbox": box})).json()
        return (await self._post_json("/statistics", _feature(geometry), params)).json()

    async def _post_json(self, path: str, body: Any, params: dict[str, Any]) -> httpx.Response:
        http, limit = self._client()

        async def once() -> httpx.Response:
            async with limit:
                try:
                    response = await http.post(path, params=_query(params), json=body)
                except httpx.TransportError as exc:
                    raise TransientError(f"{type(exc).__name__}: {exc}") from exc
            self._check(response, response.content)
            return response

        return await self._retrying(once)

    # -- chunks ------------------------------------------------------------------------------

    async def stream_chunks(
        self, chunks: Sequence[dict[str, Any]], body: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        """One POST /chunks, frames as they arrive (no retries: see `fetch_chunks`)."""
        http, limit = self._client()
        async with limit:
            try:
                async with http.stream(
                    "POST",
                    "/chunks",
                    json={**body, "chunks": layout.wire(chunks)},
                    headers={"accept": MEDIA_TYPE},
                ) as response:
                    if response.status_code >= 400:
                        self._check(response, await response.aread())
                    async for chunk in aiter_frames(response.aiter_bytes()):
                        yield chunk
            except httpx.TransportError as exc:
                raise TransientError(f"{type(exc).__name__}: {exc}") from exc
            except FramingError as exc:
                raise TransientError(str(exc)) from exc

    async def fetch_chunks(
        self,
        chunks: Sequence[dict[str, Any]],
        body: dict[str, Any],
        *,
        finished: dict[str, Chunk] | None = None,
        progress: bool | None = None,
    ) -> dict[str, Chunk]:
        """Every chunk's final answer by id, in batches per request; resumable when interrupted.

        Chunks already in `finished` are not read again. A chunk error the server marks as
        worth retrying (a timeout) is retried with its batch, and after the last retry the
        read is interrupted (ReadInterrupted); any other chunk error is returned as that
        chunk's answer (status "error"), never retried: `terrazzo.layout.check_errors` raises it.
        """
        done: dict[str, Chunk] = dict(finished or {})
        todo = [c for c in chunks if c["id"] not in done]
        size = max(1, self.config.chunks_per_request)
        batches = [todo[i : i + size] for i in range(0, len(todo), size)]
        bar = _Progress(len(chunks), _show_progress(progress), "terrazzo")
        bar.update(len(chunks) - len(todo))

        async def batch_task(batch: list[dict[str, Any]]) -> None:
            pending = {c["id"]: c for c in batch}

            async def attempt() -> None:
                errors: list[str] = []
                async for chunk in self.stream_chunks(list(pending.values()), body):
                    if chunk.id not in pending:
                        continue
                    # a chunk error the server says asking again will not fix is its final
                    # answer (the caller's errors= decides); only the others are retried
                    if chunk.status in ("ok", "empty") or not chunk.header.get("retry", True):
                        done[chunk.id] = chunk
                        del pending[chunk.id]
                        bar.update()
                    elif chunk.error:
                        errors.append(f"chunk {chunk.id}: {chunk.error}")
                if pending:
                    why = f" ({errors[0]})" if errors else ""
                    raise TransientError(f"{len(pending)} chunks failed on the server{why}")

            await self._retrying(attempt)

        tasks = [asyncio.ensure_future(batch_task(b)) for b in batches]
        try:
            failure: BaseException | None = None
            for task in asyncio.as_completed(tasks):
                try:
                    await task
                except (TransientError, ServerError) as exc:
                    failure = failure or exc
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
        if failure is not None:
            missing = [c["id"] for c in chunks if c["id"] not in done]
            if isinstance(failure, ServerError) and not done:
                raise failure

            async def again(previous: dict[str, Chunk]) -> dict[str, Chunk]:
                return await self.fetch_chunks(chunks, body, finished=previous, progress=progress)

            raise ReadInterrupted(failure, done, missing, again)
        return done

    # -- arrays ------------------------------------------------------------------------------

    async def read(
        self,
        bbox: Sequence[float] | None = None,
        *,
        crs: str | None = None,
        resolution: float | Sequence[float] | None = None,
        shape: Sequence[int] | None = None,
        anchor: str | Sequence[float] = "edge",
        bbox_crs: str | None = None,
        geopolygon: Any = None,
        like: Any = None,
        chunk_size: int | tuple[int, int] = 1024,
        chunks: dict[str, int] | None = None,
        progress: bool | None = None,
        errors: str = "raise",
        allow_empty: bool = False,
        max_bytes: int | None = None,
        **params: Any,
    ) -> Any:
        """The area as an eager xarray.DataArray (time, band, y, x), read chunk by chunk.

        The grid as odc-stac makes it (terrazzo.grid): `bbox` in `bbox_crs` (default: `crs`),
        or a lon/lat `geopolygon`, or `like=` another DataArray; `crs="utm"` for the zone of
        the area's centre; `resolution` (a number or (x, y)) snapped to its multiples
        (`anchor`), or `shape=(height, width)`.

        `params` are the request's read and search fields: assets, bidx (or odc-stac's
        `bands`), expression (band math per item, TiTiler's syntax: one float32 band per
        `;`-separated block), datetime, collections, ids, filter, sortby, method, resampling, dtype,
        nodata, groupby/group_by (default "time": a layer per datetime; "solar_day", "day",
        "month", "year", "id"; None: one mosaic layer). `chunks={"x": .., "y": ..}` or
        `chunk_size` sets the pixels per chunk request.
        `errors`: "raise" (ChunkError, ItemError naming the item and chunk), "warn" or "ignore"
        (the read with holes where failed items had data). No matching item at all raises
        NoItemsFound unless `allow_empty` (then the array has no time layer, and the bands,
        names and dtype a read of these assets has elsewhere in the catalog). A read larger
        than `max_bytes` (default: half the memory available) raises ReadTooLarge before any
        request: `open` it lazily instead.
        """
        layout.check_errors_option(errors)
        area = {k: v for k, v in locals().items() if k in AREA}  # Grid.make's arguments
        grid, specs, body = layout.prepare(area, chunk_size, params, chunks)
        layout.check_size(grid, params, max_bytes)

        async def finish(finished: dict[str, Chunk]) -> Any:
            try:
                chunks = await self.fetch_chunks(specs, body, finished=finished, progress=progress)
            except ReadInterrupted as exc:
                exc._continuation = finish
                raise
            headers = [c.header for c in chunks.values()]
            hint = None
            if not allow_empty:
                layout.check_found(headers, body)
            elif not any(h.get("items") for h in headers):
                hint = await self.probe_layout(body)
            result = layout.assemble(grid, specs, chunks, params, hint)
            layout.check_errors(chunks, errors, result)
            return result

        return await finish({})

    async def open(
        self,
        bbox: Sequence[float] | None = None,
        *,
        crs: str | None = None,
        resolution: float | Sequence[float] | None = None,
        shape: Sequence[int] | None = None,
        anchor: str | Sequence[float] = "edge",
        bbox_crs: str | None = None,
        geopolygon: Any = None,
        like: Any = None,
        chunk_size: int | tuple[int, int] = 1024,
        chunks: dict[str, int] | None = None,
        progress: bool | None = None,
        errors: str = "raise",
        allow_empty: bool = False,
        **params: Any,
    ) -> Any:
        """A lazy, Dask-backed DataArray: one Dask chunk per chunk request.

        A dry run first learns the time labels, bands and dtype, so nothing is read until
        `.compute()` (which, on a dask.distributed cluster, spreads the reads over workers).
        `errors` and `allow_empty` as for `read`: a plan the server refuses raises now, item
        errors raise (or warn) when the block that meets them is computed.
        """
        layout.check_errors_option(errors)
        area = {k: v for k, v in locals().items() if k in AREA}  # Grid.make's arguments
        grid, specs, body = layout.prepare(area, chunk_size, params, chunks)
        plans = await self.dry_run(specs, body, progress=progress)
        refused = {str(p["id"]): p.get("error") or "error" for p in plans if p["status"] == "error"}
        if refused and errors == "raise":
            first = next(iter(refused))
            raise ChunkError(first, refused[first], refused, {})
        if not allow_empty:
            layout.check_found(plans, body)
        elif not any(p.get("items") for p in plans):
            plans = [*plans, {"id": None, "layout": await self.probe_layout(body)}]
        array = layout.lazy(self.config, grid, specs, body, plans, params, errors)
        if chunks and "time" in chunks and array.sizes["time"]:
            array = array.chunk({"time": chunks["time"]})
        return array

    async def probe_layout(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The bands, dtype and band names a read with `body` gives, for an empty result to
        be typed like a full one: a dry run of one small chunk over the catalog's extent,
        without the time and item filters (None when the catalog has nothing to read)."""
        extent = (await self.info()).get("bbox")
        if not extent:
            return None
        probe = {k: v for k, v in body.items() if k not in ("datetime", "ids", "filter", "crs")}
        chunk = {"id": "probe", "bbox": extent, "width": 16, "height": 16}
        plans = await self.dry_run([chunk], {**probe, "crs": "EPSG:4326"}, progress=False)
        return plans[0].get("layout") if plans else None

    async def dry_run(
        self,
        specs: Sequence[dict[str, Any]],
        body: dict[str, Any],
        *,
        progress: bool | None = None,
    ) -> list[dict[str, Any]]:
        """The server's read plans for `specs` (no pixels read): what each chunk would read
        (items, time labels, bands and dtype), without the per-tile detail. Batches of
        DRY_RUN_BATCH chunks run concurrently (bounded by `concurrency`), with a progress bar."""
        http, limit = self._client()
        batches = [list(specs[i : i + DRY_RUN_BATCH]) for i in range(0, len(specs), DRY_RUN_BATCH)]
        bar = _Progress(len(specs), _show_progress(progress), "terrazzo plan")

        async def once(part: list[dict[str, Any]]) -> list[dict[str, Any]]:
            request = {**body, "chunks": layout.wire(part), "dry_run": True, "plans": False}
            async with limit:
                try:
                    r = await http.post("/chunks", json=request)
                except httpx.TransportError as exc:
                    raise TransientError(str(exc)) from exc
            self._check(r, r.content)
            bar.update(len(part))
            return r.json()["chunks"]

        try:
            results = await asyncio.gather(
                *(self._retrying(lambda part=part: once(part)) for part in batches)
            )
        finally:
            bar.close()
        return [plan for part in results for plan in part]


def _close_later(http: httpx.AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
    """Close a collected AsyncClient's connections on the loop they belong to."""
    if loop.is_closed() or http.is_closed:
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(http.aclose())
    elif loop.is_running():
        asyncio.run_coroutine_threadsafe(http.aclose(), loop)


def _stop_loop(
    owned: AsyncClient, loop: asyncio.AbstractEventLoop, thread: threading.Thread
) -> None:
    """A Client's shutdown (close(), or its finalizer): connections, then its loop thread."""
    if loop.is_running():
        closing = asyncio.run_coroutine_threadsafe(owned.aclose(), loop)
        with contextlib.suppress(Exception):
            closing.result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not threading.current_thread():
            thread.join(timeout=5)
    if not loop.is_running() and not loop.is_closed():
        loop.close()


def _query(params: dict[str, Any]) -> list[tuple[str, Any]]:
    """Query pairs; lists become repeated keys (TiTiler's spelling)."""
    pairs: list[tuple[str, Any]] = []
    for key, value in params.items():
        if value is None:
            continue
        if isinstance(value, list | tuple):
            pairs += [(key, str(v)) for v in value]
        else:
            pairs.append((key, str(value)))
    return pairs


class Client:
    """Blocking Terrazzo client: the AsyncClient's methods run on a private loop thread.

    Works where a loop is already running (Jupyter) and never falls back to serial reads.
    Ctrl-C or cancelling the caller cancels the work on the loop thread.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self._async = AsyncClient(url, **options)
        self.config = self._async.config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="terrazzo-client"
        )
        self._thread.start()
        # closed when dropped without close(): connections, loop and thread (not self: the
        # finalizer holds only what it closes)
        self._finalizer = weakref.finalize(self, _stop_loop, self._async, self._loop, self._thread)

    def _run(self, coro: Awaitable[T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            while True:  # short waits, so Ctrl-C is seen at once on every platform
                try:
                    return future.result(timeout=0.2)
                except concurrent.futures.TimeoutError:
                    continue
        except ReadInterrupted as exc:
            exc._runner = self._run
            raise
        except BaseException:
            future.cancel()  # Ctrl-C / cancellation: stop the work, then let it propagate
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._finalizer()

    def tile(self, z: int, x: int, y: int, **kwargs: Any) -> np.ma.MaskedArray | None:
        return self._run(self._async.tile(z, x, y, **kwargs))

    def tile_bytes(self, z: int, x: int, y: int, **kwargs: Any) -> bytes:
        return self._run(self._async.tile_bytes(z, x, y, **kwargs))

    def info(self) -> dict[str, Any]:
        return self._run(self._async.info())

    def statistics(self, bbox: Sequence[float] | None = None, **kwargs: Any) -> Any:
        return self._run(self._async.statistics(bbox, **kwargs))

    def read(self, bbox: Sequence[float] | None = None, **kwargs: Any) -> Any:
        return self._run(self._async.read(bbox, **kwargs))

    def open(self, bbox: Sequence[float] | None = None, **kwargs: Any) -> Any:
        return self._run(self._async.open(bbox, **kwargs))

    def fetch_chunks(
        self, chunks: Sequence[dict[str, Any]], body: dict[str, Any], **kwargs: Any
    ) -> dict[str, Chunk]:
        return self._run(self._async.fetch_chunks(chunks, body, **kwargs))


def _feature(geometry: Any) -> dict[str, Any]:
    """A GeoJSON Feature (or FeatureCollection) for POST /statistics."""
    if hasattr(geometry, "__geo_interface__"):
        geometry = geometry.__geo_interface__
    if not isinstance(geometry, dict):
        raise TypeError("geometry: a GeoJSON dict or an object with __geo_interface__")
    if geometry.get("type") in ("Feature", "FeatureCollection"):
        return geometry
    return {"type": "Feature", "properties": {}, "geometry": geometry}


__all__ = ["AsyncClient", "Client", "Config"]
