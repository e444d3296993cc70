"""Build a small but realistic demo catalog: real COGs in three UTM zones plus an index.

The demo exercises what makes mosaicking hard: footprints that overlap across UTM zone
boundaries (6°E and 12°E), two acquisition dates, nodata edges, an internal mask instead of a
nodata value, and a file without overviews. The imagery is a synthetic landscape defined as a
function of lon/lat, so overlapping items agree pixel for pixel (up to resampling) and a
correct mosaic looks seamless while a wrong one shows visible seams.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from affine import Affine
from pyproj import Transformer

from core.cogs import stac_item, write_cog
from core.indexing import index_items

COLLECTION = "demo"
BASE_SIZE = 1024
BASE_PIXEL = 30.0  # metres at size=1024; smaller demos keep footprints, coarsen pixels
OVERLAP = 0.2
LAT = 45.0
KM_PER_DEG_LAT = 111.2
KM_PER_DEG_LON = KM_PER_DEG_LAT * np.cos(np.radians(LAT))
WATER_LEVEL = 320.0  # metres
VISUAL_NODATA = 0
DEM_NODATA = -9999.0

# (date, first centre lon, last centre lon, northward shift in km). The later date covers only
# the eastern part and is shifted north so mosaics show both dates and a date boundary.
PASSES = (
    ("2024-06-01", 5.2, 12.8, 0.0),
    ("2024-09-01", 9.4, 12.9, 11.0),
)


@dataclass(frozen=True)
class DemoItem:
    """Where one demo scene sits and which storage quirks it exercises."""

    item_id: str
    date: str
    epsg: int
    transform: Affine
    cut: int | None  # which corner (0-3) is cut off as nodata, or None
    internal_mask: bool
    overviews: bool


@cache
def _to_lonlat(epsg: int) -> Transformer:
    return Transformer.from_crs(epsg, 4326, always_xy=True)


@cache
def _from_lonlat(epsg: int) -> Transformer:
    return Transformer.from_crs(4326, epsg, always_xy=True)


def _layout(size: int) -> list[DemoItem]:
    """Place the scenes: a strip along 45°N, zone by centre longitude, ~20% overlap."""
    pixel = BASE_PIXEL * BASE_SIZE / size
    extent_km = BASE_SIZE * BASE_PIXEL / 1000
    step_deg = extent_km * (1 - OVERLAP) / KM_PER_DEG_LON
    items: list[DemoItem] = []
    for date, lon0, lon1, north_km in PASSES:
        lons = np.arange(lon0, lon1 + 1e-9, step_deg)
        seen_zones: set[int] = set()
        for i, lon in enumerate(lons):
            epsg = 32600 + int((lon + 180) // 6) + 1
            cx, cy = _from_lonlat(epsg).transform(lon, LAT + north_km / KM_PER_DEG_LAT)
            half = size * pixel / 2
            left = round((cx - half) / pixel) * pixel
            top = round((cy + half) / pixel) * pixel
            first_in_zone = epsg not in seen_zones
            seen_zones.add(epsg)
            early = date == PASSES[0][0]
            internal_mask = early and first_in_zone and epsg == 32632
            items.append(
                DemoItem(
                    item_id=f"demo-{epsg}-{date}-{i:02d}",
                    date=date,
                    epsg=epsg,
                    transform=Affine(pixel, 0.0, left, 0.0, -pixel, top),
                    cut=(i // 3) % 4 if (i % 3 == 0 or internal_mask) else None,
                    internal_mask=internal_mask,
                    overviews=not (early and first_in_zone and epsg == 32633),
                )
            )
    return items


class _Landscape:
    """Smooth synthetic terrain (metres) as a function of local east/north kilometres.

    Spectral synthesis: sine waves in random directions with wavelengths from ~2.5 to ~90 km
    and amplitude proportional to wavelength (a red spectrum, like real relief), plus a few
    broad gaussian massifs and basins that give snowy peaks and lakes.
    """

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        n_waves = 36
        wavelength = np.exp(rng.uniform(np.log(2.5), np.log(90.0), n_waves))
        theta = rng.uniform(0, np.pi, n_waves)
        self.kx = 2 * np.pi * np.cos(theta) / wavelength
        self.ky = 2 * np.pi * np.sin(theta) / wavelength
        self.amp = 5.5 * wavelength
        self.phase = rng.uniform(0, 2 * np.pi, n_waves)
        n_peaks = 16
        self.px = rng.uniform(-360, 360, n_peaks)
        self.py = rng.uniform(-30, 50, n_peaks)
        self.ps = rng.uniform(7, 20, n_peaks)
        self.pa = rng.uniform(700, 1900, n_peaks) * rng.choice([1, 1, 1, -0.6], n_peaks)

    def __call__(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Elevation (m) and its analytic slopes (m per m) towards east and north."""
        z = np.full(np.shape(x), 650.0)
        gx = np.zeros(np.shape(x))
        gy = np.zeros(np.shape(x))
        for kx, ky, amp, phase in zip(self.kx, self.ky, self.amp, self.phase, strict=True):
            arg = kx * x + ky * y + phase
            z += amp * np.sin(arg)
            c = amp * np.cos(arg)
            gx += kx * c
            gy += ky * c
        for px, py, ps, pa in zip(self.px, self.py, self.ps, self.pa, strict=True):
            dx, dy = x - px, y - py
            e = pa * np.exp(-(dx * dx + dy * dy) / (2 * ps * ps))
            z += e
            gx -= e * dx / (ps * ps)
            gy -= e * dy / (ps * ps)
        return z, gx / 1000, gy / 1000  # x, y are in km


