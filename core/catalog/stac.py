"""Full STAC Items out of a catalog snapshot, a page at a time, for the STAC API (app.stac_api).

Why this shape:
- The read path materialises only what a read needs (`core.catalog.search`); a STAC client
  wants the item as the catalog stores it: every asset with all its fields, every property,
  `stac_extensions`, `links`. So a page is one SELECT whose rows DuckDB turns into JSON itself
  (`to_json`, in C++, off the GIL) from the snapshot's own columns — STAC-GeoParquet's layout:
  the top-level item keys as columns, every other column a property, as stac-geoparquet and
  rustac convert rows back to items.
- Paging is by key, not by offset: a page's last row (its sort values and id, a total order)
  is where the next page starts. DuckDB keeps only `limit` rows for a keyset page; an
  OFFSET deep in a large catalog would keep every row before it.
- `intersects` refines the bbox candidates with the exact footprint (shapely), candidate page
  after candidate page, as `Catalog.scan_sync` does for tiles.
- Values JSON cannot carry: NaN and infinities become "nan", "inf", "-inf" (the raster
  extension's spelling for nodata); nulls a column holds only because another item has the
  field (a struct unified across items) are dropped, as rustac does; relative asset hrefs
  are resolved against the catalog's location, as the read path resolves them, and local
  paths become file:// URIs (an href relative to, or a path on, the API's URL would point
  at this server, which does not serve the files).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.catalog import sql
from core.catalog.query import SearchError, SearchQuery, item_problem, parse_footprint
from core.catalog.snapshot import Snapshots

# STAC-GeoParquet's top-level item keys; every other column is a property
TOP_LEVEL = ("type", "stac_version", "stac_extensions", "id", "collection", "links", "assets")
# column types a page key can be bound back as (a sort on a list or struct has no key)
SORTABLE = ("VARCHAR", "BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
            "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DATE",
            "TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "TIMESTAMPTZ")  # fmt: skip
_CONSTANTS = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}
MAX_CANDIDATE_PAGE = 2_000  # rows fetched at once while `intersects` filters candidates


@dataclass
class StacPage:
    """One page of a STAC search: the items, how many match in all (None when counting would
    mean testing every footprint), and the key after which the next page starts (None: last
    page). A key is JSON-able: one value per sort term, the id last."""

    items: list[dict[str, Any]]
    matched: int | None
    next_key: list[Any] | None


class StacItems(Snapshots):
    """`stac_page` and its `_async` twin (on the search executor, never the event loop)."""

    async def stac_page_async(
        self, query: SearchQuery, limit: int, after: list[Any] | None = None
    ) -> StacPage:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.stac_page, query, limit, after)

    def stac_page(self, query: SearchQuery, limit: int, after: list[Any] | None = None) -> StacPage:
        """The first `limit` items matching `query` in its `sortby` order that come after the
        key `after` (a `StacPage.next_key` of the same query), as full STAC Item dicts
        (without the API's own links: those need the request's URL)."""
        self.reload_if_replaced()
        limit = max(1, int(limit))
        terms = sql.sort_terms(query.sortby, self.columns)
        for expr, _, kind in terms:
            if kind.upper() not in SORTABLE:
                raise SearchError(
                    f"sortby: {expr} is a {kind}; sort on a text, number or time field"
                )
        if after is not None and len(after) != len(terms):
            raise SearchError("token: it belongs to another search (sortby differs)")
        where, params = sql.where(query, self.columns)
        matched = None
        if query.intersects is None:
            row = self._fetch(f"SELECT count(*) FROM items{where}", params, query)[0]
            matched = int(row[0]) if row else 0
        select = self._item_select(terms)
        order = sql.order_by(query.sortby, self.columns)
        items: list[dict[str, Any]] = []
        keys: list[list[Any]] = []
        page = limit + 1 if query.intersects is None else min(4 * (limit + 1), MAX_CANDIDATE_PAGE)
        cursor = after
        while True:
            clause, values = where, list(params)
            if cursor is not None:
                fragment, extra = _after(terms, cursor)
                clause = (clause + " AND " if clause else " WHERE ") + fragment
                values += extra
            rows = self._fetch(
                f"SELECT {select} FROM items{clause} ORDER BY {order} LIMIT {page}", values, query
            )
            for row in rows:
                wkb, text, bbox, *key = row
                cursor = [_jsonable(v) for v in key]
                footprint = parse_footprint(wkb)
                if query.intersects is not None and (
                    footprint is None or not footprint.intersects(query.intersects)
                ):
                    continue
                items.append(self._to_stac(text, bbox, footprint))
                keys.append(cursor)
                if len(items) > limit:
                    return StacPage(items[:limit], matched, keys[limit - 1])
            if len(rows) < page:
                return StacPage(items, matched, None)

    def _item_select(self, terms: list[tuple[str, bool, str]]) -> str:
        """geometry (WKB), the item's other columns as one JSON text, the bbox, the key."""
        fields = []
        for name, kind in sql.visible(self.columns).items():
            if name in ("geometry", "bbox"):
                continue
            column = sql.quote(name)
            if kind.upper().startswith("TIMESTAMP"):
                column = _rfc3339(column)
            fields.append(f"{sql.quote(name)} := {column}")
        document = f"to_json(struct_pack({', '.join(fields)}))" if fields else "'{}'"
        geometry = "geometry::BLOB" if "geometry" in self.columns else "NULL::BLOB"
        key = ", ".join(expr for expr, _, _ in terms)
        return f"{geometry}, {document}, bbox, {key}"

    def _to_stac(
        self, text: str, bbox: dict[str, float] | None, footprint: Any | None
    ) -> dict[str, Any]:
        doc = json.loads(text, parse_constant=_CONSTANTS.__getitem__)
        box = (bbox["xmin"], bbox["ymin"], bbox["xmax"], bbox["ymax"]) if bbox else ()
        properties = {k: v for k, v in doc.items() if k not in TOP_LEVEL and v is not None}
        properties.setdefault("datetime", doc.get("datetime"))  # required, null or not
        problem = item_problem(box, footprint)
        if problem:  # shown, not hidden: the client sees why this item never draws
            properties["terrazzo:error"] = problem
        assets = {}
        for name, asset in (doc.get("assets") or {}).items():
            if not isinstance(asset, dict):
                continue
            asset = _drop_nulls(asset)
            if isinstance(asset.get("href"), str):
                asset["href"] = _uri(self.source.resolve_href(asset["href"]))
            assets[name] = asset
        item: dict[str, Any] = {
            "type": doc.get("type") or "Feature",
            "stac_version": doc.get("stac_version") or "1.1.0",
            "stac_extensions": list(doc.get("stac_extensions") or []),
            "id": doc["id"],
            "geometry": footprint.__geo_interface__ if footprint is not None else None,
            "bbox": list(box) if len(box) == 4 and all(map(math.isfinite, box)) else None,
            "properties": properties,
            "links": [
                _drop_nulls(link) for link in doc.get("links") or [] if isinstance(link, dict)
            ],
            "assets": assets,
        }
        if doc.get("collection") is not None:
            item["collection"] = doc["collection"]
        return item


