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
- What async-tiff cannot decode, or decodes unlike GDAL (PackBits, strips, JPEG), is decided
  per asset when its header opens (`Header.decoder`): those blocks are still fetched here,
  through the same stores and caches, and decoded by GDAL in the compute pool
  (core.gdal_decode), never on the event loop and never by GDAL reading the network itself.
- Hostile files are bounded before native code sees them: core.tiffguard walks each header
  first (IFD loops, absurd counts, sizes, dtypes, scales), a header open has a deadline and is
  cancelled when no request waits for it, a read's decoded size has a budget, DEFLATE tiles
  inflate through a decoder that stops at the tile's size, and no cache entry exceeds its cap.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import threading
import warnings
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import deflate  # libdeflate: a demo 512² tile in 0.44 ms, zlib-ng 0.66 (both off the GIL)
import numpy as np
from async_geotiff import GeoTIFF, Overview
from async_tiff import DecoderRegistry, ImageFileDirectory
from async_tiff.enums import Compression, PlanarConfiguration

from core.access import AccessPolicy
from core.gdal_decode import (
    GDAL_COMPRESSIONS,
    Blocks,
    DecodeJob,
    GdalFile,
    GdalLevel,
    decode_blocks,
    header_ranges,
    join_segments,
)
from core.plan import AssetRead, Header, Level
from core.stores import Stores
from core.tiffguard import MAX_HEADER_BYTES, CheckedHeader, PrefixStore, check_header

if TYPE_CHECKING:
    from core.compute import ComputePool

T = TypeVar("T")

_TRANSIENT_TEXT = re.compile(
    r"time(d)? ?out|connection|reset by peer|temporar|broken pipe|\b(429|500|502|503|504)\b|"
    r"too many requests|service unavailable|slow ?down",
    re.IGNORECASE,
)
# Refusals by our own guards keep their words when async-tiff re-raises them as its own type
_PERMANENT_TEXT = re.compile(
    r"not ?found|no such file|permission|invalid range|AccessDenied|ResponseTooLarge|"
    r"HostileTiff|redirect|--allow|too large",
    re.IGNORECASE,
)


# Decoded bytes one read (one asset window: its internal tiles, all bands, plus the mask) may
# take. 512 MiB holds a 4096² chunk of 4 float64 bands with its edge tiles; beyond it a read
# is an item error rather than an allocation the machine may not have.
MAX_READ_BYTES = 512 * 2**20
# A header open (guard + parse) gets this long, across every request sharing it. COG headers
# are one or two range reads; 20 s covers several retried slow round trips and stays under
# the tile budget (30 s), so the open fails before its request does.
HEADER_TIMEOUT_S = 20.0


class FetchError(RuntimeError):
    """A read that failed for good (after retries where retrying made sense)."""


class ReadTooLarge(ValueError):
    """A read whose decoded size exceeds the per-read budget (permanent: not retried)."""


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
    """The plain-data header the planner works from (tiles, or strips as full-width blocks)."""
    crs = geotiff.crs
    epsg = crs.to_epsg()
    levels = [geotiff, *geotiff.overviews]
    blocks = [blocks_of(level.ifd) for level in levels]
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
                tile_width=b.block_width,
                tile_height=b.block_height,
                tile_bytes=_tile_bytes(level, b),
            )
            for level, b in zip(levels, blocks, strict=True)
        ),
        decoder=decoder_for(geotiff),
        scales=tuple(map(float, geotiff.scales)),  # GDAL_METADATA's, (1, ...) when none
        offsets=tuple(map(float, geotiff.offsets)),
    )


def blocks_of(ifd: ImageFileDirectory) -> Blocks:
    """An IFD's internal blocks: its tiles, or its strips (async-geotiff reports a striped
    image as one tile of the whole image, and cannot read it)."""
    planes = ifd.samples_per_pixel if ifd.planar_configuration == PlanarConfiguration.Planar else 1
    if ifd.tile_offsets is not None:
        return Blocks(
            width=ifd.image_width,
            height=ifd.image_height,
            block_width=ifd.tile_width,
            block_height=ifd.tile_height,
            planes=planes,
            offsets=tuple(ifd.tile_offsets),
            counts=tuple(ifd.tile_byte_counts or ()),
        )
    rows = ifd.rows_per_strip or ifd.image_height
    return Blocks(
        width=ifd.image_width,
        height=ifd.image_height,
        block_width=ifd.image_width,
        block_height=min(rows, ifd.image_height),
        planes=planes,
        offsets=tuple(ifd.strip_offsets or ()),
        counts=tuple(ifd.strip_byte_counts or ()),
    )


