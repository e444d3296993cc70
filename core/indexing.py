"""Turn STAC item JSON into a spatially sorted STAC-GeoParquet index.

The service answers every tile request with a bbox query on this file, so its layout matters:
items are ordered along a Hilbert curve so that each row group covers a compact area and
DuckDB can skip most row groups from their bbox statistics. The file is written to a temp
path and renamed into place so a running server never reads a half-written index.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rustac
import shapely.geometry

HILBERT_ORDER = 16  # 2^16 × 2^16 grid over the items' extent
_NDJSON_SUFFIXES = {".ndjson", ".jsonl", ".geojsonl", ".geojsonseq"}
_EXPECTED = "a STAC Item, an ItemCollection/FeatureCollection with 'features', or NDJSON Items"


def hilbert_index(x: np.ndarray, y: np.ndarray, order: int = HILBERT_ORDER) -> np.ndarray:
    """Hilbert curve distance of integer cells (x, y) in [0, 2**order), vectorised.

    Classic xy→d: at each level take the quadrant bits, add the quadrant's offset, then
    rotate/flip the remaining low bits so the sub-curve is oriented like the parent.
    """
    n = 1 << order
    x = np.asarray(x, dtype=np.int64).copy()
    y = np.asarray(y, dtype=np.int64).copy()
    if x.size and (x.min() < 0 or y.min() < 0 or x.max() >= n or y.max() >= n):
        raise ValueError(f"hilbert_index inputs must lie in [0, {n})")
    d = np.zeros(x.shape, dtype=np.int64)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.astype(np.int64)) ^ ry.astype(np.int64))
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = np.where(swap, y, x), np.where(swap, x, y)
        s >>= 1
    return d


def _parse_items(source: Path) -> list[dict[str, Any]]:
    """Items from a JSON Item/FeatureCollection/list or from NDJSON (one item per line)."""
    text = source.read_text(encoding="utf-8")
    docs: list[Any]
    if source.suffix.lower() in _NDJSON_SUFFIXES:
        docs = _ndjson(text, source)
    else:
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            docs = _ndjson(text, source)  # several documents: treat as NDJSON
        else:
            if isinstance(whole, list):
                docs = whole
            elif isinstance(whole, dict) and "features" in whole:
                docs = whole["features"]
            else:
                docs = [whole]
    if not docs:
        raise ValueError(f"{source}: no items found; expected {_EXPECTED}")
    for i, doc in enumerate(docs):
        if not (isinstance(doc, dict) and doc.get("type") == "Feature" and "id" in doc):
            kind = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(
                f"{source}: entry {i} is not a STAC Item (type={kind!r}); expected {_EXPECTED}"
            )
        if not isinstance(doc.get("properties"), dict) or doc.get("geometry") is None:
            raise ValueError(
                f"{source}: item {doc['id']!r} lacks geometry or properties; expected {_EXPECTED}"
            )
    return docs


def _ndjson(text: str, source: Path) -> list[Any]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{source}:{lineno}: not valid JSON ({exc.msg}); expected {_EXPECTED}"
            ) from exc
    return docs


def _rebase_href(href: str, source_dir: Path, out_dir: Path) -> str:
    """Resolve a relative href from the source; keep it relative only if under ``out_dir``.

    Relative hrefs under the index directory keep a catalog portable (copy the folder, it
    still works); anything else becomes absolute so moving the index cannot break it.
    """
    if "://" in href:
        return href
    path = Path(os.path.abspath(source_dir / href))
    if path.is_relative_to(out_dir):
        return path.relative_to(out_dir).as_posix()
    return path.as_posix()


def _rebase_item(item: dict[str, Any], source_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Copy of ``item`` with rebased hrefs and a bbox (the index's search column)."""
    item = dict(item)
    if not item.get("bbox"):
        item["bbox"] = list(shapely.geometry.shape(item["geometry"]).bounds)
    item["assets"] = {
        key: {**asset, "href": _rebase_href(asset["href"], source_dir, out_dir)}
        if isinstance(asset, dict) and isinstance(asset.get("href"), str)
        else asset
        for key, asset in (item.get("assets") or {}).items()
    }
    # A self link from the source file would be wrong in the index; other links are rebased.
    item["links"] = [
        {**link, "href": _rebase_href(link["href"], source_dir, out_dir)}
        for link in item.get("links") or []
        if isinstance(link, dict) and link.get("rel") != "self" and "href" in link
    ]
    return item


def _bbox(item: dict[str, Any]) -> tuple[float, float, float, float]:
    bbox = item.get("bbox")
    if bbox and len(bbox) in (4, 6):
        if len(bbox) == 6:
            return bbox[0], bbox[1], bbox[3], bbox[4]
        return tuple(bbox)  # type: ignore[return-value]
    return shapely.geometry.shape(item["geometry"]).bounds


