"""Hostile COG content: every crafted file is an item error, quickly and with bounded memory.

Unit level: core.tiffguard (through the Fetcher, as the engine calls it) refuses each file in
well under a second with a one-line message naming the file and the limit. End to end: a real
`terrazzo serve` over a catalog where the hostile files sit on top of a good item answers
200 with the good item's pixels, reports each hostile item, stays alive and stays small.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from obstore.store import LocalStore
from pyproj import Transformer

from core.cogs import stac_item, write_cog
from core.faults import FaultyStore
from core.fetch import Fetcher, is_transient
from core.indexing import index_items
from core.plan import Grid, plan_asset
from core.stores import Stores
from core.tiffguard import HostileTiff, check_header
from tests.conftest import EVERY_ITEM, Server
from tests.hostile_tiffs import CRS, DECODE_TIME, HOSTILE, SIZE, TRANSFORM, base_cog

# RSS the server may gain over serving the good item alone while it meets every hostile file
# (the bombs and claims above would each cost 1-32 GB without the bounds).
SERVER_RSS_BOUND_MB = 300
# Peak RSS one in-process read of a bomb may add (its tile is 1 MiB decoded).
BOMB_RSS_BOUND_MB = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("hostile")
    writers = {name: w for name, (w, _) in {**HOSTILE, **DECODE_TIME}.items()}
    return {name: write(out / f"{name}.tif") for name, write in writers.items()}


def _vm_hwm_kb(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _reset_hwm() -> None:
    """Reset this process's peak RSS to its current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_guard_refuses_quickly_with_one_line(corpus: dict[str, Path], name: str) -> None:
    href = str(corpus[name])
    started = time.perf_counter()
    with pytest.raises(HostileTiff, match=HOSTILE[name][1]) as info:
        await Fetcher().header(href)
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert href in message and "\n" not in message and len(message) < 300
    assert not is_transient(info.value)  # permanent: never retried


async def test_guard_reads_a_bounded_prefix_of_a_hostile_file(corpus: dict[str, Path]) -> None:
    """The 1 MB bomb and the 1.2 MB 3000-IFD chain are refused after reading a bounded
    amount of them, in few requests (the chain is walked, never loaded whole)."""
    store = FaultyStore(LocalStore())
    for name in ("deflate_bomb", "many_overviews", "huge_tile_count"):
        with pytest.raises(HostileTiff):
            await check_header(store, str(corpus[name]), name)
    assert store.requests <= 6


async def test_an_ordinary_cog_costs_one_request_and_the_same_header(tmp_path: Path) -> None:
    """The guard's bytes serve async-geotiff's header parse (PrefixStore): no extra request."""
    data = (np.arange(3 * 1024 * 1024) % 251).astype("uint8").reshape(3, 1024, 1024)
    cog = write_cog(tmp_path / "ok.tif", data, crs=CRS, transform=TRANSFORM)  # 256² tiles
    store = FaultyStore(LocalStore())
    fetcher = Fetcher(stores=Stores(lambda key: store))
    header = await fetcher.header(str(cog))
    assert store.requests == 1
    assert header.count == 3 and header.dtype == "uint8" and len(header.levels) == 3
    checked = await check_header(LocalStore(), str(cog), str(cog))
    assert checked.requests == 1 and len(checked.ifds) == 3


async def test_deflate_bomb_in_bounds_stops_at_the_tile_size(corpus: dict[str, Path]) -> None:
    """A 1 MiB tile whose plausible-sized stream inflates to 1 GiB passes the header check;
    the bounded inflate stops at 1 MiB (async-tiff's own decoder reached 2.1 GB RSS)."""
    href = str(corpus["deflate_bomb_in_bounds"])
    fetcher = Fetcher()
    header = await fetcher.header(href)  # a legitimate header
    grid = Grid(CRS, TRANSFORM, SIZE, SIZE)
    read = plan_asset("data", header, grid, "nearest")
    assert read is not None and read.tiles == ((0, 0),)
    _reset_hwm()
    before = _vm_hwm_kb()
    started = time.perf_counter()
    with pytest.raises(ValueError, match="decompression bomb"):
        await fetcher.read(read)
    assert time.perf_counter() - started < 2.0
    assert (_vm_hwm_kb() - before) / 1024 < BOMB_RSS_BOUND_MB
    assert fetcher.tiles.get((href, 0, (0, 0))) is None  # a failed fetch is not reused


