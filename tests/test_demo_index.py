"""Demo catalog, COG writer and STAC-GeoParquet indexer, checked on real files (no mocks)."""

from __future__ import annotations

import asyncio
import json
import math
import os
from pathlib import Path

import duckdb
import numpy as np
import obstore.store
import pyarrow.parquet as pq
import pytest
import rasterio
import rustac
from affine import Affine
from async_geotiff import GeoTIFF
from rasterio.enums import MaskFlags
from rasterio.warp import Resampling, reproject
from rio_cogeo.cogeo import cog_validate

from core.cogs import COG_MEDIA_TYPE, stac_item, write_cog
from core.demo import build_demo
from core.indexing import hilbert_index, index_items

SIZE = 256
QUERY = "select id, bbox, datetime, assets, geometry::BLOB from read_parquet(?)"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("demo"), size=SIZE)


@pytest.fixture(scope="module")
def items(demo: Path) -> list[dict]:
    lines = (demo.parent / "items.ndjson").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _rows(parquet: Path) -> list[tuple]:
    return duckdb.connect().execute(QUERY, [str(parquet)]).fetchall()


def _has_internal_mask(path: Path) -> bool:
    with rasterio.open(path) as src:
        return src.nodata is None and MaskFlags.per_dataset in src.mask_flag_enums[0]


def _overview_count(path: Path) -> int:
    with rasterio.open(path) as src:
        return len(src.overviews(1))


# --- demo layout -----------------------------------------------------------------------------


def test_demo_layout(demo: Path, items: list[dict]) -> None:
    assert demo == demo.parent / "items.parquet"
    assert demo.exists()
    assert len(items) >= 30
    codes = {it["properties"]["proj:code"] for it in items}
    assert {"EPSG:32631", "EPSG:32632", "EPSG:32633"} <= codes
    assert {it["properties"]["datetime"][:10] for it in items} == {"2024-06-01", "2024-09-01"}
    assert all(it["collection"] == "demo" for it in items)
    assert all(set(it["assets"]) == {"visual", "dem"} for it in items)
    assert "demo-32632-2024-06-01-03" in {it["id"] for it in items}

    cogs = demo.parent
    visual = [cogs / it["assets"]["visual"]["href"] for it in items]
    masked = [p for p in visual if _has_internal_mask(p)]
    flat = [p for p in visual if _overview_count(p) == 0]
    assert masked, "one item must carry an internal mask instead of a nodata value"
    assert flat, "one item must have no overviews"


def test_footprints_overlap_across_zone_boundaries(items: list[dict]) -> None:
    def overlaps(a: dict, b: dict) -> bool:
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
        return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1

    pairs = {
        (a["properties"]["proj:code"], b["properties"]["proj:code"])
        for a in items
        for b in items
        if a["id"] < b["id"] and overlaps(a, b)
    }
    assert ("EPSG:32631", "EPSG:32632") in pairs or ("EPSG:32632", "EPSG:32631") in pairs
    assert ("EPSG:32632", "EPSG:32633") in pairs or ("EPSG:32633", "EPSG:32632") in pairs


def test_imagery_has_no_zero_inside_valid_area(demo: Path, items: list[dict]) -> None:
    for it in items[:6]:
        with rasterio.open(demo.parent / it["assets"]["visual"]["href"]) as src:
            data = src.read()
            valid = src.dataset_mask() > 0
        assert (data[:, valid] > 0).all()


def test_overlapping_items_in_different_zones_agree(demo: Path) -> None:
    """The landscape is a function of lon/lat, so a neighbour warped onto an item matches it."""
    cogs = demo.parent / "cogs"
    for west, east in [
        ("demo-32631-2024-06-01-02", "demo-32632-2024-06-01-03"),
        ("demo-32632-2024-06-01-21", "demo-32633-2024-06-01-22"),
    ]:
        for asset, tolerance in [("dem", 2.0), ("visual", 2.0)]:
            with (
                rasterio.open(cogs / f"{west}_{asset}.tif") as a,
                rasterio.open(cogs / f"{east}_{asset}.tif") as b,
            ):
                assert a.crs != b.crs
                warped = np.full((b.count, b.height, b.width), np.nan, dtype=np.float32)
                source = np.where(a.dataset_mask() > 0, a.read(), np.nan).astype(np.float32)
                reproject(
                    source,
                    warped,
                    src_transform=a.transform,
                    src_crs=a.crs,
                    src_nodata=np.nan,
                    dst_transform=b.transform,
                    dst_crs=b.crs,
                    dst_nodata=np.nan,
                    resampling=Resampling.bilinear,
                )
                both = np.isfinite(warped[0]) & (b.dataset_mask() > 0)
                assert both.mean() > 0.1  # ~20% overlap
                diff = np.abs(warped[:, both] - b.read()[:, both].astype(np.float32))
                assert diff.mean() < tolerance, (west, east, asset, diff.mean())