def decoder_for(geotiff: GeoTIFF) -> str:
    """ "gdal" when any IFD (levels and masks) is striped or compressed with a codec
    async-tiff cannot decode or decodes unlike GDAL (GDAL_COMPRESSIONS), else "async-tiff".

    One decoder per asset: its levels and masks are read the same way, so an overview never
    disagrees with its full resolution because two decoders read them."""
    for level in (geotiff, *geotiff.overviews):
        for ifd in (level.ifd, level.mask_ifd):
            if ifd is None:
                continue
            if ifd.tile_offsets is None or int(ifd.compression) in GDAL_COMPRESSIONS:
                return "gdal"
    return "async-tiff"


def _tile_bytes(level: GeoTIFF | Overview, blocks: Blocks) -> tuple[int, ...]:
    """Compressed bytes of each block (all planes counted once: plane 0's index)."""
    data = list(blocks.counts[: blocks.across * blocks.down])
    if level.mask_ifd is not None:
        mask = blocks_of(level.mask_ifd).counts
        if len(mask) == len(data):  # same layout (GDAL writes masks with the data's blocks)
            data = [d + m for d, m in zip(data, mask, strict=True)]
    return tuple(data)


@dataclass(frozen=True)
class _Asset:
    """An opened asset: async-geotiff's view, the planner's header and, for GDAL-decoded
    assets, the header bytes and block layout GDAL needs."""

    geotiff: GeoTIFF
    header: Header
    gdal: GdalFile | None = None


class _Batch:
    """One coalesced fetch of several internal tiles, shared by every read that needs them.

    The fetch runs as its own task so that one reader's cancellation (e.g. `first` having
    filled its tile) does not fail the other readers; it is cancelled only when no reader
    waits for it any more, so a cancelled request stops its store reads.

    A reader joins in the same step that looks the batch up (no await between them) and
    leaves when done; the last to leave cancels the fetch and marks it `abandoned`, so it is
    never handed out again, even while its cancellation is still unwinding: a read that
    joined a dying fetch would get its CancelledError though nobody cancelled that read (in
    POST /chunks that ended the whole stream).
    """

    def __init__(self, task: asyncio.Task[dict]) -> None:
        self.task = task
        self.waiters = 0
        self.abandoned = False  # cancelled for want of readers: never join it

    @property
    def reusable(self) -> bool:
        if self.abandoned:
            return False
        return not self.task.done() or (not self.task.cancelled() and self.task.exception() is None)

    def join(self) -> None:
        self.waiters += 1

    def leave(self) -> None:
        self.waiters -= 1
        if self.waiters == 0 and not self.task.done():
            self.abandoned = True
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

    def put(self, key: tuple, batch: _Batch, size: int) -> bool:
        """Keep `batch` under `key`; False (not kept) when one entry would exceed the cap, so
        the cache never holds more than max_bytes: the tile is decoded, used and dropped."""
        if size > self.max_bytes:
            return False
        self._entries[key] = (batch, size)
        self.bytes += size
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            _, (_, old) = self._entries.popitem(last=False)
            self.bytes -= old
        return True

    def drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[1]


