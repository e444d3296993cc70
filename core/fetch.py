"""Fetch stage: COG headers and pixel windows with async-geotiff over obstore stores.

Why this shape:
- Reads are network-bound, so they are coroutines on the event loop; decoding happens in
  async-tiff's Rust thread pool without the GIL.
- A store is chosen by href scheme and reused; opened headers are cached (bounded LRU keyed by
  href, the in-flight open shared so a burst of tiles opens a COG once).
- Concurrency is bounded twice: a global semaphore for the service, and the caller's own bound
  per request (see engine).
- Transient store errors are retried with exponential backoff and full jitter; permanent ones
  (missing file, corrupt header) fail at once. Cancellation is never caught, so a cancelled
  request stops its reads.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from async_geotiff import GeoTIFF, Overview

from core.access import AccessPolicy
from core.plan import AssetRead, Header, Level
from core.stores import Stores

T = TypeVar("T")

_TRANSIENT_TEXT = re.compile(
    r"time(d)? ?out|connection|reset by peer|temporar|broken pipe|\b(429|500|502|503|504)\b|"
    r"too many requests|service unavailable|slow ?down",
    re.IGNORECASE,
)
_PERMANENT_TEXT = re.compile(r"not ?found|no such file|permission|invalid range", re.IGNORECASE)


class FetchError(RuntimeError):
    """A read that failed for good (after retries where retrying made sense)."""


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: timeouts, dropped connections, 5xx/429 from the store."""
    if isinstance(exc, TimeoutError | ConnectionError):
        return True
    if isinstance(exc, FileNotFoundError | PermissionError | ValueError):
        return False
    text = str(exc)
    return bool(_TRANSIENT_TEXT.search(text)) and not _PERMANENT_TEXT.search(text)


async def with_retries(
    call: Callable[[], Awaitable[T]], *, retries: int, base: float, cap: float
) -> T:
    """Await `call()`, retrying transient errors with exponential backoff and full jitter."""
    attempt = 0
    while True:
        try:
            return await call()
        except Exception as exc:
            if attempt >= retries or not is_transient(exc):
                raise
            await asyncio.sleep(random.uniform(0, min(cap, base * 2**attempt)))
            attempt += 1


@dataclass(frozen=True)
class Pixels:
    """A decoded window: (bands, h, w) data and an (h, w) validity mask (True = data)."""

    data: np.ndarray
    valid: np.ndarray


def header_of(href: str, geotiff: GeoTIFF) -> Header:
    """The plain-data header the planner works from."""
    crs = geotiff.crs
    epsg = crs.to_epsg()
    levels = [geotiff, *geotiff.overviews]
    return Header(
        href=href,
        crs=f"EPSG:{epsg}" if epsg else crs.to_wkt(),
        count=geotiff.count,
        dtype=str(np.dtype(geotiff.dtype)),
        nodata=geotiff.nodata,
        has_mask=geotiff.mask_ifd is not None,
        levels=tuple(
            Level(
                transform=level.transform,
                width=level.width,
                height=level.height,
                tile_width=level.tile_width,
                tile_height=level.tile_height,
                tile_bytes=_tile_bytes(level),
            )
            for level in levels
        ),
    )


def _tile_bytes(level: GeoTIFF | Overview) -> tuple[int, ...]:
    data = list(level.ifd.tile_byte_counts or [])
    if level.mask_ifd is not None and level.mask_ifd.tile_byte_counts:
        data = [d + m for d, m in zip(data, level.mask_ifd.tile_byte_counts, strict=False)]
    return tuple(data)


class _Batch:
    """One coalesced fetch of several internal tiles, shared by every read that needs them.

    The fetch runs as its own task so that one reader's cancellation (e.g. `first` having
    filled its tile) does not fail the other readers; it is cancelled only when no reader
    waits for it any more, so a cancelled request stops its store reads.
    """

    def __init__(self, task: asyncio.Task[dict]) -> None:
        self.task = task
        self.waiters = 0

    @property
    def reusable(self) -> bool:
        return not self.task.done() or (not self.task.cancelled() and self.task.exception() is None)

    async def get(self, xy: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        self.waiters += 1
        try:
            return (await asyncio.shield(self.task))[xy]
        finally:
            self.waiters -= 1
            if self.waiters == 0 and not self.task.done():
                self.task.cancel()


class TileCache:
    """Decoded internal tiles shared by every read (neighbouring web tiles, chunks).

    Entries are shared fetches, so two chunks wanting the same tile at the same time fetch it
    once. Bounded by bytes; least recently used tiles go first; failed fetches are not kept.
    """

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, tuple[_Batch, int]] = OrderedDict()

    def get(self, key: tuple) -> _Batch | None:
        entry = self._entries.get(key)
        if entry is not None and not entry[0].reusable:
            self.drop(key)
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: tuple, batch: _Batch, size: int) -> None:
        self._entries[key] = (batch, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes -= old

    def drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]


