"""Catalog entries that cannot be served — garbage WKB, a NaN bbox, a NUL byte in an href, a
year-20000 datetime — are item errors reported at start-up, never a failed start-up or a 500
for the other items; a replacement file with the wrong schema is ignored (issues 11, 19).

The catalogs are the demo's STAC-GeoParquet rewritten with pyarrow, as any writer could.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import morecantile
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import Server

TMS = morecantile.tms.get("WebMercatorQuad")
HERE = (10.0, 45.12)  # covered by a June and a September demo item
SEPTEMBER = "demo-32632-2024-09-01-02"  # the newer of the two: first in mosaic order


def _set(table: pa.Table, column: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(column)
    field = table.schema.field(column)
    return table.set_column(index, field, pa.array(values, type=field.type))


def broken_catalog(demo: Path, out: Path) -> dict[str, str]:
    """Rewrite the demo catalog with one broken entry of each kind; returns {id: kind}."""
    table = pq.read_table(demo)
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    others = [i for i, r in enumerate(rows) if r["id"] != SEPTEMBER and "2024-06" not in r["id"]]
    broken = {
        SEPTEMBER: "garbage WKB",
        rows[others[0]]["id"]: "short WKB",
        rows[others[1]]["id"]: "NaN bbox",
        rows[others[2]]["id"]: "NUL href",
        rows[others[3]]["id"]: "year 20000",
    }
    geometry = table.column("geometry").to_pylist()
    geometry[ids.index(SEPTEMBER)] = b"\x01\x03\x00\x00\x00garbage that is not a polygon"
    geometry[others[0]] = b"\x00"
    table = _set(table, "geometry", geometry)
    bbox = table.column("bbox").to_pylist()
    bbox[others[1]] = {"xmin": float("nan"), "ymin": 0.0, "xmax": 1.0, "ymax": float("inf")}
    table = _set(table, "bbox", bbox)
    assets = table.column("assets").to_pylist()
    assets[others[2]]["visual"]["href"] = "cogs/evil\x00.tif"
    table = _set(table, "assets", assets)
    when = table.column("datetime").cast(pa.int64()).to_pylist()
    unit = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[table.schema.field("datetime").type.unit]
    when[others[3]] = (20000 - 1970) * 365 * 86400 * unit  # year ~20000
    index = table.schema.get_field_index("datetime")
    table = table.set_column(
        index,
        table.schema.field("datetime"),
        pa.array(when, pa.int64()).cast(table.schema.field("datetime").type),
    )
    pq.write_table(table, out)
    return broken


@pytest.fixture(scope="module")
def broken(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("broken")
    shutil.copytree(demo_catalog.parent / "cogs", folder / "cogs")
    path = folder / "items.parquet"
    kinds = broken_catalog(demo_catalog, path)
    server = Server(path)
    yield server, path, kinds
    server.stop()


def test_start_up_reports_the_broken_items(broken) -> None:
    server, _, kinds = broken
    out = server.output()
    assert server.proc.poll() is None
    assert "items that cannot be served (catalog content): 4" in out, out[-3000:]
    for item_id, kind in kinds.items():
        if kind != "garbage WKB":  # its header bytes look right: caught when searched
            assert item_id in out, (kind, out[-3000:])


def test_a_tile_over_a_garbage_geometry_is_served_from_the_others(broken) -> None:
    server, _, _ = broken
    tile = TMS.tile(*HERE, 11)
    response = httpx.get(f"{server.url}/tiles/{tile.z}/{tile.x}/{tile.y}.png", timeout=30)
    assert response.status_code == 200, response.text
    assert SEPTEMBER in response.headers["X-Terrazzo-Errors"]
    assert "not valid WKB" in response.headers["X-Terrazzo-Errors"]
    assert response.headers["Cache-Control"] == "no-store"  # incomplete: never cached
    plan = httpx.get(f"{server.url}/tiles/{tile.z}/{tile.x}/{tile.y}/assets", timeout=30)
    assert plan.status_code == 200 and plan.json(), plan.text


@pytest.mark.parametrize(
    "path",
    ["/items", "/collections", "/info", "/tilejson.json", "/point/{lon},{lat}", "/map"],
)
def test_every_route_answers_despite_broken_entries(broken, path: str) -> None:
    server, _, _ = broken
    url = server.url + path.format(lon=HERE[0], lat=HERE[1])
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, (path, response.text[:500])


def test_a_nul_href_is_an_item_error(broken) -> None:
    server, _, kinds = broken
    nul = next(i for i, k in kinds.items() if k == "NUL href")
    items = httpx.get(f"{server.url}/items", params={"ids": nul}).json()["features"]
    lon0, lat0, lon1, lat1 = items[0]["bbox"]
    tile = TMS.tile((lon0 + lon1) / 2, (lat0 + lat1) / 2, 12)
    response = httpx.get(f"{server.url}/tiles/{tile.z}/{tile.x}/{tile.y}", timeout=30)
    assert response.status_code in (200, 502), response.text
    errors = response.headers.get("X-Terrazzo-Errors", "") + response.text
    assert nul in errors


def test_a_year_20000_datetime_does_not_break_searches(broken) -> None:
    server, _, kinds = broken
    late = next(i for i, k in kinds.items() if k == "year 20000")
    found = httpx.get(f"{server.url}/items", params={"ids": late}).json()
    assert found["numberMatched"] == 1
    assert found["features"][0]["properties"]["datetime"] is None
    dated = httpx.get(f"{server.url}/items", params={"datetime": "2024-01-01/.."})
    assert dated.status_code == 200


def test_a_replacement_with_the_wrong_schema_is_ignored_then_a_good_one_taken(
    broken, demo_catalog: Path
) -> None:
    server, path, _ = broken
    before = httpx.get(f"{server.url}/info").json()["items"]
    wrong = pq.read_table(demo_catalog)
    wrong = wrong.set_column(
        wrong.schema.get_field_index("bbox"),
        "bbox",
        pa.array([str(b) for b in wrong.column("bbox").to_pylist()]),
    )
    staged = path.with_suffix(".staged")
    pq.write_table(wrong, staged)
    os.replace(staged, path)
    time.sleep(1.2)  # replacements are checked at most once a second
    tile = TMS.tile(*HERE, 11)
    assert (
        httpx.get(f"{server.url}/tiles/{tile.z}/{tile.x}/{tile.y}", timeout=30).status_code == 200
    )
    assert httpx.get(f"{server.url}/info").json()["items"] == before
    assert "column 'bbox' is VARCHAR" in server.output()

    good = pq.read_table(demo_catalog).slice(0, 30)
    pq.write_table(good, staged)
    os.replace(staged, path)
    time.sleep(1.2)
    assert httpx.get(f"{server.url}/info").json()["items"] == 30  # no lag behind the file
    response = httpx.get(f"{server.url}/items", params={"limit": 100}).json()
    assert response["numberMatched"] == 30
