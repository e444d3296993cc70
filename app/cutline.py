"""The crop routes' compute-pool job (app.crops): a GeoJSON geometry's cutline on the output
grid ANDed with the mosaic's validity, the format chosen, the crop encoded — one job, so a
feature crop costs one pool round trip as a tile does.

Kept apart from app.crops so that a compute worker imports numpy and rasterio here, not
FastAPI: a pool job is pickled by reference to its module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.encoders import default_format, encode
from core.statistics import StatsOptions, geometry_masks


def inside(
    geometry: dict[str, Any],
    geometry_crs: str,
    crs: str,
    transform: tuple[float, ...],
    width: int,
    height: int,
) -> np.ndarray:
    """(height, width) True where `geometry` (GeoJSON in `geometry_crs`) touches the pixel on
    the grid: rio-tiler's `Reader.feature` rule (the shape reprojected with GDAL's
    `transform_geom`, rasterized with `all_touched=True`), so a crop's mask matches TiTiler's;
    the same cutline as the statistics routes' (core.statistics.geometry_masks)."""
    within, _ = geometry_masks(
        geometry, geometry_crs, crs, transform, width, height, StatsOptions()
    )
    return within


def encode_crop(
    data: np.ndarray,
    valid: np.ndarray,
    fmt: str | None,
    *,
    crs: str,
    transform: tuple[float, ...],
    geometry: dict[str, Any] | None = None,
    geometry_crs: str | None = None,
    **render: Any,
) -> tuple[bytes, str]:
    """Mask what lies outside `geometry` (if any), pick the tile routes' default format when
    `fmt` is None (JPEG for full 8-bit data, else PNG), encode with `render` (the request's
    app.params.RenderParams.options()); returns (bytes, format)."""
    if geometry is not None:
        height, width = valid.shape
        valid = valid & inside(geometry, geometry_crs or crs, crs, transform, width, height)
    if fmt is None:
        fmt = default_format(data.dtype, bool(valid.all()), render)
    body = encode(
        data,
        valid,
        fmt,
        **render,
        crs=crs,
        transform=transform,
    )
    return body, fmt
