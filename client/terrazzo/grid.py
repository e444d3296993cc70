"""The output grid of a read, the way odc-stac (odc-geo's GeoBox) makes it.

Why this shape: a data scientist who asks for `resolution=15` expects 15.0 m pixels on a grid
aligned to multiples of 15, as odc-stac and stackstac give, so two reads of neighbouring areas
stack without resampling. The bbox is therefore snapped outwards to the resolution (anchor
"edge": pixel edges on multiples of it; "center": pixel centres; "floating": the bbox's own
corner; or an (x, y) fraction of a pixel), with odc-geo's 1%-of-a-pixel tolerance, instead of
stretching the resolution to the bbox. With `shape=` the bbox is kept and the pixel size follows.

The area may be given as a bbox in any CRS (`bbox_crs`, default the output CRS), a lon/lat
`geopolygon` (shapely or GeoJSON), or `like=` another DataArray (its grid exactly); `crs="utm"`
picks the UTM zone of the area's centre. Unit mistakes fail here, before any request: lon/lat
numbers with a metric CRS, a zero or negative resolution, a bbox the CRS cannot hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ANCHORS = {"edge": (0.0, 0.0), "center": (0.5, 0.5), "centre": (0.5, 0.5), "floating": None}
TOLERANCE = 0.01  # of a pixel: a bbox edge this close to the grid is on it (odc-geo's default)
LONLAT = "EPSG:4326"


@dataclass(frozen=True)
class Grid:
    """A north-up pixel grid: top-left corner (minx, maxy), pixel size (rx, ry > 0), shape."""

    crs: str
    minx: float
    maxy: float
    rx: float
    ry: float
    width: int
    height: int

    @property
    def maxx(self) -> float:
        return self.minx + self.width * self.rx

    @property
    def miny(self) -> float:
        return self.maxy - self.height * self.ry

    @property
    def res(self) -> tuple[float, float]:
        return (self.rx, self.ry)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        return (self.minx, self.miny, self.maxx, self.maxy)

    @property
    def transform(self) -> tuple[float, float, float, float, float, float]:
        """The affine (a, b, c, d, e, f) of rasterio/GDAL order (c, f: the top-left corner)."""
        return (self.rx, 0.0, self.minx, 0.0, -self.ry, self.maxy)

    @classmethod
    def make(
        cls,
        bbox: Sequence[float] | None = None,
        *,
        crs: str | None = None,
        resolution: float | Sequence[float] | None = None,
        shape: Sequence[int] | None = None,
        anchor: str | Sequence[float] = "edge",
        bbox_crs: str | None = None,
        geopolygon: Any = None,
        like: Any = None,
    ) -> Grid:
        """The grid of a read; raises ValueError naming what to fix."""
        if like is not None:
            if bbox is not None or geopolygon is not None or resolution or shape:
                raise ValueError("like: gives the whole grid; drop bbox, resolution and shape")
            return cls.like(like)
        if crs is None:
            raise ValueError("crs: needed (e.g. 'EPSG:32632', or 'utm' for the area's zone)")
        if (bbox is None) == (geopolygon is None):
            raise ValueError("give the area as one of bbox=(minx, miny, maxx, maxy) or geopolygon=")
        if geopolygon is not None:
            bbox, bbox_crs = _polygon_bounds(geopolygon), LONLAT
        assert bbox is not None
        box = _check_bbox(bbox)
        if str(crs).lower() == "utm":
            lonlat = _transform_bounds(box, bbox_crs or LONLAT, LONLAT)
            crs = utm_zone((lonlat[0] + lonlat[2]) / 2, (lonlat[1] + lonlat[3]) / 2)
            bbox_crs = bbox_crs or LONLAT
        source = bbox_crs or crs
        _check_units(box, source, given_crs=bbox_crs is not None)
        if bbox_crs is not None and not _same_crs(bbox_crs, crs):
            box = _transform_bounds(box, bbox_crs, crs)
        if (resolution is None) == (shape is None):
            raise ValueError("give exactly one of resolution (pixel size) or shape (height, width)")
        minx, miny, maxx, maxy = box
        if shape is not None:
            height, width = _check_shape(shape)
            return cls(
                crs, minx, maxy, (maxx - minx) / width, (maxy - miny) / height, width, height
            )
        rx, ry = _check_resolution(resolution)
        offsets = _anchor(anchor)
        x0, width = _snap(minx, maxx, rx, None if offsets is None else offsets[0])
        y0, height = _snap(-maxy, -miny, ry, None if offsets is None else offsets[1])
        return cls(crs, x0, -y0, rx, ry, width, height)

    @classmethod
    def like(cls, other: Any) -> Grid:
        """The grid of another DataArray/Dataset (x/y pixel-centre coordinates and a CRS)."""
        try:
            x = [float(v) for v in other["x"].values]
            y = [float(v) for v in other["y"].values]
        except (KeyError, TypeError) as exc:
            raise ValueError("like: needs an xarray object with x and y coordinates") from exc
        if len(x) < 2 or len(y) < 2:
            raise ValueError("like: needs at least 2 pixels along x and y to know the grid")
        rx, ry = x[1] - x[0], y[0] - y[1]
        if rx <= 0 or ry <= 0:
            raise ValueError("like: x must increase and y decrease (a north-up grid)")
        return cls(_crs_of(other), x[0] - rx / 2, y[0] + ry / 2, rx, ry, len(x), len(y))


def utm_zone(lon: float, lat: float) -> str:
    """The UTM zone holding (lon, lat), as odc-stac's crs="utm" picks it (EPSG:326xx/327xx)."""
    zone = min(60, max(1, math.floor((lon + 180) / 6) + 1))
    return f"EPSG:{(32600 if lat >= 0 else 32700) + zone}"


