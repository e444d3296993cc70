"""The catalog schema layer (core.schema) on the shapes real writers produce: a bbox as a list
(GeoPandas), no bbox at all, nanosecond and naive timestamps (pandas), an all-null datetime
column with start/end datetimes, raster:bands and proj:shape on the assets; and datetimes in
UTC whatever the server's TZ (issue 12, points 1, 2, 6, 8).

Each variant is the demo's STAC-GeoParquet rewritten with pyarrow the way that writer lays it
out, then served by a real `terrazzo serve`; the results are compared with the original file's.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from core import schema
from core.catalog import Catalog, SearchQuery
from tests.conftest import Server

TMS = morecantile.tms.get("WebMercatorQuad")
TWO_DATES = TMS.tile(10.0, 45.12, 11)


def _replace(table: pa.Table, name: str, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, column)


def list_bbox(t: pa.Table) -> pa.Table:
    """GeoPandas/`to_geodataframe` + `to_parquet`: bbox as list<double>."""
    b = t.column("bbox").combine_chunks()
    parts = [b.field(k) for k in ("xmin", "ymin", "xmax", "ymax")]
    lists = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 4 * len(t) + 1, 4, dtype=np.int32)),
        pa.array(np.stack([p.to_numpy() for p in parts], axis=1).ravel()),
    )
    return _replace(t, "bbox", lists)


def bbox_3d(t: pa.Table) -> pa.Table:
    """A 6-number bbox [xmin, ymin, zmin, xmax, ymax, zmax], as STAC allows."""
    b = t.column("bbox").combine_chunks()
    x0, y0, x1, y1 = (b.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax"))
    z = np.zeros_like(x0)
    values = np.stack([x0, y0, z, x1, y1, z], axis=1).ravel()
    offsets = pa.array(np.arange(0, 6 * len(t) + 1, 6, dtype=np.int32))
    return _replace(t, "bbox", pa.ListArray.from_arrays(offsets, pa.array(values)))


def no_bbox(t: pa.Table) -> pa.Table:
    return t.drop_columns(["bbox"])


def ns_utc(t: pa.Table) -> pa.Table:
    """What pandas writes: timestamp[ns, UTC]."""
    return _replace(t, "datetime", t.column("datetime").cast(pa.timestamp("ns", tz="UTC")))


def naive_ns(t: pa.Table) -> pa.Table:
    naive = pc.cast(t.column("datetime"), pa.timestamp("ns"))
    return _replace(t, "datetime", naive)


def null_datetime_with_range(t: pa.Table) -> pa.Table:
    """`datetime` all null (naive, as GeoPandas leaves it) with start/end datetimes; each
    item spans 14 days from its acquisition."""
    start = t.column("datetime").cast(pa.timestamp("us", tz="UTC"))
    end = pc.add(start, pa.scalar(dt.timedelta(days=14), pa.duration("us")))
    t = _replace(t, "datetime", pa.nulls(len(t), pa.timestamp("ns")))
    return t.append_column("start_datetime", start).append_column("end_datetime", end)


VARIANTS: dict[str, Callable[[pa.Table], pa.Table]] = {
    "list-bbox": list_bbox,
    "3d-bbox": bbox_3d,
    "no-bbox": no_bbox,
    "ns-utc": ns_utc,
    "naive-ns": naive_ns,
    "null-datetime+range": null_datetime_with_range,
}


@pytest.fixture(scope="module")
def variants(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("variants")
    shutil.copytree(demo_catalog.parent / "cogs", folder / "cogs")
    table = pq.read_table(demo_catalog)
    out = {}
    for name, make in VARIANTS.items():
        path = folder / f"{name}.parquet"
        pq.write_table(make(table), path)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_searches_like_the_original(variants, demo_catalog, name: str) -> None:
    original = Catalog(demo_catalog)
    variant = Catalog(variants[name])
    try:
        query = SearchQuery(bbox=(9.5, 44.9, 10.5, 45.3), limit=100)
        expect = {i.id: i.bbox for i in original.search_sync(query)}
        got = {i.id: i.bbox for i in variant.search_sync(query)}
        assert got.keys() == expect.keys() and len(expect) > 3
        for item_id, box in expect.items():
            assert got[item_id] == pytest.approx(box, abs=1e-7)  # derived bboxes: float noise
        when = SearchQuery(datetime=(dt.datetime(2024, 8, 1, tzinfo=dt.UTC), None), limit=100)
        assert {i.id for i in variant.search_sync(when)} == {
            i.id for i in original.search_sync(when)
        }
        assert (
            variant.columns["bbox"] == "STRUCT(xmin DOUBLE, ymin DOUBLE, xmax DOUBLE, ymax DOUBLE)"
        )
        for column in schema.TIME_COLUMNS:
            if column in variant.columns:
                assert variant.columns[column] == "TIMESTAMP WITH TIME ZONE"
    finally:
        original.close()
        variant.close()


def test_a_derived_bbox_equals_the_written_one(variants, demo_catalog) -> None:
    derived = Catalog(variants["no-bbox"])
    original = Catalog(demo_catalog)
    try:
        got = {i.id: i.bbox for i in derived.search_sync(SearchQuery(limit=1000))}
        expect = {i.id: i.bbox for i in original.search_sync(SearchQuery(limit=1000))}
        assert got.keys() == expect.keys()
        for item_id, box in expect.items():
            assert got[item_id] == pytest.approx(box, abs=1e-7)
    finally:
        derived.close()
        original.close()


@pytest.fixture(scope="module")
def range_server(variants) -> Iterator[Server]:
    srv = Server(variants["null-datetime+range"], env={"TZ": "Asia/Tokyo"})
    yield srv
    srv.stop()


def test_end_datetime_is_the_end_of_the_catalog_interval(range_server, demo_catalog) -> None:
    last = max(pq.read_table(demo_catalog).column("datetime").to_pylist())
    info = httpx.get(f"{range_server.url}/info").json()
    assert info["datetime"][1].startswith((last + dt.timedelta(days=14)).date().isoformat())
    collections = httpx.get(f"{range_server.url}/collections").json()["collections"]
    assert any(
        c["extent"]["temporal"]["interval"][0][1].startswith(
            (last + dt.timedelta(days=14)).date().isoformat()
        )
        for c in collections
    ), collections


def test_datetimes_are_utc_under_any_tz(range_server) -> None:
    """Under TZ=Asia/Tokyo an item at 10:30Z is labelled 10:30Z everywhere."""
    t = TWO_DATES
    assets = httpx.get(f"{range_server.url}/tiles/{t.z}/{t.x}/{t.y}/assets").json()
    assert assets, "two items cover this tile"
    for entry in assets:
        assert entry["datetime"].endswith(("+00:00", "Z")), entry
        assert "T10:30:00" in entry["datetime"], entry
    lon, lat = 10.0, 45.12
    point = httpx.get(f"{range_server.url}/point/{lon},{lat}").json()
    for value in point["items"]:
        assert "T10:30:00" in value["datetime"] and value["datetime"].endswith(("+00:00", "Z"))


def test_datetime_filters_on_nanosecond_catalogs_are_not_a_500(variants) -> None:
    srv = Server(variants["ns-utc"])
    try:
        t = TWO_DATES
        for path in (f"/tiles/{t.z}/{t.x}/{t.y}", "/items"):
            response = httpx.get(srv.url + path, params={"datetime": "2024-08-01/.."}, timeout=30)
            assert response.status_code == 200, response.text
        one = httpx.get(
            srv.url + f"/tiles/{t.z}/{t.x}/{t.y}/assets", params={"datetime": "2024-08-01/.."}
        ).json()
        assert one and {e["datetime"][:10] for e in one} == {"2024-09-01"}  # June left out
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda t: t.drop_columns(["assets"]), "no 'assets' column"),
        (lambda t: t.drop_columns(["geometry", "bbox"]), "no 'geometry' or 'bbox' column"),
        (
            lambda t: _replace(t, "bbox", pa.array([str(b) for b in t.column("bbox").to_pylist()])),
            "column 'bbox' is VARCHAR",
        ),
        (
            lambda t: _replace(t, "datetime", pa.array(["x"] * len(t))),
            "column 'datetime' is VARCHAR",
        ),
    ],
)
def test_a_catalog_that_cannot_be_served_fails_start_up_in_one_line(
    demo_catalog, tmp_path: Path, make, needle: str
) -> None:
    path = tmp_path / "bad.parquet"
    pq.write_table(make(pq.read_table(demo_catalog)), path)
    with pytest.raises(RuntimeError) as failed:
        Server(path)
    out = str(failed.value)
    assert needle in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]


def test_raster_bands_and_proj_shape_on_assets(demo_catalog, tmp_path: Path) -> None:
    """raster:bands on the item instead of the assets reaches each asset; asset-level
    proj:shape sets the TileJSON zooms of that asset."""
    catalog = Catalog(demo_catalog)
    try:
        item = catalog.search_sync(SearchQuery(limit=1))[0]
        assert item.raster_bands["visual"][0]["nodata"] == 0
        assert item.raster_bands["dem"][0]["data_type"] == "float32"
        assert catalog.resolution_stats(("visual",)) is not None
    finally:
        catalog.close()
    assert schema.raster_bands({}, [{"scale": 2.0, "offset": None}]) == ({"scale": 2.0},)
    assert schema.raster_bands({"raster:bands": [{"nodata": 1}]}, [{"nodata": 2}]) == (
        {"nodata": 1},
    )