def valid_mask(
    data: np.ndarray, mask: np.ndarray | None, nodata: float | None, alpha: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(data without alpha band, validity) following GDAL's order: mask, nodata, alpha, NaN.

    A pixel is nodata only when every band equals nodata (or every band is NaN): GDAL's
    warper does so by default (UNIFIED_SRC_NODATA=YES) and rio-tiler's mask is "any band
    valid", so [11, 0, 0] with nodata 0 is valid in both (tests/test_decode_fallback.py
    checks the table on rio-tiler's tiles). An alpha band or a mask decides alone."""
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
        max_read_bytes: int = MAX_READ_BYTES,
        header_timeout: float = HEADER_TIMEOUT_S,
    ) -> None:
        self.stores = stores or Stores()
        # decoded COG tiles shared by every read: neighbouring tiles and chunks reuse them
        self.tiles = TileCache(tile_cache_bytes)
        self.policy = policy  # None: every href is readable (library use, tests)
        self._limit = asyncio.Semaphore(concurrency)
        self.max_read_bytes = max_read_bytes
        self.header_timeout = header_timeout
        self._cache: OrderedDict[str, _SharedOpen] = OrderedDict()
        # GDAL-decoded assets decode here (set by the engine); None: a thread (library use)
        self.pool: ComputePool | None = None
        self._cache_size = cache_size
        self._retry = {"retries": retries, "base": retry_base, "cap": retry_cap}
        self.stats = {
            "header_hits": 0,
            "header_misses": 0,
            "reads": 0,
            "tiles": 0,
            "gdal_tiles": 0,
        }

    async def _bounded(self, call: Callable[[], Awaitable[T]]) -> T:
        async def once() -> T:
            async with self._limit:
                return await call()

        return await with_retries(once, **self._retry)

    async def _opened(self, href: str) -> _Asset:
        """The opened GeoTIFF and its header, from the LRU cache when possible.

        The open is one task shared by every caller; it has a deadline (`header_timeout`) and
        is cancelled when the last caller waiting for it leaves (a request's 504 or
        disconnect), so a header that never ends cannot outlive its requests.
        """
        shared = self._cache.get(href)
        if shared is not None:
            self._cache.move_to_end(href)
            self.stats["header_hits"] += 1
        else:
            self.stats["header_misses"] += 1
            shared = _SharedOpen(asyncio.ensure_future(self._open_checked(href)))
            self._cache[href] = shared
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        shared.waiters += 1
        try:
            # shield: one caller's cancellation must not fail the open for the others sharing it
            return await asyncio.shield(shared.task)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._cache.get(href) is shared:
                del self._cache[href]
            raise
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.task.done():
                shared.task.cancel()  # nobody waits: stop reading the header
                if self._cache.get(href) is shared:
                    del self._cache[href]

    async def _open_checked(self, href: str) -> _Asset:
        """Guard the header (core.tiffguard), then let async-geotiff parse it from the bytes
        the guard read: no native reader sees a header that claims too much, and an ordinary
        COG costs no extra round trip.

        The access policy is checked first, before any store is touched, on a thread: it may
        resolve a host name or a symlink (blocking calls), and it runs once per opened header,
        not per read — the connection itself is checked again when it is made (core.httpstore).
        """
        if self.policy is not None:
            await asyncio.to_thread(self.policy.check, href)
        store, path = self.stores.get(href)
        try:
            async with asyncio.timeout(self.header_timeout):
                checked = await self._bounded(lambda: check_header(store, path, href))
                prefixed = PrefixStore(store, path, checked.prefix, checked.size)
                try:
                    with warnings.catch_warnings():
                        # "Striped GeoTIFFs are not supported": GDAL decodes those here
                        warnings.simplefilter("ignore", UserWarning)
                        geotiff = await self._bounded(
                            lambda: GeoTIFF.open(
                                path, store=prefixed, prefetch=max(len(checked.prefix), 1)
                            )
                        )
                finally:
                    prefixed.release()
                header = header_of(href, geotiff)
                gdal = None
                if header.decoder == "gdal":
                    gdal = await self._gdal_file(store, path, checked, geotiff)
        except TimeoutError as exc:
            raise FetchError(
                f"{href}: header not read within {self.header_timeout:g} s; refused"
            ) from exc
        return _Asset(geotiff, header, gdal)

    async def _gdal_file(
        self, store: Any, path: str, checked: CheckedHeader, geotiff: GeoTIFF
    ) -> GdalFile:
        """What a GDAL decode of this asset needs, kept with its header: the header bytes
        GDAL's open reads (the guard read them already, except tag values far from the start
        that no check needed: those are fetched now, bounded by MAX_HEADER_BYTES) and each
        level's blocks."""
        levels = tuple(
            GdalLevel(
                data=blocks_of(level.ifd),
                mask=None if level.mask_ifd is None else blocks_of(level.mask_ifd),
            )
            for level in (geotiff, *geotiff.overviews)
        )
        ends = [end for _, end in checked.extents]
        for lv in levels:
            for b in (lv.data, lv.mask):
                if b is not None:
                    ends += [o + c for o, c in zip(b.offsets, b.counts, strict=False) if c]
        # the file's size: known from a short read, else its last referenced byte (nothing
        # past it is part of the image)
        size = checked.size if checked.size is not None else max(ends, default=0)
        wanted = header_ranges(checked.extents, size)
        known = [(0, checked.prefix), *checked.segments]
        missing = [(s, e) for s, e in wanted if checked.known(s, e) is None]
        if missing:  # tag values or pages no check read: one more request, bounded
            if sum(e - s for s, e in missing) > MAX_HEADER_BYTES:
                raise FetchError(f"{path}: GDAL header beyond {MAX_HEADER_BYTES:,} bytes")
            chunks = await self._bounded(
                lambda: store.get_ranges_async(
                    path, starts=[s for s, _ in missing], ends=[e for _, e in missing]
                )
            )
            known += [(s, bytes(c)) for (s, _), c in zip(missing, chunks, strict=True)]
        joined = join_segments(known)

        def read(start: int, end: int) -> bytes:
            for s, d in joined:
                if s <= start and end <= s + len(d):
                    return d[start - s : end - s]
            raise FetchError(f"{path}: header bytes {start:,}..{end:,} were not read")

        header = tuple((s, read(s, e)) for s, e in wanted)
        return GdalFile(size=size, header=header, levels=levels)

    def clear_caches(self) -> None:
        """Forget opened headers and decoded tiles (files changed underneath)."""
        self._cache.clear()
        self.tiles = TileCache(self.tiles.max_bytes)

    async def open(self, href: str) -> GeoTIFF:
        return (await self._opened(href)).geotiff

    async def header(self, href: str) -> Header:
        return (await self._opened(href)).header

    async def read(self, read: AssetRead, *, nodata: float | None = None) -> Pixels:
        """Decode one planned window from its internal tiles; `nodata` overrides the file's.

        Tiles already in the tile cache (fetched for another read) are reused; the others are
        fetched in one coalesced request.
        """
        asset = await self._opened(read.href)
        geotiff = asset.geotiff
        level = geotiff if read.level == 0 else geotiff.overviews[read.level - 1]
        decoded_bytes = len(read.tiles) * _tile_decoded_bytes(level)
        if decoded_bytes > self.max_read_bytes:
            raise ReadTooLarge(
                f"{read.href}: level {read.level} window needs {len(read.tiles)} tile(s) "
                f"decoding to {decoded_bytes / 2**20:,.0f} MiB; the per-read budget is "
                f"{self.max_read_bytes / 2**20:,.0f} MiB"
            )
        self.stats["reads"] += 1
        decoded = await self._tiles(read, level, asset)
        header_level = asset.header.levels[read.level]
        job = (
            read,
            decoded,
            (header_level.tile_width, header_level.tile_height),
            nodata if nodata is not None else read.nodata,
            geotiff._alpha_band_idx,  # async-geotiff has no public accessor for it
        )
        if decoded_bytes < WINDOW_THREAD_BYTES:
            return assemble_window(*job)
        # a chunk's window: megabytes of (mostly band-transposing) copies, which numpy does
        # without the GIL; on the loop they would hold every other read and request up
        return await asyncio.to_thread(assemble_window, *job)

    async def _tiles(
        self, read: AssetRead, level: GeoTIFF | Overview, asset: _Asset
    ) -> list[tuple[np.ndarray, np.ndarray | None]]:
        cache = self.tiles
        size = _tile_decoded_bytes(level)
        batches = [cache.get((read.href, read.level, xy)) for xy in read.tiles]
        missing = [xy for xy, batch in zip(read.tiles, batches, strict=True) if batch is None]
        if missing:
            if asset.gdal is not None:
                fetch = self._fetch_gdal(read, asset.gdal, missing)
            else:
                fetch = self._fetch_tiles(level, missing)
            batch = _Batch(asyncio.ensure_future(fetch))
            for xy in missing:
                cache.put((read.href, read.level, xy), batch, size)
            batches = [b or batch for b in batches]
        joined = [b for b in batches if b is not None]
        for b in joined:  # now, in the step that looked them up (see _Batch)
            b.join()
        try:
            # shield: this read's cancellation must not fail the fetch for its other readers
            return [
                (await asyncio.shield(b.task))[xy] for b, xy in zip(joined, read.tiles, strict=True)
            ]
        finally:
            for b in joined:
                b.leave()

    async def _fetch_tiles(self, level: GeoTIFF | Overview, xys: list[tuple[int, int]]) -> dict:
        """Fetch (coalesced, bounded, retried) and decode tiles: {(x, y): (data, mask)}."""
        fetched = await self._bounded(lambda: _fetch_decode(level, xys))
        self.stats["tiles"] += len(fetched)
        return fetched

    async def _fetch_gdal(
        self, read: AssetRead, gdal: GdalFile, xys: list[tuple[int, int]]
    ) -> dict:
        """Fetch the blocks (data planes and mask) under tiles `xys` through our own store
        (bounded, retried, access-checked) and decode them with GDAL in the compute pool:
        {(x, y): (data, mask or None)}."""
        store, path = self.stores.get(read.href)
        ranges = gdal.ranges(read.level, xys)
        fetched: list[tuple[int, bytes]] = []
        if ranges:
            chunks = await self._bounded(
                lambda: store.get_ranges_async(
                    path, starts=[s for s, _ in ranges], ends=[e for _, e in ranges]
                )
            )
            fetched = [(s, bytes(c)) for (s, _), c in zip(ranges, chunks, strict=True)]
        lv = gdal.levels[read.level]
        job = DecodeJob(
            name=read.href,
            size=gdal.size,
            segments=join_segments([*gdal.header, *fetched]),
            level=read.level,
            count=read.count,
            width=lv.data.width,
            height=lv.data.height,
            block_width=lv.data.block_width,
            block_height=lv.data.block_height,
            xys=tuple(xys),
            mask=lv.mask is not None,
        )
        if self.pool is not None:
            decoded = await self.pool.run(decode_blocks, job)
        else:
            decoded = await asyncio.to_thread(decode_blocks, job)
        self.stats["tiles"] += len(decoded)
        self.stats["gdal_tiles"] += len(decoded)
        return decoded


