"""A bounded walk of a TIFF/BigTIFF header before any native reader sees it.

Why: async-tiff trusts what a header claims. A 298-byte file claiming 2^32-1 tile offsets makes
it allocate 32 GiB and abort the whole server process; an IFD chain that loops makes it read
forever; 10,000 bands or a 32752² tile make one read decode a gigabyte. None of that can be
caught after the fact, so `check_header` reads the header itself (pure Python, through the
same obspec store async-geotiff will use), refuses anything beyond the limits below with a
`HostileTiff` naming the href and the limit, and only then lets `GeoTIFF.open` run.

It costs no extra round trip on a normal COG: the bytes it read are returned as a
`PrefixStore` that serves async-geotiff's header reads from memory (see core.fetch).

Strips (untiled files) are checked like tiles, as blocks of image width x RowsPerStrip; GDAL
decodes them (core.gdal_decode). The walk also records where every IFD and tag value lies
(`CheckedHeader.extents`): the header bytes a GDAL decode of the file needs.

Every limit is a module constant with the reason for its value; together they bound what one
header and one decoded tile can cost.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

# First read: GDAL's COG layout puts every IFD and tag array before the first tile, within the
# first 16-64 KiB for ordinary files, so one 64 KiB read usually holds the whole header.
FIRST_READ = 64 * 1024
# Header bytes read at most (all reads together). 8 MiB holds the TileOffsets and
# TileByteCounts (LONG8) of MAX_TILES tiles plus their overviews, with room for metadata.
MAX_HEADER_BYTES = 8 * 2**20
# IFDs in the chain: a COG has one per overview level and as many masks; 2^31 pixels at
# 256-pixel tiles need 24 levels, so 128 leaves room for thumbnails and odd writers.
MAX_IFDS = 128
# Entries in one IFD: GDAL writes ~20-30; the TIFF tag space in use is a few hundred.
MAX_TAGS = 512
# Values of one ordinary tag (GeoKeys, GDAL metadata text, colormaps of 3*65536 SHORTs):
# 1 MiB of values is far above real files.
MAX_TAG_BYTES = 2**20
# Image side: 2^19 px (5,243 km at 10 m) is beyond any single COG product; the TileOffsets
# bound below is the real one.
MAX_SIDE = 2**19
# Internal tile side: the TIFF spec wants multiples of 16; GDAL's COG driver defaults to
# 512 and real files use 256-2048, so 4096 allows every sane one (16M px per tile).
MAX_TILE_SIDE = 4096
# Tiles (per sample plane) in one IFD: 262,144 tiles is a 131,072² image at 256 px or
# 262,144² at 512 px; their offsets and counts take at most 4 MiB as LONG8.
MAX_TILES = 2**18
# Samples per pixel: hyperspectral products carry a few hundred bands (EnMAP 224, PRISMA 239,
# EMIT 285, AVIRIS-NG 425); 512 covers them. Memory is bounded by MAX_TILE_DECODED, not this.
MAX_SAMPLES = 512
# Decoded bytes of one internal tile (all bands): 128 MiB is e.g. 512² x 256 bands x uint16
# or 2048² x 4 x float64; a tile is decoded whole, so this bounds one decode.
MAX_TILE_DECODED = 128 * 2**20
# A compressed tile may exceed its decoded size only by codec framing: DEFLATE stored blocks
# add 5 bytes per 64 KiB, LZW's worst case is 12 bits per 8-bit sample (1.5x). Twice the
# decoded size plus 4 KiB allows all of them and refuses a lying 2 GB byte count.
MAX_COMPRESSION_OVERHEAD = 2.0
COMPRESSED_SLACK = 4096

# (SampleFormat, BitsPerSample) pairs async-tiff decodes to the right numpy dtype (verified on
# GDAL-written files in tests/test_hostile_tiffs.py); complex and float16 are refused.
ALLOWED_SAMPLES = {
    (1, 8): "uint8",
    (1, 16): "uint16",
    (1, 32): "uint32",
    (1, 64): "uint64",
    (2, 8): "int8",
    (2, 16): "int16",
    (2, 32): "int32",
    (2, 64): "int64",
    (3, 32): "float32",
    (3, 64): "float64",
}
# Codecs Terrazzo reads: none, LZW, JPEG, DEFLATE (and its old code), PackBits, LERC, LZMA,
# ZSTD, WebP. Others (fax, old-style JPEG, JPEG 2000) are refused before a read.
ALLOWED_COMPRESSION = {1, 5, 7, 8, 32773, 32946, 34887, 34925, 50000, 50001}

_NEW_SUBFILE, _WIDTH, _HEIGHT, _BITS, _COMPRESSION = 254, 256, 257, 258, 259
_STRIP_OFFSETS, _SAMPLES, _ROWS_PER_STRIP, _STRIP_COUNTS, _PLANAR = 273, 277, 278, 279, 284
_TILE_WIDTH, _TILE_HEIGHT, _TILE_OFFSETS, _TILE_COUNTS = 322, 323, 324, 325
_SAMPLE_FORMAT, _PIXEL_SCALE, _TIEPOINT, _TRANSFORMATION = 339, 33550, 33922, 34264
_MASK_SUBFILE = 4  # NewSubfileType bit: transparency mask

# TIFF field type -> (struct code, bytes per value)
_TYPES = {
    1: ("B", 1),  # BYTE
    2: ("B", 1),  # ASCII
    3: ("H", 2),  # SHORT
    4: ("I", 4),  # LONG
    5: ("I", 8),  # RATIONAL (two LONGs)
    6: ("b", 1),  # SBYTE
    7: ("B", 1),  # UNDEFINED
    8: ("h", 2),  # SSHORT
    9: ("i", 4),  # SLONG
    10: ("i", 8),  # SRATIONAL
    11: ("f", 4),  # FLOAT
    12: ("d", 8),  # DOUBLE
    13: ("I", 4),  # IFD
    16: ("Q", 8),  # LONG8
    17: ("q", 8),  # SLONG8
    18: ("Q", 8),  # IFD8
}
# Tags whose values the checks read; the others are only bounded in size.
_READ = {
    _NEW_SUBFILE,
    _WIDTH,
    _HEIGHT,
    _BITS,
    _COMPRESSION,
    _STRIP_OFFSETS,
    _SAMPLES,
    _ROWS_PER_STRIP,
    _STRIP_COUNTS,
    _PLANAR,
    _TILE_WIDTH,
    _TILE_HEIGHT,
    _TILE_OFFSETS,
    _TILE_COUNTS,
    _SAMPLE_FORMAT,
    _PIXEL_SCALE,
    _TIEPOINT,
    _TRANSFORMATION,
}


class HostileTiff(ValueError):
    """A TIFF whose header claims more than Terrazzo reads, or contradicts itself.

    A ValueError, so core.fetch.is_transient treats it as permanent: it is not retried.
    """


@dataclass(frozen=True)
class LevelLimits:
    """What a checked IFD may decode to: one tile's bytes, for the bounded decoders."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    tile_decoded: int  # bytes one decoded tile (all its samples) takes
    chunk_decoded: int  # bytes one compressed chunk inflates to (a tile, or one plane)
    mask: bool
    striped: bool = False  # blocks are strips: tile width = image width, height = RowsPerStrip