def test_internal_mask_visible_to_async_geotiff(demo: Path, items: list[dict]) -> None:
    cogs = demo.parent / "cogs"
    masked = [
        Path(it["assets"][key]["href"]).name
        for it in items
        for key in ("visual", "dem")
        if _has_internal_mask(demo.parent / it["assets"][key]["href"])
    ]
    assert masked

    async def read_masks() -> list[np.ndarray | None]:
        store = obstore.store.LocalStore(str(cogs))
        out = []
        for name in masked:
            geotiff = await GeoTIFF.open(name, store=store)
            out.append((await geotiff.read()).mask)
        return out

    for mask in asyncio.run(read_masks()):
        assert mask is not None
        assert mask.any() and not mask.all()


# --- the index -------------------------------------------------------------------------------


def test_parquet_readable_by_plain_duckdb(demo: Path, items: list[dict]) -> None:
    rows = _rows(demo)
    assert sorted(r[0] for r in rows) == sorted(it["id"] for it in items)
    _ident, bbox, when, assets, geometry = rows[0]
    assert set(bbox) == {"xmin", "ymin", "xmax", "ymax"}
    assert bbox["xmin"] < bbox["xmax"] and bbox["ymin"] < bbox["ymax"]
    assert when.year == 2024
    assert assets["visual"]["type"] == COG_MEDIA_TYPE
    assert isinstance(geometry, bytes) and len(geometry) > 100  # densified WKB polygon

    # The bbox covering supports a plain-SQL search with no extension.
    hits = (
        duckdb.connect()
        .execute(
            "select id from read_parquet(?) where bbox.xmin <= ? and bbox.xmax >= ? "
            "and bbox.ymin <= ? and bbox.ymax >= ?",
            [str(demo), 6.0, 6.0, 45.0, 45.0],
        )
        .fetchall()
    )
    zones = {h[0].split("-")[1] for h in hits}
    assert {"32631", "32632"} <= zones


def test_schema_metadata_kept(demo: Path) -> None:
    meta = pq.ParquetFile(demo).schema_arrow.metadata
    assert b"geo" in meta and b"stac-geoparquet" in meta
    geo = json.loads(meta[b"geo"])
    assert geo["primary_column"] == "geometry"
    assert geo["columns"]["geometry"]["encoding"].upper() == "WKB"


def test_row_group_size(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "small-groups.parquet"
    n = index_items(demo.parent / "items.ndjson", out, row_group_size=5)
    meta = pq.ParquetFile(out).metadata
    assert meta.num_rows == n
    assert meta.num_row_groups == math.ceil(n / 5)
    assert all(meta.row_group(i).num_rows <= 5 for i in range(meta.num_row_groups))
    assert b"geo" in meta.metadata and b"stac-geoparquet" in meta.metadata
    assert [f for f in os.listdir(tmp_path) if f.startswith(".")] == []  # temp files gone


def test_output_is_spatially_sorted(demo: Path) -> None:
    rows = _rows(demo)
    centres = np.array(
        [((b["xmin"] + b["xmax"]) / 2, (b["ymin"] + b["ymax"]) / 2) for _, b, *_ in rows]
    )

    def mean_step(points: np.ndarray) -> float:
        return float(np.linalg.norm(np.diff(points, axis=0), axis=1).mean())

    rng = np.random.default_rng(0)
    shuffled = np.mean([mean_step(rng.permutation(centres)) for _ in range(20)])
    assert mean_step(centres) < 0.4 * shuffled


def test_same_place_newest_first(tmp_path: Path) -> None:
    """Items with the same footprint sort newest first; a missing bbox is derived."""
    base = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "geometry": {"type": "Point", "coordinates": [1.0, 2.0]},  # no bbox: derived
        "assets": {"data": {"href": "https://example.com/a.tif"}},
        "links": [],
    }
    dates = ["2024-01-01T00:00:00Z", "2024-03-01T00:00:00Z", "2024-02-01T00:00:00Z"]
    feats = [{**base, "id": f"i{i}", "properties": {"datetime": d}} for i, d in enumerate(dates)]
    src = tmp_path / "same.json"
    src.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    index_items(src, tmp_path / "same.parquet")
    rows = _rows(tmp_path / "same.parquet")
    assert [r[0] for r in rows] == ["i1", "i2", "i0"]
    assert rows[0][1] == {"xmin": 1.0, "ymin": 2.0, "xmax": 1.0, "ymax": 2.0}