def valid_mask(
    data: np.ndarray, mask: np.ndarray | None, nodata: float | None, alpha: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(data without alpha band, validity) following GDAL's order: mask, nodata, alpha, NaN."""
    if alpha is not None:
        valid = data[alpha] != 0
        data = np.delete(data, alpha, axis=0)
        if mask is not None:
            valid &= mask
        return data, valid
    if mask is not None:
        return data, mask.astype(bool, copy=False)
    if nodata is not None:
        if isinstance(nodata, float) and np.isnan(nodata):
            return data, np.any(~np.isnan(data), axis=0)
        return data, np.any(data != np.asarray(nodata).astype(data.dtype), axis=0)
    if data.dtype.kind == "f":
        return data, np.any(~np.isnan(data), axis=0)
    return data, np.ones(data.shape[1:], dtype=bool)


class Fetcher:
    """Opens COGs (cached) and reads planned windows tile by tile, bounded and retried."""

    def __init__(
        self,
        *,
        concurrency: int = 64,
        cache_size: int = 512,
        retries: int = 3,
        retry_base: float = 0.05,
        retry_cap: float = 2.0,
        stores: Stores | None = None,
        policy: AccessPolicy | None = None,
        tile_cache_bytes: int = 512 * 2**20,
    ) -> None:
        self.stores = stores or Stores()
        # decoded COG tiles shared by every read: neighbouring tiles and chunks reuse them
        self.tiles = TileCache(tile_cache_bytes)
        self.policy = policy  # None: every href is readable (library use, tests)
        self._limit = asyncio.Semaphore(concurrency)
        self._cache: OrderedDict[str, asyncio.Task[tuple[GeoTIFF, Header]]] = OrderedDict()
        self._cache_size = cache_size
        self._retry = {"retries": retries, "base": retry_base, "cap": retry_cap}
        self.stats = {"header_hits": 0, "header_misses": 0, "reads": 0, "tiles": 0}

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        async def once() -> T:
            async with self._limit:
                return await call()

        return await with_retries(once, **self._retry)

    async def _opened(self, href: str) -> tuple[GeoTIFF, Header]:
        """The opened GeoTIFF and its header, from the LRU cache when possible."""
        if self.policy is not None:
            self.policy.check(href)  # before any store is touched
        task = self._cache.get(href)
        if task is not None:
            self._cache.move_to_end(href)
            self.stats["header_hits"] += 1
        else:
            self.stats["header_misses"] += 1
            store, path = self.stores.get(href)

            async def open_() -> tuple[GeoTIFF, Header]:
                geotiff = await self._bounded(lambda: GeoTIFF.open(path, store=store))
                return geotiff, header_of(href, geotiff)

            task = asyncio.ensure_future(open_())
            self._cache[href] = task
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        try:
            # shield: one caller's cancellation must not fail the open for the others sharing it
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._cache.get(href) is task:
                del self._cache[href]
            raise

    def clear_caches(self) -> None:
        """Forget opened headers and decoded tiles (files changed underneath)."""
        self._cache.clear()
        self.tiles = TileCache(self.tiles.max_bytes)

    async def open(self, href: str) -> GeoTIFF:
        return (await self._opened(href))[0]

    async def header(self, href: str) -> Header:
        return (await self._opened(href))[1]

    async def read(self, read: AssetRead, *, nodata: float | None = None) -> Pixels:
        """Decode one planned window from its internal tiles; `nodata` overrides the file's.

        Tiles already in the tile cache (fetched for another read) are reused; the others are
        fetched in one coalesced request.
        """
        geotiff = await self.open(read.href)
        level = geotiff if read.level == 0 else geotiff.overviews[read.level - 1]
        self.stats["reads"] += 1
        decoded = await self._tiles(read, level)
        col, row, width, height = read.window
        tw, th = level.tile_width, level.tile_height
        first = decoded[0][0]
        data = np.empty((first.shape[0], height, width), dtype=first.dtype)
        mask = None if decoded[0][1] is None else np.empty((height, width), dtype=bool)
        for (tx, ty), (tile_data, tile_mask) in zip(read.tiles, decoded, strict=True):
            # overlap of the tile with the window, in window coordinates
            c0, r0 = max(tx * tw, col), max(ty * th, row)
            c1 = min((tx + 1) * tw, col + width)
            r1 = min((ty + 1) * th, row + height)
            src = np.s_[r0 - ty * th : r1 - ty * th, c0 - tx * tw : c1 - tx * tw]
            dst = np.s_[r0 - row : r1 - row, c0 - col : c1 - col]
            data[(slice(None), *dst)] = tile_data[(slice(None), *src)]
            if mask is not None:
                mask[dst] = tile_mask[src]
        data, valid = valid_mask(
            data,
            mask,
            nodata if nodata is not None else read.nodata,
            geotiff._alpha_band_idx,  # async-geotiff has no public accessor for it
        )
        return Pixels(data=data, valid=valid)

    async def _tiles(
        self, read: AssetRead, level: GeoTIFF | Overview
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        cache = self.tiles
        size = level.tile_width * level.tile_height * read.count * np.dtype(read.dtype).itemsize
        batches = [cache.get((read.href, read.level, xy)) for xy in read.tiles]
        missing = [xy for xy, batch in zip(read.tiles, batches, strict=True) if batch is None]
        if missing:
            batch = _Batch(asyncio.ensure_future(self._fetch_tiles(level, missing)))
            for xy in missing:
                cache.put((read.href, read.level, xy), batch, size)
            batches = [b or batch for b in batches]
        return list(
            await asyncio.gather(*(b.get(xy) for b, xy in zip(batches, read.tiles, strict=True)))
        )

    async def _fetch_tiles(self, level: GeoTIFF | Overview, xys: list[tuple[int, int]]) -> dict:
        """Fetch (coalesced, bounded, retried) and decode tiles: {(x, y): (data, mask)}."""
        fetched = await self._bounded(lambda: level.fetch_tiles(xys))
        self.stats["tiles"] += len(fetched)
        return {(t.x, t.y): (t.array.data, t.array.mask) for t in fetched}