@dataclass(frozen=True)
class CheckedHeader:
    """The result of a passed check: the bytes read and what each IFD may decode to."""

    prefix: bytes  # the file's first bytes, as read (serves async-geotiff's header reads)
    size: int | None  # the file size when the reads showed it (a short read), else None
    bytes_read: int
    requests: int
    ifds: tuple[LevelLimits, ...]
    # (start, end) of every IFD and out-of-line tag value, read by the checks or not: the
    # header a GDAL open reads (core.gdal_decode), found without a second walk
    extents: tuple[tuple[int, int], ...] = ()
    segments: tuple[tuple[int, bytes], ...] = ()  # bytes read outside the prefix

    def known(self, start: int, end: int) -> bytes | None:
        """Bytes [start, end) when the check read them (clipped to a known file end)."""
        if self.size is not None:
            end = min(end, self.size)
        if end <= len(self.prefix):
            return self.prefix[start:end]
        for seg_start, seg in self.segments:
            if seg_start <= start and end <= seg_start + len(seg):
                return seg[start - seg_start : end - seg_start]
        return None


class _Source:
    """The header bytes, read on demand: one prefix grown from offset 0 (cheap to hand on to
    async-geotiff) and, for headers far from the start, separate bounded segments."""

    def __init__(self, store: Any, path: str, href: str) -> None:
        self.store, self.path, self.href = store, path, href
        self.prefix = b""
        self.segments: list[tuple[int, bytes]] = []
        self.size: int | None = None
        self.read_total = 0
        self.claimed = 0  # out-of-line tag bytes the IFDs claim
        self.requests = 0
        self.extents: list[tuple[int, int]] = []  # IFDs and out-of-line tag values

    async def _fetch(self, start: int, end: int) -> bytes:
        if self.size is not None:
            end = min(end, self.size)
        if self.read_total + (end - start) > MAX_HEADER_BYTES:
            raise HostileTiff(
                f"{self.href}: header needs more than {MAX_HEADER_BYTES:,} bytes "
                "(MAX_HEADER_BYTES); refused"
            )
        data = bytes(await self.store.get_range_async(self.path, start=start, end=end))
        self.requests += 1
        self.read_total += len(data)
        if len(data) < end - start:
            self.size = start + len(data)  # a short read: the file ends here
        return data

    async def get(self, start: int, length: int) -> bytes:
        """`length` bytes at `start`; HostileTiff when the file ends first (truncated)."""
        end = start + length
        if self.size is not None and end > self.size:
            raise self._truncated(start, end)
        if end <= len(self.prefix):
            return self.prefix[start:end]
        for seg_start, seg in self.segments:
            if seg_start <= start and end <= seg_start + len(seg):
                return seg[start - seg_start : end - seg_start]
        if start <= len(self.prefix) + FIRST_READ:
            # near the prefix (a COG header): grow it, doubling, so it stays one buffer
            grow_to = max(end, FIRST_READ, 2 * len(self.prefix))
            self.prefix += await self._fetch(len(self.prefix), grow_to)
            if end > len(self.prefix):
                raise self._truncated(start, end)
            return self.prefix[start:end]
        seg = await self._fetch(start, max(end, start + FIRST_READ))
        if len(seg) < length:
            raise self._truncated(start, end)
        self.segments.append((start, seg))
        return seg[:length]

    def _truncated(self, start: int, end: int) -> HostileTiff:
        return HostileTiff(
            f"{self.href}: truncated file: the header needs bytes {start:,}..{end:,} but the "
            f"file has {self.size:,}"
        )


