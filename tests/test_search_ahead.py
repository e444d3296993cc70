"""A request's chunks are searched once as one area before they start: their own searches then
find their rows in the catalog's prefilter cache, and their results are the same as alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.catalog import SearchQuery
from core.chunks import ChunkSpec, read_chunk, stream_chunks
from core.engine import Engine, ReadParams
from core.settings import Settings
from tests.conftest import utm_area

CRS = "EPSG:32632"


def _chunks(res: float = 60.0, size: int = 128) -> list[ChunkSpec]:
    """Four neighbouring chunks (a 2×2 block) over the demo's UTM 32 items."""
    x0, y0, x1, y1 = utm_area(2 * size, res, lon=7.55, lat=45.0)
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    boxes = [(x0, ym, xm, y1), (xm, ym, x1, y1), (x0, y0, xm, ym), (xm, y0, x1, ym)]
    return [ChunkSpec(f"c{i}", b, size, size) for i, b in enumerate(boxes)]


def _count_queries(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL search the catalog runs (the DuckDB boundary), recorded."""
    catalog = engine.catalog
    queries: list[str] = []
    fetch = catalog._fetch

    def counted(sql: str, params: list, query: SearchQuery) -> list:
        queries.append(sql)
        return fetch(sql, params, query)

    monkeypatch.setattr(catalog, "_fetch", counted)
    return queries


async def test_chunks_search_once_and_read_the_same(
    demo_catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    specs = _chunks()
    params = ReadParams(assets=("visual",))
    query = SearchQuery()
    ahead = Engine(Settings(catalog=demo_catalog, compute_workers=1))
    alone = Engine(Settings(catalog=demo_catalog, compute_workers=1))
    try:
        queries = _count_queries(ahead, monkeypatch)
        together = {r.id: r async for r in stream_chunks(ahead, specs, CRS, query, params)}
        # one search for the four (each chunk's own search served from the prefilter's cache)
        assert len(queries) == 1, queries
        separate = {s.id: await read_chunk(alone, s, CRS, query, params) for s in specs}
    finally:
        ahead.close()
        alone.close()
    assert sorted(together) == sorted(separate)
    for cid, result in together.items():
        other = separate[cid]
        assert result.status == other.status == "ok", (result.error, other.error)
        assert result.items == other.items > 0
        assert np.array_equal(result.data, other.data) and np.array_equal(result.valid, other.valid)


async def test_scattered_chunks_are_not_searched_as_one(
    demo_catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two chunks far apart: their union holds mostly items neither reads, so each searches
    on its own (two queries, none for the union)."""
    near, far = _chunks()[0], _chunks()[3]
    shift = 200 * 60.0  # 12 km: the union is ~70x the chunks' area
    far = ChunkSpec(
        "far", (far.bbox[0] + shift, far.bbox[1], far.bbox[2] + shift, far.bbox[3]), 128, 128
    )
    engine = Engine(Settings(catalog=demo_catalog, compute_workers=1))
    try:
        queries = _count_queries(engine, monkeypatch)
        results = [
            r async for r in stream_chunks(engine, [near, far], CRS, SearchQuery(), ReadParams())
        ]
    finally:
        engine.close()
    assert len(results) == 2
    assert len(queries) == 2, queries


async def test_the_requests_check_runs_sql_only_when_it_can_refuse(
    demo_catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /chunks' up-front check: no filter and the default order can refuse nothing, so
    it runs no query; an unknown sortby field or a bad filter still fails there, once."""
    from core.catalog import SearchError
    from core.filters import FilterError
    from core.filters import parse as parse_filter

    engine = Engine(Settings(catalog=demo_catalog, compute_workers=1))
    try:
        queries = _count_queries(engine, monkeypatch)
        await engine.check(SearchQuery(), ReadParams(), headers=False)
        assert queries == []
        with pytest.raises((SearchError, FilterError)):
            await engine.check(SearchQuery(sortby=("nosuchfield",)), ReadParams(), headers=False)
        bad = parse_filter("nosuchcolumn = 3")
        with pytest.raises((SearchError, FilterError)):
            await engine.check(SearchQuery(filter=bad), ReadParams(), headers=False)
    finally:
        engine.close()
