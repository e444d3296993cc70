"""Hostile TIFFs, written at test time from a real GDAL COG.

Each function writes one file that claims too much (dimensions, tile counts, bands, IFDs,
bytes) or lies (byte counts, loops, NaN scales). They start from a genuine COG written by GDAL
(`core.cogs.write_cog`): its IFDs and tiles are parsed with `struct`, the tags are edited, and
a classic little-endian TIFF is serialised again, so every file is a real GeoTIFF except for
the one thing it is hostile about. The files are tiny (bytes to ~1 MB); what they claim is not.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from affine import Affine

from core.cogs import write_cog

# TIFF field types: (struct code, size in bytes)
_TYPES = {1: ("B", 1), 2: ("B", 1), 3: ("H", 2), 4: ("I", 4), 5: ("I", 4), 7: ("B", 1)}
_TYPES |= {8: ("h", 2), 9: ("i", 4), 10: ("i", 4), 11: ("f", 4), 12: ("d", 8), 16: ("Q", 8)}
_RATIONAL = (5, 10)  # two LONGs per value

SHORT, LONG, DOUBLE = 3, 4, 12
IMAGE_WIDTH, IMAGE_LENGTH, BITS_PER_SAMPLE, COMPRESSION = 256, 257, 258, 259
SAMPLES_PER_PIXEL, NEW_SUBFILE_TYPE, PLANAR = 277, 254, 284
TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTE_COUNTS = 322, 323, 324, 325
SAMPLE_FORMAT, PIXEL_SCALE, TIEPOINT = 339, 33550, 33922
GDAL_NODATA = 42113

# Where the crafted items sit: UTM 33N near 15°E 45°N; the e2e test's good item shares it.
CRS = "EPSG:32633"
TRANSFORM = Affine(10.0, 0, 500_000.0, 0, -10.0, 4_985_000.0)
SIZE = 256


@dataclass
class Tag:
    """One IFD entry. `count` overrides the written count (a lying count); `raw` overrides
    the 4-byte value/offset field (e.g. an offset pointing anywhere)."""

    type: int
    values: list[int | float]
    count: int | None = None
    raw: int | None = None


@dataclass
class Ifd:
    """Tags (TileOffsets/TileByteCounts are generated from `tiles` unless given) and the
    compressed tile payloads, row-major."""

    tags: dict[int, Tag]
    tiles: list[bytes] = field(default_factory=list)


def read_tiff(path: Path) -> list[Ifd]:
    """Parse a classic little-endian TIFF (what GDAL writes for small COGs)."""
    data = Path(path).read_bytes()
    assert data[:4] == b"II*\x00", "expected a classic little-endian TIFF"
    (offset,) = struct.unpack_from("<I", data, 4)
    ifds = []
    while offset:
        (n,) = struct.unpack_from("<H", data, offset)
        tags: dict[int, Tag] = {}
        for i in range(n):
            tag, typ, count, value = struct.unpack_from("<HHII", data, offset + 2 + 12 * i)
            code, size = _TYPES[typ]
            items = count * (2 if typ in _RATIONAL else 1)
            at = offset + 2 + 12 * i + 8 if size * items <= 4 else value
            tags[tag] = Tag(typ, list(struct.unpack_from(f"<{items}{code}", data, at)))
        offsets = tags.pop(TILE_OFFSETS).values
        counts = tags.pop(TILE_BYTE_COUNTS).values
        tiles = [data[int(o) : int(o) + int(c)] for o, c in zip(offsets, counts, strict=True)]
        ifds.append(Ifd(tags, tiles))
        (offset,) = struct.unpack_from("<I", data, offset + 2 + 12 * n)
    return ifds


def write_tiff(path: Path, ifds: list[Ifd], *, loop_to: int | None = None) -> Path:
    """Serialise `ifds` as a classic TIFF: header, each IFD with its out-of-line values, then
    the tiles. `loop_to`: the last IFD's next-IFD pointer goes back to IFD `loop_to`."""
    layout: list[tuple[int, dict[int, Tag]]] = []
    pos = 8
    for ifd in ifds:
        tags = dict(ifd.tags)
        for tag in (TILE_OFFSETS, TILE_BYTE_COUNTS):
            tags.setdefault(tag, Tag(LONG, [0] * len(ifd.tiles)))
        layout.append((pos, tags))
        pos += 2 + 12 * len(tags) + 4 + sum(_outline(t) for t in tags.values())
    # tiles after every IFD: fill generated offsets and counts
    for (_, tags), ifd in zip(layout, ifds, strict=True):
        if ifd.tiles and TILE_OFFSETS not in ifd.tags:
            tags[TILE_OFFSETS] = Tag(
                LONG, [pos + sum(map(len, ifd.tiles[:i])) for i in range(len(ifd.tiles))]
            )
        if ifd.tiles and TILE_BYTE_COUNTS not in ifd.tags:
            tags[TILE_BYTE_COUNTS] = Tag(LONG, [len(t) for t in ifd.tiles])
        pos += sum(map(len, ifd.tiles))
    out = bytearray(b"II*\x00" + struct.pack("<I", layout[0][0]))
    for n, (start, tags) in enumerate(layout):
        assert len(out) == start
        extra = start + 2 + 12 * len(tags) + 4
        body, tail = bytearray(struct.pack("<H", len(tags))), bytearray()
        for tag in sorted(tags):
            t = tags[tag]
            code, _ = _TYPES[t.type]
            packed = struct.pack(f"<{len(t.values)}{code}", *t.values)
            count = (
                t.count
                if t.count is not None
                else len(t.values) // (2 if t.type in _RATIONAL else 1)
            )
            if t.raw is not None:
                field_ = struct.pack("<I", t.raw)
            elif len(packed) <= 4:
                field_ = packed.ljust(4, b"\x00")
            else:
                field_ = struct.pack("<I", extra + len(tail))
                tail += packed.ljust(_outline(t), b"\x00")
            body += struct.pack("<HHI", tag, t.type, count) + field_
        following = layout[n + 1][0] if n + 1 < len(layout) else 0
        if n + 1 == len(layout) and loop_to is not None:
            following = layout[loop_to][0]
        out += body + struct.pack("<I", following) + tail
    for ifd in ifds:
        for tile in ifd.tiles:
            out += tile
    Path(path).write_bytes(bytes(out))
    return Path(path)


