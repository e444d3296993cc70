"""Plan stage: turn "this output grid from these items" into an explicit read plan.

The plan is plain data: for each item (in mosaic order) and asset, which COG level to read
(GDAL's choice, so tiles equal TiTiler's: see `choose_level`), which source window (clipped:
COG readers have no boundless reads), and which internal tiles that window touches. It can be
printed (`terrazzo plan`, `/plan/...`) so a user can see why a tile is slow, and it is what the
fetch and compute stages execute — nothing else decides what to read.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import morecantile
from affine import Affine
from pyproj import Transformer

if TYPE_CHECKING:  # the compute workers import this module: not the catalog's DuckDB
    from core.catalog import Item, SearchResult

RESAMPLING = ("nearest", "bilinear", "cubic", "average")
# Source pixels needed beyond the footprint so the kernel sees its neighbours at the edges.
_MARGIN = {"nearest": 1, "bilinear": 2, "cubic": 3, "average": 2}
# GDAL's overview choice (VRTWarpedRasterBand::GetBestOverviewLevel for warped reads,
# GDALBandGetBestOverviewLevel2 in a COG's own CRS): the most reduced overview whose reduction
# is below the wanted one times a threshold — 1.2 for nearest, 1.0 for the other kernels —
# plus 0.1. That is the rule of the GDAL in rasterio's wheel (3.10.3), measured on both paths
# (tests/test_plan.py, tests/test_overviews.py); later GDALs drop the 0.1 and nudge 1.0 to
# 1.01. GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD replaces the threshold, as in GDAL and TiTiler.
_NEAREST_OVERSAMPLING = 1.2
_OVERSAMPLING = 1.0
_OVERSAMPLING_MARGIN = 0.1

Bounds = tuple[float, float, float, float]


@lru_cache(maxsize=512)
def transformer(src: str, dst: str) -> Transformer:
    """PROJ set-up costs milliseconds; a tile server meets the same few CRS pairs all day."""
    return Transformer.from_crs(src, dst, always_xy=True)


def reproject_bounds(bounds: Bounds, src: str, dst: str) -> Bounds:
    """`bounds` in `dst`, with densified edges (curved edges of a reprojected box)."""
    if src == dst:
        return bounds
    return transformer(src, dst).transform_bounds(*bounds, densify_pts=21)


MERCATOR_RADIUS = 6378137.0  # EPSG:3857's sphere


def mercator_lonlat(bounds: Bounds) -> Bounds:
    """Web Mercator bounds in lon/lat, in closed form: longitude depends on x alone and
    latitude on y alone, both increasing, so the corners are the extent (what PROJ's
    densified transform_bounds gives, to 1e-9 degree). Why: every web tile's search asks for
    it, and pyproj releases the GIL for the call: on the event loop, getting it back behind
    the decode, encode and search threads cost more than the transform."""
    left, bottom, right, top = bounds
    degrees = 180.0 / math.pi
    return (
        left / MERCATOR_RADIUS * degrees,
        math.atan(math.sinh(bottom / MERCATOR_RADIUS)) * degrees,
        right / MERCATOR_RADIUS * degrees,
        math.atan(math.sinh(top / MERCATOR_RADIUS)) * degrees,
    )


def pixel_window(
    bounds: Bounds, transform: Affine, width: int, height: int, margin: int
) -> tuple[int, int, int, int] | None:
    """The (col, row, width, height) window of a grid covering `bounds`, clipped; None if empty."""
    if not all(math.isfinite(v) for v in bounds):
        return None
    left, bottom, right, top = bounds
    inverse = ~transform
    corners = ((left, top), (right, top), (left, bottom), (right, bottom))
    cols, rows = zip(*(inverse @ corner for corner in corners), strict=True)
    col0 = max(0, math.floor(min(cols)) - margin)
    row0 = max(0, math.floor(min(rows)) - margin)
    col1 = min(width, math.ceil(max(cols)) + margin)
    row1 = min(height, math.ceil(max(rows)) + margin)
    if col1 <= col0 or row1 <= row0:
        return None
    return (col0, row0, col1 - col0, row1 - row0)


@dataclass(frozen=True)
class Grid:
    """An output raster grid: CRS, affine transform and shape."""

    crs: str
    transform: Affine
    width: int
    height: int

    @classmethod
    def from_bounds(
        cls, crs: str, bounds: tuple[float, float, float, float], width: int, height: int
    ) -> Grid:
        left, bottom, right, top = bounds
        transform = Affine((right - left) / width, 0, left, 0, -(top - bottom) / height, top)
        return cls(crs=crs, transform=transform, width=width, height=height)

    def buffered(self, pixels: float) -> Grid:
        """This grid grown by `pixels` on every side: on the same pixel lattice for whole
        pixels; a half pixel (TiTiler's tile `buffer` of 0.5, 1.5…) grows each side by half a
        pixel, so the lattice shifts by half a pixel and the size by one (rio-tiler's rule)."""
        if not pixels:
            return self
        return Grid(
            crs=self.crs,
            transform=self.transform * Affine.translation(-pixels, -pixels),
            width=self.width + int(2 * pixels),
            height=self.height + int(2 * pixels),
        )

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        t = self.transform
        left, top = t.c, t.f
        right, bottom = t @ (self.width, self.height)
        return (min(left, right), min(top, bottom), max(left, right), max(top, bottom))

    @property
    def res(self) -> float:
        return min(abs(self.transform.a), abs(self.transform.e))

    def lonlat_bounds(self) -> Bounds:
        """The grid's extent in lon/lat (densified edges), for the catalog's bbox columns."""
        if self.crs == "EPSG:3857":
            return mercator_lonlat(self.bounds)
        return reproject_bounds(self.bounds, self.crs, "EPSG:4326")

    def to_dict(self) -> dict[str, Any]:
        return {
            "crs": self.crs,
            "transform": list(self.transform)[:6],
            "width": self.width,
            "height": self.height,
            "bounds": list(self.bounds),
        }


class TileError(ValueError):
    """A tile index or matrix set that does not exist."""


@lru_cache(maxsize=64)
def matrix_set(tms_id: str) -> morecantile.TileMatrixSet:
    """A TileMatrixSet by id, shared: `morecantile.tms.get` deep-copies the set on every call
    (3 ms, a tenth of a tile's CPU), and the sets are only read."""
    try:
        return morecantile.tms.get(tms_id)
    except Exception as exc:
        raise TileError(
            f"tileMatrixSetId: unknown {tms_id!r}; known: {', '.join(morecantile.tms.list())}"
        ) from exc


@lru_cache(maxsize=64)
def matrix_set_crs(tms_id: str) -> str:
    """The set's CRS as a string for GDAL/PROJ (0.4 ms to build each time)."""
    return matrix_set(tms_id).rasterio_crs.to_string()


def tile_grid(tms_id: str, z: int, x: int, y: int, tilesize: int = 256) -> Grid:
    """The grid of web map tile z/x/y in a morecantile TileMatrixSet."""
    tms = matrix_set(tms_id)
    if not tms.minzoom <= z <= tms.maxzoom:
        raise TileError(f"z: {z} is outside {tms_id}'s zoom range {tms.minzoom}..{tms.maxzoom}")
    matrix = tms.matrix(z)
    if not (0 <= x < matrix.matrixWidth and 0 <= y < matrix.matrixHeight):
        raise TileError(
            f"tile {z}/{x}/{y} is outside {tms_id}: at zoom {z} x must be in "
            f"0..{matrix.matrixWidth - 1} and y in 0..{matrix.matrixHeight - 1}"
        )
    bounds = tms.xy_bounds(x, y, z)
    return Grid.from_bounds(matrix_set_crs(tms_id), tuple(bounds), tilesize, tilesize)


@dataclass(frozen=True)
class Level:
    """One resolution level of a COG (level 0 = full resolution)."""

    transform: Affine
    width: int
    height: int
    tile_width: int
    tile_height: int
    tile_bytes: tuple[int, ...] = ()  # compressed size of each internal tile, row-major

    @property
    def res(self) -> float:
        return min(abs(self.transform.a), abs(self.transform.e))


@dataclass(frozen=True)
class Header:
    """What the planner needs from a COG header, as plain picklable data."""

    href: str
    crs: str
    count: int
    dtype: str
    nodata: float | None
    has_mask: bool
    levels: tuple[Level, ...]  # finest first
    # who decodes the blocks: async-tiff, or GDAL in the compute pool for what async-tiff
    # cannot decode or decodes differently (core.gdal_decode.decoder_for)
    decoder: str = "async-tiff"
    # the GeoTIFF's own per-band scale/offset (GDAL_METADATA), () when the file has none
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()


@dataclass(frozen=True)
class AssetRead:
    """One window read from one level of one asset's COG."""

    asset: str
    href: str
    level: int
    window: tuple[int, int, int, int]  # col_off, row_off, width, height at that level
    tiles: tuple[tuple[int, int], ...]  # internal (x, y) tiles the window touches
    transform: Affine  # of the window's top-left pixel
    dst_window: tuple[int, int, int, int]  # the part of the output grid this read can reach
    bytes: int  # compressed bytes of the internal tiles (data and mask) to fetch
    crs: str
    res: float
    count: int
    dtype: str
    nodata: float | None
    has_mask: bool
    decoder: str = "async-tiff"  # Header.decoder
    # per band, what `unscale` applies (value * scale + offset): see `band_scaling`
    scales: tuple[float, ...] = ()
    offsets: tuple[float, ...] = ()


@dataclass(frozen=True)
class ItemRead:
    item_id: str
    datetime: str | None
    reads: tuple[AssetRead, ...]
    collection: str | None = None
    lon: float | None = None  # of the item's bbox centre: its solar day (group_by=solar_day)


@dataclass(frozen=True)
class ReadPlan:
    """Everything one output grid will read, in mosaic order."""

    grid: Grid
    method: str
    resampling: str
    assets: tuple[str, ...]
    items: tuple[ItemRead, ...]
    source: str = "dynamic"  # where the pixels come from: the items, or "pyramid" blocks
    skipped: tuple[tuple[str, str], ...] = ()  # (item id, why it is not read)
    truncated: bool = False  # a search limit left out items that match (see `search`)
    errors: tuple[tuple[str, str], ...] = field(default=())  # headers that failed to open
    search: dict[str, Any] | None = None  # how the item search ended (SearchResult.to_dict)

    @property
    def truncated_why(self) -> str:
        """Which search limit left items out, in words ("" when none did)."""
        if not self.truncated:
            return ""
        return (self.search or {}).get("truncated") or "item limit reached; older items left out"

    @property
    def tile_reads(self) -> int:
        return sum(len(r.tiles) for item in self.items for r in item.reads)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for item in self.items for r in item.reads)

    def to_dict(self) -> dict[str, Any]:
        def read_dict(r: AssetRead) -> dict[str, Any]:
            d = asdict(r)
            d["transform"] = list(r.transform)[:6]
            d["dst_window"] = list(r.dst_window)
            d["tiles"] = [list(t) for t in r.tiles]
            return d

        return {
            "source": self.source,
            "grid": self.grid.to_dict(),
            "method": self.method,
            "resampling": self.resampling,
            "assets": list(self.assets),
            "items": [
                {"id": i.item_id, "datetime": i.datetime, "reads": [read_dict(r) for r in i.reads]}
                for i in self.items
            ],
            "skipped": [{"id": i, "reason": why} for i, why in self.skipped],
            "errors": [{"id": i, "error": why} for i, why in self.errors],
            "truncated": self.truncated,
            "search": self.search,
            "tile_reads": self.tile_reads,
            "bytes": self.bytes,
        }

    def describe(self) -> str:
        """A human-readable account of the plan, one line per read."""
        lines = [
            f"grid {self.grid.width}x{self.grid.height} {self.grid.crs} "
            f"bounds={tuple(round(b, 3) for b in self.grid.bounds)}",
            f"method={self.method} resampling={self.resampling} assets={','.join(self.assets)}"
            f" items={len(self.items)} internal tiles={self.tile_reads}"
            f" bytes={self.bytes:,}"
            + (f" (incomplete: {self.truncated_why})" if self.truncated else ""),
        ]
        for n, item in enumerate(self.items, 1):
            lines.append(f"{n:>3}. {item.item_id} {item.datetime or ''}")
            for r in item.reads:
                lines.append(
                    f"       {r.asset}: level {r.level} (res {r.res:.3g}) window "
                    f"col={r.window[0]} row={r.window[1]} {r.window[2]}x{r.window[3]} "
                    f"tiles={len(r.tiles)} ({r.bytes:,} B) {r.dtype}x{r.count} {r.decoder} {r.href}"
                )
        for item_id, why in self.skipped:
            lines.append(f"  skipped {item_id}: {why}")
        for item_id, why in self.errors:
            lines.append(f"  error {item_id}: {why}")
        if self.source != "dynamic":
            lines.append(f"  pixels from: {self.source} (pre-rendered blocks)")
        return "\n".join(lines)


def centre_longitude(bbox: tuple[float, float, float, float]) -> float | None:
    """The longitude of a bbox's centre (one crossing the antimeridian has xmin > xmax)."""
    xmin, _, xmax, _ = bbox
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        return None
    centre = (xmin + xmax) / 2 if xmin <= xmax else (xmin + xmax + 360) / 2
    return (centre + 180) % 360 - 180


def describe_error(exc: BaseException) -> str:
    """One line for an item's error: the type and the first line of the message (native
    readers append multi-line debug dumps that belong in logs, not in responses)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def oversampling_threshold(resampling: str) -> float:
    """How much coarser than the output pixel an overview may be, as GDAL decides it.

    Nearest takes an overview up to 1.2x coarser (no kernel smooths over the gap, and fewer
    bytes win); the interpolating kernels one that is not coarser. GDAL's
    GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD overrides both, here as in TiTiler."""
    value = _NEAREST_OVERSAMPLING if resampling == "nearest" else _OVERSAMPLING
    configured = os.environ.get("GDAL_OVERVIEW_OVERSAMPLING_THRESHOLD")
    if configured:
        with contextlib.suppress(ValueError):  # GDAL would read garbage as 0: keep ours
            value = float(configured)
    return value


@lru_cache(maxsize=8192)
def natural_res(
    crs: str, transform: tuple[float, ...], width: int, height: int, dst_crs: str
) -> tuple[float, float] | None:
    """The image's natural (x, y) pixel size in `dst_crs`, or None if GDAL cannot say.

    This is GDALSuggestedWarpOutput2 over the whole image, the grid gdalwarp and rio-tiler's
    WarpedVRT call full resolution: overview choice in another CRS is measured in its pixels.
    GDAL itself computes it (its edge sampling and border adjustments are not worth copying);
    ~1 ms, once per image and output CRS."""
    from rasterio.warp import calculate_default_transform  # GDAL: only the server needs it

    t = Affine(*transform)
    xs, ys = zip(t * (0, 0), t * (width, height), strict=True)
    try:
        out, _, _ = calculate_default_transform(
            crs, dst_crs, width, height, min(xs), min(ys), max(xs), max(ys)
        )
    except Exception:  # outside the target CRS's domain, or a CRS GDAL does not know
        return None
    return abs(out.a), abs(out.e)


def downsampling(header: Header, grid: Grid) -> tuple[float, tuple[int, int] | None]:
    """Full-resolution pixels per output pixel, measured where GDAL measures it.

    In the image's own CRS, GDAL's RasterIO compares pixel sizes directly. In another CRS, GDAL
    (rio-tiler, TiTiler, gdalwarp) warps through a VRT at the image's natural resolution in the
    output CRS and downsamples that VRT, so the ratio is counted in output pixels: at 46°N a
    degree of longitude is 0.69 of a degree of latitude, and comparing degrees would read an
    overview two times too fine. Returns the factor on GDAL's axis (the less reduced one) and the
    VRT's size (None in the image's own CRS), which sizes GDAL's warped overviews."""
    base = header.levels[0]
    gx, gy = abs(grid.transform.a), abs(grid.transform.e)
    natural = None
    if header.crs != grid.crs:
        natural = natural_res(
            header.crs, tuple(base.transform)[:6], base.width, base.height, grid.crs
        )
    if natural is None:
        if header.crs == grid.crs:
            fx, fy = gx / abs(base.transform.a), gy / abs(base.transform.e)
        else:  # GDAL cannot size the image in the grid's CRS: fall back to source units
            try:
                left, bottom, right, top = reproject_bounds(grid.bounds, grid.crs, header.crs)
            except Exception:
                return 1.0, None
            fx = (right - left) / grid.width / abs(base.transform.a)
            fy = (top - bottom) / grid.height / abs(base.transform.e)
        warped = None
    else:
        # rio-tiler sizes the VRT at the natural resolution, or the output's when finer
        vrt_w = max(1, round(grid.width * gx / min(natural[0], gx)))
        vrt_h = max(1, round(grid.height * gy / min(natural[1], gy)))
        fx, fy = vrt_w / grid.width, vrt_h / grid.height
        warped = (vrt_w, vrt_h)
    factor = fx if fx < fy or grid.height == 1 else fy
    return (factor if math.isfinite(factor) else 1.0), warped