def _snap(lo: float, hi: float, res: float, offset: float | None) -> tuple[float, int]:
    """[lo, hi] snapped outwards to multiples of `res` shifted by `offset` pixels; the start
    and the pixel count (None: not snapped, starts at lo)."""
    if offset is None:
        return lo, max(1, math.ceil(_almost_int((hi - lo) / res)))
    shift = offset * res
    first = math.floor(_almost_int((lo - shift) / res))
    last = math.ceil(_almost_int((hi - shift) / res))
    return first * res + shift, max(1, last - first)


def _almost_int(value: float) -> float:
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < TOLERANCE else value


def _anchor(anchor: str | Sequence[float]) -> tuple[float, float] | None:
    if isinstance(anchor, str):
        if anchor.lower() not in ANCHORS:
            raise ValueError(f"anchor: {anchor!r}; one of {sorted(ANCHORS)} or an (x, y) fraction")
        return ANCHORS[anchor.lower()]
    ax, ay = (float(v) for v in anchor)
    return (ax % 1.0, ay % 1.0)


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    try:
        minx, miny, maxx, maxy = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise ValueError(f"bbox: four numbers (minx, miny, maxx, maxy), got {bbox!r}") from None
    if not all(math.isfinite(v) for v in (minx, miny, maxx, maxy)):
        raise ValueError(f"bbox: finite numbers only, got {tuple(bbox)}")
    if not (maxx > minx and maxy > miny):
        raise ValueError(f"bbox: needs minx < maxx and miny < maxy, got {tuple(bbox)}")
    return minx, miny, maxx, maxy


def _check_resolution(resolution: Any) -> tuple[float, float]:
    if isinstance(resolution, int | float):
        values = [resolution, resolution]
    else:
        try:
            values = list(resolution)
        except TypeError:
            values = []
    if len(values) != 2 or not all(isinstance(v, int | float) for v in values):
        raise ValueError(f"resolution: a pixel size or (x, y) pixel sizes, got {resolution!r}")
    rx, ry = (abs(float(v)) if float(v) < 0 and i == 1 else float(v) for i, v in enumerate(values))
    if not (math.isfinite(rx) and math.isfinite(ry)) or rx <= 0 or ry <= 0:
        raise ValueError(f"resolution: pixel sizes must be positive, got {resolution!r}")
    return rx, ry


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape: (height, width) in pixels, got {shape!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"shape: at least one pixel each way, got {tuple(shape)}")
    return height, width


