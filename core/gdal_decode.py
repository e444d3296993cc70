"""GDAL decoding of the internal blocks async-tiff cannot decode, or decodes differently.

Why: async-tiff has no PackBits decoder, reads no striped (untiled) TIFF, refuses JPEG with
2 or 4 components (NAIP's RGB + near-infrared), and its JPEG decoder is not libjpeg: on
GDAL-written files it is ±1 on ~3% of pixels for grey/RGB JPEG and 1.7 grey levels off on
average (up to ~100) for YCbCr JPEG, whose chroma upsampling differs. GDAL (through rasterio)
decodes all of them, and is what rio-tiler and every GDAL client read, so those assets are
decoded here instead (`decoder_for`).

How, without letting GDAL touch the network: the fetch stage reads the byte ranges a read
needs through Terrazzo's own store (access policy, no redirects, bounded, retried) — the
header bytes the guard already read and the blocks (tiles or strips, all planes, and the mask
blocks) covering the window — and ships them to a compute worker (`decode_blocks`), where
rasterio opens a sparse in-memory view of the file (a Python opener) and GDAL reads the blocks.
The view serves only the shipped bytes: a read anywhere else fails loudly instead of
returning zeros, so a layout we did not foresee is an item error, never wrong pixels.
"""

from __future__ import annotations

import bisect
import io
import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

DECODERS = ("async-tiff", "gdal")
# TIFF compressions decoded by GDAL: PackBits (async-tiff has no decoder) and JPEG (async-tiff
# refuses 2/4 components and differs from libjpeg; YCbCr by up to ~100 grey levels).
GDAL_COMPRESSIONS = {7: "JPEG", 32773: "PackBits"}
# Bytes at the start of the file GDAL reads whatever the header says (its format probe).
GDAL_PROBE = 1024
# libtiff loads strip/tile offset arrays lazily, reading from the 4 KiB page holding the
# wanted entry (_TIFFPartialReadStripArray's IO_CACHE_PAGE_SIZE) to the array's end, so a tag
# value's extent is kept from the start of its page.
LIBTIFF_PAGE = 4096


