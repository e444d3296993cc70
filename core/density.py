"""The lowest zoom at which every tile of a matrix set can be served complete.

A tile's item search stops at the request's item limit (`max_items`, capped `items_limit`)
and candidate limit (`max_scan`); past them the tile is marked `X-Terrazzo-Truncated`. A
tile's candidates are the items whose lon/lat bbox touches the tile's lon/lat bounds (the
search's bbox test; the exact footprint test only removes some), so a tile whose candidates
number at most the limit is always complete. `complete_zoom` is the lowest zoom at which no
tile of the matrix set has more than `limit` candidates — a sufficient rule, counted on bboxes:
footprints, `skipcovered` and `exitwhenfull` can only make a tile more complete, and
`time_limit` is not predictable from the catalog.

How it is counted, in DuckDB from the items' bboxes alone (no COG is opened):

- Each item's bbox is put in the matrix set's CRS once. For a CRS whose x depends only on
  longitude and y only on latitude (WebMercatorQuad, WorldMercatorWGS84Quad, every lon/lat set)
  the corners are exact; for any other CRS each edge is sampled at 9 points and the item's tile
  range is widened by one tile on each side (conservative: a tile's lon/lat bounds reach
  further than the tile). Sets with coalesced rows (`variableMatrixWidths`: CDB1GlobalGrid,
  GNOSISGlobalGrid) are counted on the uncoalesced grid, widened by the largest coalescence.
- At each zoom an item is exploded (`range()`/`unnest`) into the tile index range it touches
  (touching counts: the search's bbox test is closed); a tile's count is its number of rows.
- Counts never grow with the zoom in a nested matrix set (a child tile's candidates are among
  its parent's), so each zoom only explodes the items of the previous zoom's over-full tiles
  into those tiles' children: the work follows the dense places, not the whole catalog.
- When more than `limit` items each contain a whole over-full tile, every tile under it stays
  over-full at any zoom: no zoom is complete (None) and the scan stops there.
- A zoom whose explosion would pass `MAX_PAIRS` rows is not counted: None, the conservative
  answer (the caller then announces its maxzoom).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import duckdb
import morecantile
import numpy as np
import pyarrow as pa
from morecantile import TileMatrixSet

from core.catalog import Catalog, SearchQuery
from core.plan import matrix_set_crs, transformer
from core.settings import Settings

MAX_PAIRS = 10_000_000  # (item, tile) rows one zoom may explode into (17 bytes each)
EPS = 1e-9  # in tiles: a bbox edge within this of a tile edge touches it
EDGE_SAMPLES = 9  # points per bbox edge for CRSs where boxes do not stay boxes


@dataclass(frozen=True)
class Density:
    """`zoom`: the lowest complete zoom (None: none up to the set's maxzoom, or over budget).
    `densest`: the most candidates of one tile at the last zoom counted; `why` explains None."""

    zoom: int | None
    densest: int
    items: int
    seconds: float
    why: str = ""


@lru_cache(maxsize=64)
def _separable(crs: str) -> bool:
    """True when x depends on longitude only and y on latitude only (a lon/lat box stays a
    box: its corners are its bounds)."""
    t = transformer("EPSG:4326", crs)
    lon = np.array([-60.0, -60.0, 30.0, 30.0])
    lat = np.array([-40.0, 40.0, -40.0, 40.0])
    with np.errstate(all="ignore"):
        x, y = t.transform(lon, lat)
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        return False
    same = lambda a, b: math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-9)  # noqa: E731
    return same(x[0], x[1]) and same(x[2], x[3]) and same(y[0], y[2]) and same(y[1], y[3])


def project_bboxes(tms: TileMatrixSet, bboxes: np.ndarray) -> tuple[np.ndarray, bool]:
    """(n, 4) lon/lat bboxes → (m, 5) [item, xmin, ymin, xmax, ymax] in the set's CRS (items
    outside its domain dropped), and whether the boxes are exact (else widen by a tile)."""
    world = tms.bbox
    lo = np.array([world.left, world.bottom, world.left, world.bottom])
    hi = np.array([world.right, world.top, world.right, world.top])
    b = np.clip(bboxes, lo, hi)
    keep = (b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])
    index = np.nonzero(keep)[0]
    b = b[keep]
    crs = matrix_set_crs(tms.id)
    t = transformer("EPSG:4326", crs)
    exact = _separable(crs)
    with np.errstate(all="ignore"):
        if exact:
            x0, y0 = t.transform(b[:, 0], b[:, 1])
            x1, y1 = t.transform(b[:, 2], b[:, 3])
            xs, ys = np.stack([x0, x1], axis=1), np.stack([y0, y1], axis=1)
        else:
            s = np.linspace(0.0, 1.0, EDGE_SAMPLES)
            w, e = b[:, 0:1], b[:, 2:3]
            south, north = b[:, 1:2], b[:, 3:4]
            along_x = w + (e - w) * s
            along_y = south + (north - south) * s
            lon = np.concatenate(
                [along_x, along_x, np.repeat(w, len(s), 1), np.repeat(e, len(s), 1)], 1
            )
            lat = np.concatenate(
                [np.repeat(south, len(s), 1), np.repeat(north, len(s), 1), along_y, along_y], 1
            )
            px, py = t.transform(lon.ravel(), lat.ravel())
            xs, ys = px.reshape(lon.shape), py.reshape(lat.shape)
        xs = np.where(np.isfinite(xs), xs, np.nan)
        ys = np.where(np.isfinite(ys), ys, np.nan)
        out = np.stack(
            [index, np.nanmin(xs, 1), np.nanmin(ys, 1), np.nanmax(xs, 1), np.nanmax(ys, 1)], 1
        )
    return out[np.all(np.isfinite(out), axis=1)], exact


def _matrix(tms: TileMatrixSet, z: int) -> dict[str, float]:
    """Tile (0, 0)'s top-left corner and a tile's size in the set's CRS, and the grid size."""
    m = tms.matrix(z)
    b = tms.xy_bounds(morecantile.Tile(0, 0, z))
    coalesce = max((v.coalesce for v in m.variableMatrixWidths or ()), default=1)
    return {
        "L": b.left,
        "T": b.top,
        "SX": b.right - b.left,
        "SY": b.top - b.bottom,
        "W": m.matrixWidth,
        "H": m.matrixHeight,
        "coalesce": coalesce,
    }