# Decoded bytes from which a read's window is put together on a thread, not the loop: a
# web tile's window (a few 256-512² tiles) costs less than the thread hop; a 1024² chunk
# window of pixel-interleaved RGB tiles costs ~8 ms on the loop (0.22 ms per 512² tile).
WINDOW_THREAD_BYTES = 4 * 2**20


def assemble_window(
    read: AssetRead,
    decoded: list[tuple[np.ndarray, np.ndarray | None]],
    tile_size: tuple[int, int],
    nodata: float | None,
    alpha: int | None,
) -> Pixels:
    """The planned window from its decoded tiles (each (bands, h, w), maybe a strided view
    of pixel-interleaved data), with its validity (`valid_mask`)."""
    col, row, width, height = read.window
    tw, th = tile_size
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
    data, valid = valid_mask(data, mask, nodata, alpha)
    return Pixels(data=data, valid=valid)


class _SharedOpen:
    """A header open shared by every request that wants it, with the count of waiters."""

    def __init__(self, task: asyncio.Task[tuple[GeoTIFF, Header]]) -> None:
        self.task = task
        self.waiters = 0


def _chunk_bytes(ifd: ImageFileDirectory) -> int:
    """Bytes one compressed chunk (tile or strip) of `ifd` decodes to: the whole block when
    pixel-interleaved, one band of it when planar. core.tiffguard has bounded every factor."""
    bits = ifd.bits_per_sample[0]
    planar = ifd.planar_configuration == PlanarConfiguration.Planar
    samples = 1 if planar else ifd.samples_per_pixel
    b = blocks_of(ifd)
    return math.ceil(b.block_width * samples * bits / 8) * b.block_height