def _timestamp(item: dict[str, Any]) -> float:
    """Item time as epoch seconds (datetime, else start_datetime); -inf when missing."""
    props = item["properties"]
    value = props.get("datetime") or props.get("start_datetime")
    if not value:
        return float("-inf")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise ValueError(f"item {item['id']!r}: datetime {value!r} is not ISO 8601") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def spatial_keys(bounds: np.ndarray) -> np.ndarray:
    """Hilbert keys of the centres of (n, 4) boxes, on a grid over their common extent."""
    cx = (bounds[:, 0] + bounds[:, 2]) / 2
    cy = (bounds[:, 1] + bounds[:, 3]) / 2
    top = (1 << HILBERT_ORDER) - 1

    def to_grid(v: np.ndarray) -> np.ndarray:
        span = v.max() - v.min()
        if span <= 0:
            return np.zeros(v.shape, dtype=np.int64)
        return np.floor((v - v.min()) / span * top).astype(np.int64)

    return hilbert_index(to_grid(cx), to_grid(cy))


def sort_items(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order items by Hilbert key of their bbox centre, newest first among equal keys."""
    keys = spatial_keys(np.array([_bbox(it) for it in items], dtype=np.float64))
    newest_first = -np.array([_timestamp(it) for it in items])
    order = np.lexsort((newest_first, keys))  # last key is the primary one
    return [items[i] for i in order]


def _rustac_table(items: list[dict[str, Any]], raw: Path, source: Path) -> pa.Table:
    """STAC-GeoParquet of `items` as one arrow table, written by rustac.

    rustac 0.9 cannot write one file of items whose properties differ in shape (e.g.
    `proj:geometry` on only some items, as rio-stac writes it: "all columns in a record batch
    must have the same length"), so then each group of items with the same property keys is
    written on its own and the tables are concatenated with their schemas unified.
    """
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    try:
        rustac.write_sync(str(raw), items, format="geoparquet")
        tables = [_read_with_metadata(raw)]
    except rustac.RustacError as exc:
        for item in items:
            groups.setdefault(tuple(sorted(item.get("properties", {}))), []).append(item)
        if len(groups) == 1:
            raise ValueError(
                f"cannot write STAC-GeoParquet from {source}: {exc} "
                "(check that every item's datetime is RFC 3339, e.g. 2024-06-01T00:00:00Z)"
            ) from exc
        tables = []
        for group in groups.values():
            try:
                rustac.write_sync(str(raw), group, format="geoparquet")
            except rustac.RustacError as inner:
                raise ValueError(
                    f"cannot write STAC-GeoParquet from {source}: {inner} (items "
                    f"{group[0]['id']!r}...; check their datetimes are RFC 3339)"
                ) from inner
            tables.append(_read_with_metadata(raw))
    table = pa.concat_tables(tables, promote_options="permissive")
    if len(tables) > 1:  # back to the items' (Hilbert) order, which row-group pruning needs
        position = {item["id"]: i for i, item in enumerate(items)}
        order = np.argsort([position[i] for i in table.column("id").to_pylist()], kind="stable")
        table = table.take(pa.array(order))
    return table.replace_schema_metadata(tables[0].schema.metadata)


def _read_with_metadata(path: Path) -> pa.Table:
    """rustac stores `geo`/`stac-geoparquet` as file key-value metadata that pyarrow does not
    surface on the arrow schema, so carry them over explicitly."""
    parquet = pq.ParquetFile(path)
    file_meta = {k: v for k, v in (parquet.metadata.metadata or {}).items() if k != b"ARROW:schema"}
    table = parquet.read()
    parquet.close()
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **file_meta})


def index_items(source: Path, out: Path, *, row_group_size: int = 5000) -> int:
    """Index STAC items from ``source`` (JSON or NDJSON) into STAC-GeoParquet at ``out``.

    Returns the number of items written. rustac produces the STAC-GeoParquet encoding (bbox
    struct covering, WKB geometry, ``geo`` metadata); pyarrow then rewrites it with bounded
    row groups, because rustac writes one big group and pruning needs many small ones.
    """
    source = Path(source)
    out = Path(out)
    if row_group_size < 1:
        raise ValueError("row_group_size must be positive")
    out_dir = Path(os.path.abspath(out.parent))
    source_dir = Path(os.path.abspath(source.parent))
    items = [_rebase_item(it, source_dir, out_dir) for it in _parse_items(source)]
    items = sort_items(items)

    out_dir.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    raw = out_dir / f".{out.name}.{token}.raw.parquet"
    staged = out_dir / f".{out.name}.{token}.tmp.parquet"
    try:
        table = _rustac_table(items, raw, source)
        pq.write_table(table, staged, row_group_size=row_group_size, compression="zstd")
        os.replace(staged, out)
    finally:
        raw.unlink(missing_ok=True)
        staged.unlink(missing_ok=True)
    return len(items)