async def check_header(store: Any, path: str, href: str) -> CheckedHeader:
    """Walk every IFD of the TIFF at `path` in `store` and check it against the limits.

    Raises HostileTiff (naming `href` and the limit) on the first thing out of bounds; reads
    at most MAX_HEADER_BYTES, in one request for an ordinary COG.
    """
    src = _Source(store, path, href)
    head = await src.get(0, 8)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None:
        raise HostileTiff(f"{href}: not a TIFF (byte order mark {head[:2]!r})")
    (magic,) = struct.unpack(order + "H", head[2:4])
    if magic == 42:
        big = False
        (offset,) = struct.unpack(order + "I", head[4:8])
    elif magic == 43:
        big = True
        rest = await src.get(8, 8)
        (offset,) = struct.unpack(order + "Q", rest)
    else:
        raise HostileTiff(f"{href}: not a TIFF (version {magic})")
    seen: set[int] = set()
    ifds: list[LevelLimits] = []
    while offset:
        if offset in seen:
            raise HostileTiff(f"{href}: IFD chain loops back to offset {offset}; refused")
        if len(seen) >= MAX_IFDS:
            raise HostileTiff(f"{href}: more than {MAX_IFDS} IFDs (MAX_IFDS); refused")
        seen.add(offset)
        tags, offset = await _read_ifd(src, offset, order, big)
        ifds.append(_check_ifd(href, tags, len(ifds), src.size))
    if not ifds:
        raise HostileTiff(f"{href}: no IFD")
    return CheckedHeader(
        prefix=src.prefix,
        size=src.size,
        bytes_read=src.read_total,
        requests=src.requests,
        ifds=tuple(ifds),
        extents=tuple(src.extents),
        segments=tuple(src.segments),
    )


