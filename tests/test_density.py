"""TileJSON/WMTS minzoom: never below the lowest zoom at which every tile can be served
complete (no tile touches more items than a tile search takes).

`core.density` counts in DuckDB; every expectation here is a brute-force count over the tiles
of each zoom, made with morecantile from the items' bboxes (closed intersection, as the
search's bbox test), independent of that SQL.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import affine
import httpx
import morecantile
import numpy as np
import pytest

from core.cogs import stac_item, write_cog
from core.density import complete_zoom
from core.indexing import index_items
from tests.conftest import Server

MERCATOR = morecantile.tms.get("WebMercatorQuad")


def brute_counts(tms: morecantile.TileMatrixSet, bboxes: np.ndarray, z: int) -> dict:
    """Items touching each tile of zoom `z`, one by one: every tile between the tiles of a
    bbox's north-west and south-east corners (morecantile's own point-to-tile), counted.
    For north-up matrix sets that rectangle is exactly the tiles the bbox meets (the boxes
    of `clustered` never lie on a tile edge); a tenth of the time of testing each candidate
    tile's bounds, which the first version did."""
    counts: collections.Counter = collections.Counter()
    for west, south, east, north in bboxes:
        first, last = tms.tile(west, north, z), tms.tile(east, south, z)
        counts.update(
            morecantile.Tile(x, y, z)
            for x in range(first.x, last.x + 1)
            for y in range(first.y, last.y + 1)
        )
    return dict(counts)


def brute_zoom(
    tms: morecantile.TileMatrixSet, bboxes: np.ndarray, limit: int, top: int
) -> int | None:
    for z in range(tms.minzoom, top + 1):
        if max(brute_counts(tms, bboxes, z).values()) <= limit:
            return z
    return None


def clustered(n: int, seed: int) -> np.ndarray:
    """`n` bboxes of 0.5-30 km around two towns (never aligned on tile edges)."""
    rng = np.random.default_rng(seed)
    town = rng.integers(0, 2, n)
    cx = np.where(town, 10.4, 11.1) + rng.normal(0, 0.15, n)
    cy = np.where(town, 45.3, 45.0) + rng.normal(0, 0.1, n)
    w = np.exp(rng.uniform(np.log(0.005), np.log(0.3), n))
    return np.stack([cx, cy, cx + w, cy + w * rng.uniform(0.5, 1.0, n)], axis=1)


@pytest.mark.parametrize(("seed", "limit"), [(1, 8), (2, 20), (3, 60), (4, 150)])
def test_complete_zoom_matches_a_brute_force_count(seed: int, limit: int) -> None:
    bboxes = clustered(240, seed)
    got = complete_zoom(MERCATOR, bboxes, limit)
    expected = brute_zoom(MERCATOR, bboxes, limit, top=14)
    assert got.zoom == expected, got
    if got.zoom is not None:
        assert got.densest == max(brute_counts(MERCATOR, bboxes, got.zoom).values())
        assert max(brute_counts(MERCATOR, bboxes, got.zoom - 1).values()) > limit


def test_a_stack_deeper_than_the_limit_is_complete_at_no_zoom() -> None:
    """Twelve items on one footprint: every tile over it has twelve at every zoom."""
    bboxes = np.vstack([clustered(50, 7), np.tile([[10.71, 45.21, 10.93, 45.33]], (12, 1))])
    got = complete_zoom(MERCATOR, bboxes, 10)
    assert got.zoom is None and got.why
    assert max(brute_counts(MERCATOR, bboxes, 16).values()) > 10
    # the same stack within the limit: a zoom is found, and it is the brute-force one
    assert complete_zoom(MERCATOR, bboxes, 12).zoom == brute_zoom(MERCATOR, bboxes, 12, top=14)


def test_start_and_fewer_items_than_the_limit() -> None:
    bboxes = clustered(30, 5)
    assert complete_zoom(MERCATOR, bboxes, 30).zoom == 0
    assert complete_zoom(MERCATOR, bboxes, 30, start=6).zoom == 6
    full = complete_zoom(MERCATOR, bboxes, 5)
    assert complete_zoom(MERCATOR, bboxes, 5, start=3).zoom == full.zoom
    assert complete_zoom(MERCATOR, bboxes, 5, start=full.zoom + 2).zoom == full.zoom + 2


