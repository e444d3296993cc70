"""Search stage: DuckDB item searches over a STAC-GeoParquet file.

Why this shape:
- DuckDB runs the query without the GIL, but a connection serves one query at a time, so each
  worker thread of a dedicated ThreadPoolExecutor holds its own cursor (thread-local).
- Coroutines call `Catalog.search`, which hops to that pool with `loop.run_in_executor`; the event
  loop never runs SQL.
- The bbox struct columns give a cheap prefilter that prunes row groups of a spatially sorted
  file; the exact footprint test (shapely on the WKB geometry) runs only on the few candidates.
- Every user value is a bound parameter; identifiers (sort fields) are checked against the
  file's own columns before they are quoted into SQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import duckdb
import shapely
from shapely.geometry.base import BaseGeometry

from core import filters, schema
from core.cover import Coverage

IMAGE_MEDIA_PREFIX = "image/tiff"
log = logging.getLogger("terrazzo.catalog")


@dataclass(frozen=True)
class Item:
    """The part of a STAC item the read path needs: where its pixels are and when."""

    id: str
    collection: str | None
    datetime: dt.datetime | None
    bbox: tuple[float, float, float, float]
    assets: dict[str, str]  # asset name -> absolute href (relative hrefs resolved)
    properties: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # content that cannot be served (bad geometry, bbox): an item error
    # per asset, its `raster:bands` (the asset's own, else the item's): nodata, scale, offset...
    raster_bands: dict[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchQuery:
    """An item search. `bbox` is lon/lat; `intersects` (lon/lat) refines it exactly."""

    bbox: tuple[float, float, float, float] | None = None
    intersects: BaseGeometry | None = None
    datetime: tuple[dt.datetime | None, dt.datetime | None] | None = None
    collections: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    sortby: tuple[str, ...] = ("-datetime",)
    limit: int | None = None  # items returned at most (items_limit); None: DEFAULT_LIMIT
    filter: dict[str, Any] | None = None  # CQL2-JSON, already parsed (core.filters.parse)
    # TiTiler-pgstac's search limits, same meaning; they need `intersects` (the area to fill)
    scan_limit: int | None = None  # candidate rows looked at, at most
    time_limit: float | None = None  # seconds the search may take
    # None: the caller's default (the engine turns both on for method `first`; the catalog off)
    exitwhenfull: bool | None = None  # stop once the footprints so far cover `intersects`
    skipcovered: bool | None = None  # leave out items whose footprint newer ones already cover

    def __post_init__(self) -> None:
        """Bounded before any SQL is built: every id and collection becomes a bound value."""
        for name, values, limit in (
            ("ids", self.ids, MAX_IDS),
            ("collections", self.collections, MAX_COLLECTIONS),
            ("sortby", self.sortby, MAX_SORT_FIELDS),
        ):
            if len(values) > limit:
                raise SearchError(f"{name}: at most {limit} per request, got {len(values)}")
        if self.bbox is not None and not all(math.isfinite(v) for v in self.bbox):
            raise SearchError(f"bbox: every coordinate must be a finite number, got {self.bbox}")
        for name, value in (("items_limit", self.limit), ("scan_limit", self.scan_limit)):
            if value is not None and value < 1:
                raise SearchError(f"{name}: must be at least 1, got {value}")
        if self.time_limit is not None and not (self.time_limit > 0):
            raise SearchError(
                f"time_limit: must be a positive number of seconds, got {self.time_limit}"
            )


@dataclass
class SearchResult:
    """The items a search returned and how it ended: `truncated` says why items that match
    were left out ("" when none were); `full` says it stopped because `intersects` was covered.
    """

    items: list[Item]
    scanned: int = 0  # candidate rows looked at (bbox matches, in sort order)
    covered_skips: int = 0  # items left out because newer footprints already cover them
    full: bool = False
    truncated: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "returned": len(self.items),
            "scanned": self.scanned,
            "skipped_covered": self.covered_skips,
            "full": self.full,
            "truncated": self.truncated or None,
        }


DEFAULT_LIMIT = 100  # items of a search that names no limit
MAX_IDS = 1_000  # item ids in one search
MAX_COLLECTIONS = 100  # collection ids in one search
MAX_SORT_FIELDS = 8  # sortby fields


class SearchError(ValueError):
    """A search parameter the catalog cannot honour (e.g. sorting by a missing column)."""


def parse_datetime_range(value: str) -> tuple[dt.datetime | None, dt.datetime | None]:
    """Parse a STAC/TiTiler `datetime` parameter: an instant, or `start/end` with `..` open ends.

    A bare date (`2024-06-01`) means the whole day, as users expect.
    """

    def one(text: str, *, end: bool) -> dt.datetime | None:
        text = text.strip()
        if text in ("", ".."):
            return None
        try:
            if len(text) == 10:
                day = dt.date.fromisoformat(text)
                moment = dt.datetime.combine(day, dt.time.max if end else dt.time.min)
            else:
                moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise SearchError(
                f"datetime: {text!r} is not an RFC 3339 date or date-time "
                "(e.g. 2024-06-01 or 2024-06-01T00:00:00Z, ranges as start/end with '..')"
            ) from exc
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)

    if "/" in value:
        start_text, end_text = value.split("/", 1)
        start, end = one(start_text, end=False), one(end_text, end=True)
    else:
        start, end = one(value, end=False), one(value, end=True)
        if start is not None and len(value.strip()) > 10:
            end = start
    if start and end and start > end:
        raise SearchError(f"datetime: start {start.isoformat()} is after end {end.isoformat()}")
    return start, end


class Catalog:
    """A STAC-GeoParquet file opened for concurrent searches."""

    def __init__(self, path: Path | str, *, threads: int = 2, in_memory: bool = False) -> None:
        self.path = Path(path).resolve()
        self.in_memory = in_memory
        self._generation = 0
        if not self.path.is_file():
            raise FileNotFoundError(f"catalog not found: {self.path}")
        self._root = duckdb.connect(config={"threads": 1})
        # metadata cache: row-group statistics are parsed once, not on every search
        self._root.execute("SET parquet_metadata_cache = true")
        # Geometries stay WKB bytes: DuckDB's GeoParquet conversion parses every geometry at
        # load and one garbage WKB fails the whole catalog; shapely checks each item instead.
        self._root.execute("SET enable_geoparquet_conversion = false")
        # TIMESTAMPTZ values reach Python in the session's zone, the machine's by default:
        # UTC, so a server under TZ=Asia/Tokyo labels an item 23:00Z as 23:00Z
        self._root.execute("SET TimeZone = 'UTC'")
        self._fds: list[int] = []
        self._stamp = self._open_snapshot()
        self._checked = time.monotonic()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="terrazzo-search")
        self.asset_names: tuple[str, ...] = self._asset_names()
        self.default_assets: tuple[str, ...] = self._default_assets()

    # -- lifecycle ---------------------------------------------------------------------------

    def _open_snapshot(self) -> tuple[int, int]:
        """Point the `items` view at the catalog: a table loaded in memory (`in_memory`:
        ~6x the file size in RAM, searches ~10x faster at 1M items), or the file itself
        through an open descriptor.

        Either way the view keeps what was validated even after the path is replaced (reading
        through /proc/self/fd); a new file is only taken by `reload_if_replaced`.
        """
        fd = os.open(self.path, os.O_RDONLY)
        source = f"/proc/self/fd/{fd}" if os.path.exists(f"/proc/self/fd/{fd}") else str(self.path)
        scan = f"read_parquet('{_sql_string(source)}')"
        self._generation += 1
        bounds = f"bounds_{self._generation}"
        try:
            raw = self._describe(f"SELECT * FROM {scan}")
            schema.check(self.path, raw)
            normalised, _ = schema.select(scan, raw, bounds)
            if "bbox" not in raw:  # only a geometry: derive each item's bbox from it
                derived = schema.derive_bbox(
                    lambda: self._root.execute(
                        f"SELECT geometry::BLOB FROM {scan}"
                    ).to_arrow_table()
                )
                # a table, not a registered view: every search thread's cursor must see it
                self._root.register("derived_bbox", derived)
                self._root.execute(f"CREATE TABLE {bounds} AS SELECT * FROM derived_bbox")
                self._root.unregister("derived_bbox")
            if self.in_memory:
                table = f"items_{self._generation}"
                self._root.execute(f"CREATE TABLE {table} AS {normalised}")
                self._root.execute(f"CREATE OR REPLACE VIEW items AS SELECT * FROM {table}")
                # the table before last goes; the last one may still serve running searches
                if self._generation > 2:
                    self._root.execute(f"DROP TABLE IF EXISTS items_{self._generation - 2}")
            else:
                self._root.execute(f"CREATE OR REPLACE VIEW items AS {normalised}")
            columns = self._describe("SELECT * FROM items")
        except duckdb.Error as exc:
            os.close(fd)
            reason = str(exc).splitlines()[0]
            raise schema.SchemaError(f"{self.path}: cannot be read ({reason})") from exc
        except Exception:
            os.close(fd)
            raise
        self.columns = columns
        self._fds.append(fd)
        while len(self._fds) > 2:  # the previous file stays open for queries still running
            os.close(self._fds.pop(0))
        st = os.fstat(fd)
        return (st.st_ino, st.st_mtime_ns)

    def _describe(self, sql: str) -> dict[str, str]:
        return {row[0]: row[1] for row in self._root.execute(f"DESCRIBE {sql}").fetchall()}

    async def version_async(self) -> str:
        """Which catalog file is in use (inode and mtime), after taking a replaced one: part of
        every tile's ETag, so a new catalog changes them all. On a search thread, as the
        reload reads the file."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.reload_if_replaced)
        return f"{self._stamp[0]:x}-{self._stamp[1]:x}"

    def reload_if_replaced(self, every_s: float = 1.0) -> bool:
        """Switch to a catalog file that replaced ours (e.g. `terrazzo index` renames its
        output into place), once it validates; a broken or half-written file is ignored and
        the one in use is kept. Checked at most every `every_s` seconds."""
        now = time.monotonic()
        if now - self._checked < every_s:
            return False
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError:
            return False
        if (st.st_ino, st.st_mtime_ns) == self._stamp:
            return False
        with self._lock:
            try:
                self._stamp = self._open_snapshot()
            except Exception as exc:
                log.warning(
                    "catalog %s changed but does not read (%s); keeping the old one", self.path, exc
                )
                self._stamp = (st.st_ino, st.st_mtime_ns)  # do not retry until it changes again
                return False
            self.asset_names = self._asset_names()
            self.default_assets = self._default_assets()
        count, examples = self.problems()
        log.warning(
            "catalog %s reloaded; %d items cannot be served%s",
            self.path,
            count,
            "".join(f"; {i}: {why}" for i, why in examples),
        )
        return True

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for cursor in self._cursors:
            cursor.close()
        self._root.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor: a DuckDB connection runs one query at a time."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._lock:
                cursor = self._root.cursor()
                cursor.execute("SET TimeZone = 'UTC'")  # per connection, like the root's
                self._cursors.append(cursor)
            self._local.cursor = cursor
        return cursor

    # -- searching ---------------------------------------------------------------------------

    async def search(self, query: SearchQuery) -> list[Item]:
        """Run `query` on a search worker thread; never on the event loop."""
        return (await self.scan(query)).items

    async def scan(self, query: SearchQuery) -> SearchResult:
        """`search` with how it ended (truncated, full, rows scanned)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.scan_sync, query)

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
        `truncated` is set whenever a matching item was left out by a limit.
        """
        self.reload_if_replaced()
        limit = DEFAULT_LIMIT if query.limit is None else max(0, int(query.limit))
        sql, params = self._build_sql(query)
        deadline = None if query.time_limit is None else time.monotonic() + query.time_limit
        area = query.intersects
        cover = (
            Coverage(area)
            if area is not None and (query.skipcovered or query.exitwhenfull)
            else None
        )
        result = SearchResult(items=[])
        page, offset = limit * 2 + 8, 0
        while True:
            rows = self._fetch(f"{sql} LIMIT {page} OFFSET {offset}", params, query)
            for row in rows:
                if query.scan_limit is not None and result.scanned >= query.scan_limit:
                    result.truncated = f"scan_limit: {query.scan_limit} candidates scanned"
                    return result
                if deadline is not None and time.monotonic() > deadline:
                    result.truncated = f"time_limit: search stopped after {query.time_limit} s"
                    return result
                result.scanned += 1
                footprint = _footprint(row[5])
                item = self._to_item(row, footprint)
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
            if len(rows) < page:
                return result
            offset += page
            page *= 4

    def _fetch(self, sql: str, params: list[Any], query: SearchQuery) -> list[tuple[Any, ...]]:
        """Run a search on this thread's cursor. A filter's values reach DuckDB as bound
        parameters, so a value DuckDB cannot cast (`eo:cloud_cover < 'x'`) fails here: that is
        the user's filter, a 400 that quotes DuckDB's reason, not a server error."""
        try:
            return self._cursor().execute(sql, params).fetchall()
        except (
            duckdb.ConversionException,
            duckdb.BinderException,
            duckdb.InvalidInputException,
        ) as exc:
            if query.filter is None:
                raise
            reason = str(exc).splitlines()[0]
            raise filters.FilterError(f"filter: the catalog cannot evaluate it ({reason})") from exc

    def _build_sql(self, query: SearchQuery) -> tuple[str, list[Any]]:
        where, params = self._where(query)
        props = self._property_columns()
        select = ", ".join(
            [
                "id",
                _collection_expr(self.columns),
                _datetime_expr(self.columns),
                "bbox",
                "assets",
                "geometry::BLOB",
            ]
            + [_quote(p) for p in props]
        )
        sql = f"SELECT {select} FROM items{where}"
        sql += " ORDER BY " + self._order_by(query.sortby)
        return sql, params

    def _order_by(self, sortby: Sequence[str]) -> str:
        terms = []
        for key in sortby:
            key = key.strip()
            if not key:
                continue
            descending = key.startswith("-")
            name = key.lstrip("+-")
            name = name.removeprefix("properties.")
            if name not in self.columns and name != "datetime":  # datetime: always (see below)
                raise SearchError(
                    f"sortby: unknown field {name!r}; sortable fields: {sorted(self.columns)}"
                )
            # an item without a datetime is ordered by its start_datetime, the time it is
            # labelled with (as pgstac orders): the newest range on top, not the oldest id
            column = _datetime_expr(self.columns) if name == "datetime" else _quote(name)
            terms.append(f"{column} {'DESC' if descending else 'ASC'} NULLS LAST")
        terms.append("id ASC")  # a total order: the same tile is always mosaicked the same way
        return ", ".join(terms)

    def _time_columns(self) -> tuple[str, str]:
        """Columns bounding an item's time: start/end_datetime when present, else datetime."""
        if "start_datetime" in self.columns and "end_datetime" in self.columns:
            return ("COALESCE(start_datetime, datetime)", "COALESCE(end_datetime, datetime)")
        return ("datetime", "datetime")

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
                name: self.resolve_href(asset["href"])
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

    def resolve_href(self, href: str) -> str:
        """Relative hrefs are relative to the catalog file's directory."""
        if "://" in href or href.startswith("/"):
            return href
        # normalised, not resolved: symlinks stay visible to the access policy
        return os.path.abspath(self.path.parent / href)

    # -- summaries ---------------------------------------------------------------------------

    def href_dirs(self) -> list[tuple[str, int, str, str]]:
        """(directory or URL prefix of asset hrefs, item count, an item id, an href), for the
        access policy's defaults and its start-up report (one row per directory, not per item)."""
        rows: list[tuple[str, int, str, str]] = []
        for name in self.asset_names:
            column = f"assets.{_quote(name)}.href"
            rows += self._root.execute(
                f"SELECT regexp_extract({column}, '^(.*)/', 1) AS dir, count(*), min(id),"
                f" min({column}) FROM items WHERE {column} IS NOT NULL GROUP BY dir"
            ).fetchall()
        return [(d, n, i, self.resolve_href(h)) for d, n, i, h in rows]

    async def report_async(self) -> str:
        """The start-up lines about the catalog's own items (see `problems`)."""
        loop = asyncio.get_running_loop()
        count, examples = await loop.run_in_executor(self._executor, self.problems)
        lines = [f"items that cannot be served (catalog content): {count}"]
        lines += [f"  {item_id}: {why}" for item_id, why in examples]
        return "\n".join(lines)

    def problems(self, examples: int = 5) -> tuple[int, list[tuple[str, str]]]:
        """Items whose own content cannot be served — (how many, a few (id, why)) — for the
        start-up report. One vectorised pass in DuckDB (no per-item Python): a missing id,
        a bbox that is not four finite numbers, a missing or non-WKB geometry (its header
        bytes; a garbage body is caught per item by the search), a datetime Python cannot
        hold, an href with a NUL byte. Such items stay item errors wherever they match."""
        box = " AND ".join(f"isfinite(bbox.{k})" for k in ("xmin", "ymin", "xmax", "ymax"))
        checks = [
            ("id IS NULL", "no id"),
            (f"bbox IS NULL OR NOT ({box})", "bbox is not four finite numbers"),
            (
                "geometry IS NULL OR octet_length(geometry::BLOB) < 9"
                " OR hex((geometry::BLOB)[1:1]) NOT IN ('00', '01')",
                "geometry is missing or not WKB",
            ),
        ]
        for name in ("datetime", "start_datetime", "end_datetime"):
            if name in self.columns and self.columns[name].upper().startswith("TIMESTAMP"):
                checks.append(
                    (f"{name} NOT BETWEEN {_TIME_MIN} AND {_TIME_MAX}", f"{name} out of range")
                )
        for name in self.asset_names:
            checks.append(
                (f"contains(assets.{_quote(name)}.href, chr(0))", f"asset {name}: NUL in href")
            )
        reason = "CASE " + " ".join(f"WHEN {c} THEN '{_sql_string(w)}'" for c, w in checks)
        rows = self._root.execute(
            f"SELECT count(*) OVER (), coalesce(id, '(no id)'), why FROM"
            f" (SELECT id, {reason} END AS why FROM items) WHERE why IS NOT NULL LIMIT {examples}"
        ).fetchall()
        return (rows[0][0] if rows else 0), [(i, w) for _, i, w in rows]

    def _asset_names(self) -> tuple[str, ...]:
        kind = self.columns["assets"]
        if not kind.upper().startswith("STRUCT"):
            return ()
        rows = self._root.execute(
            "SELECT unnest(json_keys(to_json(assets))) FROM (SELECT assets FROM items LIMIT 1)"
        ).fetchall()
        return tuple(r[0] for r in rows)

    def _default_assets(self) -> tuple[str, ...]:
        """The first image asset, as TiTiler users expect when they name none."""
        row = self._root.execute("SELECT to_json(assets) FROM items LIMIT 1").fetchone()
        if row is None:
            return ()
        assets = json.loads(row[0]) or {}
        for name, asset in assets.items():
            if asset and str(asset.get("type") or "").startswith(IMAGE_MEDIA_PREFIX):
                return (name,)
        return (next(iter(assets)),) if assets else ()

    async def summary_async(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.summary)

    def summary(self) -> dict[str, Any]:
        """Counts and extents, for /info-like routes and the CLI (of the file in use now: a
        replaced catalog is taken first, as every search does)."""
        self.reload_if_replaced()
        row = (
            self._cursor()
            .execute(
                f"SELECT count(*), min(bbox.xmin), min(bbox.ymin), max(bbox.xmax), max(bbox.ymax),"
                f" min({_datetime_expr(self.columns)}),"
                f" max({_datetime_expr(self.columns, 'end')})"
                " FROM items"
            )
            .fetchone()
        )
        assert row is not None
        count, minx, miny, maxx, maxy, start, end = row
        return {
            "path": str(self.path),
            "items": count,
            "bbox": [minx, miny, maxx, maxy] if count else None,
            "datetime": [
                start.isoformat() if start else None,
                end.isoformat() if end else None,
            ],
            "assets": list(self.asset_names),
            "default_assets": list(self.default_assets),
        }

    # -- browsing: /collections, /items, TileJSON zoom ranges ------------------------------------
    # Each has an `_async` twin that runs it on the search executor (the event loop never runs
    # SQL). Results that depend only on the snapshot are kept per snapshot: viewers ask again
    # on every parameter change.

    def _per_snapshot(self, key: str, build: Callable[[], Any]) -> Any:
        """`build()` once per catalog snapshot (a replaced file has a new `_stamp`)."""
        cache: dict[str, tuple[Any, Any]] = self.__dict__.setdefault("_browse_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == self._stamp:
            return hit[1]
        value = build()
        cache[key] = (self._stamp, value)
        return value

    def _where(self, query: SearchQuery) -> tuple[str, list[Any]]:
        """` WHERE …` for `query`'s bbox, datetime, collections, ids and filter (a bbox matches
        items whose bbox intersects it; the search refines with `intersects` afterwards)."""
        where: list[str] = []
        params: list[Any] = []
        if query.bbox is not None:
            minx, miny, maxx, maxy = query.bbox
            where.append("bbox.xmin <= ? AND bbox.xmax >= ? AND bbox.ymin <= ? AND bbox.ymax >= ?")
            params += [maxx, minx, maxy, miny]
        if query.datetime is not None:
            start, end = query.datetime
            lo, hi = self._time_columns()
            if start is not None:
                where.append(f"{hi} >= ?")
                params.append(start)
            if end is not None:
                where.append(f"{lo} <= ?")
                params.append(end)
        if query.collections:
            where.append(f"{_collection_expr(self.columns)} IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(query.collections))
        if query.ids:
            where.append("id IN (SELECT unnest(?::VARCHAR[]))")
            params.append(list(query.ids))
        if query.filter is not None:
            fragment, values = filters.to_sql(query.filter, self.columns)
            where.append(fragment)
            params += values
        return (" WHERE " + " AND ".join(where)) if where else "", params

    async def collections_async(self) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.collections)

    def collections(self) -> list[dict[str, Any]]:
        """Per collection: item count, bbox, time interval, distinct UTC days (newest first,
        at most MAX_DATES) and per-asset metadata.

        Asset metadata (`type`, `roles`, `raster:bands`…, never `href`) comes from one item
        that has the asset, as in STAC's item-assets extension, so a client knows e.g. that
        `dem` is float32 and needs a rescale.
        """
        self.reload_if_replaced()

        def build() -> list[dict[str, Any]]:
            when = _datetime_expr(self.columns)
            names = list(self.asset_names)
            per_asset = "".join(
                f", count(assets.{_quote(n)}), any_value(assets.{_quote(n)})" for n in names
            )
            day = f"strftime(timezone('UTC', {when}), '%Y-%m-%d')"
            rows = (
                self._cursor()
                .execute(
                    f"SELECT {_collection_expr(self.columns)} AS c, count(*),"
                    " min(bbox.xmin), min(bbox.ymin), max(bbox.xmax), max(bbox.ymax),"
                    f" min({when}), max({_datetime_expr(self.columns, 'end')}),"
                    f" list(DISTINCT {day} ORDER BY {day} DESC) FILTER (WHERE {when} IS NOT NULL)"
                    f"{per_asset} FROM items GROUP BY c ORDER BY c NULLS LAST"
                )
                .fetchall()
            )
            out = []
            for cid, count, minx, miny, maxx, maxy, start, end, days, *assets in rows:
                item_assets = {}
                for i, name in enumerate(names):
                    present, example = assets[2 * i], assets[2 * i + 1]
                    if present and example:
                        meta = {k: v for k, v in example.items() if k != "href"}
                        item_assets[name] = {**_json_safe(meta), "items": present}
                days = days or []
                out.append(
                    {
                        "id": cid,
                        "items": count,
                        "bbox": [minx, miny, maxx, maxy],
                        "interval": [_utc(start), _utc(end)],
                        "dates": days[:MAX_DATES],
                        "dates_truncated": len(days) > MAX_DATES,
                        "item_assets": item_assets,
                    }
                )
            return out

        return self._per_snapshot("collections", build)

    async def footprints_async(self, query: SearchQuery) -> tuple[list[dict[str, Any]], int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.footprints, query)

    def footprints(self, query: SearchQuery) -> tuple[list[dict[str, Any]], int]:
        """GeoJSON Features of the first `query.limit` items matching `query` (in `sortby`
        order) and how many match in all."""
        self.reload_if_replaced()
        clause, params = self._where(query)
        row = self._fetch(f"SELECT count(*) FROM items{clause}", params, query)[0]
        matched = int(row[0]) if row else 0
        rows = self._fetch(
            f"SELECT id, {_collection_expr(self.columns)}, {_datetime_expr(self.columns)}, bbox,"
            f" geometry::BLOB, assets FROM items{clause}"
            f" ORDER BY {self._order_by(query.sortby)} LIMIT {int(query.limit or DEFAULT_LIMIT)}",
            params,
            query,
        )
        features = []
        for item_id, collection, when, bbox, wkb, assets in rows:
            shape = _footprint(wkb)
            geometry = json.loads(shapely.to_geojson(shape)) if shape is not None else None
            box = (bbox["xmin"], bbox["ymin"], bbox["xmax"], bbox["ymax"]) if bbox else ()
            problem = item_problem(box, shape)
            properties = {
                "datetime": _utc(when),
                "collection": collection,
                "assets": [k for k, v in (assets or {}).items() if v is not None],
            }
            if problem:  # shown, not hidden: the user sees why this item never draws
                properties["terrazzo:error"] = problem
            features.append(
                {
                    "type": "Feature",
                    "id": item_id,
                    "geometry": geometry,
                    "bbox": list(box) if box and all(map(math.isfinite, box)) else None,
                    "properties": properties,
                }
            )
        return features, matched

    async def resolution_stats_async(
        self, assets: Sequence[str] = (), collections: Sequence[str] = ()
    ) -> dict[str, Any] | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, self.resolution_stats, tuple(assets), tuple(collections)
        )

    def resolution_stats(
        self, assets: tuple[str, ...] = (), collections: tuple[str, ...] = ()
    ) -> dict[str, Any] | None:
        """The item with the finest pixel and the largest item, for TileJSON/WMTS zooms, over
        the items of `collections` (all when empty) and the pixels of `assets`.

        Pixel size is in degrees of longitude: bbox width over `proj:shape` (the asset's own,
        else the item's), else `gsd` metres (asset, then item) over the metres per degree at
        the item's latitude. That orders items as Web Mercator resolutions do. None when
        neither is anywhere; items crossing the antimeridian (xmin > xmax) are left out.
        """
        self.reload_if_replaced()

        def build() -> dict[str, Any] | None:
            width = "(bbox.xmax - bbox.xmin)"
            coslat = "cos(radians((bbox.ymin + bbox.ymax) / 2))"
            terms = []
            for owner in [f"assets.{_quote(a)}" for a in assets] + [""]:
                shape = self._field(owner, "proj:shape")
                if shape:
                    terms.append(f"{width} / NULLIF({shape}[2], 0)")
            for owner in [f"assets.{_quote(a)}" for a in assets] + [""]:
                gsd = self._field(owner, "gsd")
                if gsd:
                    terms.append(f"{gsd} / ({_M_PER_DEG} * {coslat})")
            if not terms:
                return None
            res = f"COALESCE({', '.join(terms)})"
            size = f"greatest({width} * {coslat}, bbox.ymax - bbox.ymin)"
            where, params = self._where(SearchQuery(collections=collections))
            where = (where + " AND" if where else " WHERE") + (
                " bbox.xmax > bbox.xmin AND bbox.ymax > bbox.ymin"
            )
            row = (
                self._cursor()
                .execute(
                    "SELECT arg_min(bbox, res), min(res), arg_max(bbox, size)"
                    f" FROM (SELECT bbox, {res} AS res, {size} AS size FROM items{where})"
                    " WHERE res > 0",
                    params,
                )
                .fetchone()
            )
            if row is None or row[0] is None:
                return None
            finest, res_deg, largest = row
            box = lambda b: (b["xmin"], b["ymin"], b["xmax"], b["ymax"])  # noqa: E731
            return {"finest_bbox": box(finest), "res_deg": res_deg, "largest_bbox": box(largest)}

        return self._per_snapshot(f"resolution:{assets}:{collections}", build)

    def tile_fingerprints(
        self, query: SearchQuery, zoom: int
    ) -> list[tuple[int, int, int, str, dt.datetime | None, dt.datetime | None]]:
        """Per WebMercatorQuad tile at `zoom` that the bboxes of the items matching `query`
        (datetime, collections, ids, filter; not bbox) touch: (x, y, items, fingerprint,
        first datetime, last datetime), for `terrazzo overviews`. The fingerprint is the
        count, XOR and sum of a hash of each whole row (id, datetime, assets, geometry, every
        property), so adding, removing or changing an item changes the fingerprint of exactly
        the tiles its bbox touches. Items crossing the antimeridian (xmin > xmax) are left out,
        as in `resolution_stats`."""
        self.reload_if_replaced()
        n = 2 ** int(zoom)
        where, params = self._where(replace(query, bbox=None))
        where = (where + " AND" if where else " WHERE") + " bbox.xmax >= bbox.xmin"
        lat = "least(greatest({}, -85.0511287798), 85.0511287798)"

        def tx(lon: str) -> str:
            return f"least(greatest(floor(({lon} + 180) / 360 * {n})::BIGINT, 0), {n - 1})"

        def ty(col: str) -> str:
            r = f"radians({lat.format(col)})"
            merc = f"ln(tan({r}) + 1 / cos({r}))"
            return f"least(greatest(floor((1 - {merc} / pi()) / 2 * {n})::BIGINT, 0), {n - 1})"

        when = _datetime_expr(self.columns)
        rows = (
            self._cursor()
            .execute(
                f"WITH m AS (SELECT hash(it) AS h, {when} AS t, {tx('bbox.xmin')} AS x0,"
                f" {tx('bbox.xmax')} AS x1, {ty('bbox.ymax')} AS y0, {ty('bbox.ymin')} AS y1"
                f" FROM items AS it{where}),"
                " a AS (SELECT h, t, unnest(range(x0, x1 + 1)) AS x, y0, y1 FROM m),"
                " b AS (SELECT h, t, x, unnest(range(y0, y1 + 1)) AS y FROM a)"
                " SELECT x, y, count(*), bit_xor(h), sum(h), min(t), max(t) FROM b"
                " GROUP BY x, y ORDER BY y, x",
                params,
            )
            .fetchall()
        )
        return [
            (int(x), int(y), int(c), f"{c}-{int(xor):016x}-{int(total):x}", lo, hi)
            for x, y, c, xor, total, lo, hi in rows
        ]

    def _field(self, owner: str, name: str) -> str | None:
        """SQL for column `name` (owner "") or struct field `owner.name`, if the snapshot has
        it (asset structs differ between catalogs), else None."""
        expr = f"{owner}.{_quote(name)}" if owner else _quote(name)
        if not owner:
            return expr if name in self.columns else None
        try:
            self._cursor().execute(f"DESCRIBE SELECT {expr} FROM items")
        except duckdb.Error:
            return None
        return expr

    async def bboxes_derived_async(
        self, query: SearchQuery, key: str, derive: Callable[[Any], Any]
    ) -> Any:
        """`derive(bboxes)` on a search thread, kept per snapshot under `key` and the query:
        `bboxes` is an (n, 4) float64 array of xmin, ymin, xmax, ymax of the items matching
        `query`'s datetime, collections, ids and filter (its bbox is not applied); items
        without a finite bbox are left out. For summaries of where items crowd
        (`core.density`) that must not run SQL on the event loop nor per request."""
        import numpy as np  # only this summary needs it here

        selection = SearchQuery(
            datetime=query.datetime,
            collections=query.collections,
            ids=query.ids,
            filter=query.filter,
        )
        where, params = self._where(selection)
        box = ("bbox.xmin", "bbox.ymin", "bbox.xmax", "bbox.ymax")
        finite = " AND ".join(f"isfinite({c})" for c in box)
        sql = f"SELECT {', '.join(box)} FROM items{where}"
        sql += (" AND " if where else " WHERE ") + finite
        cache_key = f"bboxes:{key}:{sql}:{params!r}"

        def run() -> Any:
            self.reload_if_replaced()

            def build() -> Any:
                try:
                    cols = self._cursor().execute(sql, params).fetchnumpy()
                except (duckdb.ConversionException, duckdb.BinderException) as exc:
                    if query.filter is None:
                        raise
                    reason = str(exc).splitlines()[0]
                    raise filters.FilterError(
                        f"filter: the catalog cannot evaluate it ({reason})"
                    ) from exc
                names = ("xmin", "ymin", "xmax", "ymax")
                array = np.stack([np.asarray(cols[n], dtype="float64") for n in names], axis=1)
                return derive(array.reshape(-1, 4))

            return self._per_snapshot(cache_key, build)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def _collection_expr(columns: dict[str, str]) -> str:
    return "collection" if "collection" in columns else "NULL"