def _nested(a: dict[str, float], b: dict[str, float]) -> int:
    """k when every tile of `b` (one zoom finer) lies in one tile of `a`, split k×k; else 0."""
    k = a["SX"] / b["SX"]
    if not (
        round(k) >= 1
        and math.isclose(k, round(k), rel_tol=1e-9)
        and math.isclose(a["SY"] / b["SY"], round(k), rel_tol=1e-9)
        and math.isclose(a["L"], b["L"], abs_tol=a["SX"] * 1e-9)
        and math.isclose(a["T"], b["T"], abs_tol=a["SY"] * 1e-9)
        and a["coalesce"] == b["coalesce"] == 1
    ):
        return 0
    return round(k)


def _ranges(m: dict[str, float], pad: int) -> str:
    """SQL columns c0, c1, r0, r1: the tile index range an item touches at matrix `m`."""
    L, T, SX, SY = (repr(m[k]) for k in ("L", "T", "SX", "SY"))
    W, H, e = int(m["W"]) - 1, int(m["H"]) - 1, EPS
    return (
        f"greatest(0, ceil((x0 - {L}) / {SX} - {e})::BIGINT - 1 - {pad}) AS c0,"
        f" least({W}, floor((x1 - {L}) / {SX} + {e})::BIGINT + {pad}) AS c1,"
        f" greatest(0, ceil(({T} - y1) / {SY} - {e})::BIGINT - 1 - {pad}) AS r0,"
        f" least({H}, floor(({T} - y0) / {SY} + {e})::BIGINT + {pad}) AS r1"
    )


def _covers(m: dict[str, float]) -> str:
    """SQL: the item's box contains the whole tile (c, r)."""
    L, T, SX, SY = (repr(m[k]) for k in ("L", "T", "SX", "SY"))
    return (
        f"(x0 <= {L} + c * {SX} AND x1 >= {L} + (c + 1) * {SX}"
        f" AND y1 >= {T} - r * {SY} AND y0 <= {T} - (r + 1) * {SY})"
    )