def _tile_decoded_bytes(level: GeoTIFF | Overview) -> int:
    """Decoded bytes of one internal tile (or strip) of `level`: every band, plus its mask."""
    ifd = level.ifd
    planes = ifd.samples_per_pixel if ifd.planar_configuration == PlanarConfiguration.Planar else 1
    size = _chunk_bytes(ifd) * planes
    if level.mask_ifd is not None:
        b = blocks_of(ifd)
        size += b.block_width * b.block_height  # decoded to one byte per pixel
    return size


_decoder_failure = threading.local()  # the exception our decoder raised, per decoding thread


def _bounded_inflate(limit: int) -> object:
    """A DEFLATE decoder that stops at `limit` bytes: async-tiff's own inflates the whole
    stream before it checks the length (a 1 MB tile inflating to 1 GiB took 2.1 GB RSS), so
    a decompression bomb could claim any amount of memory. Here it costs at most `limit`:
    libdeflate inflates into a buffer of that size and fails when the stream needs more (or
    is corrupt: libdeflate does not say which)."""

    def decode(buffer: bytes) -> bytes:
        try:
            return deflate.zlib_decompress(buffer, limit)
        except deflate.DeflateError as exc:
            error = ValueError(
                f"DEFLATE tile does not inflate within its {limit:,}-byte size (corrupt, or a "
                "decompression bomb)"
            )
            _decoder_failure.error = error  # for _decode_sync, on this thread
            raise error from exc

    return decode