@cache
def _interp_matrix(n: int, m: int) -> np.ndarray:
    """(n, m) linear interpolation weights from m evenly spaced nodes to pixels 0..n-1."""
    nodes = np.linspace(0, n - 1, m)
    eye = np.eye(m)
    weights = np.stack([np.interp(np.arange(n), nodes, eye[j]) for j in range(m)], axis=1)
    return weights.astype(np.float32)


def _fields(item: DemoItem, size: int, land: _Landscape) -> tuple[np.ndarray, np.ndarray]:
    """Elevation and hillshade on the item's pixel grid.

    The landscape is evaluated at the lon/lat of a coarse node grid and upsampled with two
    small matrix products: the terrain is smooth at that scale, and this costs milliseconds
    instead of a million-point reprojection. Nodes stay ≤ ~240 m apart whatever ``size`` is,
    so small demos show the same terrain and overlapping items still agree.
    """
    m = max(size // 8, 128) + 1
    nodes = np.linspace(0, size - 1, m)
    cols, rows = np.meshgrid(nodes + 0.5, nodes + 0.5)
    xs, ys = item.transform * (cols, rows)
    lon, lat = _to_lonlat(item.epsg).transform(xs, ys)
    ex = (lon - 9.0) * KM_PER_DEG_LON
    ny = (lat - LAT) * KM_PER_DEG_LAT
    # Slopes are taken east/north, not along the UTM grid, so shading matches across zones.
    z, dzdx, dzdy = land(ex, ny)
    exaggeration = 4.0
    sx, sy = -dzdx * exaggeration, -dzdy * exaggeration
    sun = np.array([-1.0, 1.0, 1.2])  # from the north-west, as cartographers light maps
    sun /= np.linalg.norm(sun)
    shade = (sx * sun[0] + sy * sun[1] + sun[2]) / np.sqrt(sx * sx + sy * sy + 1)
    w = _interp_matrix(size, m)
    light = np.clip(shade, 0, 1).astype(np.float32)
    return w @ z.astype(np.float32) @ w.T, w @ light @ w.T


# Hypsometric ramps: elevation stops (m) → RGB. September is drier with less snow.
_STOPS = np.array([-200, WATER_LEVEL - 1, WATER_LEVEL, 340, 700, 1200, 1700, 2200, 2500, 4000])
_RAMPS = {
    "2024-06-01": np.array(
        [
            [18, 40, 110],
            [60, 110, 185],
            [206, 196, 150],
            [70, 140, 62],
            [98, 160, 70],
            [132, 150, 84],
            [140, 112, 78],
            [150, 140, 130],
            [244, 244, 250],
            [255, 255, 255],
        ]
    ),
    "2024-09-01": np.array(
        [
            [22, 48, 112],
            [70, 116, 176],
            [214, 200, 150],
            [150, 152, 78],
            [176, 160, 92],
            [168, 138, 90],
            [148, 114, 80],
            [152, 140, 128],
            [170, 164, 160],
            [236, 236, 242],
        ]
    ),
}


_LUT_Z_STEP = 2.0  # metres per lookup row
_LUT_LIGHT_LEVELS = 128


@cache
def _colour_lut(date: str) -> np.ndarray:
    """(3, elevation rows × light levels) uint8 table: colour ramp times hillshade.

    A table lookup replaces per-pixel interpolation and float maths, which otherwise costs
    as much as writing the COG itself.
    """
    ramp = _RAMPS.get(date, _RAMPS[PASSES[0][0]])
    z = np.arange(_STOPS[0], _STOPS[-1] + _LUT_Z_STEP, _LUT_Z_STEP)
    colour = np.stack([np.interp(z, _STOPS, ramp[:, b]) for b in range(3)])  # (3, nz)
    shade = np.linspace(0.0, 1.0, _LUT_LIGHT_LEVELS)
    # Water is lit evenly; land gets the hillshade so relief reads on a web map.
    light = np.where((z < WATER_LEVEL)[:, None], 1.0, 0.35 + 0.8 * shade[None, :])
    table = colour[:, :, None] * light[None]  # (3, nz, levels)
    return np.clip(np.rint(table), 1, 255).astype(np.uint8).reshape(3, -1)  # 0 means nodata


def _visual(z: np.ndarray, shade: np.ndarray, date: str) -> np.ndarray:
    lut = _colour_lut(date)
    rows = lut.shape[1] // _LUT_LIGHT_LEVELS
    zi = ((z - np.float32(_STOPS[0])) / np.float32(_LUT_Z_STEP)).clip(0, rows - 1)
    li = (shade * np.float32(_LUT_LIGHT_LEVELS - 1)).clip(0, _LUT_LIGHT_LEVELS - 1)
    flat = zi.astype(np.intp) * _LUT_LIGHT_LEVELS + np.rint(li).astype(np.intp)
    return np.take(lut, flat, axis=1)  # (3, h, w)


def _valid_mask(size: int, cut: int | None) -> np.ndarray:
    """True = valid. A diagonal corner cut mimics the edge of a satellite swath."""
    valid = np.ones((size, size), dtype=bool)
    if cut is None:
        return valid
    r, c = np.ogrid[:size, :size]
    if cut in (1, 2):
        c = size - 1 - c
    if cut in (2, 3):
        r = size - 1 - r
    valid[(r + c) < int(0.45 * size)] = False
    return valid


def _write_item(item: DemoItem, size: int, land: _Landscape, out_dir: Path) -> dict:
    z, shade = _fields(item, size, land)
    rgb = _visual(z, shade, item.date)
    dem = z.astype(np.float32)[None]
    valid = _valid_mask(size, item.cut)
    rgb[:, ~valid] = VISUAL_NODATA
    dem[:, ~valid] = DEM_NODATA
    crs = f"EPSG:{item.epsg}"
    cogs = out_dir / "cogs"
    mask = valid if item.internal_mask else None
    paths = {}
    for asset, data, nodata in (("visual", rgb, VISUAL_NODATA), ("dem", dem, DEM_NODATA)):
        paths[asset] = write_cog(
            cogs / f"{item.item_id}_{asset}.tif",
            data,
            crs=crs,
            transform=item.transform,
            nodata=None if mask is not None else nodata,
            mask=mask,
            overviews=item.overviews,
        )
    return stac_item(
        item.item_id,
        paths,
        datetime=f"{item.date}T10:30:00Z",
        collection=COLLECTION,
        href_base=out_dir,
        properties={"gsd": item.transform.a, "platform": "terrazzo-demo"},
    )


def build_demo(out_dir: Path, *, size: int = 1024, seed: int = 0) -> Path:
    """Write demo COGs, ``items.ndjson`` and the ``items.parquet`` index; return the index.

    ``size`` is the scene width in pixels; footprints stay the same (30 m pixels at 1024), so
    tests can build the identical layout quickly at ``size=256``. ``seed`` varies the terrain.
    """
    out_dir = Path(out_dir)
    (out_dir / "cogs").mkdir(parents=True, exist_ok=True)
    land = _Landscape(seed)
    stac_items = [_write_item(item, size, land, out_dir) for item in _layout(size)]
    ndjson = out_dir / "items.ndjson"
    ndjson.write_text("".join(json.dumps(it) + "\n" for it in stac_items), encoding="utf-8")
    parquet = out_dir / "items.parquet"
    index_items(ndjson, parquet)
    return parquet
