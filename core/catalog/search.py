"""Item searches over a catalog snapshot: bbox candidates in mosaic order, the exact
footprint test, TiTiler-pgstac's search limits.

Why this shape:
- DuckDB runs the query without the GIL, but a connection serves one query at a time, so each
  worker thread of a dedicated ThreadPoolExecutor holds its own cursor (thread-local).
- Coroutines call `search`/`scan`, which hop to that pool with `loop.run_in_executor`; the
  event loop never runs SQL.
- The flat bbox columns of the spatially sorted snapshot let zone maps prune row groups; the
  exact footprint test (shapely on the WKB geometry) runs only on the few candidates, and
  only those rows are materialised as items.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from typing import Any

from shapely.geometry.base import BaseGeometry

from core import schema
from core.catalog import sql
from core.catalog.prefilter import DEFAULT_SORT, MAX_ROWS, Prefilter
from core.catalog.query import (
    DEFAULT_LIMIT,
    Item,
    SearchQuery,
    SearchResult,
    item_problem,
    parse_footprint,
)
from core.catalog.snapshot import Snapshots
from core.cover import Coverage


class Searching(Snapshots):
    """`search`, `scan` and their sync forms, over the snapshot in use."""

    _prefilter: Prefilter | None = None  # the arrays of the snapshot they were built from
    _prefilter_skipped: str | None = None  # a snapshot too large for them

    async def search(self, query: SearchQuery) -> list[Item]:
        """Run `query` on a search worker thread; never on the event loop."""
        return (await self.scan(query)).items

    async def scan(self, query: SearchQuery) -> SearchResult:
        """`search` with how it ended (truncated, full, rows scanned)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.scan_sync, query)

    async def check(self, query: SearchQuery) -> None:
        """Raise what `query` would raise (unknown sortby field, a filter on a missing column
        or a value its column cannot hold) without searching: one request's worth of chunks
        then fails once, up front, not chunk by chunk.

        No filter and the default order: nothing the SQL could refuse, so no query (it was a
        thread hop and a DuckDB round in series before every POST /chunks' first read)."""
        if query.filter is None and query.intersects is None and query.sortby == DEFAULT_SORT:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.check_sync, query)

    def check_sync(self, query: SearchQuery) -> None:
        text, params = self._build_sql(query)
        self._fetch(f"{text} LIMIT 0", params, query)

    def search_sync(self, query: SearchQuery) -> list[Item]:
        return self.scan_sync(query).items

    def scan_sync(self, query: SearchQuery) -> SearchResult:
        """Candidates (bbox matches) in sort order, page after page, until `limit` items pass
        the exact footprint test. A page that loses every candidate to the footprint test
        never hides an older item that truly covers the area: the next page is read.

        With `skipcovered`, an item whose footprint adds no point of `intersects` to those the
        newer ones cover is left out; with `exitwhenfull` the search ends once every point is
        covered (core.cover samples the area). Footprints are only a guide: the engine fills
        what they promised and did not hold (core.engine.Engine.complete).
        `truncated` is set whenever a matching item was left out by a limit. The candidates
        come from `_candidates` (the prefilter's cache or DuckDB: the same rows in the same
        order).
        """
        self.reload_if_replaced()
        limit = DEFAULT_LIMIT if query.limit is None else max(0, int(query.limit))
        deadline = None if query.time_limit is None else time.monotonic() + query.time_limit
        area = query.intersects
        cover = (
            Coverage(area)
            if area is not None and (query.skipcovered or query.exitwhenfull)
            else None
        )
        result = SearchResult(items=[])
        for item, footprint in self._candidates(query, limit):
            if query.scan_limit is not None and result.scanned >= query.scan_limit:
                result.truncated = f"scan_limit: {query.scan_limit} candidates scanned"
                return result
            if deadline is not None and time.monotonic() > deadline:
                result.truncated = f"time_limit: search stopped after {query.time_limit} s"
                return result
            result.scanned += 1
            points = None  # the cover samples this item's footprint holds
            if area is not None and item.error is None:
                assert footprint is not None  # else item.error says so
                if not footprint.intersects(area):
                    continue
                if cover is not None:
                    points = cover.points(footprint)
                    if query.skipcovered and not cover.adds(points):
                        result.covered_skips += 1
                        continue
            if len(result.items) >= limit:
                result.truncated = f"items_limit: more than {limit} items match"
                return result
            result.items.append(item)
            if cover is not None:
                cover.add(points)
                if query.exitwhenfull and cover.full:
                    result.full = True
                    return result
        return result

    def prefilter(self) -> Prefilter | None:
        """The arrays of the snapshot in use (core.catalog.prefilter), built on first use
        (below MAX_ROWS rows): None for a larger catalog, whose searches all run in DuckDB."""
        alias = self._attached[-1][0]
        index = self._prefilter
        if index is not None and index.alias == alias:
            return index
        if self._prefilter_skipped == alias:
            return None
        cursor = self._cursor()
        (rows,) = cursor.execute(f"SELECT count(*) FROM {alias}.items").fetchone() or (0,)
        if rows > MAX_ROWS:
            self._prefilter_skipped = alias
            return None
        self._prefilter = index = Prefilter(cursor, alias, self.columns)
        return index

    def _candidates(
        self, query: SearchQuery, limit: int
    ) -> Iterator[tuple[Item, BaseGeometry | None]]:
        """The bbox candidates of `query` in sort order, as items with their footprints:
        from the prefilter's cache as far as it holds them, then from DuckDB page after page
        (a small first page: with exitwhenfull a tile is often full after a few items, and
        each row fetched is converted to Python; pages grow fourfold after that)."""
        index = self.prefilter() if Prefilter.serves(query) else None
        assets = self._assets_expr(query.assets)
        table, offset = "items", 0
        if index is not None:
            rowids = index.candidates(query)
            hit = index.cached(rowids, assets)
            yield from hit
            if len(hit) == len(rowids):
                return
            table = f"{index.alias}.items"  # the rows of the arrays' snapshot, with rowid
            offset = len(hit)  # the same candidates in the same order: the rest from SQL
        text, params = self._build_sql(query, table=table, rowid=index is not None)
        page = min(limit, 24) + 8
        while True:
            rows = self._fetch(f"{text} LIMIT {page} OFFSET {offset}", params, query)
            for row in rows:
                if index is not None:
                    rowid, *rest = row
                    row = tuple(rest)
                footprint = parse_footprint(row[5])
                item = self._to_item(row, footprint)
                if index is not None:
                    index.keep(rowid, assets, (item, footprint))
                yield item, footprint
            if len(rows) < page:
                return
            offset += page
            page *= 4

    def _build_sql(
        self, query: SearchQuery, table: str = "items", rowid: bool = False
    ) -> tuple[str, list[Any]]:
        where, params = sql.where(query, self.columns)
        props = self._property_columns()
        select = ", ".join(
            ["rowid"] * rowid
            + [
                "id",
                sql.collection_expr(self.columns),
                sql.datetime_expr(self.columns),
                "bbox",
                self._assets_expr(query.assets),
                "geometry::BLOB",
            ]
            + [sql.quote(p) for p in props]
        )
        text = f"SELECT {select} FROM {table}{where}"
        return text + " ORDER BY " + sql.order_by(query.sortby, self.columns), params

    def _assets_expr(self, wanted: tuple[str, ...]) -> str:
        """The `assets` a search materialises: only the ones the read needs when it says
        (turning DuckDB's nested asset structs — raster:bands lists above all — into Python
        is most of a search's time: 8 assets cost ~250 µs per row, 2 a quarter of that)."""
        known = [a for a in wanted if a in self.asset_names]
        if not wanted or not known:
            return "assets"
        fields = ", ".join(f"{sql.quote(a)} := assets.{sql.quote(a)}" for a in known)
        return f"struct_pack({fields})"

    def _property_columns(self) -> list[str]:
        return [c for c in ("proj:code", "proj:epsg", "raster:bands") if c in self.columns]

    def _to_item(self, row: tuple[Any, ...], footprint: BaseGeometry | None) -> Item:
        item_id, collection, when, bbox, assets, _wkb, *props = row
        names = self._property_columns()
        box = (bbox["xmin"], bbox["ymin"], bbox["xmax"], bbox["ymax"]) if bbox else (math.nan,) * 4
        properties = dict(zip(names, props, strict=True))
        return Item(
            id=item_id,
            collection=collection,
            datetime=when,
            error=item_problem(box, footprint),
            bbox=box,
            assets={
                name: self.source.resolve_href(asset["href"])
                for name, asset in (assets or {}).items()
                if asset is not None and asset.get("href")
            },
            properties=properties,
            raster_bands={
                name: schema.raster_bands(asset, properties.get("raster:bands"))
                for name, asset in (assets or {}).items()
                if asset is not None
            },
        )