def choose_level(
    levels: tuple[Level, ...],
    factor: float,
    resampling: str = "nearest",
    warped: tuple[int, int] | None = None,
) -> int:
    """GDAL's overview: the most reduced level whose reduction stays under `factor` times the
    oversampling threshold (0 when none does, or when the read does not downsample).

    Level k's reduction is measured as GDAL measures it: the COG's own size ratio, or, through
    a warped VRT of size `warped`, that VRT's overview k (rounded to whole pixels)."""
    if factor <= 1:
        return 0
    limit = factor * oversampling_threshold(resampling) + _OVERSAMPLING_MARGIN
    base = levels[0]
    best, best_reduction = 0, 0.0
    for index, level in enumerate(levels[1:], 1):
        if warped is None:
            reduction = min(base.width / level.width, base.height / level.height)
        else:
            ratio = base.width / level.width
            width, height = int(warped[0] / ratio + 0.5), int(warped[1] / ratio + 0.5)
            if width < 1 or height < 1:
                break
            reduction = min(warped[0] / width, warped[1] / height)
        if reduction < limit and reduction > best_reduction:
            best, best_reduction = index, reduction
    return best


def band_scaling(
    header: Header, bands: tuple[dict[str, Any], ...] = ()
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per band (scale, offset) for `unscale`: the file's own when it has any (what rio-tiler
    and GDAL apply), else the catalog's `raster:bands` (Landsat C2 L2 keeps them only there),
    else identity."""
    count = header.count
    own_s, own_o = header.scales, header.offsets
    if (
        len(own_s) == count
        and len(own_o) == count
        and (any(v != 1 for v in own_s) or any(v != 0 for v in own_o))
    ):
        return tuple(map(float, own_s)), tuple(map(float, own_o))
    scales, offsets = [1.0] * count, [0.0] * count
    for index, band in enumerate(bands[:count]):
        with contextlib.suppress(TypeError, ValueError):  # a malformed entry is no scaling
            scale, offset = float(band.get("scale", 1.0)), float(band.get("offset", 0.0))
            if math.isfinite(scale) and math.isfinite(offset):
                scales[index], offsets[index] = scale, offset
    return tuple(scales), tuple(offsets)


def plan_asset(
    asset: str,
    header: Header,
    grid: Grid,
    resampling: str,
    bands: tuple[dict[str, Any], ...] = (),
) -> AssetRead | None:
    """Where `grid` falls in this COG; None when the image does not reach the grid.
    `bands` is the catalog's `raster:bands` for this asset (scale/offset when the file has
    none)."""
    try:
        left, bottom, right, top = reproject_bounds(grid.bounds, grid.crs, header.crs)
    except Exception:  # the grid is outside the source CRS's domain
        return None
    if not all(math.isfinite(v) for v in (left, bottom, right, top)):
        return None
    factor, warped = downsampling(header, grid)
    level_index = choose_level(header.levels, factor, resampling, warped)
    level = header.levels[level_index]
    margin = _MARGIN[resampling]
    window = pixel_window(
        (left, bottom, right, top), level.transform, level.width, level.height, margin
    )
    if window is None:
        return None
    col0, row0, width, height = window
    transform = level.transform @ Affine.translation(col0, row0)
    # Where this window lands in the output: warping only there skips empty output pixels.
    src_bounds = (
        transform.c,
        transform.f + height * transform.e,
        transform.c + width * transform.a,
        transform.f,
    )
    try:
        dst_bounds = reproject_bounds(src_bounds, header.crs, grid.crs)
    except Exception:
        dst_bounds = grid.bounds
    dst_window = pixel_window(dst_bounds, grid.transform, grid.width, grid.height, 1)
    if dst_window is None:
        return None
    scales, offsets = band_scaling(header, bands)
    tiles = tuple(
        (tx, ty)
        for ty in range(row0 // level.tile_height, (row0 + height - 1) // level.tile_height + 1)
        for tx in range(col0 // level.tile_width, (col0 + width - 1) // level.tile_width + 1)
    )
    across = math.ceil(level.width / level.tile_width)
    size = level.tile_bytes
    fetch_bytes = sum(size[ty * across + tx] for tx, ty in tiles if ty * across + tx < len(size))
    return AssetRead(
        asset=asset,
        href=header.href,
        level=level_index,
        window=window,
        tiles=tiles,
        transform=transform,
        dst_window=dst_window,
        bytes=fetch_bytes,
        crs=header.crs,
        res=level.res,
        count=header.count,
        dtype=header.dtype,
        nodata=header.nodata,
        has_mask=header.has_mask,
        decoder=header.decoder,
        scales=scales,
        offsets=offsets,
    )


def make_plan(
    grid: Grid,
    items: list[Item],
    headers: dict[str, Header | BaseException],
    *,
    assets: tuple[str, ...],
    method: str,
    resampling: str,
    search: SearchResult | None = None,
) -> ReadPlan:
    """Plan every item against `grid`, keeping the search order (the mosaic order)."""
    planned: list[ItemRead] = []
    skipped: list[tuple[str, str]] = []
    errors: list[tuple[str, str]] = []
    for item in items:
        if item.error:  # the catalog entry itself is broken (see core.catalog.item_problem)
            errors.append((item.id, f"catalog entry: {item.error}"))
            continue
        missing = [a for a in assets if a not in item.assets]
        if missing:
            skipped.append((item.id, f"no asset {', '.join(missing)}"))
            continue
        reads: list[AssetRead] = []
        failure: str | None = None
        for asset in assets:
            header = headers[item.assets[asset]]
            if isinstance(header, BaseException):
                failure = f"{asset}: {describe_error(header)}"
                break
            bands = item.raster_bands.get(asset, ())
            read = plan_asset(asset, header, grid, resampling, bands)
            if read is None:
                break
            reads.append(read)
        if failure:
            errors.append((item.id, failure))
        elif len(reads) < len(assets):
            skipped.append((item.id, "image does not reach the grid"))
        else:
            when = item.datetime.isoformat() if item.datetime else None
            planned.append(
                ItemRead(
                    item_id=item.id,
                    datetime=when,
                    reads=tuple(reads),
                    collection=item.collection,
                    lon=centre_longitude(item.bbox),
                )
            )
    return ReadPlan(
        grid=grid,
        method=method,
        resampling=resampling,
        assets=assets,
        items=tuple(planned),
        skipped=tuple(skipped),
        truncated=bool(search and search.truncated),
        errors=tuple(errors),
        search=search.to_dict() if search else None,
    )