@pytest.mark.parametrize("tms_id", ["WorldCRS84Quad", "EuropeanETRS89_LAEAQuad"])
def test_other_matrix_sets_are_exact_or_conservative(tms_id: str) -> None:
    """A lon/lat set is counted exactly; a set whose boxes curve (LAEA) never announces a
    zoom below the brute-force one (its tile ranges are widened by a tile: here up to two
    zooms higher than needed)."""
    tms = morecantile.tms.get(tms_id)
    bboxes = clustered(120, 11)
    for limit in (20, 40):
        got = complete_zoom(tms, bboxes, limit)
        expected = brute_zoom(tms, bboxes, limit, top=min(tms.maxzoom, 14))
        assert expected is not None
        if tms_id == "WorldCRS84Quad":
            assert got.zoom == expected, (limit, got)
        else:
            assert got.zoom is not None and expected <= got.zoom <= expected + 2, (limit, got)


def test_100k_items_are_counted_in_about_a_second() -> None:
    """Speed on a synthetic 100k-item catalog (a dense city of small aerial frames: the
    complete zoom is high, so many zooms are counted). Generous bound: 2 shared cores."""
    rng = np.random.default_rng(0)
    n = 100_000
    cx, cy = rng.normal(2.35, 0.08, n), rng.normal(48.85, 0.05, n)
    w = rng.uniform(0.0005, 0.005, n)
    bboxes = np.stack([cx, cy, cx + w, cy + w * 0.66], axis=1)
    complete_zoom(MERCATOR, bboxes[:100], 10)  # PROJ and DuckDB set up once
    started = time.perf_counter()
    got = complete_zoom(MERCATOR, bboxes, 500)
    took = time.perf_counter() - started
    assert got.zoom is not None and got.densest <= 500
    assert took < 10, took


# -- through a real server ----------------------------------------------------------------

SIZE = 256


