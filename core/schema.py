"""The catalog schema layer: what real STAC-GeoParquet writers produce, seen as one schema.

Writers differ (checked with each: stac-geoparquet's arrow writer, its GeoPandas path, rustac,
pystac + pyarrow, `terrazzo index`):
- `bbox` is a struct {xmin, ymin, xmax, ymax} (stac-geoparquet, rustac), a list of 4 or 6
  numbers (GeoPandas' `to_parquet` of `to_geodataframe`), or absent (only `geometry`);
- timestamps come in any unit (pandas writes nanoseconds), with or without a zone, or as an
  all-null column of no type at all;
- the search SQL, the filters and the time labels want one thing: a struct bbox of doubles and
  TIMESTAMPTZ times in UTC.

So the catalog reads the file through one SELECT that normalises those columns, and refuses a
file it cannot serve with a single line naming the column and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

TIME_COLUMNS = ("datetime", "start_datetime", "end_datetime")
_CANONICAL_BBOX = "STRUCT(xmin DOUBLE, ymin DOUBLE, xmax DOUBLE, ymax DOUBLE)"
_FIX = "write it with stac-geoparquet, rustac or `terrazzo index`"


class SchemaError(ValueError):
    """A catalog file that cannot be served; the message names the column and the fix."""


def check(path: Path | str, columns: dict[str, str]) -> None:
    """Refuse what no normalisation can serve (at start-up, and for a replacement file)."""
    for required in ("id", "assets"):
        if required not in columns:
            raise SchemaError(f"{path} is not STAC-GeoParquet: no '{required}' column; {_FIX}")
    if "geometry" not in columns and "bbox" not in columns:
        raise SchemaError(f"{path}: no 'geometry' or 'bbox' column, so items have no place; {_FIX}")
    expect = {"id": ("VARCHAR",), "assets": ("STRUCT(", "MAP(")}
    if "geometry" in columns:
        expect["geometry"] = ("BLOB", "GEOMETRY")
    for name in TIME_COLUMNS:
        if name in columns:
            expect[name] = ("TIMESTAMP", "DATE", '"NULL"')
    for name, prefixes in expect.items():
        if not columns[name].upper().startswith(prefixes):
            raise SchemaError(
                f"{path}: column '{name}' is {columns[name]}, expected {' or '.join(prefixes)};"
                f" {_FIX}"
            )
    if "bbox" in columns and bbox_kind(columns["bbox"]) is None:
        raise SchemaError(
            f"{path}: column 'bbox' is {columns['bbox']}, expected a struct of xmin, ymin, "
            f"xmax, ymax or a list of 4 or 6 numbers; {_FIX}"
        )


def bbox_kind(duck_type: str) -> str | None:
    """'struct' or 'list' for a bbox column DuckDB can normalise, else None."""
    t = duck_type.upper()
    if t.startswith("STRUCT(") and all(f"{k} " in duck_type for k in ("xmin", "ymin", "xmax")):
        return "struct"
    if t.endswith("[]") and t[:-2] in ("DOUBLE", "FLOAT", "DECIMAL", "INTEGER", "BIGINT"):
        return "list"
    return None


def select(scan: str, columns: dict[str, str], bounds: str = "bounds") -> tuple[str, list[str]]:
    """The SELECT that presents `scan` in the one schema, and the columns it replaced.

    Without a bbox column the caller registers one derived from the geometry (`derive_bbox`)
    as relation `bounds`, joined by position (one row per item, in file order).
    """
    replaced: list[str] = []
    exprs: list[str] = []
    kind = bbox_kind(columns["bbox"]) if "bbox" in columns else None
    if kind == "list":
        replaced.append("bbox")
        exprs.append(
            "CASE WHEN len(bbox) = 6 THEN struct_pack(xmin := bbox[1]::DOUBLE, "
            "ymin := bbox[2]::DOUBLE, xmax := bbox[4]::DOUBLE, ymax := bbox[5]::DOUBLE) "
            "WHEN len(bbox) = 4 THEN struct_pack(xmin := bbox[1]::DOUBLE, "
            "ymin := bbox[2]::DOUBLE, xmax := bbox[3]::DOUBLE, ymax := bbox[4]::DOUBLE) "
            "END AS bbox"
        )
    elif kind == "struct" and columns["bbox"] != _CANONICAL_BBOX:
        replaced.append("bbox")
        exprs.append(
            "struct_pack(xmin := bbox.xmin::DOUBLE, ymin := bbox.ymin::DOUBLE, "
            "xmax := bbox.xmax::DOUBLE, ymax := bbox.ymax::DOUBLE) AS bbox"
        )
    for name in TIME_COLUMNS:
        # naive times are UTC (the session zone is UTC); ns/ms/s and DATE become µs TIMESTAMPTZ
        if name in columns and columns[name].upper() != "TIMESTAMP WITH TIME ZONE":
            replaced.append(name)
            exprs.append(f'CAST("{name}" AS TIMESTAMPTZ) AS "{name}"')
    star = f"* REPLACE ({', '.join(exprs)})" if exprs else "*"
    if "bbox" not in columns:
        return f"SELECT {star}, {bounds}.bbox FROM {scan} POSITIONAL JOIN {bounds}", replaced
    return f"SELECT {star} FROM {scan}", replaced


def derive_bbox(fetch_geometries: Callable[[], pa.Table]) -> pa.Table:
    """A one-column table of bbox structs from the items' WKB geometries (for files without a
    bbox column); unreadable geometries get a NaN bbox, which the catalog reports."""
    wkb = fetch_geometries().column(0).to_numpy(zero_copy_only=False)
    shapes = shapely.from_wkb(wkb, on_invalid="ignore")
    bounds = shapely.bounds(shapes)  # NaN rows for None
    fields = {
        k: bounds[:, i].astype(np.float64) for i, k in enumerate(("xmin", "ymin", "xmax", "ymax"))
    }
    return pa.table({"bbox": pa.StructArray.from_arrays(list(fields.values()), list(fields))})


def raster_bands(asset: dict[str, Any] | None, item_level: Any) -> tuple[dict, ...]:
    """`raster:bands` of one asset: the asset's own, else the item's (both places are valid
    STAC), as plain dicts with the keys present."""
    bands = (asset or {}).get("raster:bands") or item_level or ()
    return tuple({k: v for k, v in dict(b).items() if v is not None} for b in bands if b)