def _lower_bound(
    con: duckdb.DuckDBPyConnection, tms: TileMatrixSet, first: int, limit: int
) -> int | None:
    """A zoom no higher than the answer, found cheaply: a tile touches at least the items
    whose bbox centre lies in it, so a zoom where some tile holds more than `limit` centres is
    incomplete, and (the set nested) so is every zoom below it. Binary search over the zooms;
    None when even the maxzoom is crowded (no zoom is complete)."""
    matrices = [_matrix(tms, z) for z in range(first, tms.maxzoom + 1)]
    if not all(_nested(a, b) for a, b in itertools.pairwise(matrices)):
        return first

    def crowded(m: dict[str, float]) -> bool:
        (most,) = con.execute(
            "SELECT max(n) FROM (SELECT sum(w) AS n FROM items GROUP BY"
            f" floor(((x0 + x1) / 2 - {m['L']!r}) / {m['SX']!r}),"
            f" floor(({m['T']!r} - (y0 + y1) / 2) / {m['SY']!r}))"
        ).fetchone()
        return most is not None and most > limit

    lo, hi = 0, len(matrices) - 1  # the answer is at or above the first zoom not crowded
    if not crowded(matrices[lo]):
        return first
    while lo < hi:  # invariant: matrices[lo] crowded
        mid = (lo + hi + 1) // 2
        if crowded(matrices[mid]):
            lo = mid
        else:
            hi = mid - 1
    return None if lo == len(matrices) - 1 else first + lo + 1


