"""Browsing a catalog snapshot: summaries, collections, footprints, the resolution and
density figures behind TileJSON zooms and the overview pyramid's fingerprints.

Each has an `_async` twin that runs it on the search executor (the event loop never runs
SQL). Results that depend only on the snapshot are kept per snapshot: viewers ask again on
every parameter change.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import duckdb
import shapely

from core import filters
from core.catalog import sql
from core.catalog.query import DEFAULT_LIMIT, SearchQuery, item_problem, parse_footprint
from core.catalog.snapshot import Snapshots, asset_names

IMAGE_MEDIA_PREFIX = "image/tiff"
MAX_DATES = 1000  # distinct acquisition days listed per collection
_M_PER_DEG = 111_319.49  # metres per degree of longitude on the WGS84 equator


class Browsing(Snapshots):
    """What the catalog routes, TileJSON/WMTS and `terrazzo overviews` ask of a snapshot."""

    async def report_async(self) -> str:
        """The start-up lines about the catalog's own items (see `problems`)."""
        loop = asyncio.get_running_loop()
        count, examples = await loop.run_in_executor(self._executor, self.problems)
        lines = [f"items that cannot be served (catalog content): {count}"]
        lines += [f"  {item_id}: {why}" for item_id, why in examples]
        return "\n".join(lines)

    def _asset_names(self) -> tuple[str, ...]:
        return tuple(asset_names(self._root, "items", self.columns))

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
                f" min({sql.datetime_expr(self.columns)}),"
                f" max({sql.datetime_expr(self.columns, 'end')})"
                " FROM items"
            )
            .fetchone()
        )
        assert row is not None
        count, minx, miny, maxx, maxy, start, end = row
        return {
            "path": self.source.spec,
            "catalog": self.describe(),
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
            when = sql.datetime_expr(self.columns)
            names = list(self.asset_names)
            per_asset = "".join(
                f", count(assets.{sql.quote(n)}), any_value(assets.{sql.quote(n)})" for n in names
            )
            day = f"strftime(timezone('UTC', {when}), '%Y-%m-%d')"
            rows = (
                self._cursor()
                .execute(
                    f"SELECT {sql.collection_expr(self.columns)} AS c, count(*),"
                    " min(bbox.xmin), min(bbox.ymin), max(bbox.xmax), max(bbox.ymax),"
                    f" min({when}), max({sql.datetime_expr(self.columns, 'end')}),"
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
        clause, params = sql.where(query, self.columns)
        row = self._fetch(f"SELECT count(*) FROM items{clause}", params, query)[0]
        matched = int(row[0]) if row else 0
        rows = self._fetch(
            f"SELECT id, {sql.collection_expr(self.columns)}, {sql.datetime_expr(self.columns)},"
            f" bbox, geometry::BLOB, assets FROM items{clause}"
            f" ORDER BY {sql.order_by(query.sortby, self.columns)}"
            f" LIMIT {int(query.limit or DEFAULT_LIMIT)}",
            params,
            query,
        )
        features = []
        for item_id, collection, when, bbox, wkb, assets in rows:
            shape = parse_footprint(wkb)
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
            for owner in [f"assets.{sql.quote(a)}" for a in assets] + [""]:
                shape = self._field(owner, "proj:shape")
                if shape:
                    terms.append(f"{width} / NULLIF({shape}[2], 0)")
            for owner in [f"assets.{sql.quote(a)}" for a in assets] + [""]:
                gsd = self._field(owner, "gsd")
                if gsd:
                    terms.append(f"{gsd} / ({_M_PER_DEG} * {coslat})")
            if not terms:
                return None
            res = f"COALESCE({', '.join(terms)})"
            size = f"greatest({width} * {coslat}, bbox.ymax - bbox.ymin)"
            where, params = sql.where(SearchQuery(collections=collections), self.columns)
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
        where, params = sql.where(replace(query, bbox=None), self.columns)
        where = (where + " AND" if where else " WHERE") + " bbox.xmax >= bbox.xmin"
        lat = "least(greatest({}, -85.0511287798), 85.0511287798)"

        def tx(lon: str) -> str:
            return f"least(greatest(floor(({lon} + 180) / 360 * {n})::BIGINT, 0), {n - 1})"

        def ty(col: str) -> str:
            r = f"radians({lat.format(col)})"
            merc = f"ln(tan({r}) + 1 / cos({r}))"
            return f"least(greatest(floor((1 - {merc} / pi()) / 2 * {n})::BIGINT, 0), {n - 1})"

        when = sql.datetime_expr(self.columns)
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
        expr = f"{owner}.{sql.quote(name)}" if owner else sql.quote(name)
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
        where, params = sql.where(selection, self.columns)
        box = ("bbox.xmin", "bbox.ymin", "bbox.xmax", "bbox.ymax")
        finite = " AND ".join(f"isfinite({c})" for c in box)
        text = f"SELECT {', '.join(box)} FROM items{where}"
        text += (" AND " if where else " WHERE ") + finite
        cache_key = f"bboxes:{key}:{text}:{params!r}"

        def run() -> Any:
            self.reload_if_replaced()

            def build() -> Any:
                try:
                    cols = self._cursor().execute(text, params).fetchnumpy()
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
