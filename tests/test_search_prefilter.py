"""The search prefilter (core.catalog.prefilter) answers exactly what DuckDB answers.

Catalogs written by rustac and by stac-geoparquet at test time: items of mixed sizes that
overlap, ties on datetime (broken by id), items with only start/end_datetime or no time, three
collections. Every query runs on a catalog whose prefilter is on (twice: the second time from
its row cache, with no SQL at all) and on one where every search runs in DuckDB; the items,
their order and the search's counters must be the same.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from pathlib import Path

import pytest
import rustac
import shapely
import stac_geoparquet.arrow

from core.catalog import Catalog, SearchQuery


def _items(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        x, y = rng.uniform(0, 20), rng.uniform(40, 50)
        w, h = rng.choice([0.2, 1.0, 3.0]), rng.choice([0.2, 1.0, 2.5])
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        if i % 7 == 3:  # a triangle: its bbox matches more than its footprint
            ring = [[x, y], [x + w, y], [x, y + h], [x, y]]
        day = dt.datetime(2024, 1 + i % 6, 1 + i % 5, 10, tzinfo=dt.UTC)
        props: dict = {"datetime": day.isoformat().replace("+00:00", "Z")}
        if i % 11 == 5:  # a range instead of an instant
            props = {
                "datetime": None,
                "start_datetime": day.isoformat().replace("+00:00", "Z"),
                "end_datetime": (day + dt.timedelta(days=20)).isoformat().replace("+00:00", "Z"),
            }
        if i % 23 == 7:  # no time at all (invalid STAC, seen in the wild): never in a range
            props = {"datetime": None}
        out.append(
            {
                "type": "Feature",
                "stac_version": "1.1.0",
                "id": f"it-{(i * 37) % n:04d}",  # ids not in the order of the rows
                "collection": "abc"[i % 3],
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "bbox": [x, y, x + w, y + h],
                "properties": props,
                "assets": {"visual": {"href": f"cogs/{i}.tif", "type": "image/tiff"}},
                "links": [],
            }
        )
    return out


def _queries(count: int, seed: int) -> list[SearchQuery]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        x, y = rng.uniform(-1, 21), rng.uniform(39, 51)
        size = rng.choice([0.05, 0.5, 2.0, 8.0])
        box = (x, y, x + size, y + size)
        kind = rng.random()
        query: dict = {"bbox": box}
        if kind < 0.7:
            query.update(intersects=shapely.box(*box))
        if kind < 0.4:
            query.update(exitwhenfull=True, skipcovered=True)
        if rng.random() < 0.3:
            query["collections"] = tuple(rng.sample("abc", rng.choice([1, 2])))
        if rng.random() < 0.3:
            start = dt.datetime(2024, rng.randint(1, 6), 1, tzinfo=dt.UTC)
            end = start + dt.timedelta(days=rng.choice([3, 40]))
            query["datetime"] = rng.choice([(start, end), (start, None), (None, end)])
        if rng.random() < 0.3:
            query["limit"] = rng.choice([1, 3])
        out.append(SearchQuery(**query))
    return out


def _write(writer: str, items: list[dict], path: Path) -> Path:
    if writer == "rustac":
        rustac.write_sync(str(path), items)
    else:
        table = stac_geoparquet.arrow.parse_stac_items_to_arrow(items)
        stac_geoparquet.arrow.to_parquet(table, path)
    return path


def _answer(catalog: Catalog, query: SearchQuery) -> tuple:
    result = catalog.scan_sync(query)
    return (
        [(i.id, i.datetime, i.assets.get("visual")) for i in result.items],
        result.scanned,
        result.covered_skips,
        result.full,
        result.truncated,
    )


@pytest.mark.parametrize("writer", ["rustac", "stac-geoparquet"])
def test_the_prefilter_and_duckdb_give_the_same_answers(writer: str, tmp_path: Path) -> None:
    path = _write(writer, _items(300, seed=1), tmp_path / "items.parquet")
    fast = Catalog(path, threads=1, cache=tmp_path / "cache-fast")
    slow = Catalog(path, threads=1, cache=tmp_path / "cache-slow")
    slow.prefilter = lambda: None  # type: ignore[method-assign]  # every search in DuckDB
    sql_calls = []
    fetch = fast._fetch

    def counted(*args, **kwargs):
        sql_calls.append(args[0])
        return fetch(*args, **kwargs)

    fast._fetch = counted  # type: ignore[method-assign]
    try:
        assert fast.prefilter() is not None
        queries = _queries(150, seed=2)
        matched = 0
        for query in queries:
            expected = _answer(slow, query)
            assert _answer(fast, query) == expected, query
            before = len(sql_calls)
            assert _answer(fast, query) == expected, query  # from the row cache
            assert len(sql_calls) == before, "a repeated search ran SQL"
            matched += bool(expected[0])
            # a wider search after a narrower one: the cached first rows, then SQL from there
            wider = dataclasses.replace(query, limit=None, exitwhenfull=None, skipcovered=None)
            assert _answer(fast, wider) == _answer(slow, wider), wider
        assert matched > 50  # the queries do find items (a prefilter finding none would pass)
        # a filter or another order is DuckDB's: the prefilter never answers it
        before = len(sql_calls)
        fast.scan_sync(SearchQuery(bbox=(0, 40, 20, 50), sortby=("id",)))
        assert len(sql_calls) > before
    finally:
        fast.close()
        slow.close()
