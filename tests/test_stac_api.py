"""The STAC API (app.stac_api) driven by STAC's own clients — pystac-client and odc-stac —
against the session's real server, checked against the parquet file read directly."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import duckdb
import httpx
import numpy as np
import odc.stac
import pystac
import pytest
import rustac
import shapely
from odc.geo.geobox import GeoBox
from pystac.validation.stac_validator import JsonSchemaSTACValidator
from pystac_client import Client

from app.stac_api import MAX_LIMIT
from core.catalog import Catalog, SearchQuery
from core.indexing import index_items
from tests.conftest import Server, assert_clear_error, utm_area

ALL = 37  # demo items
BOX = [5.0, 44.5, 7.5, 45.5]  # lon/lat: items of both UTM zones


@pytest.fixture(scope="module")
def stac(server: Server) -> Client:
    return Client.open(server.url)


@pytest.fixture(scope="module")
def reference(demo_catalog: Path) -> dict[str, dict[str, Any]]:
    """Every item of the parquet file as rustac reads it back, asset hrefs resolved against
    the file's directory (what a STAC client must be able to open). rustac, not
    stac-geoparquet: stac-geoparquet gives back the nulls of struct fields unified across
    items (`"nodata": null` for an asset without nodata), which the original items lack."""
    out = {}
    for item in rustac.read_sync(str(demo_catalog))["features"]:
        for asset in item["assets"].values():
            asset["href"] = Path(os.path.abspath(demo_catalog.parent / asset["href"])).as_uri()
        out[item["id"]] = item
    return out


def duck_ids(catalog: Path, where: str, params: list[Any]) -> list[str]:
    """Ids DuckDB reads from the file itself, newest first then by id (the API's order)."""
    rows = duckdb.execute(
        f"SELECT id FROM read_parquet(?) WHERE {where} ORDER BY datetime DESC, id",
        [str(catalog), *params],
    ).fetchall()
    return [r[0] for r in rows]


def when(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def assert_same_item(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Everything the file holds for the item, as the file holds it."""
    assert got["id"] == want["id"] and got["collection"] == want["collection"]
    assert got["stac_version"] == want["stac_version"]
    assert got["stac_extensions"] == want["stac_extensions"]
    assert got["assets"] == want["assets"], "every asset field, hrefs included"
    props = dict(got["properties"])
    expected = dict(want["properties"])
    assert when(props.pop("datetime")) == when(expected.pop("datetime"))
    assert props == expected
    assert got["bbox"] == pytest.approx(want["bbox"])
    assert shapely.geometry.shape(got["geometry"]).equals_exact(
        shapely.geometry.shape(want["geometry"]), 1e-12
    )


def test_landing_page_is_a_stac_api(http: httpx.Client, stac: Client) -> None:
    landing = http.get("/").json()
    assert landing["type"] == "Catalog" and landing["id"] and landing["description"]
    rels = {link["rel"] for link in landing["links"]}
    assert {"root", "self", "conformance", "data", "search", "service-desc"} <= rels
    methods = {link.get("method") for link in landing["links"] if link["rel"] == "search"}
    assert methods == {"GET", "POST"}
    assert http.get("/conformance").json()["conformsTo"] == landing["conformsTo"]
    for name in ("core", "item_search", "collections", "features", "filter", "sort"):
        assert stac.conforms_to(name), name
    assert [c.id for c in stac.get_collections()] == ["demo"]
    queryables = http.get("/queryables").json()["properties"]
    assert queryables["datetime"]["format"] == "date-time" and "proj:code" in queryables


def test_search_returns_the_items_of_the_file(
    stac: Client, demo_catalog: Path, reference: dict[str, dict[str, Any]]
) -> None:
    search = stac.search(bbox=BOX, datetime="2024-06-01/2024-06-30", max_items=100, method="GET")
    got = [item.to_dict(transform_hrefs=False) for item in search.items()]
    want = duck_ids(
        demo_catalog,
        "bbox.xmin <= ? AND bbox.xmax >= ? AND bbox.ymin <= ? AND bbox.ymax >= ?"
        " AND datetime BETWEEN ? AND ?",
        [BOX[2], BOX[0], BOX[3], BOX[1], "2024-06-01T00:00:00Z", "2024-06-30T23:59:59Z"],
    )
    assert 3 <= len(want) < ALL, "the area and month select some items, not all"
    assert [item["id"] for item in got] == want
    for item in got:
        assert_same_item(item, reference[item["id"]])
        links = {link["rel"]: link["href"] for link in item["links"]}
        assert httpx.get(links["self"]).json()["id"] == item["id"]
        assert httpx.get(links["collection"]).json()["id"] == "demo"
    assert len(list(stac.search(bbox=BOX, max_items=2).items())) == 2, "max_items honoured"


def test_paging_gives_every_item_once(stac: Client, http: httpx.Client) -> None:
    search = stac.search(limit=4)  # POST, next links with merge
    pages = [[f["id"] for f in page["features"]] for page in search.pages_as_dicts()]
    assert len(pages) == -(-ALL // 4) and all(len(p) <= 4 for p in pages)
    ids = [i for page in pages for i in page]
    assert len(ids) == ALL and len(set(ids)) == ALL
    # GET, sorted on two keys (projection ascending, then oldest first): the keyset follows
    url: str | None = "/search?limit=5&sortby=proj:code,%2Bdatetime"
    seen: list[dict[str, Any]] = []
    while url:
        body = http.get(url).json()
        assert body["numberMatched"] == ALL and body["numberReturned"] <= 5
        seen += body["features"]
        url = next((x["href"] for x in body["links"] if x["rel"] == "next"), None)
    keys = [(f["properties"]["proj:code"], f["properties"]["datetime"], f["id"]) for f in seen]
    assert keys == sorted(keys) and len({k[2] for k in keys}) == ALL


def test_post_search_with_intersects_and_a_cql2_filter(
    stac: Client, http: httpx.Client, reference: dict[str, dict[str, Any]]
) -> None:
    ring = [[5.2, 44.8], [7.0, 44.9], [6.0, 45.3], [5.2, 44.8]]
    triangle = {"type": "Polygon", "coordinates": [ring]}
    cql = {"op": "=", "args": [{"property": "proj:code"}, "EPSG:32632"]}
    search = stac.search(intersects=triangle, filter=cql, max_items=100, limit=2)
    got = [item.id for item in search.items()]
    shape = shapely.geometry.shape(triangle)
    want = sorted(
        (i for i, item in reference.items()
         if item["properties"]["proj:code"] == "EPSG:32632"
         and shapely.geometry.shape(item["geometry"]).intersects(shape)),
        key=lambda i: (-when(reference[i]["properties"]["datetime"]).timestamp(), i),
    )  # fmt: skip
    assert got == want and 2 < len(want) < ALL
    # the same filter as CQL2-text over GET
    text = http.get("/search", params={"filter": "\"proj:code\" = 'EPSG:32632'", "limit": 100})
    zone32 = [f["id"] for f in text.json()["features"]]
    assert set(want) < set(zone32)
    assert all(reference[i]["properties"]["proj:code"] == "EPSG:32632" for i in zone32)


def test_collection_items_paging_and_one_item(
    http: httpx.Client, stac: Client, reference: dict[str, dict[str, Any]]
) -> None:
    collection = http.get("/collections/demo").json()
    items_link = next(x["href"] for x in collection["links"] if x["rel"] == "items")
    url: str | None = items_link + "?limit=10&datetime=2024-09-01"
    seen = []
    while url:
        body = httpx.get(url).json()
        seen += [f["id"] for f in body["features"]]
        url = next((x["href"] for x in body["links"] if x["rel"] == "next"), None)
    september = [i for i, it in reference.items() if it["properties"]["datetime"] >= "2024-09"]
    assert sorted(seen) == sorted(september) and len(seen) > 10, "more than one page"
    one = http.get(f"/collections/demo/items/{seen[0]}")
    assert one.status_code == 200 and one.headers["content-type"] == "application/geo+json"
    assert_same_item(one.json(), reference[seen[0]])
    assert len(list(stac.get_collection("demo").get_items())) == ALL
    missing = http.get("/collections/demo/items/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["detail"]
    assert "37 items" in missing.json()["detail"]
    nowhere = http.get("/collections/nope/items")
    assert nowhere.status_code == 404 and "['demo']" in nowhere.json()["detail"]


def test_odc_stac_loads_the_same_array_as_from_the_file(
    stac: Client, reference: dict[str, dict[str, Any]]
) -> None:
    res, crs = 120, "EPSG:32632"
    area = utm_area(64, res, lon=6.9, lat=45.0, crs=crs)
    box = GeoBox.from_bbox(area, crs, resolution=res)
    lonlat = list(box.geographic_extent.boundingbox)
    found = list(stac.search(bbox=lonlat, max_items=100).items())
    assert len(found) >= 2, "the area spans several items"
    direct = [pystac.Item.from_dict(reference[item.id]) for item in found]
    kwargs: dict[str, Any] = {"bands": ["dem"], "geobox": box, "resampling": "nearest"}
    ours, theirs = odc.stac.load(found, **kwargs), odc.stac.load(direct, **kwargs)
    np.testing.assert_array_equal(ours.dem.values, theirs.dem.values)
    np.testing.assert_array_equal(ours.time.values, theirs.time.values)
    assert (ours.dem.values != -9999).any(), "pixels were read, not only nodata"


def test_items_validate_against_the_stac_item_schema(http: httpx.Client) -> None:
    item = http.get("/search", params={"limit": 1}).json()["features"][0]
    parsed = pystac.Item.from_dict(item)
    validator = JsonSchemaSTACValidator()
    # the core schema ships with pystac: this part runs offline
    validator.validate_core(item, pystac.STACObjectType.ITEM, item["stac_version"])
    bad = {**item, "properties": {**item["properties"], "datetime": 5}}
    with pytest.raises(pystac.STACValidationError):
        validator.validate_core(bad, pystac.STACObjectType.ITEM, item["stac_version"])
    # the extensions' schemas live on stac-extensions.github.io (not reachable here): what
    # the item claims of them is checked by the field-by-field comparison with the file
    assert parsed.stac_extensions == item.get("stac_extensions", [])


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"limit": "0"}, "limit: must be at least 1"),
        ({"limit": "ten"}, "limit: expected a whole number"),
        ({"bbox": "1,2,3"}, "bbox:"),
        ({"datetime": "yesterday"}, "datetime:"),
        ({"sortby": "nope"}, "sortby: unknown field 'nope'"),
        ({"filter": "cloud <"}, "filter:"),
        ({"filter-lang": "sql"}, "filter-lang:"),
        ({"token": "not-a-token"}, "token:"),
        ({"intersects": '{"type": "Circle"}'}, "intersects:"),
        ({"bbox": "0,0,1,1", "intersects": '{"type":"Point","coordinates":[0,0]}'}, "not both"),
        ({"colections": "demo"}, "did you mean 'collections'"),
    ],
)
def test_bad_parameters_are_400s_that_say_what_to_fix(
    http: httpx.Client, params: dict[str, str], needle: str
) -> None:
    assert_clear_error(http.get("/search", params=params), 400, needle)


def test_bad_bodies_tokens_and_limits(http: httpx.Client) -> None:
    for body, needle in [
        ([1, 2], "body: expected a JSON object"),
        ({"query": {}}, "unknown key(s) ['query']"),
        ({"bbox": "1,2"}, "bbox:"),
        ({"sortby": [{"field": "datetime", "direction": "up"}]}, "sortby:"),
        ({"collections": "demo"}, None),  # a string is a comma list: fine
        ({"intersects": {"type": "Polygon", "coordinates": [[[0, 0]]]}}, "intersects:"),
        ({"filter": 5}, "filter:"),
    ]:
        r = http.post("/search", json=body)
        if needle is None:
            assert r.status_code == 200, r.text
        else:
            assert_clear_error(r, 400, needle)
    # a token is tied to its search: sent with another sortby it is refused
    first = http.post("/search", json={"limit": 2}).json()
    token = next(x for x in first["links"] if x["rel"] == "next")["body"]["token"]
    assert http.post("/search", json={"limit": 2, "token": token}).status_code == 200
    other = http.post("/search", json={"limit": 2, "token": token, "sortby": [{"field": "id"}]})
    assert_clear_error(other, 400, "token: it belongs to another search")
    assert_clear_error(http.get("/search", params={"token": "x" * 5000}), 400, "longer than")
    # a limit above the maximum is served as the maximum (OGC API Features), not refused
    big = http.get("/search", params={"limit": MAX_LIMIT * 10})
    assert big.status_code == 200 and big.json()["numberReturned"] == ALL
    assert json.loads(big.text)["numberMatched"] == ALL


@pytest.fixture(scope="module")
def sparse_catalog(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The demo's items with a `cloud` property of many ties, missing (NULL) on a quarter."""
    out = tmp_path_factory.mktemp("sparse")
    items = []
    for n, line in enumerate((demo_catalog.parent / "items.ndjson").read_text().splitlines()):
        item = json.loads(line)
        for asset in item["assets"].values():
            asset["href"] = str(demo_catalog.parent / asset["href"])
        if n % 4:
            item["properties"]["cloud"] = float(n % 3)
        items.append(item)
    (out / "items.ndjson").write_text("\n".join(json.dumps(i) for i in items))
    index_items(out / "items.ndjson", out / "items.parquet")
    catalog = Catalog(out / "items.parquet", cache=out / "cache")
    yield out / "items.parquet", catalog
    catalog.close()


@pytest.mark.parametrize("sortby", [("cloud", "-datetime"), ("-cloud",), ("+platform", "-cloud")])
def test_keyset_pages_over_nulls_and_ties(sparse_catalog: Any, sortby: tuple[str, ...]) -> None:
    """Page keys past NULLs (sorted last) and ties: pages of 3 give the whole order once,
    the order DuckDB gives the file itself (NULLS LAST, then id)."""
    path, catalog = sparse_catalog
    terms = ", ".join(
        f"{s.lstrip('+-')} {'DESC' if s.startswith('-') else 'ASC'} NULLS LAST" for s in sortby
    )
    query = f"SELECT id, cloud FROM read_parquet(?) ORDER BY {terms}, id"
    rows = duckdb.execute(query, [str(path)]).fetchall()
    assert any(cloud is None for _, cloud in rows), "some items lack the property"
    got: list[str] = []
    after = None
    while True:
        page = catalog.stac_page(SearchQuery(sortby=sortby), 3, after)
        assert page.matched == ALL and len(page.items) <= 3
        got += [item["id"] for item in page.items]
        after = page.next_key
        if after is None:
            break
    assert got == [item_id for item_id, _ in rows]
