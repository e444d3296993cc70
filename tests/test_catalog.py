"""Search stage: DuckDB over real STAC-GeoParquet, one cursor per worker thread."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import threading
from pathlib import Path

import pytest
import rustac
import shapely

from core import filters
from core.catalog import Catalog, SearchError, SearchQuery, parse_datetime_range


def item(i: int, x: float, y: float, day: int, collection: str = "a") -> dict:
    ring = [[x, y], [x + 1, y], [x + 1, y + 1], [x, y + 1], [x, y]]
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": f"item-{i:03d}",
        "collection": collection,
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "bbox": [x, y, x + 1, y + 1],
        "properties": {"datetime": f"2024-06-{day:02d}T10:00:00Z"},
        "assets": {
            "visual": {
                "href": f"cogs/{i}.tif",
                "roles": ["data"],
                "type": "image/tiff; application=geotiff",
            }
        },
        "links": [],
    }


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Catalog:
    items = [
        item(i, x=i % 10, y=i // 10, day=1 + i % 20, collection="ab"[i % 2]) for i in range(100)
    ]
    # a triangle whose bbox covers (5.5, 0.5) but whose footprint does not
    tri = item(500, 5, 0, 25)
    tri["geometry"]["coordinates"] = [[[5, 0], [6, 0], [5, 0.2], [5, 0]]]
    path = tmp_path_factory.mktemp("cat") / "items.parquet"
    rustac.write_sync(str(path), [*items, tri])
    cat = Catalog(path, threads=2)
    yield cat
    cat.close()


def test_bbox_and_footprint(catalog: Catalog) -> None:
    box = (5.4, 0.4, 5.6, 0.6)
    found = catalog.search_sync(SearchQuery(bbox=box, intersects=shapely.box(*box)))
    assert [i.id for i in found] == ["item-005"]  # the triangle's bbox matched, footprint not
    assert found[0].assets["visual"] == str(catalog.local_root / "cogs/5.tif")


def test_datetime_collections_ids_sort_limit(catalog: Catalog) -> None:
    june3 = parse_datetime_range("2024-06-03")
    found = catalog.search_sync(SearchQuery(datetime=june3))
    assert {i.id for i in found} == {"item-002", "item-022", "item-042", "item-062", "item-082"}
    found = catalog.search_sync(SearchQuery(collections=("b",), limit=5, sortby=("id",)))
    assert [i.id for i in found] == ["item-001", "item-003", "item-005", "item-007", "item-009"]
    found = catalog.search_sync(SearchQuery(ids=("item-010", "item-011"), sortby=("-id",)))
    assert [i.id for i in found] == ["item-011", "item-010"]
    newest = catalog.search_sync(SearchQuery(limit=3))
    assert all(a.datetime >= b.datetime for a, b in itertools.pairwise(newest))
    assert newest[0].datetime == dt.datetime(2024, 6, 25, 10, tzinfo=dt.UTC)


def test_values_are_bound_not_pasted(catalog: Catalog) -> None:
    evil = "x' OR '1'='1"
    assert catalog.search_sync(SearchQuery(ids=(evil,))) == []
    assert catalog.search_sync(SearchQuery(collections=(evil,))) == []
    with pytest.raises(SearchError, match="unknown field"):
        catalog.search_sync(SearchQuery(sortby=('id" DESC; DROP TABLE items; --',)))


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-01", "2024-06-05/2024-06-01"])
def test_bad_datetime_says_why(bad: str) -> None:
    with pytest.raises(SearchError, match="datetime"):
        parse_datetime_range(bad)


def test_open_ended_datetime() -> None:
    start, end = parse_datetime_range("2024-06-01T00:00:00Z/..")
    assert start == dt.datetime(2024, 6, 1, tzinfo=dt.UTC) and end is None


async def test_searches_run_on_worker_threads_in_parallel(catalog: Catalog) -> None:
    seen: set[str] = set()
    original = catalog._cursor

    def spy():
        seen.add(threading.current_thread().name)
        return original()

    catalog._cursor = spy  # type: ignore[method-assign]
    try:
        results = await asyncio.gather(
            *(catalog.search(SearchQuery(bbox=(i % 10, 0, i % 10 + 0.5, 9))) for i in range(40))
        )
    finally:
        del catalog._cursor
    assert all(results)
    assert threading.main_thread().name not in seen
    assert all(name.startswith("terrazzo-search") for name in seen)


def test_default_asset_and_summary(catalog: Catalog) -> None:
    assert catalog.default_assets == ("visual",)
    summary = catalog.summary()
    assert summary["items"] == 101
    assert summary["bbox"] == [0, 0, 10, 10]


def test_not_a_catalog(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Catalog(tmp_path / "nope.parquet")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("collection = 'b' AND id < 'item-006'", ["item-001", "item-003", "item-005"]),
        (
            {"op": "in", "args": [{"property": "id"}, ["item-007", "item-042"]]},
            ["item-007", "item-042"],
        ),
        (
            "id LIKE 'item-09%' AND NOT collection = 'a'",
            ["item-091", "item-093", "item-095", "item-097", "item-099"],
        ),
        ("id BETWEEN 'item-010' AND 'item-012'", ["item-010", "item-011", "item-012"]),
    ],
)
def test_cql2_filters(catalog: Catalog, expression, expected: list[str]) -> None:
    tree = filters.parse(expression)
    found = catalog.search_sync(SearchQuery(filter=tree, sortby=("id",), limit=50))
    assert [i.id for i in found] == expected


@pytest.mark.parametrize(
    ("expression", "needle"),
    [
        ("cloud_cover < 10", "unknown property"),
        ("id = ", "not valid CQL2"),
        ("S_INTERSECTS(geometry, POINT(1 2))", "not supported"),
    ],
)
def test_bad_filters_say_why(catalog: Catalog, expression: str, needle: str) -> None:
    with pytest.raises(filters.FilterError, match=needle):
        catalog.search_sync(SearchQuery(filter=filters.parse(expression)))


def test_filter_values_are_bound(catalog: Catalog) -> None:
    tree = filters.parse({"op": "=", "args": [{"property": "id"}, "x' OR '1'='1"]})
    sql, params = filters.to_sql(tree, catalog.columns)
    assert "OR '1'" not in sql and params == ["x' OR '1'='1"]
    assert catalog.search_sync(SearchQuery(filter=tree)) == []


@pytest.mark.parametrize("in_memory", [False, True])
def test_replaced_catalog_is_reloaded_and_a_broken_one_ignored(
    tmp_path: Path, in_memory: bool
) -> None:
    path = tmp_path / "items.parquet"
    rustac.write_sync(str(path), [item(i, i, 0, 1) for i in range(3)])
    cat = Catalog(path, threads=1, in_memory=in_memory)
    try:
        assert cat.summary()["items"] == 3
        staged = tmp_path / "staged.parquet"
        rustac.write_sync(str(staged), [item(i, i, 0, 1) for i in range(7)])
        staged.replace(path)  # atomic, as `terrazzo index` writes
        assert cat.reload_if_replaced(every_s=0)
        assert len(cat.search_sync(SearchQuery(limit=50))) == 7
        broken = tmp_path / "broken.parquet"
        broken.write_bytes(b"PAR1 half a file")
        broken.replace(path)
        assert not cat.reload_if_replaced(every_s=0)
        assert len(cat.search_sync(SearchQuery(limit=50))) == 7, "the good catalog stays"
        staged = tmp_path / "staged.parquet"
        rustac.write_sync(str(staged), [item(i, i, 0, 1) for i in range(2)])
        staged.replace(path)
        assert cat.reload_if_replaced(every_s=0)
        assert len(cat.search_sync(SearchQuery(limit=50))) == 2
    finally:
        cat.close()