def test_hilbert_index_is_a_curve() -> None:
    order = 3
    n = 1 << order
    xs, ys = np.meshgrid(np.arange(n), np.arange(n))
    d = hilbert_index(xs.ravel(), ys.ravel(), order=order)
    assert sorted(d.tolist()) == list(range(n * n))  # a bijection onto 0..n²-1
    cells = np.empty((n * n, 2), dtype=int)
    cells[d] = np.column_stack([xs.ravel(), ys.ravel()])
    steps = np.abs(np.diff(cells, axis=0)).sum(axis=1)
    assert (steps == 1).all()  # consecutive keys are neighbouring cells


def test_assets_resolve_to_valid_cogs(demo: Path) -> None:
    rows = _rows(demo)
    assert rows
    for _, _, _, assets, _ in rows:
        for asset in assets.values():
            href = asset["href"]
            assert not os.path.isabs(href) and "\\" not in href
            path = demo.parent / href
            assert path.is_file()
            with rasterio.open(path) as src:
                assert src.crs is not None and src.count in (1, 3)
            valid, errors, _warnings = cog_validate(str(path), quiet=True)
            assert valid and not errors, (href, errors)


def test_rustac_reads_index_back(demo: Path, items: list[dict]) -> None:
    back = rustac.read_sync(str(demo))
    features = back.get("features", back)
    assert sorted(f["id"] for f in features) == sorted(it["id"] for it in items)
    by_id = {f["id"]: f for f in features}
    for it in items:
        assert by_id[it["id"]]["assets"]["dem"]["href"] == it["assets"]["dem"]["href"]
        assert by_id[it["id"]]["properties"]["proj:code"] == it["properties"]["proj:code"]


# --- input formats and href rebasing ----------------------------------------------------------


def test_json_ndjson_and_featurecollection_give_same_ids(demo: Path, items: list[dict]) -> None:
    src_dir = demo.parent
    inputs = {
        "fc.json": json.dumps({"type": "FeatureCollection", "features": items}),
        "list.json": json.dumps(items),
        "items.ndjson": "\n".join(json.dumps(it) for it in items) + "\n",
        "ndjson-named.json": "\n".join(json.dumps(it) for it in items),
    }
    ids = {}
    for name, text in inputs.items():
        source = src_dir / f"in-{name}"
        source.write_text(text)
        out = src_dir / f"out-{name}.parquet"
        assert index_items(source, out) == len(items)
        ids[name] = [r[0] for r in _rows(out)]
    assert all(v == ids["fc.json"] for v in ids.values())

    single = src_dir / "in-single.json"
    single.write_text(json.dumps(items[0]))
    assert index_items(single, src_dir / "out-single.parquet") == 1
    assert [r[0] for r in _rows(src_dir / "out-single.parquet")] == [items[0]["id"]]


def test_hrefs_rebased_relative_or_absolute(demo: Path, items: list[dict]) -> None:
    item = json.loads(json.dumps(items[0]))
    item["assets"]["remote"] = {"href": "https://example.com/a.tif", "type": COG_MEDIA_TYPE}
    source = demo.parent / "one.ndjson"  # hrefs like "cogs/x.tif" relative to the demo dir
    source.write_text(json.dumps(item) + "\n")

    inside = demo.parent / "sub" / "index.parquet"  # COGs not under sub/ → absolute
    index_items(source, inside)
    assets = _rows(inside)[0][3]
    assert assets["remote"]["href"] == "https://example.com/a.tif"
    assert Path(assets["visual"]["href"]).is_absolute()
    assert Path(assets["visual"]["href"]) == (demo.parent / item["assets"]["visual"]["href"])

    nested = demo.parent / "cogs" / "index.parquet"  # COGs under cogs/ → relative
    index_items(source, nested)
    href = _rows(nested)[0][3]["visual"]["href"]
    assert not os.path.isabs(href)
    assert (nested.parent / href).is_file()
    nested.unlink()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\n",
        '{"type": "FeatureCollection", "features": []}',
        '{"type": "Catalog", "id": "c", "links": []}',
        '[{"type": "Feature", "id": "x"}]',
        "not json at all",
        '{"type": "Feature", "id": "a", "geometry": null, "properties": {}}',
    ],
)
def test_invalid_input_raises_value_error(tmp_path: Path, text: str) -> None:
    source = tmp_path / "bad.json"
    source.write_text(text)
    with pytest.raises(ValueError, match="expected"):
        index_items(source, tmp_path / "bad.parquet")
    assert not (tmp_path / "bad.parquet").exists()