@pytest.mark.parametrize("dtype", ["int64", "uint64", "int8"])
async def test_64_bit_and_signed_integers_decode_exactly(tmp_path: Path, dtype: str) -> None:
    """The guard admits int64/uint64 because async-tiff decodes them right (GDAL-written,
    predictor 2): checked value for value."""
    data = (np.arange(512 * 512, dtype="int64").reshape(1, 512, 512) * 7 - 90_000).astype(dtype)
    path = write_cog(tmp_path / f"{dtype}.tif", data, crs=CRS, transform=TRANSFORM)
    fetcher = Fetcher()
    header = await fetcher.header(str(path))
    read = plan_asset("data", header, Grid(CRS, TRANSFORM, 512, 512), "nearest")
    assert read is not None
    pixels = await fetcher.read(read)
    assert pixels.data.dtype == np.dtype(dtype)
    assert np.array_equal(pixels.data, data[:, : read.window[3], : read.window[2]])


_LEGIT = {
    "bigtiff": {"driver": "COG", "BIGTIFF": "YES", "compress": "DEFLATE"},
    "planar": {
        "driver": "GTiff",
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "interleave": "band",
        "compress": "DEFLATE",
    },
    "lzw": {"driver": "COG", "compress": "LZW"},
    "zstd": {"driver": "COG", "compress": "ZSTD"},
    "webp": {"driver": "COG", "compress": "WEBP", "QUALITY": 100},
    "uncompressed": {"driver": "COG", "compress": "NONE"},
    # decoded by GDAL (core.gdal_decode); the guard bounds strips like tiles
    "striped": {"driver": "GTiff", "compress": "DEFLATE"},
    "packbits": {"driver": "GTiff", "tiled": True, "compress": "PACKBITS"},
}


@pytest.mark.parametrize("kind", [*_LEGIT, "internal_mask"])
async def test_guard_admits_real_gdal_files(tmp_path: Path, kind: str) -> None:
    """The limits refuse only hostile claims: GDAL's BigTIFF, band-interleaved, LZW, ZSTD,
    WebP, uncompressed, striped, PackBits and 1-bit internal-mask files pass, in one request,
    and read exactly."""
    data = (np.arange(3 * 600 * 700) % 251 + 1).astype("uint8").reshape(3, 600, 700)
    path = tmp_path / f"{kind}.tif"
    mask = None
    if kind == "internal_mask":
        mask = np.ones((600, 700), dtype=bool)
        mask[:100, :100] = False
        write_cog(path, data, crs=CRS, transform=TRANSFORM, mask=mask)
    else:
        profile = {"count": 3, "width": 700, "height": 600, "dtype": "uint8", "crs": CRS}
        with rasterio.open(path, "w", transform=TRANSFORM, **profile, **_LEGIT[kind]) as dst:
            dst.write(data)
    checked = await check_header(LocalStore(), str(path), str(path))
    assert checked.requests == 1
    fetcher = Fetcher()
    read = plan_asset(
        "a", await fetcher.header(str(path)), Grid(CRS, TRANSFORM, 700, 600), "nearest"
    )
    assert read is not None and read.window == (0, 0, 700, 600)
    pixels = await fetcher.read(read)
    assert np.array_equal(pixels.data, data)
    assert np.array_equal(pixels.valid, mask if mask is not None else np.ones((600, 700), bool))