def _check_units(box: tuple[float, ...], crs: str, *, given_crs: bool) -> None:
    """Refuse a bbox whose numbers cannot be in `crs`'s units: lon/lat degrees given for a
    metric CRS (a 1 m box near the equator, then a 1x1 array of nothing), or metres for a
    geographic one."""
    import pyproj

    try:
        parsed = pyproj.CRS.from_user_input(crs)
    except pyproj.exceptions.CRSError as exc:
        raise ValueError(f"crs: {crs!r} is not a CRS ({str(exc).splitlines()[0]})") from None
    minx, miny, maxx, maxy = box
    which = "bbox_crs" if given_crs else "crs"
    if parsed.is_geographic:
        if max(abs(minx), abs(maxx)) > 360 or max(abs(miny), abs(maxy)) > 90:
            raise ValueError(
                f"bbox {box} cannot be lon/lat degrees ({which} {crs} is geographic): are these "
                "metres? give the CRS they are in with bbox_crs="
            )
        return
    degrees = max(abs(minx), abs(maxx)) <= 180 and max(abs(miny), abs(maxy)) <= 90
    if parsed.is_projected and degrees and (maxx - minx) < 10 and (maxy - miny) < 10:
        raise ValueError(
            f"bbox {box} looks like lon/lat degrees but {which} {crs} is in "
            f"{parsed.axis_info[0].unit_name}s: pass bbox_crs='EPSG:4326' (or the bbox in {crs})"
        )


def _same_crs(a: str, b: str) -> bool:
    return a == b or a.upper() == b.upper()


def _transform_bounds(
    box: tuple[float, float, float, float], src: str, dst: str
) -> tuple[float, float, float, float]:
    if _same_crs(src, dst):
        return box
    import pyproj

    transformer = pyproj.Transformer.from_crs(src, dst, always_xy=True)
    out = transformer.transform_bounds(*box, densify_pts=21)
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"bbox {box} in {src} has no extent in {dst} (outside its area of use)")
    return tuple(float(v) for v in out)  # type: ignore[return-value]


def _polygon_bounds(geopolygon: Any) -> tuple[float, float, float, float]:
    """Lon/lat bounds of a shapely geometry, a GeoJSON geometry/Feature, or __geo_interface__."""
    shape = getattr(geopolygon, "__geo_interface__", geopolygon)
    if isinstance(shape, dict) and shape.get("type") == "Feature":
        shape = shape.get("geometry")
    if not isinstance(shape, dict) or "coordinates" not in shape:
        raise ValueError("geopolygon: a shapely geometry or a GeoJSON geometry in lon/lat")
    xs: list[float] = []
    ys: list[float] = []

    def walk(part: Any) -> None:
        if part and isinstance(part[0], int | float):
            xs.append(float(part[0]))
            ys.append(float(part[1]))
        else:
            for sub in part:
                walk(sub)

    walk(shape["coordinates"])
    if not xs:
        raise ValueError("geopolygon: it has no coordinates")
    return min(xs), min(ys), max(xs), max(ys)


def _crs_of(other: Any) -> str:
    crs = getattr(other, "attrs", {}).get("crs")
    if crs is None and "spatial_ref" in getattr(other, "coords", {}):
        attrs = other.coords["spatial_ref"].attrs
        crs = attrs.get("crs_wkt") or attrs.get("spatial_ref")
    if crs is None:
        rio = getattr(other, "rio", None)
        crs = rio.crs.to_wkt() if rio is not None and rio.crs is not None else None
    if crs is None:
        raise ValueError("like: the object has no CRS (attrs['crs'] or a spatial_ref coordinate)")
    return str(crs)