def _registry(ifd: ImageFileDirectory) -> DecoderRegistry | None:
    """Bounded decoders for `ifd`'s codec when the native one is unbounded."""
    if ifd.compression in (Compression.Deflate, Compression.OldDeflate):
        decode = _bounded_inflate(_chunk_bytes(ifd))
        return DecoderRegistry({Compression.Deflate: decode, Compression.OldDeflate: decode})
    return None


DECODE_SPLIT = 8  # tiles from which a batch is decoded on two threads (the machines' 2 cores)


async def _decode(tiles: list, registry: DecoderRegistry | None) -> list:
    """async-tiff's `decode_sync` of each tile, a batch per thread: its per-tile async
    `decode` cost 0.61-0.74 ms CPU per 256² RGB DEFLATE tile where a batch costs 0.39-0.46
    (the same decoder; the difference is a future, a thread hop and a loop callback per
    tile). The decoders release the GIL; a cancelled read leaves at most its batch running."""
    if len(tiles) < DECODE_SPLIT:
        parts = [tiles]
    else:
        half = len(tiles) // 2
        parts = [tiles[:half], tiles[half:]]
    done = await asyncio.gather(
        *(asyncio.to_thread(_decode_sync, part, registry) for part in parts if part)
    )
    return [array for part in done for array in part]


def _decode_sync(tiles: list, registry: DecoderRegistry | None) -> list:
    out = []
    for tile in tiles:
        _decoder_failure.error = None
        try:
            out.append(tile.decode_sync(registry))
        except Exception as exc:
            # decode_sync reports our decoder's exception as text (an AsyncTiffException):
            # raise the exception itself, as the async decode did (a bomb's ValueError)
            failure, _decoder_failure.error = _decoder_failure.error, None
            if failure is not None:
                raise failure from exc
            raise
    return out


async def _fetch_decode(level: GeoTIFF | Overview, xys: list[tuple[int, int]]) -> dict:
    """async-geotiff's `fetch_tiles` (coalesced range reads, decoding off the GIL), with
    bounded decoders: {(x, y): (data (bands, h, w), mask (h, w) bool or None)}."""
    ifd, mask_ifd = level.ifd, level.mask_ifd
    if mask_ifd is None:
        tiles, masks = await ifd.fetch_tiles(xys), None
    else:
        tiles, masks = await asyncio.gather(ifd.fetch_tiles(xys), mask_ifd.fetch_tiles(xys))
    decoded = await _decode(tiles, _registry(ifd))
    decoded_masks: list = [None] * len(xys)
    if masks is not None and mask_ifd is not None:
        decoded_masks = await _decode(masks, _registry(mask_ifd))
    chunky = ifd.planar_configuration == PlanarConfiguration.Chunky
    out = {}
    for (x, y), data, mask in zip(xys, decoded, decoded_masks, strict=True):
        array = np.asarray(data)
        if chunky:  # (h, w, bands) -> (bands, h, w), as async-geotiff's RasterArray does
            array = np.moveaxis(array, -1, 0)
        valid = None
        if mask is not None:
            valid = np.asarray(mask).astype(bool, copy=False)[:, :, 0]
        out[(x, y)] = (array, valid)
    return out
