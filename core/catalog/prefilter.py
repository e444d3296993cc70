"""An in-memory spatial prefilter and row cache for the common search: bbox (and collections,
datetime) in the default order.

Why: a tile's search is a DuckDB query of 1.5-2.5 ms CPU even on a 37-item catalog (parse,
bind, plan, the ORDER BY, converting the rows' nested asset structs to Python): measured as
the largest single cost of a tile after the PNG deflate (13% of the samples of a 16-client
tile run). Neighbouring tiles ask for the same few items again and again. Here the snapshot's
bboxes, collections, time bounds and each row's rank in the default order live in numpy
arrays (about 70 bytes a row, built once per snapshot, only below MAX_ROWS rows), so a query's
candidates in mosaic order cost microseconds, and the rows already converted (the Item and
its parsed footprint) are kept in a small LRU. A search whose candidates are all cached runs
no SQL; any other takes its cached first candidates, then DuckDB from there (the same order,
so an OFFSET), which stays the search engine (the design card) and fills the cache.
Filters, ids and other sort orders always go to DuckDB.

Same answers as the SQL: the arrays are read from the same table with the same expressions
(`core.catalog.sql`), NULLs never match, and the rank is DuckDB's own row_number over the
same ORDER BY (tests/test_search_prefilter.py compares both paths on every query).
"""

from __future__ import annotations

import collections
import datetime as dt
import threading
from typing import Any

import duckdb
import numpy as np
from shapely.geometry.base import BaseGeometry

from core.catalog import sql
from core.catalog.query import Item, SearchQuery

MAX_ROWS = 500_000  # above this, the arrays' memory and the linear scan stop paying
CACHE_ROWS = 4_096  # converted rows kept (Item + footprint, ~2-4 KB each)
DEFAULT_SORT = ("-datetime",)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)

Row = tuple[Item, BaseGeometry | None]


class Prefilter:
    """The arrays of one snapshot (`alias`) and its row cache."""

    def __init__(self, cursor: duckdb.DuckDBPyConnection, alias: str, columns: dict[str, str]):
        self.alias = alias
        lo, hi = sql.time_columns(columns)
        order = sql.order_by(DEFAULT_SORT, columns)
        arrays = cursor.execute(
            f"SELECT rowid, _xmin, _ymin, _xmax, _ymax, {sql.collection_expr(columns)},"
            f" epoch_us({lo}), epoch_us({hi}), row_number() OVER (ORDER BY {order})"
            f" FROM {alias}.items"
        ).fetchnumpy()
        names = list(arrays)
        self.rowid = _ints(arrays[names[0]])
        self.box = [_floats(arrays[n]) for n in names[1:5]]  # xmin, ymin, xmax, ymax
        # collections as codes (a few distinct names; -1: none), not a string per row
        names_of = np.ma.filled(np.ma.asarray(arrays[names[5]], dtype=object), None)
        known = np.asarray([c is not None for c in names_of], dtype=bool)
        distinct, codes = np.unique(names_of[known].astype(str), return_inverse=True)
        self.codes = {str(name): i for i, name in enumerate(distinct)}
        self.collection = np.full(len(names_of), -1, dtype=np.int32)
        self.collection[known] = codes
        self.time_lo, self.lo_known = _times(arrays[names[6]])
        self.time_hi, self.hi_known = _times(arrays[names[7]])
        self.rank = _ints(arrays[names[8]])
        self._cache: collections.OrderedDict[tuple[int, str], Row] = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def serves(query: SearchQuery) -> bool:
        """Whether `query` is one the arrays answer: a bbox, maybe collections and datetime,
        the default order, no filter and no ids."""
        return (
            query.bbox is not None
            and query.filter is None
            and not query.ids
            and tuple(query.sortby) == DEFAULT_SORT
        )

    def candidates(self, query: SearchQuery) -> np.ndarray:
        """Row ids matching `query`'s bbox, collections and datetime, in the default order."""
        minx, miny, maxx, maxy = query.bbox  # type: ignore[misc]
        xmin, ymin, xmax, ymax = self.box
        hit = (xmin <= maxx) & (xmax >= minx) & (ymin <= maxy) & (ymax >= miny)
        if query.collections:
            wanted = [self.codes[c] for c in query.collections if c in self.codes]
            hit &= np.isin(self.collection, wanted)
        if query.datetime is not None:
            start, end = query.datetime
            if start is not None:
                hit &= self.hi_known & (self.time_hi >= _epoch_us(start))
            if end is not None:
                hit &= self.lo_known & (self.time_lo <= _epoch_us(end))
        rows = np.flatnonzero(hit)
        return self.rowid[rows[np.argsort(self.rank[rows], kind="stable")]]

    def cached(self, rowids: np.ndarray, assets: str) -> list[Row]:
        """The converted rows of the longest cached prefix of `rowids`, in order (a search
        that stopped early converted only its first candidates: the rest follow from SQL)."""
        out = []
        with self._lock:
            for rowid in rowids.tolist():
                row = self._cache.get((rowid, assets))
                if row is None:
                    break
                self._cache.move_to_end((rowid, assets))
                out.append(row)
        return out

    def keep(self, rowid: int, assets: str, row: Row) -> None:
        with self._lock:
            self._cache[(rowid, assets)] = row
            self._cache.move_to_end((rowid, assets))
            while len(self._cache) > CACHE_ROWS:
                self._cache.popitem(last=False)


def _floats(values: Any) -> np.ndarray:
    return np.ma.filled(np.ma.asarray(values, dtype=np.float64), np.nan)


def _ints(values: Any) -> np.ndarray:
    return np.ma.filled(np.ma.asarray(values, dtype=np.int64), -1)


def _times(values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Epoch microseconds and where they are known (NULL never matches, as in SQL)."""
    masked = np.ma.asarray(values)
    known = ~np.ma.getmaskarray(masked)
    return np.ma.filled(masked.astype(np.int64), 0), known


def _epoch_us(moment: dt.datetime) -> int:
    """`moment` in epoch microseconds (naive: UTC, as the catalog's sessions are)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return (moment - _EPOCH) // _MICROSECOND