def complete_zoom(
    tms: TileMatrixSet,
    bboxes: np.ndarray,
    limit: int,
    *,
    start: int | None = None,
    threads: int = 2,
    max_pairs: int = MAX_PAIRS,
) -> Density:
    """The lowest zoom of `tms`, from `start` (default: the set's minzoom) up, where no tile
    touches more than `limit` of `bboxes` ((n, 4) lon/lat xmin, ymin, xmax, ymax); the
    method is in this module's docstring."""
    started = time.perf_counter()
    bboxes = np.asarray(bboxes, dtype="float64").reshape(-1, 4)
    bboxes = bboxes[np.all(np.isfinite(bboxes), axis=1)]
    # crossing the antimeridian (xmin > xmax): counted as spanning every longitude
    wrap = bboxes[:, 0] > bboxes[:, 2]
    bboxes[wrap, 0], bboxes[wrap, 2] = -180.0, 180.0

    def done(zoom: int | None, densest: int, why: str = "") -> Density:
        return Density(zoom, densest, len(bboxes), time.perf_counter() - started, why)

    first = tms.minzoom if start is None else min(max(start, tms.minzoom), tms.maxzoom)
    if len(bboxes) <= limit:
        return done(first, len(bboxes))
    boxes, exact = project_bboxes(tms, bboxes)
    con = duckdb.connect(config={"threads": threads})
    try:
        con.register(
            "boxes",
            pa.table(
                {
                    "i": boxes[:, 0].astype("int64"),
                    "x0": boxes[:, 1],
                    "y0": boxes[:, 2],
                    "x1": boxes[:, 3],
                    "y1": boxes[:, 4],
                }
            ),
        )
        # items sharing one bbox (a time series on a fixed grid) are one row with a weight
        con.execute(
            "CREATE TABLE items AS SELECT row_number() OVER () AS i, x0, y0, x1, y1, w FROM"
            " (SELECT x0, y0, x1, y1, count(*) AS w FROM boxes GROUP BY ALL)"
        )
        previous: dict[str, float] | None = None
        densest = 0
        bound = _lower_bound(con, tms, first, limit)
        if bound is None:
            return done(
                None,
                limit + 1,
                f"more than {limit} items centred in one tile at zoom {tms.maxzoom}",
            )
        for z in range(bound, tms.maxzoom + 1):
            m = _matrix(tms, z)
            pad = (0 if exact else 1) + m["coalesce"] - 1
            k = _nested(previous, m) if previous is not None else 0
            if k:  # only the over-full tiles of the zoom before, split into their children
                source = (
                    "SELECT p.i, p.c, p.r, p.w, x0, y0, x1, y1 FROM pairs p"
                    " SEMI JOIN hot h ON p.c = h.c AND p.r = h.r JOIN items USING (i)"
                )
                ranged = (
                    f"SELECT i, x0, y0, x1, y1, w, greatest(c0, c * {k}) AS c0,"
                    f" least(c1, c * {k} + {k - 1}) AS c1, greatest(r0, r * {k}) AS r0,"
                    f" least(r1, r * {k} + {k - 1}) AS r1"
                    f" FROM (SELECT *, {_ranges(m, pad)} FROM ({source}))"
                )
            else:
                ranged = f"SELECT *, {_ranges(m, pad)} FROM items"
            con.execute(
                f"CREATE OR REPLACE TABLE ranged AS SELECT * FROM ({ranged})"
                " WHERE c1 >= c0 AND r1 >= r0"
            )
            rows, span = con.execute(
                "SELECT coalesce(sum((c1 - c0 + 1) * (r1 - r0 + 1)), 0),"
                " coalesce(max(greatest(c1 - c0, r1 - r0)), 0) FROM ranged"
            ).fetchone()
            if rows > max_pairs:
                return done(None, densest, f"zoom {z} would count {rows} (item, tile) pairs")
            # explode: a join with the offsets 0..span (faster than unnest(range()) per row)
            con.execute(
                "CREATE OR REPLACE TABLE pairs AS"
                f" WITH o AS (SELECT range AS d FROM range(0, {int(span) + 1}))"
                " SELECT i::INTEGER AS i, c::INTEGER AS c, r::INTEGER AS r, w::INTEGER AS w,"
                f" {_covers(m)} AS covers FROM ("
                "  SELECT i, x0, y0, x1, y1, w, c0 + dx.d AS c, r0 + dy.d AS r FROM ranged"
                "  JOIN o dx ON dx.d <= c1 - c0 JOIN o dy ON dy.d <= r1 - r0)"
            )
            con.execute(
                "CREATE OR REPLACE TABLE hot AS SELECT c, r, sum(w) AS n,"
                " coalesce(sum(w) FILTER (WHERE covers), 0) AS whole FROM pairs GROUP BY c, r"
                f" HAVING sum(w) > {int(limit)}"
            )
            most, full = con.execute("SELECT max(n), max(whole) FROM hot").fetchone()
            if most is None:
                top = con.execute(
                    "SELECT coalesce(max(n), 0) FROM (SELECT sum(w) AS n FROM pairs GROUP BY c, r)"
                ).fetchone()[0]
                return done(z, int(top))
            densest = int(most)
            if full > limit:
                return done(
                    None,
                    densest,
                    f"{full} items each cover a whole tile at zoom {z}: more than {limit}"
                    " at every zoom",
                )
            previous = m
        return done(None, densest, f"{densest} items touch one tile at zoom {tms.maxzoom}")
    finally:
        con.close()


async def complete_zoom_async(
    catalog: Catalog, tms: TileMatrixSet, query: SearchQuery, limit: int, start: int | None = None
) -> Density:
    """`complete_zoom` over the items matching `query`'s datetime, collections, ids and
    filter, computed on a search thread once per catalog snapshot, query, set and limit."""
    return await catalog.bboxes_derived_async(
        query,
        f"density:{tms.id}:{int(limit)}:{start}",
        lambda bboxes: complete_zoom(tms, bboxes, limit, start=start),
    )


def tile_limit(settings: Settings, query: SearchQuery) -> int:
    """Candidates a tile search takes before it stops: the request's `items_limit` capped by
    `max_items`, and no more than `max_scan` (both end a search as truncated)."""
    limit = min(query.limit or settings.max_items, settings.max_items)
    scan = getattr(settings, "max_scan", None)
    if scan is not None:
        limit = min(limit, getattr(query, "scan_limit", None) or scan, scan)
    return max(1, int(limit))