# -- end to end -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_catalog(corpus: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good item under every hostile one (newer, so first in mosaic order), same place."""
    out = tmp_path_factory.mktemp("hostile-catalog")
    good = base_cog(out / "good.tif")
    template = stac_item(
        "good", {"data": good}, datetime="2024-01-01T00:00:00Z", collection="c", href_base=out
    )
    items = [template]
    for day, (name, path) in enumerate(sorted(corpus.items()), start=2):
        item = json.loads(json.dumps(template))
        item["id"] = name
        item["properties"]["datetime"] = f"2024-02-{day:02d}T00:00:00Z"
        item["assets"]["data"]["href"] = str(path)
        items.append(item)
    source = out / "items.ndjson"
    source.write_text("".join(json.dumps(i) + "\n" for i in items))
    index_items(source, out / "items.parquet")
    return out / "items.parquet"


def _tile_over_items() -> str:
    """The z15 WebMercatorQuad tile at the items' centre (the 2.56 km items cover it)."""
    centre = TRANSFORM * (SIZE / 2, SIZE / 2)
    lon, lat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(*centre)
    t = morecantile.tms.get("WebMercatorQuad").tile(lon, lat, 15)
    return f"{t.z}/{t.x}/{t.y}"


def _npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def test_server_serves_the_good_item_and_reports_each_hostile_one(
    hostile_catalog: Path, corpus: dict[str, Path]
) -> None:
    corpus_dir = str(next(iter(corpus.values())).parent)
    server = Server(
        hostile_catalog, env={"TERRAZZO_LOG_LEVEL": "warning"}, args=("--allow", corpus_dir)
    )
    try:
        tile = f"/tiles/WebMercatorQuad/{_tile_over_items()}.npy"
        with httpx.Client(base_url=server.url, timeout=30) as http:
            expected = _npy(http.get(tile, params={"ids": "good"}))
            assert expected[-1].any()  # the good item has pixels in this tile
            baseline_kb = _vm_hwm_kb(server.proc.pid)
            started = time.perf_counter()
            for name in sorted(corpus):
                response = http.get(tile, params={"ids": f"good,{name}"})
                assert np.array_equal(_npy(response), expected), name
                errors = response.headers.get("x-terrazzo-errors", "")
                if name in HOSTILE or DECODE_TIME[name][1] is not None:
                    assert errors.startswith(f"{name}: "), (name, errors)
                    phrase = HOSTILE.get(name, DECODE_TIME.get(name))[1]
                    assert phrase in errors, (name, errors)
                else:
                    assert errors == "", (name, errors)
            # every item at once, and the plan names each refused header
            assert np.array_equal(_npy(http.get(tile)), expected)
            plan = http.get(
                f"/plan/WebMercatorQuad/{_tile_over_items()}", params=EVERY_ITEM
            ).json()  # every item planned: they share one footprint
            refused = {e["id"] for e in plan["errors"]}
            assert refused == set(HOSTILE)
            elapsed = time.perf_counter() - started
            assert http.get("/healthz").status_code == 200
        assert server.proc.poll() is None  # alive
        grown_mb = (_vm_hwm_kb(server.proc.pid) - baseline_kb) / 1024
        assert grown_mb < SERVER_RSS_BOUND_MB, grown_mb
        assert elapsed < 30, elapsed
        print(f"hostile e2e: {len(corpus)} files in {elapsed:.2f} s, peak RSS +{grown_mb:.0f} MB")
    finally:
        server.stop()


async def test_only_the_hostile_headers_fail(corpus: dict[str, Path]) -> None:
    """Opened together, as engine.plan opens a tile's headers: exactly the hostile ones fail
    (as exceptions the engine turns into plan errors), the decode-time ones open."""
    fetcher = Fetcher()
    results = await asyncio.gather(
        *(fetcher.header(str(p)) for p in corpus.values()), return_exceptions=True
    )
    failed = {n for n, r in zip(corpus, results, strict=True) if isinstance(r, Exception)}
    assert failed == set(HOSTILE)