def _datetime_expr(columns: dict[str, str], edge: str = "start") -> str:
    """An item's datetime (`edge="end"`: where its time span ends, `end_datetime` first), NULL
    where Python cannot hold it (DuckDB's timestamps reach year 294,247; a year-20000 value
    would fail the whole query when its rows are fetched)."""
    present = [c for c in (f"{edge}_datetime", "datetime") if c in columns]
    if edge == "start" and "datetime" in present:
        present.reverse()  # the item's own datetime labels it; start_datetime when it is null
    if not present:
        return "NULL::TIMESTAMPTZ"
    raw = f"COALESCE({', '.join(present)})" if len(present) > 1 else present[0]
    return f"(CASE WHEN {raw} BETWEEN {_TIME_MIN} AND {_TIME_MAX} THEN {raw} END)"


_TIME_MIN = "TIMESTAMPTZ '0001-01-02 00:00:00+00'"
_TIME_MAX = "TIMESTAMPTZ '9999-12-30 00:00:00+00'"


def check_catalog(path: Path | str) -> None:
    """Raise a one-line error if the file at `path` is no catalog Terrazzo can serve: its
    schema only (DESCRIBE reads the footer), before a server starts loading it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"catalog not found: {path}")
    con = duckdb.connect(config={"threads": 1})
    try:
        con.execute("SET enable_geoparquet_conversion = false")
        try:
            rows = con.execute(
                f"DESCRIBE SELECT * FROM read_parquet('{_sql_string(str(path))}')"
            ).fetchall()
        except duckdb.Error as exc:
            raise schema.SchemaError(
                f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})"
            ) from exc
        schema.check(path, {row[0]: row[1] for row in rows})
    finally:
        con.close()


def item_problem(bbox: tuple[float, ...], footprint: BaseGeometry | None) -> str | None:
    """Why an item's own content cannot be served, or None. Such an item is reported as an
    item error wherever it matches, never a 500 for the request or the other items."""
    if len(bbox) != 4 or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox):
        return f"bbox {list(bbox)} is not four finite numbers"
    if footprint is None:
        return "geometry is missing or not valid WKB"
    return None


def _footprint(wkb: bytes | None) -> BaseGeometry | None:
    """The item's footprint, or None when its WKB does not parse."""
    if wkb is None:
        return None
    try:
        return shapely.from_wkb(wkb)
    except Exception:  # shapely.errors.GEOSException and friends: garbage bytes
        return None


MAX_DATES = 1000  # distinct acquisition days listed per collection
_M_PER_DEG = 111_319.49  # metres per degree of longitude on the WGS84 equator


def _json_safe(value: Any) -> Any:
    """Plain JSON for catalog metadata: NaN/inf become strings (Starlette's JSON refuses
    them), None-valued keys are dropped."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def _utc(value: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC with a `Z`, as STAC writes datetimes."""
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