def _outline(tag: Tag) -> int:
    """Bytes a tag's values take outside the IFD (0 when they fit in the entry), even."""
    size = len(tag.values) * _TYPES[tag.type][1]
    return 0 if size <= 4 or tag.raw is not None else size + size % 2


def base_cog(
    path: Path, *, size: int = SIZE, bands: int = 1, dtype: str = "uint8", overviews: bool = False
) -> Path:
    """A genuine DEFLATE COG of one size² tile at the crafted items' place (1-200, nodata 0)."""
    rows = np.arange(size * size, dtype="uint32").reshape(size, size)
    data = np.stack([(rows + 37 * b) % 200 + 1 for b in range(bands)]).astype(dtype)
    transform = TRANSFORM * Affine.scale(SIZE / size)
    return write_cog(
        path, data, crs=CRS, transform=transform, nodata=0, overviews=overviews, blocksize=size
    )


def _edit(
    out: Path, edit: Callable[[list[Ifd]], list[Ifd] | None], *, size: int = SIZE, **kw
) -> Path:
    src = out.with_name(out.stem + ".base.tif")
    base_cog(src, size=size)
    ifds = read_tiff(src)
    src.unlink()
    ifds = edit(ifds) or ifds
    return write_tiff(out, ifds, **kw)


def huge_dims(out: Path) -> Path:
    """ImageWidth and ImageLength 2^31: 2^62 pixels, 2^46 tiles claimed."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tags[IMAGE_WIDTH] = Tag(LONG, [2**31])
        ifds[0].tags[IMAGE_LENGTH] = Tag(LONG, [2**31])

    return _edit(out, edit)


def huge_tile_count(out: Path) -> Path:
    """TileOffsets and TileByteCounts claim 2^32-1 entries in a file of a few hundred bytes
    (the reader that trusts the count allocates 32 GiB and aborts the process)."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tags[TILE_OFFSETS] = Tag(LONG, [], count=2**32 - 1, raw=8)
        ifds[0].tags[TILE_BYTE_COUNTS] = Tag(LONG, [], count=2**32 - 1, raw=8)
        ifds[0].tiles = []

    return _edit(out, edit)


