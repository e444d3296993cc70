"""A synthetic continent: many STAC items over a few shared COGs in several UTM zones.

The shape of a real archive at low zoom: tens of thousands of small scenes (cells of `cell`
degrees, newest on top), several acquisitions of some cells, and one hotspot where
`hotspot` scenes stack under a single z10 tile (a city imaged every few days). COGs are
shared between items (one per `cog_box` of the continent, in the UTM zone of its centre,
written by GDAL's COG driver with overviews): the pixels are a smooth function of lon/lat, so
every item over a place sees the same landscape and a mosaic has no seams. Items are indexed
with `terrazzo index`'s code (core.indexing).

    .venv/bin/python -m bench.continent --out data/continent --items 100000

Used by bench/lowzoom.py (100,000 items) and tests/test_continent.py (a few thousand).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import morecantile
import numpy as np
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from core.indexing import index_items

EUROPE = (-10.0, 36.0, 30.0, 60.0)
HOTSPOT = (10.02, 45.02)  # lon, lat of the stacked scenes
TMS = morecantile.tms.get("WebMercatorQuad")


def utm_epsg(lon: float, lat: float) -> int:
    return (32600 if lat >= 0 else 32700) + int((lon + 180) // 6) + 1


def landscape(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """(3, ...) uint8 RGB in 1..255, smooth in lon/lat (0 is nodata)."""
    a = np.sin(np.radians(lon) * 9) * np.cos(np.radians(lat) * 7)
    b = np.cos(np.radians(lon + lat) * 23)
    rgb = np.stack([90 + 60 * a + 30 * b, 120 + 50 * b, 110 - 70 * a])
    return np.clip(np.rint(rgb), 1, 255).astype(np.uint8)


def write_cog(path: Path, box: tuple[float, float, float, float], res: float) -> int:
    """The COG covering `box` (lon/lat) in its UTM zone at `res` metres; returns its EPSG."""
    epsg = utm_epsg((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    lons = np.linspace(box[0], box[2], 21)
    lats = np.linspace(box[1], box[3], 21)
    xs, ys = to_utm.transform(*np.meshgrid(lons, lats))
    west, east = math.floor(xs.min() / res) * res - res, math.ceil(xs.max() / res) * res + res
    south, north = math.floor(ys.min() / res) * res - res, math.ceil(ys.max() / res) * res + res
    width, height = int((east - west) / res), int((north - south) / res)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    to_lonlat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True)
    lon, lat = to_lonlat.transform(west + cols * res, north - rows * res)
    profile = {
        "driver": "COG",
        "width": width,
        "height": height,
        "count": 3,
        "dtype": "uint8",
        "crs": f"EPSG:{epsg}",
        "transform": from_origin(west, north, res, res),
        "nodata": 0,
        "compress": "deflate",
        "blocksize": 256,
        "overview_resampling": "nearest",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(landscape(lon, lat))
    return epsg


def item(
    item_id: str, cell: tuple[float, float, float, float], when: str, href: str, epsg: int
) -> dict:
    west, south, east, north = cell
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/projection/v2.0.0/schema.json"],
        "id": item_id,
        "collection": "continent",
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [west, south, east, north],
        "properties": {"datetime": when, "proj:code": f"EPSG:{epsg}"},
        "assets": {"visual": {"href": href, "type": "image/tiff; application=geotiff"}},
        "links": [],
    }


def build(
    out: Path,
    *,
    items: int = 100_000,
    bounds: tuple[float, float, float, float] = EUROPE,
    cog_box: tuple[float, float] = (5.0, 4.0),
    cell: float = 0.1,
    hotspot: int = 250,
    res: float = 1000.0,
    seed: int = 0,
) -> Path:
    """Write the COGs and `out`/items.parquet; returns the catalog path. `bounds` must be a
    whole number of `cog_box`es and a cog_box a whole number of cells."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    west, south, east, north = bounds
    nx, ny = round((east - west) / cog_box[0]), round((north - south) / cog_box[1])
    cogs: dict[tuple[int, int], tuple[str, int]] = {}
    for i in range(nx):
        for j in range(ny):
            box = (
                west + i * cog_box[0],
                south + j * cog_box[1],
                west + (i + 1) * cog_box[0],
                south + (j + 1) * cog_box[1],
            )
            path = out / f"cog-{i:02d}-{j:02d}.tif"
            cogs[i, j] = (path.name, write_cog(path, box, res))
    cx, cy = round((east - west) / cell), round((north - south) / cell)
    cells = [(i, j) for i in range(cx) for j in range(cy)]
    stacked = max(0, items - hotspot - len(cells))  # second acquisitions of random cells
    if items - hotspot < len(cells):  # fewer items than cells: a random subset of cells
        keep = rng.choice(len(cells), size=max(0, items - hotspot), replace=False)
        cells = [cells[k] for k in sorted(keep)]
    picks = [cells[k] for k in rng.integers(0, len(cells), size=stacked)] if stacked else []
    features = []

    def add(item_id: str, box: tuple[float, float, float, float]) -> None:
        ci = min(int((box[0] - west + 1e-9) // cog_box[0]), nx - 1)
        cj = min(int((box[1] - south + 1e-9) // cog_box[1]), ny - 1)
        href, epsg = cogs[ci, cj]
        day = int(rng.integers(0, 730))
        when = f"{2023 + day // 365}-{1 + (day % 365) // 31:02d}-{1 + day % 28:02d}T10:00:00Z"
        features.append(item(item_id, box, when, href, epsg))

    for n, (i, j) in enumerate([*cells, *picks]):
        x0, y0 = west + i * cell, south + j * cell
        add(f"scene-{n:06d}", (x0, y0, x0 + cell, y0 + cell))
    if hotspot:
        t = TMS.tile(*HOTSPOT, 10)
        tb = TMS.bounds(t)
        for n in range(hotspot):  # sub-boxes around the z10 tile's centre, inside one COG
            w = float(rng.uniform(0.3, 0.9)) * (tb.right - tb.left)
            h = float(rng.uniform(0.3, 0.9)) * (tb.top - tb.bottom)
            x0 = float(rng.uniform(tb.left, tb.right - w))
            y0 = float(rng.uniform(tb.bottom, tb.top - h))
            add(f"hot-{n:04d}", (x0, y0, x0 + w, y0 + h))
    source = out / "items.ndjson"
    source.write_text("".join(json.dumps(f) + "\n" for f in features))
    catalog = out / "items.parquet"
    index_items(source, catalog)
    return catalog


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/continent"))
    ap.add_argument("--items", type=int, default=100_000)
    args = ap.parse_args()
    path = build(args.out, items=args.items)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
