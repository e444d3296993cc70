"""The query model of a catalog search: what is asked (SearchQuery), what comes back (Item,
SearchResult), and the errors that say what to fix. No SQL here: every backend takes these.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

import shapely
from shapely.geometry.base import BaseGeometry


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
    assets: tuple[str, ...] = ()  # the assets the read needs (items carry only those); (): all

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


def item_problem(bbox: tuple[float, ...], footprint: BaseGeometry | None) -> str | None:
    """Why an item's own content cannot be served, or None. Such an item is reported as an
    item error wherever it matches, never a 500 for the request or the other items."""
    if len(bbox) != 4 or not all(isinstance(v, int | float) and math.isfinite(v) for v in bbox):
        return f"bbox {list(bbox)} is not four finite numbers"
    if footprint is None:
        return "geometry is missing or not valid WKB"
    return None


def parse_footprint(wkb: bytes | None) -> BaseGeometry | None:
    """The item's footprint, or None when its WKB does not parse."""
    if wkb is None:
        return None
    try:
        return shapely.from_wkb(wkb)
    except Exception:  # shapely.errors.GEOSException and friends: garbage bytes
        return None
