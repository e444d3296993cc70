"""SQL fragments over a catalog snapshot's `items` relation, shared by search and browsing.

Every user value becomes a bound parameter; identifiers (sort fields, asset names) are
checked against the snapshot's own columns before they are quoted into SQL.

A snapshot keeps each item's bbox twice: the `bbox` struct STAC-GeoParquet writers use,
and flat columns (BBOX) that DuckDB's zone maps prune on — a struct field does not prune a
row group, a plain column of a spatially sorted table does (core.catalog.snapshot).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core import filters
from core.catalog.query import SearchError, SearchQuery

BBOX = ("_xmin", "_ymin", "_xmax", "_ymax")  # flat copies of bbox.xmin ... bbox.ymax
TIME_MIN = "TIMESTAMPTZ '0001-01-02 00:00:00+00'"
TIME_MAX = "TIMESTAMPTZ '9999-12-30 00:00:00+00'"


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def string(text: str) -> str:
    """`text` as the inside of a SQL string literal."""
    return text.replace("'", "''")


def collection_expr(columns: dict[str, str]) -> str:
    return "collection" if "collection" in columns else "NULL"


def datetime_expr(columns: dict[str, str], edge: str = "start") -> str:
    """An item's datetime (`edge="end"`: where its time span ends, `end_datetime` first), NULL
    where Python cannot hold it (DuckDB's timestamps reach year 294,247; a year-20000 value
    would fail the whole query when its rows are fetched)."""
    present = [c for c in (f"{edge}_datetime", "datetime") if c in columns]
    if edge == "start" and "datetime" in present:
        present.reverse()  # the item's own datetime labels it; start_datetime when it is null
    if not present:
        return "NULL::TIMESTAMPTZ"
    raw = f"COALESCE({', '.join(present)})" if len(present) > 1 else present[0]
    return f"(CASE WHEN {raw} BETWEEN {TIME_MIN} AND {TIME_MAX} THEN {raw} END)"


def time_columns(columns: dict[str, str]) -> tuple[str, str]:
    """Columns bounding an item's time: start/end_datetime when present, else datetime."""
    if "start_datetime" in columns and "end_datetime" in columns:
        return ("COALESCE(start_datetime, datetime)", "COALESCE(end_datetime, datetime)")
    return ("datetime", "datetime")


def where(query: SearchQuery, columns: dict[str, str]) -> tuple[str, list[Any]]:
    """` WHERE …` for `query`'s bbox, datetime, collections, ids and filter (a bbox matches
    items whose bbox intersects it; the search refines with `intersects` afterwards)."""
    clauses: list[str] = []
    params: list[Any] = []
    if query.bbox is not None:
        minx, miny, maxx, maxy = query.bbox
        xmin, ymin, xmax, ymax = BBOX
        clauses.append(f"{xmin} <= ? AND {xmax} >= ? AND {ymin} <= ? AND {ymax} >= ?")
        params += [maxx, minx, maxy, miny]
    if query.datetime is not None:
        start, end = query.datetime
        lo, hi = time_columns(columns)
        if start is not None:
            clauses.append(f"{hi} >= ?")
            params.append(start)
        if end is not None:
            clauses.append(f"{lo} <= ?")
            params.append(end)
    if query.collections:
        clauses.append(f"{collection_expr(columns)} IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(query.collections))
    if query.ids:
        clauses.append("id IN (SELECT unnest(?::VARCHAR[]))")
        params.append(list(query.ids))
    if query.filter is not None:
        fragment, values = filters.to_sql(query.filter, columns)
        clauses.append(fragment)
        params += values
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def sort_terms(sortby: Sequence[str], columns: dict[str, str]) -> list[tuple[str, bool, str]]:
    """(SQL expression, descending, DuckDB type) per STAC `sortby` field, ending with `id`
    ascending (a total order: the same tile is always mosaicked the same way, and a STAC
    page's last row is a key the next page can start after)."""
    terms = []
    for key in sortby:
        key = key.strip()
        if not key:
            continue
        descending = key.startswith("-")
        name = key.lstrip("+-").removeprefix("properties.")
        if name not in columns and name != "datetime":  # datetime: always (see below)
            raise SearchError(f"sortby: unknown field {name!r}; sortable fields: {sorted(columns)}")
        # an item without a datetime is ordered by its start_datetime, the time it is
        # labelled with (as pgstac orders): the newest range on top, not the oldest id
        if name == "datetime":
            terms.append((datetime_expr(columns), descending, "TIMESTAMPTZ"))
        else:
            terms.append((quote(name), descending, columns[name]))
    terms.append(("id", False, "VARCHAR"))
    return terms


def order_by(sortby: Sequence[str], columns: dict[str, str]) -> str:
    """ORDER BY terms for STAC `sortby` fields (see `sort_terms`), NULLS LAST."""
    return ", ".join(
        f"{expr} {'DESC' if descending else 'ASC'} NULLS LAST"
        for expr, descending, _ in sort_terms(sortby, columns)
    )


def visible(columns: dict[str, str]) -> dict[str, str]:
    """The item's own columns (hive partition keys included), without the snapshot's."""
    return {k: v for k, v in columns.items() if k not in BBOX}
