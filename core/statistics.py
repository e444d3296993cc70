"""Statistics of a read (issue 17): rio-tiler's own numbers, on Terrazzo's mosaics.

The figures are `rio_tiler.utils.get_array_statistics` itself (what `ImageData.statistics()`
and TiTiler's /statistics call), not a re-implementation: min, max, mean, count, sum, std,
median, majority, minority, unique, histogram, valid_percent, masked_pixels, valid_pixels and
`percentile_{p}`, so an area read at the same resolution gives rio-tiler's answer.

A geometry masks the pixels it does not touch and may weight the others by how much of each
pixel it covers, by rio-tiler's rules (what TiTiler's POST /statistics does):

- inside: `rasterio.features.rasterize(all_touched=True)` on the output grid, as
  `Reader.feature` masks (a pixel the geometry touches at all is in);
- coverage: the geometry rasterized `all_touched` on a grid `cover_scale` times finer, each
  pixel weighted by the fraction of its sub-cells inside (`ImageData.get_coverage_array`).
  The weights enter count, sum, mean, std, median and percentiles; min, max, majority,
  minority, unique, histogram and the pixel counts are unweighted (rio-tiler's choice).

Everything here runs in the compute pool: `area_statistics` is a module-level function of
numpy arrays, tuples and strings (picklable), geometry reprojection and rasterizing included.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_PERCENTILES = (2, 98)  # rio-tiler's and TiTiler's default
MAX_PERCENTILES = 100
MAX_CATEGORIES = 1000
MAX_BINS = 10_000  # histogram bins (a count, or edges + 1): the answer is JSON
DEFAULT_COVER_SCALE = 10  # TiTiler's CoverScaleParams default
MAX_COVER_SCALE = 1000
# sub-cells the coverage raster may hold (uint8: bytes): pixels x cover_scale², at most
MAX_COVER_CELLS = 2**27


class StatisticsError(ValueError):
    """A statistics option that cannot be honoured; the message says what to change."""


@dataclass(frozen=True)
class StatsOptions:
    """rio-tiler's statistics options (TiTiler's StatisticsParams and HistogramParams)."""

    categorical: bool = False
    categories: tuple[float, ...] = ()
    percentiles: tuple[int, ...] = DEFAULT_PERCENTILES
    bins: int | tuple[float, ...] = 10  # numpy.histogram's bins: a count or the edges
    range: tuple[float, float] | None = None  # numpy.histogram's range
    coverage: bool = False  # weight pixels by the fraction inside the geometry
    cover_scale: int = DEFAULT_COVER_SCALE

    def __post_init__(self) -> None:
        if not self.percentiles:
            raise StatisticsError("percentiles: give at least one, e.g. 2,98")
        if len(self.percentiles) > MAX_PERCENTILES:
            raise StatisticsError(f"percentiles: at most {MAX_PERCENTILES}")
        for p in self.percentiles:
            if not 0 <= p <= 100:
                raise StatisticsError(f"percentiles: {p} is outside 0..100")
        if len(self.categories) > MAX_CATEGORIES:
            raise StatisticsError(f"categories: at most {MAX_CATEGORIES} values")
        if self.categories and not self.categorical:
            raise StatisticsError("categories: only with categorical=true")
        if any(not math.isfinite(c) for c in self.categories):
            raise StatisticsError("categories: finite numbers only")
        if isinstance(self.bins, int):
            if not 1 <= self.bins <= MAX_BINS:
                raise StatisticsError(f"histogram_bins: a count in 1..{MAX_BINS}, got {self.bins}")
        else:
            edges = self.bins
            if not 2 <= len(edges) <= MAX_BINS + 1:
                raise StatisticsError(
                    f"histogram_bins: edges are 2..{MAX_BINS + 1} numbers, got {len(edges)}"
                )
            if any(not math.isfinite(e) for e in edges) or any(
                b <= a for a, b in itertools.pairwise(edges)
            ):
                raise StatisticsError(
                    f"histogram_bins: edges must be finite and increasing, got {list(edges)}"
                )
        if self.range is not None:
            lo, hi = self.range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise StatisticsError(
                    f"histogram_range: 'min,max' finite with min <= max, got {list(self.range)}"
                )
        if not 1 <= self.cover_scale <= MAX_COVER_SCALE:
            raise StatisticsError(
                f"cover_scale: 1..{MAX_COVER_SCALE}, got {self.cover_scale} (TiTiler's default 10)"
            )

    def hist_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"bins": self.bins if isinstance(self.bins, int) else list(self.bins)}
        if self.range is not None:
            out["range"] = list(self.range)
        return out


def check_coverage_size(width: int, height: int, options: StatsOptions) -> None:
    """Refuse a coverage raster beyond MAX_COVER_CELLS before reading anything."""
    cells = width * height * options.cover_scale**2
    if options.coverage and cells > MAX_COVER_CELLS:
        from core.chunks import LimitError  # a 413 (app.main's table)

        raise LimitError(
            f"coverage: {width}x{height} pixels at cover_scale={options.cover_scale} are "
            f"{cells} sub-cells; the limit is {MAX_COVER_CELLS}: lower cover_scale, "
            "max_size or the resolution"
        )


def _json_number(value: Any) -> Any:
    """JSON has no NaN or infinity: they leave as null (no valid pixel)."""
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return _json_number(value)


def array_statistics(
    data: np.ndarray,
    valid: np.ndarray,
    names: list[str] | tuple[str, ...],
    options: StatsOptions,
    coverage: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """`{band name: rio-tiler's statistics}` of `data` (bands, h, w) where `valid` (h, w)."""
    from rio_tiler.utils import get_array_statistics

    if data.shape[0] != len(names):
        raise ValueError(f"{data.shape[0]} bands but {len(names)} names")
    mask = np.broadcast_to(~valid.astype(bool), data.shape).copy()
    array = np.ma.MaskedArray(data, mask=mask)
    stats = get_array_statistics(
        array,
        categorical=options.categorical,
        categories=list(options.categories) or None,
        percentiles=list(options.percentiles),
        coverage=coverage,
        **({} if options.categorical else options.hist_options()),
    )
    return {str(name): _jsonable(s) for name, s in zip(names, stats, strict=True)}


def geometry_masks(
    geometry: dict[str, Any],
    geometry_crs: str,
    crs: str,
    transform: tuple[float, ...],
    width: int,
    height: int,
    options: StatsOptions,
) -> tuple[np.ndarray, np.ndarray | None]:
    """(inside (h, w) bool, coverage (h, w) float32 or None) of `geometry` on the grid, by
    rio-tiler's rules: `Reader.feature`'s all-touched cutline, `get_coverage_array`'s
    fractions of `cover_scale`² sub-cells."""
    import warnings

    from affine import Affine
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.features import rasterize
    from rasterio.warp import transform_geom

    shape = geometry if geometry_crs == crs else transform_geom(geometry_crs, crs, geometry)
    affine = Affine(*transform[:6])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
        inside = rasterize(
            [(shape, 1)],
            out_shape=(height, width),
            transform=affine,
            all_touched=True,
            fill=0,
            dtype="uint8",
        ).astype(bool)
        if not options.coverage:
            return inside, None
        scale = options.cover_scale
        cells = rasterize(
            [(shape, 1)],
            out_shape=(height * scale, width * scale),
            transform=affine * Affine.scale(1 / scale),
            all_touched=True,
            fill=0,
            dtype="uint8",
        )
    coverage = cells.reshape(height, scale, width, scale).sum(axis=(1, 3), dtype="float32")
    return inside, coverage / scale**2


def area_statistics(
    data: np.ndarray,
    valid: np.ndarray,
    names: tuple[str, ...],
    options: StatsOptions,
    crs: str,
    transform: tuple[float, ...],
    geometry: dict[str, Any] | None = None,
    geometry_crs: str = "EPSG:4326",
) -> dict[str, dict[str, Any]]:
    """The compute-pool job: statistics of a read, inside `geometry` when one is given."""
    coverage = None
    if geometry is not None:
        height, width = valid.shape
        inside, coverage = geometry_masks(
            geometry, geometry_crs, crs, transform, width, height, options
        )
        valid = valid & inside
    return array_statistics(data, valid, names, options, coverage)
