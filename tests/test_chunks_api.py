"""POST /chunks end to end over a real uvicorn server, checked against direct rasterio warps."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject
from terrazzo.framing import Chunk, FramingError, iter_frames, parse_frames

from core.catalog import Catalog, SearchQuery
from core.plan import Grid, transformer
from tests.conftest import assert_clear_error

# Chunks over the demo strip in three output CRSs (the items are in UTM 31, 32 and 33).
AREAS = {
    "EPSG:32632": (6.0, 45.0),  # straddles the 31/32 boundary, internally masked item
    "EPSG:32633": (12.1, 45.1),  # straddles 32/33, two dates, an item without overviews
    "EPSG:3857": (9.4, 45.05),
}


def chunk_grid(crs: str, lon: float, lat: float, n: int, size: int, res: float) -> list[dict]:
    """n x n chunks of size² pixels at `res`, centred on lon/lat."""
    cx, cy = transformer("EPSG:4326", crs).transform(lon, lat)
    span = size * res
    x0, y0 = cx - n * span / 2, cy - n * span / 2
    return [
        {
            "id": f"{crs}-{i}-{j}",
            "bbox": [x0 + i * span, y0 + j * span, x0 + (i + 1) * span, y0 + (j + 1) * span],
            "width": size,
            "height": size,
        }
        for i in range(n)
        for j in range(n)
    ]


def post(http: httpx.Client, body: dict) -> list[Chunk]:
    r = http.post("/chunks", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/x-terrazzo-chunks"
    frames = parse_frames(r.content)
    assert frames[-1].status == "end"
    return frames[:-1]


def reference(catalog: Path, crs: str, bbox: list[float], width: int, height: int, asset: str):
    """first-valid mosaic of direct rasterio warps (nearest) of the same items, same order."""
    grid = Grid.from_bounds(crs, tuple(bbox), width, height)
    cat = Catalog(catalog, threads=1)
    try:
        lonlat = grid.lonlat_bounds()
        items = cat.search_sync(SearchQuery(bbox=lonlat, intersects=shapely.box(*lonlat)))
    finally:
        cat.close()
    out = None
    filled = np.zeros((height, width), dtype=bool)
    for item in items:
        with rasterio.open(item.assets[asset]) as ds:
            data = np.zeros((ds.count, height, width), dtype=ds.dtypes[0])
            mask = np.zeros((1, height, width), dtype=np.uint8)
            for band in range(ds.count):
                reproject(
                    rasterio.band(ds, band + 1),
                    data[band],
                    dst_transform=grid.transform,
                    dst_crs=crs,
                    resampling=Resampling.nearest,
                )
            reproject(
                ds.dataset_mask(),
                mask[0],
                src_transform=ds.transform,
                src_crs=ds.crs,
                dst_transform=grid.transform,
                dst_crs=crs,
                resampling=Resampling.nearest,
            )
        valid = mask[0] > 0
        if out is None:
            out = np.zeros_like(data)
        take = valid & ~filled
        out[:, take] = data[:, take]
        filled |= valid
    return out, filled


@pytest.mark.parametrize("asset", ["visual", "dem"])
def test_chunks_in_three_crss_equal_direct_rasterio_warps(
    http: httpx.Client, demo_catalog: Path, asset: str
) -> None:
    got: dict[str, Chunk] = {}
    requested: dict[str, tuple[str, dict]] = {}
    for crs, (lon, lat) in AREAS.items():
        res = 100.0 if crs != "EPSG:3857" else 140.0  # finer than the 120 m data: level 0
        specs = chunk_grid(crs, lon, lat, n=3, size=64, res=res)
        requested.update({c["id"]: (crs, c) for c in specs})
        for chunk in post(http, {"crs": crs, "chunks": specs, "assets": [asset]}):
            got[chunk.id] = chunk
    assert len(requested) == 27 and set(got) == set(requested)
    checked = 0
    for cid, (crs, spec) in requested.items():
        chunk = got[cid]
        assert chunk.status in ("ok", "empty"), chunk.error
        data, valid = reference(demo_catalog, crs, spec["bbox"], 64, 64, asset)
        if chunk.status == "empty":
            assert not valid.any()
            continue
        assert chunk.data.shape == (1, data.shape[0], 64, 64)
        assert chunk.data.dtype == data.dtype
        ours, our_valid = chunk.data[0], chunk.mask[0]
        assert (our_valid == valid).mean() > 0.99
        both = our_valid & valid
        if both.any():
            assert (ours[:, both] == data[:, both]).all(axis=0).mean() > 0.99
            checked += 1
    assert checked >= 15


def test_group_by_gives_a_time_axis(http: httpx.Client) -> None:
    specs = chunk_grid("EPSG:32633", 12.1, 45.12, n=1, size=128, res=120)
    (chunk,) = post(http, {"crs": "EPSG:32633", "chunks": specs, "group_by": "day"})
    assert chunk.status == "ok"
    assert chunk.header["time"] == ["2024-06-01", "2024-09-01"]
    assert chunk.data.shape == (2, 3, 128, 128) and chunk.mask.shape == (2, 128, 128)
    both = chunk.mask[0] & chunk.mask[1]
    assert both.mean() > 0.1
    assert not np.array_equal(chunk.data[0][:, both], chunk.data[1][:, both])
    (flat,) = post(http, {"crs": "EPSG:32633", "chunks": specs})
    assert flat.data.shape == (1, 3, 128, 128) and flat.header["time"] == [None]


def test_resolution_dtype_and_transform(http: httpx.Client) -> None:
    cx, cy = transformer("EPSG:4326", "EPSG:32632").transform(7.0, 45.0)
    body = {
        "crs": "EPSG:32632",
        "assets": ["dem"],
        "dtype": "float64",
        "chunks": [{"id": "r", "bbox": [cx, cy, cx + 6000, cy + 3000], "resolution": 60}],
    }
    (chunk,) = post(http, body)
    assert chunk.data.shape == (1, 1, 50, 100) and chunk.data.dtype == np.float64
    assert Affine(*chunk.header["transform"]) == Affine(60, 0, cx, 0, -60, cy + 3000)


def test_empty_chunk_and_end_frame_counts(http: httpx.Client) -> None:
    far = {"id": "sea", "bbox": [-4e6, -4e6, -3.9e6, -3.9e6], "width": 16, "height": 16}
    near = chunk_grid("EPSG:3857", 9.4, 45.05, n=1, size=32, res=150)[0]
    r = http.post("/chunks", json={"crs": "EPSG:3857", "chunks": [far, near]})
    frames = parse_frames(r.content)
    by_id = {f.id: f for f in frames[:-1]}
    assert by_id["sea"].status == "empty" and by_id["sea"].data is None
    assert by_id[near["id"]].status == "ok"
    end = frames[-1].header
    assert (end["chunks"], end["ok"], end["empty"], end["error"]) == (2, 1, 1, 0)


def test_dry_run_returns_plans(http: httpx.Client) -> None:
    specs = chunk_grid("EPSG:32632", 6.0, 45.0, n=2, size=256, res=120)
    r = http.post("/chunks", json={"crs": "EPSG:32632", "chunks": specs, "dry_run": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["chunks"]) == 4 and body["bytes"] > 0
    plan = body["chunks"][0]["plan"]
    assert plan["items"] and all(
        "level" in read and "tiles" in read for item in plan["items"] for read in item["reads"]
    )


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (
            {
                "crs": "EPSG:3857",
                "chunks": [{"id": "a", "bbox": [0, 0, 1, 1], "width": 5000, "height": 5000}],
            },
            413,
            "limit",
        ),
        (
            {
                "crs": "EPSG:3857",
                "chunks": [{"id": "a", "bbox": [1, 0, 0, 1], "width": 5, "height": 5}],
            },
            400,
            "minx < maxx",
        ),
        (
            {"crs": "EPSG:3857", "chunks": [{"id": "a", "bbox": [0, 0, 1, 1]}]},
            400,
            "width and height",
        ),
        ({"crs": "EPSG:3857", "chunks": []}, 422, "chunks"),
        (  # found by the OpenAPI fuzzer: an infinite-size grid was a 500
            {
                "crs": "EPSG:32632",
                "dry_run": True,
                "chunks": [{"id": "a", "bbox": [-1e308, -1e308, 1e308, 1e308], "width": 1}],
            },
            400,
            "finite",
        ),
        (
            {
                "crs": "EPSG:32632",
                "chunks": [{"id": "a", "bbox": [0, 0, 1e308, 1e308], "resolution": 1e-9}],
            },
            400,
            "too large",
        ),
        (
            {
                "crs": "EPSG:3857",
                "chunks": [{"id": "a", "bbox": [0, 0, 1, 1], "width": 1, "height": 1}] * 2,
            },
            422,
            "appears twice",
        ),
        (
            {
                "crs": "EPSG:3857",
                "dtype": "pixels",
                "chunks": [{"id": "a", "bbox": [0, 0, 1, 1], "width": 1, "height": 1}],
            },
            400,
            "dtype",
        ),
        (
            {
                "crs": "EPSG:3857",
                "group_by": "week",
                "chunks": [{"id": "a", "bbox": [0, 0, 1, 1], "width": 1, "height": 1}],
            },
            422,
            "group_by",
        ),
        (
            {
                "crs": "EPSG:3857",
                "method": "loudest",
                "chunks": [{"id": "a", "bbox": [0, 0, 1, 1], "width": 1, "height": 1}],
            },
            400,
            "method",
        ),
    ],
)
def test_bad_requests_are_clear(http: httpx.Client, body: dict, status: int, needle: str) -> None:
    assert_clear_error(http.post("/chunks", json=body), status, needle)


def test_cut_stream_is_detected() -> None:
    with pytest.raises(FramingError, match="cut short"):
        parse_frames(b"TZCH" + (50).to_bytes(4, "little") + b'{"id": "a"')


def test_a_body_in_any_pieces_parses_as_the_whole(http: httpx.Client) -> None:
    """The parser gathers headers and copies payloads piece by piece: a server's body cut
    into 1-byte, 3-byte, odd and 64 KB pieces (every cut inside a prefix, header and
    payload) gives the chunks of the whole body, and a body cut anywhere short is refused."""
    body = {"crs": "EPSG:32632", "group_by": "datetime", "assets": ["visual"]}
    body["chunks"] = chunk_grid("EPSG:32632", 10.2, 45.1, 2, 48, 30.0)
    r = http.post("/chunks", json=body)
    assert r.status_code == 200, r.text
    whole = parse_frames(r.content)
    assert [c.status for c in whole].count("ok") >= 2 and whole[-1].status == "end"
    for step in (1, 3, 4093, 65536):
        pieces = [r.content[i : i + step] for i in range(0, len(r.content), step)]
        parsed = list(iter_frames(pieces))
        assert [c.header for c in parsed] == [c.header for c in whole], step
        for a, b in zip(parsed, whole, strict=True):
            assert (a.data is None) == (b.data is None)
            if a.data is not None:
                np.testing.assert_array_equal(a.data, b.data)
                np.testing.assert_array_equal(a.mask, b.mask)
    for cut in (3, 8, 9, len(r.content) // 2, len(r.content) - 1):
        with pytest.raises(FramingError, match="cut short"):
            list(iter_frames([r.content[:cut]]))


def test_a_chunk_on_the_cogs_own_grid_is_its_pixels_exactly(
    http: httpx.Client, demo_catalog: Path
) -> None:
    """Same CRS, pixel size and whole-pixel offset as one COG (the aligned read Terrazzo
    copies instead of warping): the chunk is rasterio's window read of that file, bit for
    bit, mask included."""
    cog = demo_catalog.parent / "cogs" / "demo-32632-2024-06-01-05_visual.tif"
    with rasterio.open(cog) as src:
        t = src.transform
        col, row = src.width // 2 - 48, src.height // 2 - 48  # the interior: no neighbour
        window = rasterio.windows.Window(col, row, 96, 96)
        data = src.read(window=window)
        mask = src.read_masks(1, window=window) > 0
        bbox = rasterio.windows.bounds(window, t)
    spec = {"id": "own", "bbox": list(bbox), "width": 96, "height": 96}
    (chunk,) = post(http, {"crs": "EPSG:32632", "chunks": [spec], "assets": ["visual"]})
    assert chunk.status == "ok", chunk.error
    assert mask.mean() > 0.5
    np.testing.assert_array_equal(chunk.mask[0], mask)
    np.testing.assert_array_equal(np.where(mask, chunk.data[0], 0), np.where(mask, data, 0))


def test_a_read_opens_no_header_before_its_chunks_unless_bands_can_refuse_it(
    demo_catalog: Path, tmp_path: Path
) -> None:
    """The request's check opens the first item's headers only when something depends on the
    bands (bidx, expression, algorithm): otherwise it would be a store round trip in series
    before every read. Counted on a real range server: a chunk over the sea reads nothing."""
    from bench.remote import cog_server, remote_catalog
    from tests.conftest import Server

    sea = {"id": "sea", "bbox": [-4e6, -4e6, -3.9e6, -3.9e6], "width": 16, "height": 16}
    with cog_server(demo_catalog.parent, 0) as (store, _):
        server = Server(remote_catalog(demo_catalog, store, tmp_path), args=("--allow", store))
        try:

            def requests() -> int:
                return httpx.get(store + "/_requests").json()["requests"]

            before = requests()
            r = httpx.post(server.url + "/chunks", json={"crs": "EPSG:3857", "chunks": [sea]})
            assert r.status_code == 200, r.text
            assert [f.status for f in parse_frames(r.content)] == ["empty", "end"]
            assert requests() == before, "no store request for a chunk no item reaches"
            body = {"crs": "EPSG:3857", "chunks": [sea], "bidx": [9]}
            assert_clear_error(httpx.post(server.url + "/chunks", json=body), 400, "bidx")
            assert requests() > before, "bidx is checked against the first item's bands"
        finally:
            server.stop()