def _uri(href: str) -> str:
    """A local path as a file:// URI: STAC clients (pystac) resolve a bare path against the
    item's self link, which is this server's URL."""
    return Path(href).as_uri() if href.startswith("/") else href


def _rfc3339(column: str) -> str:
    """A time column as STAC writes it: UTC, `Z`, fractional seconds only when there are."""
    return (
        f"CASE WHEN microsecond({column}) % 1000000 = 0"
        f" THEN strftime({column}, '%Y-%m-%dT%H:%M:%SZ')"
        f" ELSE strftime({column}, '%Y-%m-%dT%H:%M:%S.%fZ') END"
    )


def _after(terms: list[tuple[str, bool, str]], key: list[Any]) -> tuple[str, list[Any]]:
    """SQL for "this row sorts strictly after `key`" under ORDER BY `terms` NULLS LAST: the
    lexicographic comparison, term by term (a NULL sorts after every value)."""
    (expr, descending, kind), value = terms[-1], key[-1]
    if value is None:
        raise SearchError("token: not a valid page token (no id)")
    text, params = f"{expr} {'<' if descending else '>'} ?::{kind}", [value]
    for (expr, descending, kind), value in zip(
        reversed(terms[:-1]), reversed(key[:-1]), strict=True
    ):
        if value is None:  # after a NULL only NULLs, then by the terms that follow
            text = f"({expr} IS NULL AND {text})"
        else:
            op = "<" if descending else ">"
            text = f"({expr} {op} ?::{kind} OR {expr} IS NULL OR ({expr} = ?::{kind} AND {text}))"
            params = [value, value, *params]
    return text, params


def _jsonable(value: Any) -> Any:
    """A sort value as it travels in a page token (times in ISO 8601, bound back by type)."""
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)  # Decimal, UUID: DuckDB casts the text back


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value