async def _read_ifd(
    src: _Source, offset: int, order: str, big: bool
) -> tuple[dict[int, tuple[int, int, list]], int]:
    """{tag: (type, count, values)} of the IFD at `offset` (values only for the tags the
    checks read) and the next IFD's offset."""
    count_fmt, entry_size, next_fmt = ("Q", 20, "Q") if big else ("H", 12, "I")
    (n,) = struct.unpack(order + count_fmt, await src.get(offset, 8 if big else 2))
    if n > MAX_TAGS:
        raise HostileTiff(f"{src.href}: IFD at {offset} has {n} tags (MAX_TAGS {MAX_TAGS})")
    start = offset + (8 if big else 2)
    body = await src.get(start, n * entry_size + (8 if big else 4))
    src.extents.append((offset, start + len(body)))
    inline = 8 if big else 4
    tags: dict[int, tuple[int, int, list]] = {}
    for i in range(n):
        entry = body[i * entry_size : (i + 1) * entry_size]
        tag, typ = struct.unpack(order + "HH", entry[:4])
        (count,) = struct.unpack(order + ("Q" if big else "I"), entry[4 : 4 + inline])
        value = entry[4 + inline :]
        if typ not in _TYPES:
            continue  # an unknown type: readers skip it too
        code, size = _TYPES[typ]
        nbytes = count * size
        tile_array = tag in _BLOCK_ARRAYS
        if count > MAX_TILES * MAX_SAMPLES if tile_array else nbytes > MAX_TAG_BYTES:
            raise HostileTiff(
                f"{src.href}: {_name(tag)} claims {count:,} values ({nbytes:,} bytes); refused"
            )
        if nbytes > inline:
            # every out-of-line value a native reader would load counts, read here or not
            src.claimed += nbytes
            (at,) = struct.unpack(order + ("Q" if big else "I"), value)
            src.extents.append((at, at + nbytes))
            if src.claimed > MAX_HEADER_BYTES:
                raise HostileTiff(
                    f"{src.href}: tag values take more than {MAX_HEADER_BYTES:,} bytes "
                    "(MAX_HEADER_BYTES); refused"
                )
        if tag not in _READ:
            tags[tag] = (typ, count, [])
            continue
        if nbytes <= inline:
            raw = value[:nbytes]
        else:
            raw = await src.get(at, nbytes)
        items = count * (2 if typ in (5, 10) else 1)
        tags[tag] = (typ, count, list(struct.unpack(f"{order}{items}{code}", raw)))
    (following,) = struct.unpack(order + next_fmt, body[n * entry_size :])
    return tags, following


_BLOCK_ARRAYS = (_TILE_OFFSETS, _TILE_COUNTS, _STRIP_OFFSETS, _STRIP_COUNTS)

_NAMES = {
    _WIDTH: "ImageWidth",
    _HEIGHT: "ImageLength",
    _BITS: "BitsPerSample",
    _SAMPLES: "SamplesPerPixel",
    _TILE_WIDTH: "TileWidth",
    _TILE_HEIGHT: "TileLength",
    _TILE_OFFSETS: "TileOffsets",
    _TILE_COUNTS: "TileByteCounts",
    _STRIP_OFFSETS: "StripOffsets",
    _STRIP_COUNTS: "StripByteCounts",
    _ROWS_PER_STRIP: "RowsPerStrip",
    _SAMPLE_FORMAT: "SampleFormat",
    _PIXEL_SCALE: "ModelPixelScale",
    _TRANSFORMATION: "ModelTransformation",
}


def _name(tag: int) -> str:
    return _NAMES.get(tag, f"tag {tag}")