def _cog(path: Path, west: float, north: float, span: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.integers(30, 220, (3, SIZE, SIZE), dtype=np.uint8)
    transform = affine.Affine(span / SIZE, 0, west, 0, -span / SIZE, north)
    return write_cog(path, data, crs="EPSG:4326", transform=transform)


def items_catalog(out: Path, items: list[tuple[str, str, Path, tuple | None]]) -> Path:
    """A catalog of (id, datetime, COG, bbox override) items: projection from the COG, and
    when a bbox is given the item's bbox and geometry are that box (the density tests need
    many distinct footprints, not many files)."""
    rows = []
    for item_id, when, cog, box in items:
        item = stac_item(item_id, {"visual": cog}, datetime=when, collection="c")
        if box is not None:
            w, s, e, n = box
            item["bbox"] = [w, s, e, n]
            item["geometry"] = {
                "type": "Polygon",
                "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]],
            }
        rows.append(item)
    ndjson = out.with_suffix(".ndjson")
    ndjson.write_text("\n".join(json.dumps(i) for i in rows))
    index_items(ndjson, out)
    return out


def crowded_catalog(out_dir: Path, stack: int) -> tuple[Path, tuple, tuple]:
    """`stack` items (one a day) sharing one real COG over area A, and one item over area B
    beside it: with max_items below `stack`, tiles touching A are truncated, B's are not.
    Returns the catalog and the two areas' lon/lat bboxes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    a = _cog(out_dir / "a.tif", 10.0, 45.2, 0.2, 1)
    b = _cog(out_dir / "b.tif", 10.3, 45.2, 0.2, 2)
    items = [(f"a{i}", f"2024-05-{i + 1:02d}T10:00:00Z", a, None) for i in range(stack)]
    items.append(("b0", "2024-05-01T10:00:00Z", b, None))
    path = items_catalog(out_dir / "items.parquet", items)
    return path, (10.0, 45.0, 10.2, 45.2), (10.3, 45.0, 10.5, 45.2)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server, np.ndarray]]:
    """One real COG, 160 items of distinct clustered boxes in May and June; a server taking
    at most 12 items per tile and one taking 10,000 (where only the resolution rule acts)."""
    root = tmp_path_factory.mktemp("dense")
    cog = _cog(root / "one.tif", 10.0, 45.6, 1.4, 3)
    bboxes = clustered(160, 21)
    items = [
        (f"i{k}", f"2024-0{5 + k % 2}-{1 + k % 28:02d}T10:00:00Z", cog, tuple(box))
        for k, box in enumerate(bboxes)
    ]
    catalog = items_catalog(root / "items.parquet", items)
    with ThreadPoolExecutor(2) as starting:  # both start at once: each waits on its imports
        tight, loose = starting.map(
            lambda limit: Server(catalog, env={"TERRAZZO_MAX_ITEMS": limit}), ["12", "10000"]
        )
    try:
        yield tight, loose, bboxes
    finally:
        tight.stop()
        loose.stop()


def test_tilejson_minzoom_is_where_every_tile_is_complete(
    dense: tuple[Server, Server, np.ndarray],
) -> None:
    tight, loose, bboxes = dense
    rule = httpx.get(f"{loose.url}/tilejson.json", timeout=60).json()  # resolution rule only
    tj = httpx.get(f"{tight.url}/tilejson.json", timeout=60).json()
    expected = brute_zoom(MERCATOR, bboxes, 12, top=rule["maxzoom"])
    assert expected is not None and expected > rule["minzoom"], "the density rule decides"
    assert (tj["minzoom"], tj["maxzoom"]) == (expected, rule["maxzoom"])
    assert tj["center"][2] == expected
    # items_limit narrows it further (a tile search takes fewer), never widens it
    five = httpx.get(f"{tight.url}/tilejson.json", params={"items_limit": 5}, timeout=60).json()
    fewer = brute_zoom(MERCATOR, bboxes, 5, top=rule["maxzoom"])
    assert five["minzoom"] == (rule["maxzoom"] if fewer is None else fewer)
    assert five["minzoom"] >= expected
    wide = httpx.get(f"{tight.url}/tilejson.json", params={"items_limit": 50}, timeout=60).json()
    assert wide["minzoom"] == expected
    # the tiles agree: at minzoom - 1 some tile is truncated, at minzoom the densest is not
    z = expected
    counts = brute_counts(MERCATOR, bboxes, z - 1)
    worst = max(counts, key=counts.get)
    r = httpx.get(
        f"{tight.url}/tiles/WebMercatorQuad/{z - 1}/{worst.x}/{worst.y}.png",
        params={"method": "mean"},
        timeout=60,
    )
    assert "x-terrazzo-truncated" in r.headers, (counts[worst], r.headers)
    counts = brute_counts(MERCATOR, bboxes, z)
    worst = max(counts, key=counts.get)
    r = httpx.get(
        f"{tight.url}/tiles/WebMercatorQuad/{z}/{worst.x}/{worst.y}.png",
        params={"method": "mean"},
        timeout=60,
    )
    assert r.status_code in (200, 204) and "x-terrazzo-truncated" not in r.headers


def test_minzoom_follows_the_datetime_filter_and_wmts(
    dense: tuple[Server, Server, np.ndarray],
) -> None:
    tight, loose, bboxes = dense
    rule = httpx.get(f"{loose.url}/tilejson.json", timeout=60).json()
    may = np.array([k % 2 == 0 for k in range(len(bboxes))])
    params = {"datetime": "2024-05-01/2024-05-31"}
    tj = httpx.get(f"{tight.url}/tilejson.json", params=params, timeout=60).json()
    expected = brute_zoom(MERCATOR, bboxes[may], 12, top=rule["maxzoom"])
    assert tj["minzoom"] == max(expected, rule["minzoom"])
    everything = httpx.get(f"{tight.url}/tilejson.json", timeout=60).json()
    assert tj["minzoom"] < everything["minzoom"], "half the items: complete sooner"
    # WMTS lists the same matrices
    xml = httpx.get(f"{tight.url}/WMTSCapabilities.xml", timeout=60).text
    ids = [int(v) for v in __import__("re").findall(r"<ows:Identifier>(\d+)</ows:Identifier>", xml)]
    assert min(ids) == everything["minzoom"] and max(ids) == everything["maxzoom"]