def huge_tiles(out: Path) -> Path:
    """65535² internal tiles (16 GiB of float64 per tile if decoded)."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tags[TILE_WIDTH] = Tag(SHORT, [65535])
        ifds[0].tags[TILE_LENGTH] = Tag(SHORT, [65535])

    return _edit(out, edit)


def big_tile(out: Path) -> Path:
    """A 32752² internal tile, 16-aligned: 1 GiB decoded, above the tile cache's cap."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tags[TILE_WIDTH] = Tag(SHORT, [32752])
        ifds[0].tags[TILE_LENGTH] = Tag(SHORT, [32752])

    return _edit(out, edit)


def lying_byte_count(out: Path) -> Path:
    """The one tile's byte count says 2 GB; the file holds a few KB."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tags[TILE_BYTE_COUNTS] = Tag(LONG, [2**31])

    return _edit(out, edit)


BOMB_BYTES = 2**30  # what a bomb tile inflates to


def zlib_bomb(total: int = BOMB_BYTES) -> bytes:
    """A zlib stream of `total` zero bytes (~1 KB per MiB), built in ~0.3 s: one 16 MiB
    block of raw DEFLATE ended by a full flush is independent of what came before, so it
    can be repeated; the Adler-32 trailer is computed over the whole output."""
    chunk = bytes(2**24)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(chunk) + packer.flush(zlib.Z_FULL_FLUSH)
    end = packer.flush()
    check = 1
    for _ in range(total // len(chunk)):
        check = zlib.adler32(chunk, check)
    body = first + again * (total // len(chunk) - 1) + end
    return b"\x78\xda" + body + struct.pack(">I", check)


def deflate_bomb(out: Path) -> Path:
    """A 256² uint8 tile (64 KiB decoded) whose 1 MB DEFLATE stream inflates to 1 GiB."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tiles = [zlib_bomb()]

    return _edit(out, edit)


def deflate_bomb_in_bounds(out: Path) -> Path:
    """A 1024² uint8 tile (1 MiB decoded) whose 1 MB DEFLATE stream inflates to 1 GiB: its
    byte count is plausible for the tile, so only a bounded inflate stops it."""

    def edit(ifds: list[Ifd]) -> None:
        ifds[0].tiles = [zlib_bomb()]

    return _edit(out, edit, size=1024)


def ifd_loop(out: Path) -> Path:
    """Two IFDs whose chain loops back to the first (a reader that follows it never ends)."""

    def edit(ifds: list[Ifd]) -> list[Ifd]:
        overview = Ifd(dict(ifds[0].tags), list(ifds[0].tiles))
        overview.tags[NEW_SUBFILE_TYPE] = Tag(LONG, [1])
        return [ifds[0], overview]

    return _edit(out, edit, loop_to=0)


def many_overviews(out: Path, count: int = 3000) -> Path:
    """3000 overview IFDs, each a real one-tile 16² image."""

    def edit(ifds: list[Ifd]) -> list[Ifd]:
        small = dict(ifds[0].tags)
        small |= {
            IMAGE_WIDTH: Tag(LONG, [16]),
            IMAGE_LENGTH: Tag(LONG, [16]),
            TILE_WIDTH: Tag(SHORT, [16]),
            TILE_LENGTH: Tag(SHORT, [16]),
            NEW_SUBFILE_TYPE: Tag(LONG, [1]),
        }
        tile = zlib.compress(bytes(256))
        return [ifds[0], *(Ifd(dict(small), [tile]) for _ in range(count))]

    return _edit(out, edit)


