"""Write real Cloud-Optimized GeoTIFFs and describe them as STAC items.

Tests and the demo catalog need genuine COGs (tiled, overviews, internal masks) rather than
mocks, because the mosaic code reads them with async-geotiff and rasterio exactly as it would
read production imagery. Keeping the writer here means every test builds files the same way.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import affine
import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.warp import transform as warp_transform

COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
PROJECTION_EXT = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER_EXT = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"

# Predictors only help lossless codecs; JPEG/WEBP etc. reject or ignore them.
_PREDICTOR_CODECS = {"DEFLATE", "LZW", "ZSTD", "LZMA"}
# These files are test and demo data written on every run: a fast level writes 2-3x faster
# than GDAL's default for ~15% larger files, and readers decode either at the same speed.
_FAST_LEVELS = {"DEFLATE": 3, "ZSTD": 3}
# Points per footprint edge: UTM edges curve in lon/lat, so a 4-corner polygon would
# under-cover the image and item search would miss tiles near its edges.
_DENSIFY_POINTS = 21


def _predictor(dtype: np.dtype, compress: str) -> int | None:
    """Horizontal differencing (2) for integers, floating-point predictor (3) for floats."""
    if compress.upper() not in _PREDICTOR_CODECS:
        return None
    return 3 if np.issubdtype(dtype, np.floating) else 2


def write_cog(
    path: Path,
    data: np.ndarray,
    *,
    crs: str,
    transform: affine.Affine,
    nodata: float | None = None,
    mask: np.ndarray | None = None,
    overviews: bool = True,
    blocksize: int = 256,
    compress: str = "DEFLATE",
) -> Path:
    """Write ``data`` (bands, h, w) as a COG at ``path`` and return the path.

    ``nodata`` marks invalid pixels by value; ``mask`` (h, w bool, True = valid) is instead
    stored as an internal per-dataset mask band, which is how many real products flag
    invalid pixels without reserving a value. Overviews use average resampling, which GDAL
    computes over valid pixels only (nodata or mask), so edges do not darken when zoomed out.
    """
    path = Path(path)
    if data.ndim != 3:
        raise ValueError(f"data must be (bands, height, width), got shape {data.shape}")
    count, height, width = data.shape
    if mask is not None and mask.shape != (height, width):
        raise ValueError(f"mask shape {mask.shape} does not match image ({height}, {width})")
    path.parent.mkdir(parents=True, exist_ok=True)

    cog_options: dict[str, Any] = {
        "compress": compress,
        "blocksize": blocksize,
        "overviews": "AUTO" if overviews else "NONE",
        "resampling": "average",
        # Compress tiles on all cores inside GDAL: rasterio holds the GIL while it writes, so
        # Python threads cannot parallelise COG writing, but GDAL's own workers can.
        "num_threads": "ALL_CPUS",
    }
    if compress.upper() in _FAST_LEVELS:
        cog_options["level"] = _FAST_LEVELS[compress.upper()]
    predictor = _predictor(data.dtype, compress)
    if predictor is not None:
        cog_options["predictor"] = predictor
    profile: dict[str, Any] = {
        "height": height,
        "width": width,
        "count": count,
        "dtype": data.dtype.name,
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }

    if mask is None:
        with rasterio.open(path, "w", driver="COG", **profile, **cog_options) as dst:
            dst.write(data)
        return path

    # The COG driver is create-copy only and has no write_mask, so stage a tiled GTiff with an
    # internal mask and let GDAL copy it (mask and mask overviews included) into COG layout.
    with (
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".cog-") as tmp_dir,
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
    ):
        staged = Path(tmp_dir) / "staged.tif"
        gtiff = {"tiled": True, "blockxsize": blocksize, "blockysize": blocksize}
        with rasterio.open(staged, "w", driver="GTiff", **profile, **gtiff) as dst:
            dst.write(data)
            dst.write_mask(mask.astype(bool))
        rasterio.shutil.copy(staged, path, driver="COG", **cog_options)
    return path


def _footprint(crs: CRS, transform: affine.Affine, width: int, height: int) -> list[list[float]]:
    """Image outline as a densified counter-clockwise lon/lat ring (closed)."""
    t = np.linspace(0.0, 1.0, _DENSIFY_POINTS)[:-1]
    # Pixel-space walk: bottom edge left→right, right edge up, top edge right→left, left down.
    cols = np.concatenate([t * width, np.full_like(t, width), (1 - t) * width, np.zeros_like(t)])
    rows = np.concatenate([np.full_like(t, height), (1 - t) * height, np.zeros_like(t), t * height])
    xs, ys = transform * (cols, rows)
    lons, lats = warp_transform(crs, "EPSG:4326", list(xs), list(ys))
    ring = [[round(lon, 8), round(lat, 8)] for lon, lat in zip(lons, lats, strict=True)]
    ring.append(ring[0])
    return ring


def _href(asset: Path | str, href_base: Path | None) -> str:
    """Relative POSIX href under ``href_base`` when given, else absolute; URLs untouched."""
    text = str(asset)
    if "://" in text:
        return text
    absolute = Path(os.path.abspath(text))
    if href_base is None:
        return absolute.as_posix()
    return Path(os.path.relpath(absolute, os.path.abspath(href_base))).as_posix()


def _raster_bands(src: rasterio.DatasetReader) -> list[dict[str, Any]]:
    """Minimal raster:bands so readers know dtype and nodata without opening the file."""
    bands: list[dict[str, Any]] = []
    for dtype in src.dtypes:
        band: dict[str, Any] = {"data_type": dtype}
        if src.nodata is not None:
            band["nodata"] = float(src.nodata) if np.isfinite(src.nodata) else str(src.nodata)
        bands.append(band)
    return bands


def stac_item(
    item_id: str,
    assets: dict[str, Path | str],
    *,
    datetime: str,
    collection: str,
    href_base: Path | None = None,
    properties: dict | None = None,
) -> dict:
    """Build a STAC 1.1 item for COG ``assets`` from what the files themselves say.

    Geometry and projection properties come from the first asset, so the catalog cannot
    drift from the pixels. The footprint is the image rectangle densified and reprojected to
    EPSG:4326 (UTM rectangles are not rectangles in lon/lat).
    """
    if not assets:
        raise ValueError("stac_item needs at least one asset")
    first = next(iter(assets.values()))
    with rasterio.open(first) as src:
        if src.crs is None:
            raise ValueError(f"{first} has no CRS")
        ring = _footprint(src.crs, src.transform, src.width, src.height)
        epsg = src.crs.to_epsg()
        proj_code = f"EPSG:{epsg}" if epsg is not None else None
        shape = [src.height, src.width]
        transform = list(src.transform)[:6]

    lons = [p[0] for p in ring]
    lats = [p[1] for p in ring]
    props: dict[str, Any] = {
        "datetime": datetime,
        "proj:code": proj_code,
        "proj:shape": shape,
        "proj:transform": transform,
    }
    props.update(properties or {})

    stac_assets: dict[str, dict[str, Any]] = {}
    for key, asset in assets.items():
        entry: dict[str, Any] = {
            "href": _href(asset, href_base),
            "type": COG_MEDIA_TYPE,
            "roles": ["data"],
        }
        if "://" not in str(asset):
            with rasterio.open(asset) as src:
                entry["raster:bands"] = _raster_bands(src)
                if [src.height, src.width] != shape:
                    entry["proj:shape"] = [src.height, src.width]
                    entry["proj:transform"] = list(src.transform)[:6]
        stac_assets[key] = entry

    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [PROJECTION_EXT, RASTER_EXT],
        "id": item_id,
        "collection": collection,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [min(lons), min(lats), max(lons), max(lats)],
        "properties": props,
        "assets": stac_assets,
        "links": [],
    }