def _check_ifd(
    href: str, tags: dict[int, tuple[int, int, list]], index: int, size: int | None
) -> LevelLimits:
    """Check one IFD's claims against the limits; what a tile of it may decode to."""
    where = f"{href}: IFD {index}"

    def one(tag: int, default: int | None = None) -> int:
        values = tags.get(tag, (0, 0, []))[2]
        if not values:
            if default is None:
                raise HostileTiff(f"{where}: no {_name(tag)}")
            return default
        return int(values[0])

    subfile = one(_NEW_SUBFILE, 0)
    is_mask = bool(subfile & _MASK_SUBFILE)
    width, height = one(_WIDTH), one(_HEIGHT)
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
        raise HostileTiff(
            f"{where}: image width x height {width:,} x {height:,} exceeds {MAX_SIDE:,} "
            "per side (MAX_SIDE)"
        )
    striped = _TILE_WIDTH not in tags and _TILE_OFFSETS not in tags and _STRIP_OFFSETS in tags
    if striped:
        # a strip is a block as wide as the image (GDAL decodes them, core.gdal_decode); its
        # decoded size is bounded by MAX_TILE_DECODED below like a tile's
        offsets_tag, counts_tag, block = _STRIP_OFFSETS, _STRIP_COUNTS, "strip"
        tw, th = width, min(one(_ROWS_PER_STRIP, height), height)
        if th <= 0:
            raise HostileTiff(f"{where}: RowsPerStrip {th}")
    else:
        if _TILE_WIDTH not in tags or _TILE_OFFSETS not in tags:
            raise HostileTiff(f"{where}: neither tiled nor striped (no TileOffsets)")
        offsets_tag, counts_tag, block = _TILE_OFFSETS, _TILE_COUNTS, "tile"
        tw, th = one(_TILE_WIDTH), one(_TILE_HEIGHT)
        if not (0 < tw <= MAX_TILE_SIDE and 0 < th <= MAX_TILE_SIDE and tw % 16 == 0 == th % 16):
            raise HostileTiff(
                f"{where}: tile width x height {tw} x {th}: must be multiples of 16 up to "
                f"{MAX_TILE_SIDE} (MAX_TILE_SIDE)"
            )
    samples = one(_SAMPLES, 1)
    if not 0 < samples <= MAX_SAMPLES:
        raise HostileTiff(
            f"{where}: {samples:,} samples per pixel; at most {MAX_SAMPLES} (MAX_SAMPLES)"
        )
    bits = tags.get(_BITS, (0, 0, [1]))[2] or [1]
    formats = tags.get(_SAMPLE_FORMAT, (0, 0, [1]))[2] or [1]
    if len(set(bits)) != 1 or len(set(formats)) != 1:
        raise HostileTiff(f"{where}: samples of different types ({bits[:4]}, {formats[:4]})")
    pair = (int(formats[0]), int(bits[0]))
    if pair not in ALLOWED_SAMPLES and not (is_mask and pair == (1, 1)):
        raise HostileTiff(
            f"{where}: sample format {pair[0]} with {pair[1]} bits is not one Terrazzo reads "
            f"(unsigned/signed 8-64 bit integers, float32/64; not complex or float16)"
        )
    compression = one(_COMPRESSION, 1)
    if compression not in ALLOWED_COMPRESSION:
        raise HostileTiff(f"{where}: compression {compression} is not supported")
    planar = one(_PLANAR, 1)
    if planar not in (1, 2):
        raise HostileTiff(f"{where}: PlanarConfiguration {planar}")
    across, down = math.ceil(width / tw), math.ceil(height / th)
    planes = samples if planar == 2 else 1
    if across * down > MAX_TILES:
        raise HostileTiff(
            f"{where}: {across * down:,} {block}s of {tw} x {th}; at most {MAX_TILES:,} (MAX_TILES)"
        )
    row_bytes = math.ceil(tw * (samples // planes) * pair[1] / 8)
    chunk = row_bytes * th
    decoded = chunk * planes
    if decoded > MAX_TILE_DECODED:
        raise HostileTiff(
            f"{where}: one {tw} x {th} {block} of {samples} samples decodes to {decoded:,} "
            f"bytes; at most {MAX_TILE_DECODED:,} (MAX_TILE_DECODED)"
        )
    expected = across * down * planes
    offsets = tags[offsets_tag][2]
    counts = tags.get(counts_tag, (0, 0, []))[2]
    if len(offsets) != expected or len(counts) != expected:
        raise HostileTiff(
            f"{where}: {_name(offsets_tag)} has {len(offsets):,} and {_name(counts_tag)} "
            f"{len(counts):,} entries; {across} x {down} {block}s x {planes} planes need "
            f"{expected:,}"
        )
    most = int(chunk * MAX_COMPRESSION_OVERHEAD) + COMPRESSED_SLACK
    for i, (start, count) in enumerate(zip(offsets, counts, strict=True)):
        if count > most:
            raise HostileTiff(
                f"{where}: {block} {i} byte count {count:,} exceeds {most:,} for a "
                f"{chunk:,}-byte {block} (MAX_COMPRESSION_OVERHEAD)"
            )
        if size is not None and count and start + count > size:
            raise HostileTiff(
                f"{where}: truncated file: {block} {i} needs bytes {start:,}..{start + count:,} "
                f"but the file has {size:,}"
            )
    if index == 0:
        _check_georeference(where, tags)
    return LevelLimits(
        width=width,
        height=height,
        tile_width=tw,
        tile_height=th,
        tile_decoded=decoded,
        chunk_decoded=chunk,
        mask=is_mask,
        striped=striped,
    )


def _check_georeference(where: str, tags: dict[int, tuple[int, int, list]]) -> None:
    """A pixel scale or transformation that is 0, NaN or infinite has no inverse: every
    plan of the item would divide by it."""
    scale = [float(v) for v in tags.get(_PIXEL_SCALE, (0, 0, []))[2]]
    if _PIXEL_SCALE in tags and (
        len(scale) < 2 or not all(math.isfinite(v) and v != 0 for v in scale[:2])
    ):
        raise HostileTiff(
            f"{where}: ModelPixelScale {scale[:3]}: pixel scale must be finite, non-zero"
        )
    tie = [float(v) for v in tags.get(_TIEPOINT, (0, 0, []))[2]]
    if not all(math.isfinite(v) for v in tie):
        raise HostileTiff(f"{where}: ModelTiepoint {tie[:6]} is not finite")
    matrix = [float(v) for v in tags.get(_TRANSFORMATION, (0, 0, []))[2]]
    if _TRANSFORMATION in tags:
        if len(matrix) < 16 or not all(math.isfinite(v) for v in matrix):
            raise HostileTiff(f"{where}: ModelTransformation is not 16 finite numbers")
        a, b, d, e = matrix[0], matrix[1], matrix[4], matrix[5]
        if a * e - b * d == 0:
            raise HostileTiff(f"{where}: ModelTransformation pixel scale is singular (0)")


class PrefixStore:
    """An obspec store that answers reads inside a known prefix of one file from memory and
    passes everything else to the real store.

    Handed to `GeoTIFF.open` with the bytes `check_header` already read, it makes the check
    free of extra round trips; `release()` drops the bytes once the header is parsed, so the
    cached GeoTIFF keeps a reference to the real store only.
    """

    def __init__(self, inner: Any, path: str, prefix: bytes, size: int | None) -> None:
        self.inner, self.path, self.prefix, self.size = inner, path, prefix, size
        self.served = 0  # reads answered from the prefix
        self.passed = 0  # reads passed to the real store

    def release(self) -> None:
        self.prefix = b""

    def _inside(self, path: str, start: int, end: int) -> bool:
        if path != self.path or not self.prefix:
            return False
        # past the end of a file whose size is known: the store would clip, so may we
        return end <= len(self.prefix) or (self.size == len(self.prefix) and start < self.size)

    async def get_range_async(
        self, path: str, *, start: int, end: int | None = None, length: int | None = None
    ) -> Any:
        stop = end if end is not None else start + (length or 0)
        if self._inside(path, start, stop):
            self.served += 1
            return self.prefix[start:stop]
        self.passed += 1
        return await self.inner.get_range_async(path, start=start, end=stop)

    async def get_ranges_async(
        self, path: str, *, starts: Any, ends: Any = None, lengths: Any = None
    ) -> Any:
        if ends is None:
            ends = [s + n for s, n in zip(starts, lengths or [], strict=True)]
        if all(self._inside(path, s, e) for s, e in zip(starts, ends, strict=True)):
            self.served += 1
            return [self.prefix[s:e] for s, e in zip(starts, ends, strict=True)]
        self.passed += 1
        return await self.inner.get_ranges_async(path, starts=list(starts), ends=list(ends))