def many_bands(out: Path, bands: int = 10_000) -> Path:
    """10,000 samples per pixel (a 256² tile of them is 655 MB decoded)."""

    def edit(ifds: list[Ifd]) -> None:
        tags = ifds[0].tags
        tags[SAMPLES_PER_PIXEL] = Tag(SHORT, [bands])
        tags[BITS_PER_SAMPLE] = Tag(SHORT, [8] * bands)
        tags[SAMPLE_FORMAT] = Tag(SHORT, [1] * bands)
        tags[PLANAR] = Tag(SHORT, [1])
        tags.pop(338, None)  # ExtraSamples would have to list 9,999 entries
        ifds[0].tiles = [zlib.compress(bytes(SIZE * SIZE * bands))]

    return _edit(out, edit)


def _sample_type(fmt: int, bits: int) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        def edit(ifds: list[Ifd]) -> None:
            ifds[0].tags[SAMPLE_FORMAT] = Tag(SHORT, [fmt])
            ifds[0].tags[BITS_PER_SAMPLE] = Tag(SHORT, [bits])
            ifds[0].tags.pop(317, None)  # no predictor: the payload is plain zeros
            ifds[0].tiles = [zlib.compress(bytes(SIZE * SIZE * bits // 8))]

        return _edit(out, edit)

    return write


complex_dtype = _sample_type(6, 64)  # complex64 (IEEE complex float)
int64_dtype = _sample_type(2, 64)


def truncated(out: Path) -> Path:
    """A real GDAL COG cut inside its header (tile data and part of the tags gone)."""
    src = base_cog(out.with_name(out.stem + ".base.tif"))
    data = src.read_bytes()
    src.unlink()
    out.write_bytes(data[:300])
    return out


def truncated_tiles(out: Path) -> Path:
    """A real GDAL COG whose header is whole but whose last tile is cut short."""
    src = base_cog(out.with_name(out.stem + ".base.tif"))
    data = src.read_bytes()
    src.unlink()
    out.write_bytes(data[:-200])
    return out


def _scale(value: float) -> Callable[[Path], Path]:
    def write(out: Path) -> Path:
        def edit(ifds: list[Ifd]) -> None:
            ifds[0].tags[PIXEL_SCALE] = Tag(DOUBLE, [value, value, 0.0])

        return _edit(out, edit)

    return write


scale_zero = _scale(0.0)
scale_nan = _scale(math.nan)


# name -> (writer, a phrase the guard's message must contain). Every one is refused by
# core.tiffguard before async-tiff parses it; DECODE_TIME lists the ones only a read stops.
HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "huge_dims": (huge_dims, "image width"),
    "huge_tile_count": (huge_tile_count, "TileOffsets"),
    "huge_tiles": (huge_tiles, "tile width"),
    "big_tile": (big_tile, "tile width"),
    "lying_byte_count": (lying_byte_count, "byte count"),
    "deflate_bomb": (deflate_bomb, "byte count"),
    "ifd_loop": (ifd_loop, "loop"),
    "many_overviews": (many_overviews, "IFDs"),
    "many_bands": (many_bands, "samples per pixel"),
    "complex_dtype": (complex_dtype, "sample format"),
    "truncated": (truncated, "truncated"),
    "truncated_tiles": (truncated_tiles, "truncated"),
    "scale_zero": (scale_zero, "pixel scale"),
    "scale_nan": (scale_nan, "pixel scale"),
}

# Files whose header is legitimate: the guard lets them through and the read decides.
# name -> (writer, a phrase of the read's error, or None when the read must succeed)
DECODE_TIME: dict[str, tuple[Callable[[Path], Path], str | None]] = {
    "deflate_bomb_in_bounds": (deflate_bomb_in_bounds, "decompression bomb"),
    "int64_dtype": (int64_dtype, None),  # async-tiff decodes int64 correctly (tested)
}
