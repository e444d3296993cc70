"""/collections and /items over a real server, and the catalog methods behind them."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import duckdb
import httpx
import pytest
import shapely

from app.catalog_routes import MAX_LIMIT, parse_bbox
from core.catalog import Catalog, SearchQuery
from core.engine import ParamError
from tests.conftest import assert_clear_error

ALL = 37  # demo items


def items(http: httpx.Client, **params: object) -> dict:
    r = http.get("/items", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/geo+json"
    body = r.json()
    assert body["type"] == "FeatureCollection"
    assert body["numberReturned"] == len(body["features"])
    return body


def test_collections(http: httpx.Client) -> None:
    body = http.get("/collections").json()
    assert body["numberMatched"] == 1
    (demo,) = body["collections"]
    assert demo["id"] == "demo" and demo["type"] == "Collection"
    assert demo["item_count"] == ALL
    info = http.get("/info").json()
    assert demo["extent"]["spatial"]["bbox"] == [pytest.approx(info["bbox"])]
    assert demo["extent"]["temporal"]["interval"] == [
        ["2024-06-01T10:30:00Z", "2024-09-01T10:30:00Z"]
    ]
    assert demo["dates"] == ["2024-09-01", "2024-06-01"] and not demo["dates_truncated"]
    assert demo["asset_names"] == ["visual", "dem"]
    dem = demo["item_assets"]["dem"]
    assert "href" not in dem and dem["items"] == ALL
    assert [b["data_type"] for b in dem["raster:bands"]] == ["float32"]
    assert [b["data_type"] for b in demo["item_assets"]["visual"]["raster:bands"]] == ["uint8"] * 3
    links = {link["rel"]: link["href"] for link in demo["links"]}
    assert httpx.get(links["self"]).json()["id"] == "demo"
    assert httpx.get(links["items"]).json()["numberMatched"] == ALL
    assert httpx.get(links["tilejson"]).json()["tilejson"] == "3.0.0"


def test_one_collection_and_a_missing_one(http: httpx.Client) -> None:
    assert http.get("/collections/demo").json()["item_count"] == ALL
    r = http.get("/collections/nope")
    assert r.status_code == 404
    assert "nope" in r.json()["detail"] and "demo" in r.json()["detail"]


def test_items_are_footprints(http: httpx.Client) -> None:
    body = items(http)
    assert body["numberMatched"] == ALL and body["numberReturned"] == ALL
    when = [f["properties"]["datetime"] for f in body["features"]]
    assert when == sorted(when, reverse=True), "newest first by default"
    for feature in body["features"]:
        assert feature["type"] == "Feature" and feature["id"].startswith("demo-")
        shape = shapely.geometry.shape(feature["geometry"])
        assert shape.geom_type == "Polygon" and shape.is_valid
        assert shape.bounds == pytest.approx(tuple(feature["bbox"]))
        props = feature["properties"]
        assert props["collection"] == "demo"
        assert props["assets"] == ["visual", "dem"]
        assert props["datetime"].endswith("T10:30:00Z")


def test_items_filters(http: httpx.Client) -> None:
    everything = items(http)["features"]
    box = (9.9, 45.05, 10.1, 45.2)
    found = items(http, bbox=",".join(map(str, box)))
    expected = {
        f["id"] for f in everything if shapely.box(*f["bbox"]).intersects(shapely.box(*box))
    }
    assert {f["id"] for f in found["features"]} == expected
    assert 0 < found["numberMatched"] == len(expected) < ALL

    september = items(http, datetime="2024-09-01")
    assert september["numberMatched"] == sum(
        f["properties"]["datetime"].startswith("2024-09-01") for f in everything
    )
    assert all(f["properties"]["datetime"].startswith("2024-09-01") for f in september["features"])

    both = items(http, bbox=",".join(map(str, box)), datetime="../2024-07-01")
    assert {f["id"] for f in both["features"]} == {
        f["id"] for f in found["features"] if f["properties"]["datetime"] < "2024-07"
    }

    assert items(http, collections="nope")["numberMatched"] == 0
    assert items(http, collections="demo")["numberMatched"] == ALL
    one = everything[3]["id"]
    assert [f["id"] for f in items(http, ids=one)["features"]] == [one]
    zone31 = items(http, filter="\"proj:code\" = 'EPSG:32631'")
    assert zone31["numberMatched"] > 0
    assert all("32631" in f["id"] for f in zone31["features"])
    oldest = items(http, sortby="datetime", limit=1)["features"][0]
    assert oldest["properties"]["datetime"].startswith("2024-06-01")


def test_limit(http: httpx.Client) -> None:
    page = items(http, limit=5)
    assert page["numberReturned"] == 5 and page["numberMatched"] == ALL
    for bad in (MAX_LIMIT + 1, 0):
        r = http.get("/items", params={"limit": bad})
        assert r.status_code == 422, r.text
        assert "limit" in r.json()["detail"]
    assert str(MAX_LIMIT) in http.get("/items", params={"limit": MAX_LIMIT + 1}).json()["detail"]


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"bbox": "1,2,3"}, "bbox"),
        ({"bbox": "a,b,c,d"}, "bbox"),
        ({"bbox": "0,50,10,40"}, "miny"),
        ({"bbox": "170,0,-170,10"}, "antimeridian"),
        ({"bbox": "0,0,200,10"}, "outside"),
        ({"datetime": "last week"}, "datetime"),
        ({"datetime": "2024-09-01/2024-06-01"}, "after"),
        ({"sortby": "-cloudiness"}, "sortby"),
        ({"filter": "cloudiness < 3"}, "filter"),
    ],
)
def test_bad_input_is_a_clear_400(http: httpx.Client, params: dict, needle: str) -> None:
    assert_clear_error(http.get("/items", params=params), 400, needle)


def test_parse_bbox() -> None:
    assert parse_bbox("1, 2, 3, 4") == (1, 2, 3, 4)
    assert parse_bbox("1,2,0,3,4,100") == (1, 2, 3, 4)  # 3D: heights dropped
    with pytest.raises(ParamError, match="bbox"):
        parse_bbox("nan,0,1,1")


def test_methods_run_on_the_search_threads(demo_catalog: Path) -> None:
    catalog = Catalog(demo_catalog, threads=2)
    threads: list[str] = []

    def spy(method):
        def wrapped(*args):
            threads.append(threading.current_thread().name)
            return method(*args)

        return wrapped

    for name in ("collections", "footprints", "resolution_stats"):
        setattr(catalog, name, spy(getattr(catalog, name)))

    async def main() -> tuple:
        return await asyncio.gather(
            catalog.collections_async(),
            catalog.footprints_async(SearchQuery(limit=3)),
            catalog.resolution_stats_async(),
        )

    try:
        collections, (features, matched), stats = asyncio.run(main())
    finally:
        catalog.close()
    assert len(threads) == 3 and all(t.startswith("terrazzo-search") for t in threads)
    assert collections[0]["items"] == ALL
    assert len(features) == 3 and matched == ALL
    assert stats is not None and stats["res_deg"] > 0


def test_browsing_follows_a_replaced_catalog(demo_catalog: Path, tmp_path: Path) -> None:
    """Cached per snapshot: a catalog file replaced on disk shows in /collections at once."""
    path = tmp_path / "items.parquet"
    shutil.copy(demo_catalog, path)
    catalog = Catalog(path)
    try:
        assert catalog.collections()[0]["items"] == ALL
        june = tmp_path / "june.parquet"
        duckdb.sql(
            f"COPY (SELECT * FROM read_parquet('{path}') WHERE datetime < '2024-07-01')"
            f" TO '{june}' (FORMAT parquet)"
        )
        os.replace(june, path)
        catalog._checked = time.monotonic() - 10  # skip the once-a-second check's wait
        (only,) = catalog.collections()
        assert only["dates"] == ["2024-06-01"] and only["items"] < ALL
        _, matched = catalog.footprints(SearchQuery())
        assert matched == only["items"]
    finally:
        catalog.close()
