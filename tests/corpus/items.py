"""STAC items for the corpus archives, made by rio-stac and pystac in four schema variants.

Catalogs in the wild describe the same kind of raster in different ways, and a reader that
only knows one of them breaks on the others. Each archive names one variant:

- `rio-stac`: `rio_stac.create_stac_item` (projection v1.1 `proj:epsg` at item level,
  `raster:bands` with statistics on the asset); further assets of other resolutions carry
  their own `proj:shape`/`proj:transform`.
- `pystac-proj2-item`: pystac's projection extension v2.0 (`proj:code`) on the item,
  pystac's raster extension on the assets.
- `pystac-proj2-asset`: projection v2.0 on every asset (as Sentinel-2 catalogs do, whose
  bands have different grids), raster on the assets.
- `pystac-proj1-item-raster`: projection v1.1 (`proj:epsg`) and `raster:bands` both in the
  item's properties, as older catalogs wrote them.

Footprints are the image rectangle densified (21 points per edge, as GDAL does) and projected
to lon/lat by rasterio, so UTM footprints are not under-covered.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
import rasterio.warp
import shapely
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rio_stac import create_stac_item

from tests.corpus.archives import Archive, ItemFiles

PROJECTION_V1 = "https://stac-extensions.github.io/projection/v1.1.0/schema.json"
RASTER_V1 = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
SCHEMAS = ("rio-stac", "pystac-proj2-item", "pystac-proj2-asset", "pystac-proj1-item-raster")


def _when(text: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _rio_stac(archive: Archive, item: ItemFiles) -> dict[str, Any]:
    (first_key, first_path), *others = item.assets.items()

    def one(key: str, path: Path) -> pystac.Item:
        return create_stac_item(
            str(path),
            input_datetime=_when(item.datetime),
            id=item.id,
            collection=archive.spec.name,
            asset_name=key,
            asset_roles=["data"],
            with_proj=True,
            with_raster=True,
            geom_densify_pts=21,
        )

    stac = one(first_key, first_path)
    for key, path in others:
        other = one(key, path)
        asset = other.assets[key]
        if other.properties["proj:shape"] != stac.properties["proj:shape"]:
            asset.extra_fields["proj:shape"] = other.properties["proj:shape"]
            asset.extra_fields["proj:transform"] = other.properties["proj:transform"]
        stac.add_asset(key, asset)
    return stac.to_dict()


def _footprint(src: rasterio.DatasetReader) -> dict[str, Any]:
    left, bottom, right, top = src.bounds
    ring = shapely.segmentize(shapely.box(left, bottom, right, top), (right - left) / 20)
    return rasterio.warp.transform_geom(src.crs, "EPSG:4326", shapely.geometry.mapping(ring))


def _bands(src: rasterio.DatasetReader) -> list[RasterBand]:
    bands = []
    for index, dtype in enumerate(src.dtypes):
        nodata: float | str | None = src.nodata
        if nodata is not None and math.isnan(nodata):
            nodata = "nan"  # JSON has no NaN; the raster extension spells it as a string
        bands.append(
            RasterBand.create(
                nodata=nodata,
                data_type=DataType(dtype),
                spatial_resolution=src.res[0],
                scale=src.scales[index] if src.scales[index] != 1 else None,
                offset=src.offsets[index] if src.offsets[index] != 0 else None,
            )
        )
    return bands


def _grid(src: rasterio.DatasetReader) -> dict[str, Any]:
    return {
        "epsg": src.crs.to_epsg(),
        "shape": [src.height, src.width],
        "transform": list(src.transform)[:6],
    }


def _pystac(archive: Archive, item: ItemFiles, *, proj: str, raster: str) -> dict[str, Any]:
    """pystac item; `proj` is 'v2-item', 'v2-asset' or 'v1-item', `raster` 'asset' or 'item'."""
    first = next(iter(item.assets.values()))
    with rasterio.open(first) as src:
        geometry = _footprint(src)
        grid = _grid(src)
    properties: dict[str, Any] = {}
    if item.datetime is None:
        properties["start_datetime"] = item.start_datetime
        properties["end_datetime"] = item.end_datetime
    stac = pystac.Item(
        id=item.id,
        geometry=geometry,
        bbox=list(shapely.geometry.shape(geometry).bounds),
        datetime=_when(item.datetime),
        properties=properties,
        collection=archive.spec.name,
    )
    if proj == "v2-item":
        ProjectionExtension.ext(stac, add_if_missing=True).apply(
            code=f"EPSG:{grid['epsg']}", shape=grid["shape"], transform=grid["transform"]
        )
    elif proj == "v1-item":
        stac.stac_extensions.append(PROJECTION_V1)
        stac.properties.update({f"proj:{k}": v for k, v in grid.items()})
    for key, path in item.assets.items():
        asset = pystac.Asset(href=str(path), media_type=pystac.MediaType.COG, roles=["data"])
        stac.add_asset(key, asset)
        with rasterio.open(path) as src:
            bands = _bands(src)
            asset_grid = _grid(src)
        if proj == "v2-asset":
            ProjectionExtension.ext(asset, add_if_missing=True).apply(
                code=f"EPSG:{asset_grid['epsg']}",
                shape=asset_grid["shape"],
                transform=asset_grid["transform"],
            )
        if raster == "asset":
            RasterExtension.ext(asset, add_if_missing=True).apply(bands=bands)
        elif key == next(iter(item.assets)):
            stac.stac_extensions.append(RASTER_V1)
            stac.properties["raster:bands"] = [b.to_dict() for b in bands]
    return stac.to_dict()


BUILDERS: dict[str, Callable[[Archive, ItemFiles], dict[str, Any]]] = {
    "rio-stac": _rio_stac,
    "pystac-proj2-item": lambda a, i: _pystac(a, i, proj="v2-item", raster="asset"),
    "pystac-proj2-asset": lambda a, i: _pystac(a, i, proj="v2-asset", raster="asset"),
    "pystac-proj1-item-raster": lambda a, i: _pystac(a, i, proj="v1-item", raster="item"),
}


def stac_items(archive: Archive) -> list[dict[str, Any]]:
    """The archive's items as STAC JSON dicts, in the archive's schema variant."""
    build = BUILDERS[archive.spec.schema]
    items = [build(archive, item) for item in archive.items]
    for item in items:  # rio-stac/pystac may leave numpy scalars in statistics
        item["properties"] = _plain(item["properties"])
        item["assets"] = _plain(item["assets"])
    return items


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