# --- cogs.py ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_write_cog_dtypes(tmp_path: Path, dtype: str) -> None:
    rng = np.random.default_rng(1)
    data = (rng.random((2, 600, 520)) * 100 + 1).astype(dtype)
    transform = Affine(10, 0, 400000, 0, -10, 5000000)
    path = write_cog(
        tmp_path / f"{dtype}.tif", data, crs="EPSG:32632", transform=transform, nodata=0
    )
    valid, errors, warnings = cog_validate(str(path), quiet=True)
    assert valid and not errors and not warnings
    with rasterio.open(path) as src:
        assert src.dtypes[0] == dtype
        assert src.overviews(1) == [2, 4]  # down to one 256 px block
        predictor = src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR")
        assert predictor == ("3" if dtype == "float32" else "2")
        np.testing.assert_array_equal(src.read(), data)


def test_write_cog_mask_and_no_overviews(tmp_path: Path) -> None:
    data = np.full((3, 512, 512), 200, dtype=np.uint8)
    mask = np.ones((512, 512), dtype=bool)
    mask[:, :101] = False  # odd edge: overview pixels straddle valid and invalid columns
    data[:, ~mask] = 0
    transform = Affine(30, 0, 500000, 0, -30, 5000000)
    masked = write_cog(tmp_path / "m.tif", data, crs="EPSG:32632", transform=transform, mask=mask)
    flat = write_cog(
        tmp_path / "f.tif", data, crs="EPSG:32632", transform=transform, overviews=False
    )
    assert cog_validate(str(masked), quiet=True)[0]
    with rasterio.open(masked) as src:
        assert src.nodata is None
        np.testing.assert_array_equal(src.dataset_mask() > 0, mask)
        # Average overviews are computed over valid pixels only: no darkened edge.
        overview = src.read(1, out_shape=(256, 256))
        assert set(np.unique(overview[src.read_masks(1, out_shape=(256, 256)) > 0])) == {200}
    with rasterio.open(flat) as src:
        assert src.overviews(1) == []


def test_stac_item_fields(tmp_path: Path) -> None:
    data = np.ones((1, 300, 400), dtype=np.float32)
    transform = Affine(30, 0, 699960, 0, -30, 5000040)  # near the east edge of zone 31
    path = write_cog(
        tmp_path / "cogs" / "a.tif", data, crs="EPSG:32631", transform=transform, nodata=-9999
    )
    item = stac_item(
        "a",
        {"dem": path},
        datetime="2024-06-01T00:00:00Z",
        collection="c",
        href_base=tmp_path,
        properties={"gsd": 30},
    )
    props = item["properties"]
    assert item["stac_version"] == "1.1.0" and item["links"] == []
    assert props["proj:code"] == "EPSG:32631"
    assert props["proj:shape"] == [300, 400]
    assert props["proj:transform"] == [30, 0, 699960, 0, -30, 5000040]
    assert props["datetime"] == "2024-06-01T00:00:00Z" and props["gsd"] == 30
    assert item["assets"]["dem"]["href"] == "cogs/a.tif"
    assert item["assets"]["dem"]["type"] == COG_MEDIA_TYPE
    assert item["assets"]["dem"]["roles"] == ["data"]
    ring = item["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 81  # densified: 20 segments per edge
    lons, lats = zip(*ring, strict=True)
    assert item["bbox"] == [min(lons), min(lats), max(lons), max(lats)]
    assert 5.0 < min(lons) < max(lons) < 6.5 and 44.5 < min(lats) < max(lats) < 45.5

    absolute = stac_item("a", {"dem": str(path)}, datetime="2024-06-01T00:00:00Z", collection="c")
    assert absolute["assets"]["dem"]["href"] == Path(os.path.abspath(path)).as_posix()
