"""Raster archives written by GDAL (through rasterio), shaped like the products users serve.

Each archive is a handful of overlapping items (three, newest on top) so that a mosaic has to
fall through the top item's nodata to the ones below. The specs are static so that test ids
(writer × archive) exist when pytest collects; `build` writes the files.

Layout of an archive's three items, in the oldest item's pixel units (x right, y down):
A at (0, 0), B at (+0.5, +0.25), C at (+0.25, -0.4), each one image wide and high. Every
item's bottom-left triangle (row/h - col/w > 0.5) is invalid — nodata, an internal mask or a
zero alpha, whatever the archive uses — like the slanted no-data edges of real scenes. The
check places (`probe`, `points`) are given in C's pixel units: on C's invalid edge, inside C's
valid part, and inside C's invalid triangle where the mosaic must show B or A.

Rasters are written through a staged GTiff (for scales, offsets, masks, alpha) that GDAL then
copies into the target layout, because the COG driver is create-copy only.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from pyproj import Transformer
from rasterio.enums import Resampling

# Items in mosaic order from the bottom: (x, y) offset of each item's origin, in images.
LAYOUT = ((0.0, 0.0), (0.5, 0.25), (0.25, -0.4))
DATES = ("2024-06-01T10:00:00Z", "2024-06-11T10:00:00Z", "2024-06-21T10:00:00Z")
# Where the checks look, in the top item's (C's) pixel fractions.
PROBE = (0.4, 0.9)  # on C's invalid edge, inside A and B too: tiles see all three items
POINTS = ((0.5, 0.8), (0.3, 0.95))  # C valid; C invalid (the mosaic falls through)


@dataclass(frozen=True)
class AssetSpec:
    """One asset file of every item: its pixels, validity encoding and overview resampling."""

    key: str
    dtype: str
    count: int = 1
    factor: int = 1  # pixel size as a multiple of the archive's finest resolution
    content: str = "smooth"  # "smooth" (continuous values) or "classes" (categorical)
    value_range: tuple[float, float] = (1, 255)
    nodata: float | None = None
    mask: bool = False  # internal per-dataset mask instead of a nodata value
    alpha: bool = False  # last band is an alpha band (RGBA)
    scale: float | None = None  # written into the file (and so into raster:bands)
    offset: float | None = None
    overview_resampling: str = "AVERAGE"


@dataclass(frozen=True)
class ArchiveSpec:
    """An archive: where it is, how its files are encoded, which STAC schema describes it."""

    name: str
    codec: str  # README tag: codec:<codec>
    layout: str  # README tag: layout:<layout> (cog, bigtiff, gtiff-tiled-overviews, ...)
    schema: str  # README tag: schema:<schema> (see tests.corpus.items)
    center: tuple[float, float]  # lon, lat of the oldest item's (0.75, 0.425)
    crs: tuple[str, str, str]  # per item, A B C (an archive may span UTM zones)
    res: float  # finest pixel size, CRS units
    size: int  # finest asset's width and height in pixels
    assets: tuple[AssetSpec, ...]
    options: dict[str, Any] = field(default_factory=dict)  # GDAL creation options
    blocksize: int = 256
    lossy: bool = False  # JPEG: compared within a tolerance (see the test module)
    timeless: bool = False  # datetime null, start/end_datetime instead (composites, DEMs)

    @property
    def res_m(self) -> float:
        """Finest pixel size in metres (degrees converted at the archive's latitude)."""
        if self.crs[0] == "EPSG:4326":
            return self.res * 111_320.0 * math.cos(math.radians(self.center[1]))
        return self.res

    @property
    def tags(self) -> tuple[str, ...]:
        """What a passing case of this archive proves (README rows name these)."""
        return (f"codec:{self.codec}", f"layout:{self.layout}", f"schema:{self.schema}")


@dataclass(frozen=True)
class ItemFiles:
    """One item as written: its id, time and asset paths."""

    id: str
    datetime: str | None
    start_datetime: str | None
    end_datetime: str | None
    assets: dict[str, Path]
    crs: str
    transform: Affine  # of the finest asset
    shape: tuple[int, int]  # of the finest asset

    @property
    def sort_time(self) -> str:
        """The time a `-datetime` (newest on top) mosaic orders by: the datetime, else the
        start_datetime, as pgstac stores COALESCE(datetime, start_datetime) as an item's time
        (titiler-pgstac's default order) and as Terrazzo labels such items."""
        return self.datetime or self.start_datetime or ""


@dataclass(frozen=True)
class Archive:
    spec: ArchiveSpec
    items: tuple[ItemFiles, ...]  # oldest first (A, B, C)

    def newest_first(self) -> list[ItemFiles]:
        return sorted(self.items, key=lambda i: i.sort_time, reverse=True)

    def lonlat_at(self, fx: float, fy: float) -> tuple[float, float]:
        """Lon/lat of the top item's pixel fraction (fx, fy)."""
        top = self.items[-1]
        x, y = top.transform * (fx * top.shape[1], fy * top.shape[0])
        return _transformer(top.crs, "EPSG:4326").transform(x, y)


def _transformer(src: str, dst: str) -> Transformer:
    return Transformer.from_crs(src, dst, always_xy=True)


U8 = (1, 255)
S2_BANDS = (
    AssetSpec("B04", "uint16", value_range=(100, 9000), nodata=0),
    AssetSpec("B11", "uint16", factor=2, value_range=(100, 9000), nodata=0),
    AssetSpec(
        "SCL",
        "uint8",
        factor=2,
        content="classes",
        value_range=(1, 11),
        nodata=0,
        overview_resampling="NEAREST",
    ),
)

SPECS: tuple[ArchiveSpec, ...] = (
    # Known-good control: 3-band uint8 DEFLATE COG, nodata 0.
    ArchiveSpec(
        "deflate-rgb",
        "DEFLATE",
        "cog",
        "pystac-proj2-item",
        (9.2, 45.5),
        ("EPSG:32632",) * 3,
        10.0,
        512,
        (AssetSpec("visual", "uint8", count=3, nodata=0),),
        {"compress": "DEFLATE", "predictor": 2},
    ),
    # Sentinel-2-like: 10 m and 20 m uint16 bands, SCL classes; items in UTM 31 and 32.
    ArchiveSpec(
        "sentinel2",
        "DEFLATE",
        "cog",
        "pystac-proj2-asset",
        (6.0, 45.3),
        ("EPSG:32632", "EPSG:32632", "EPSG:32631"),
        10.0,
        512,
        S2_BANDS,
        {"compress": "DEFLATE", "predictor": 2},
    ),
    # Landsat-like: uint16 DN with scale/offset (file + raster:bands), LZW.
    ArchiveSpec(
        "landsat",
        "LZW",
        "cog",
        "rio-stac",
        (15.5, 44.8),
        ("EPSG:32633",) * 3,
        30.0,
        512,
        (
            AssetSpec(
                "red",
                "uint16",
                value_range=(7000, 30000),
                nodata=0,
                scale=2.75e-05,
                offset=-0.2,
            ),
        ),
        {"compress": "LZW", "predictor": 2},
    ),
    # NAIP-like: 4-band (RGB + NIR) JPEG with an internal mask, NAD83 / UTM 18N.
    ArchiveSpec(
        "naip-jpeg-mask",
        "JPEG",
        "cog",
        "rio-stac",
        (-75.3, 40.1),
        ("EPSG:26918",) * 3,
        1.0,
        512,
        (AssetSpec("image", "uint8", count=4, mask=True),),
        {"compress": "JPEG", "quality": 90},
        lossy=True,
    ),
    # 3-band JPEG in YCbCr (the COG driver's default for RGB JPEG), nodata by mask.
    ArchiveSpec(
        "jpeg-ycbcr",
        "JPEG-YCbCr",
        "cog",
        "pystac-proj1-item-raster",
        (-81.2, 35.2),
        ("EPSG:26917",) * 3,
        1.0,
        512,
        (AssetSpec("image", "uint8", count=3, mask=True),),
        {"compress": "JPEG", "quality": 90},
        lossy=True,
    ),
    # DEM: float32, NaN nodata, EPSG:4326 at 46°N (1 arc-second), no single datetime.
    ArchiveSpec(
        "dem-float32-4326",
        "DEFLATE",
        "cog",
        "pystac-proj2-item",
        (7.5, 46.0),
        ("EPSG:4326",) * 3,
        1 / 3600,
        512,
        (AssetSpec("dem", "float32", value_range=(300, 4000), nodata=float("nan")),),
        {"compress": "DEFLATE", "predictor": 3},
        timeless=True,
    ),
    # DEM: int16 with -32767 nodata, UTM 31N.
    ArchiveSpec(
        "dem-int16",
        "ZSTD",
        "cog",
        "pystac-proj1-item-raster",
        (2.5, 43.7),
        ("EPSG:32631",) * 3,
        30.0,
        512,
        (AssetSpec("dem", "int16", value_range=(-50, 2500), nodata=-32767),),
        {"compress": "ZSTD", "predictor": 2},
        timeless=True,
    ),
    ArchiveSpec(
        "zstd-uint16",
        "ZSTD",
        "cog",
        "pystac-proj2-asset",
        (-122.5, 47.5),
        ("EPSG:32610",) * 3,
        20.0,
        512,
        (AssetSpec("data", "uint16", value_range=(1, 60000), nodata=0),),
        {"compress": "ZSTD", "predictor": 2},
        blocksize=128,
    ),
    ArchiveSpec(
        "lerc-float32",
        "LERC",
        "cog",
        "rio-stac",
        (-117.3, 34.0),
        ("EPSG:32611",) * 3,
        20.0,
        512,
        (AssetSpec("data", "float32", value_range=(-10, 40), nodata=-9999),),
        {"compress": "LERC", "max_z_error": 0},
    ),
    ArchiveSpec(
        "webp-rgb",
        "WEBP",
        "cog",
        "pystac-proj2-item",
        (21.0, 50.0),
        ("EPSG:32634",) * 3,
        5.0,
        512,
        (AssetSpec("visual", "uint8", count=3, mask=True),),
        {"compress": "WEBP", "quality": 80},
    ),
    ArchiveSpec(
        "packbits-uint8",
        "PACKBITS",
        "cog",
        "pystac-proj1-item-raster",
        (27.0, -25.0),
        ("EPSG:32735",) * 3,
        10.0,
        512,
        (AssetSpec("data", "uint8", content="classes", value_range=(1, 9), nodata=0),),
        {"compress": "PACKBITS"},
    ),
    ArchiveSpec(
        "uncompressed-uint16",
        "NONE",
        "cog",
        "pystac-proj2-asset",
        (33.0, 0.5),
        ("EPSG:32636",) * 3,
        10.0,
        384,
        (AssetSpec("data", "uint16", count=2, value_range=(1, 4000), nodata=0),),
        {"compress": "NONE"},
        blocksize=128,
    ),
    ArchiveSpec(
        "bigtiff",
        "DEFLATE",
        "bigtiff-cog",
        "rio-stac",
        (141.0, 38.0),
        ("EPSG:32654",) * 3,
        10.0,
        512,
        (AssetSpec("data", "uint16", value_range=(1, 4000), nodata=0),),
        {"compress": "DEFLATE", "bigtiff": "YES"},
    ),
    ArchiveSpec(
        "gtiff-tiled-overviews",
        "DEFLATE",
        "gtiff-tiled-overviews",
        "pystac-proj2-item",
        (-47.9, -15.8),
        ("EPSG:32723",) * 3,
        10.0,
        512,
        (AssetSpec("data", "uint16", value_range=(1, 4000), nodata=0),),
        {"compress": "DEFLATE"},
    ),
    ArchiveSpec(
        "gtiff-tiled",
        "LZW",
        "gtiff-tiled",
        "pystac-proj1-item-raster",
        (150.9, -33.8),
        ("EPSG:32756",) * 3,
        10.0,
        512,
        (AssetSpec("data", "uint8", count=3, nodata=0),),
        {"compress": "LZW"},
    ),
    ArchiveSpec(
        "gtiff-striped",
        "DEFLATE",
        "gtiff-striped",
        "rio-stac",
        (100.5, 13.7),
        ("EPSG:32647",) * 3,
        10.0,
        384,
        (AssetSpec("data", "uint16", value_range=(1, 4000), nodata=0),),
        {"compress": "DEFLATE"},
    ),
    ArchiveSpec(
        "rgba",
        "DEFLATE",
        "cog",
        "pystac-proj2-asset",
        (-3.7, 40.4),
        ("EPSG:32630",) * 3,
        10.0,
        512,
        (AssetSpec("visual", "uint8", count=4, alpha=True),),
        {"compress": "DEFLATE"},
    ),
)
BY_NAME = {s.name: s for s in SPECS}


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _field(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth field in 0..1 with pixel-scale texture (a few sinusoids plus mild noise)."""
    yy, xx = np.mgrid[0:h, 0:w].astype("float64")
    out = np.zeros((h, w))
    for _ in range(4):
        fx, fy = rng.uniform(0.5, 6, 2) * 2 * np.pi
        out += np.sin(xx / w * fx + rng.uniform(0, 6.3)) * np.cos(yy / h * fy + rng.uniform(0, 6.3))
    out += rng.normal(0, 0.15, (h, w))
    return (out - out.min()) / (out.max() - out.min())


def _pixels(spec: AssetSpec, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    lo, hi = spec.value_range
    bands = []
    for _ in range(spec.count - (1 if spec.alpha else 0)):
        f = _field(h, w, rng)
        if spec.content == "classes":
            band = np.floor(lo + f * (hi - lo + 1 - 1e-9))
        else:
            band = lo + f * (hi - lo)
        bands.append(band.astype(spec.dtype))
    return np.stack(bands)


def invalid_triangle(h: int, w: int) -> np.ndarray:
    """The bottom-left triangle every item leaves invalid (True = invalid)."""
    rows, cols = np.mgrid[0:h, 0:w]
    return (rows + 0.5) / h - (cols + 0.5) / w > 0.5


def _write_asset(
    archive: ArchiveSpec, asset: AssetSpec, path: Path, crs: str, transform: Affine, size: int
) -> None:
    rng = _rng(archive.name, path.name)
    data = _pixels(asset, size, size, rng)
    invalid = invalid_triangle(size, size)
    profile: dict[str, Any] = {
        "driver": "GTiff",
        "height": size,
        "width": size,
        "count": asset.count,
        "dtype": asset.dtype,
        "crs": crs,
        "transform": transform,
    }
    if asset.nodata is not None:
        profile["nodata"] = asset.nodata
        data[:, invalid] = asset.nodata
    if asset.mask:
        data[:, invalid] = 0
    if asset.alpha:
        alpha = np.where(invalid, 0, 255).astype(asset.dtype)[None]
        data = np.concatenate([data, alpha])
        profile.update(photometric="RGB", alpha="YES")
    path.parent.mkdir(parents=True, exist_ok=True)
    options = dict(archive.options)
    layout = archive.layout
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".stage-") as tmp:
        staged = Path(tmp) / "staged.tif" if layout.endswith("cog") else path
        staging = dict(profile)
        if layout.endswith("cog"):
            staging.update(tiled=True, blockxsize=archive.blocksize, blockysize=archive.blocksize)
        elif layout == "gtiff-striped":
            staging.update(options, tiled=False)
        else:
            staging.update(
                options, tiled=True, blockxsize=archive.blocksize, blockysize=archive.blocksize
            )
        if asset.count >= 3 and not asset.alpha:
            # RGB: what JPEG (as YCbCr) and WEBP expect; a 4th band without alpha is NIR.
            staging["photometric"] = "RGB" if asset.count == 3 else "MINISBLACK"
        with (
            rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
            rasterio.open(staged, "w", **staging) as dst,
        ):
            dst.write(data)
            if asset.mask:
                dst.write_mask(~invalid)
            if asset.scale is not None or asset.offset is not None:
                dst.scales = [asset.scale or 1.0] * asset.count
                dst.offsets = [asset.offset or 0.0] * asset.count
        if layout == "gtiff-tiled-overviews":
            with rasterio.open(path, "r+") as dst:
                dst.build_overviews([2, 4], Resampling[asset.overview_resampling.lower()])
        if layout.endswith("cog"):
            cog = {
                **options,
                "blocksize": archive.blocksize,
                "overview_resampling": asset.overview_resampling,
            }
            with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
                rasterio.shutil.copy(staged, path, driver="COG", **cog)


def build(spec: ArchiveSpec, root: Path) -> Archive:
    """Write the archive's items under `root/<name>/` and describe them."""
    lon, lat = spec.center
    items = []
    for index, ((ox, oy), crs) in enumerate(zip(LAYOUT, spec.crs, strict=True)):
        cx, cy = _transformer("EPSG:4326", crs).transform(lon, lat)
        span = spec.size * spec.res
        # The oldest item's (0.75, 0.425) sits on the centre; the others are offset from it.
        x0 = cx - 0.75 * span + ox * span
        y0 = cy + 0.425 * span - oy * span
        x0, y0 = round(x0 / spec.res) * spec.res, round(y0 / spec.res) * spec.res
        item_id = f"{spec.name}-{index}"
        assets: dict[str, Path] = {}
        for asset in spec.assets:
            res = spec.res * asset.factor
            transform = Affine(res, 0.0, x0, 0.0, -res, y0)
            path = root / spec.name / f"{item_id}_{asset.key}.tif"
            _write_asset(spec, asset, path, crs, transform, spec.size // asset.factor)
            assets[asset.key] = path
        when = DATES[index]
        items.append(
            ItemFiles(
                id=item_id,
                datetime=None if spec.timeless else when,
                start_datetime=f"20{index:02d}-02-11T00:00:00Z" if spec.timeless else None,
                end_datetime="2024-02-22T00:00:00Z" if spec.timeless else None,
                assets=assets,
                crs=crs,
                transform=Affine(spec.res, 0.0, x0, 0.0, -spec.res, y0),
                shape=(spec.size, spec.size),
            )
        )
    return Archive(spec, tuple(items))