@dataclass(frozen=True)
class Blocks:
    """One IFD's internal blocks: tiles, or strips (block width = image width, block height =
    rows per strip); `planes` > 1 when band-interleaved (one block per band)."""

    width: int
    height: int
    block_width: int
    block_height: int
    planes: int
    offsets: tuple[int, ...]
    counts: tuple[int, ...]

    @property
    def across(self) -> int:
        return math.ceil(self.width / self.block_width)

    @property
    def down(self) -> int:
        return math.ceil(self.height / self.block_height)

    def ranges(self, col0: int, row0: int, col1: int, row1: int) -> list[tuple[int, int]]:
        """(start, end) byte ranges of the blocks covering pixels [col0, col1) x [row0, row1),
        every plane; empty (sparse) blocks have none."""
        per_plane = self.across * self.down
        out = []
        for plane in range(self.planes):
            for by in range(row0 // self.block_height, (row1 - 1) // self.block_height + 1):
                for bx in range(col0 // self.block_width, (col1 - 1) // self.block_width + 1):
                    i = plane * per_plane + by * self.across + bx
                    if i < len(self.counts) and self.counts[i] > 0:
                        out.append((self.offsets[i], self.offsets[i] + self.counts[i]))
        return out


@dataclass(frozen=True)
class GdalLevel:
    """The blocks of one resolution level and of its mask (None without an internal mask)."""

    data: Blocks
    mask: Blocks | None


@dataclass(frozen=True)
class GdalFile:
    """What the fetch stage keeps to decode one asset with GDAL: the file's size, the header
    bytes GDAL reads to open it (probe, every IFD and tag value), and each level's blocks."""

    size: int
    header: tuple[tuple[int, bytes], ...]  # (offset, bytes), sorted, not overlapping
    levels: tuple[GdalLevel, ...]  # finest first, as Header.levels

    def ranges(self, level: int, xys: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
        """Byte ranges (merged, sorted) of the data and mask blocks under tiles `xys` of
        `level` (tiles in the plan's sense: the level's data blocks)."""
        lv = self.levels[level]
        d = lv.data
        wanted: list[tuple[int, int]] = []
        for tx, ty in xys:
            col0, row0 = tx * d.block_width, ty * d.block_height
            col1, row1 = min(col0 + d.block_width, d.width), min(row0 + d.block_height, d.height)
            wanted += d.ranges(col0, row0, col1, row1)
            if lv.mask is not None:
                wanted += lv.mask.ranges(col0, row0, col1, row1)
        return merge_ranges(wanted)


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted ranges with overlapping or touching ones merged."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def header_ranges(extents: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The byte ranges GDAL reads to open the file and find its blocks: its format probe and
    every IFD and tag value extent (from the start of its libtiff page), merged."""
    wanted = [(0, GDAL_PROBE)]
    wanted += [(start // LIBTIFF_PAGE * LIBTIFF_PAGE, end) for start, end in extents]
    return [(s, min(e, size)) for s, e in merge_ranges(wanted) if s < size]


@dataclass(frozen=True)
class DecodeJob:
    """One compute job: decode blocks `xys` of `level` from the shipped bytes."""

    name: str  # the href, for messages
    size: int
    segments: tuple[tuple[int, bytes], ...]  # header and block bytes, sorted, disjoint
    level: int  # 0 = full resolution, k = overview k
    count: int  # bands the header says the file has
    width: int  # of the level
    height: int
    block_width: int
    block_height: int
    xys: tuple[tuple[int, int], ...]
    mask: bool


class SparseFile(io.RawIOBase):
    """A read-only file of `size` bytes of which only `segments` are known.

    A read touching an unknown byte raises OSError (GDAL reports it as a read error): the
    fetch stage shipped every byte GDAL needs for this read, so anything else is a bug or a
    file laid out unlike its header says, and must not silently decode as zeros."""

    def __init__(self, name: str, size: int, segments: Sequence[tuple[int, bytes]]) -> None:
        super().__init__()
        self.name, self.size = name, size
        self._starts = [s for s, _ in segments]
        self._data = [d for _, d in segments]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = self.size if n is None or n < 0 else min(self.size, start + n)
        if end <= start:
            return b""
        i = bisect.bisect_right(self._starts, start) - 1
        if i >= 0:
            seg_start, seg = self._starts[i], self._data[i]
            if end <= seg_start + len(seg):
                self._pos = end
                return seg[start - seg_start : end - seg_start]
        raise OSError(
            f"{self.name}: GDAL read bytes {start:,}..{end:,}, which the plan did not fetch"
        )

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _container(file: SparseFile) -> Any:
    """A rasterio opener (FileContainer) whose one file is `file`."""
    from rasterio.abc import FileContainer

    class Container(FileContainer):
        def open(self, path: str, mode: str = "rb", **kwargs: Any) -> SparseFile:
            file.seek(0)
            return file

        def isfile(self, path: str) -> bool:
            return path.endswith(file.name)

        def isdir(self, path: str) -> bool:
            return False

        def ls(self, path: str) -> list[str]:
            return []

        def mtime(self, path: str) -> int:
            return 0

        def size(self, path: str) -> int:
            return file.size

        def rm(self, path: str) -> None:
            raise OSError("read-only")

    return Container()


# No sibling lookups (.ovr, .aux.xml, .msk): the view holds one file; no PAM files written;
# one thread (a worker is one of the pool's processes).
_GDAL_ENV = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_PAM_ENABLED": "NO",
    "GDAL_NUM_THREADS": "1",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".none",
}


def decode_blocks(job: DecodeJob) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]]:
    """Compute-pool job: GDAL-decode each block of `job`: {(x, y): (data, mask or None)}.

    data is (bands, h, w) for the part of the block inside the image (edge blocks are not
    padded); mask (h, w) bool is the internal mask (True = valid) when the file has one."""
    import rasterio
    from rasterio.windows import Window

    name = f"{uuid.uuid4().hex}.tif"
    file = SparseFile(job.name, job.size, job.segments)
    options = {"overview_level": job.level - 1} if job.level else {}
    out: dict[tuple[int, int], tuple[np.ndarray, np.ndarray | None]] = {}
    with (
        rasterio.Env(**_GDAL_ENV),
        rasterio.open(name, opener=_container(file), **options) as src,
    ):
        if (src.width, src.height, src.count) != (job.width, job.height, job.count):
            raise ValueError(
                f"{job.name}: GDAL sees level {job.level} as {src.width}x{src.height}x"
                f"{src.count}, the header {job.width}x{job.height}x{job.count}"
            )
        for tx, ty in job.xys:
            col, row = tx * job.block_width, ty * job.block_height
            window = Window(
                col,
                row,
                min(job.block_width, job.width - col),
                min(job.block_height, job.height - row),
            )
            data = src.read(window=window)
            mask = src.read_masks(1, window=window) != 0 if job.mask else None
            out[(tx, ty)] = (data, mask)
    return out


def join_segments(segments: Iterable[tuple[int, bytes]]) -> tuple[tuple[int, bytes], ...]:
    """(offset, bytes) pieces of one file, sorted and with overlapping or touching pieces
    joined, so every byte is in exactly one segment (SparseFile serves a read from one)."""
    out: list[tuple[int, bytearray]] = []
    for start, data in sorted(segments, key=lambda s: s[0]):
        if not data:
            continue
        if out and start <= out[-1][0] + len(out[-1][1]):
            last_start, last = out[-1]
            tail = start + len(data) - (last_start + len(last))
            if tail > 0:
                last += data[len(data) - tail :]
        else:
            out.append((start, bytearray(data)))
    return tuple((start, bytes(data)) for start, data in out)
