"""GDAL decode fallback and the multi-band nodata rule, against GDAL and rio-tiler themselves.

Files are written by GDAL (rasterio) the way real products are: PackBits, striped (untiled)
GeoTIFFs, NAIP-like 4-band RGB+NIR JPEG (photometric RGB, ExtraSamples) with and without an
internal mask, YCbCr JPEG COGs; LERC and WebP stay on async-tiff, which decodes them exactly.
Fetcher level: a planned window equals rasterio's read of the same window, value for value.
End to end: a real `terrazzo serve` tile at native zoom equals rio-tiler's `Reader.tile`, and
/plan names the decoder.

Nodata rule (issue 12, point 7): GDAL's warper, as rio-tiler drives it, treats a pixel as
nodata only when every band equals nodata (UNIFIED_SRC_NODATA=YES, GDAL's default when all
bands share a nodata value; rio-tiler's mask is then "any band valid"). [11, 0, 0] with nodata
0 is valid there, and in Terrazzo: the rule table below is checked on rio-tiler's own tiles.
"""

from __future__ import annotations

import io
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.windows import Window
from rio_tiler.io import Reader

from core.cogs import stac_item, write_cog
from core.fetch import Fetcher, valid_mask
from core.gdal_decode import SparseFile
from core.indexing import index_items
from core.plan import Grid, plan_asset
from tests.conftest import Server

CRS = "EPSG:32633"
TRANSFORM = Affine(10.0, 0, 500_000.0, 0, -10.0, 4_985_000.0)
SIZE = 512  # 5.12 km at 10 m: covers the z14 tile (2.4 km) at its centre
ZOOM = 14  # 9.55 m pixels: native for 10 m

_rng = np.random.default_rng(12)
_yy, _xx = np.mgrid[0:SIZE, 0:SIZE]
# smooth gradients plus noise: chroma subsampling and IDCT differences show on such content
RGB = np.clip(
    np.stack([_xx // 2, _yy // 2, (_xx + _yy) // 4]) + _rng.normal(0, 20, (3, SIZE, SIZE)),
    1,
    255,
).astype("uint8")
NIR = np.clip(120 + _rng.normal(0, 30, (1, SIZE, SIZE)), 1, 255).astype("uint8")
MASK = np.ones((SIZE, SIZE), dtype=bool)
MASK[:, :90] = False  # a collar, as quarter-quads have
MASK[300:340, 200:260] = False

# name -> (creation options, bands, internal mask?, expected decoder)
KINDS: dict[str, tuple[dict, np.ndarray, bool, str]] = {
    "packbits": (
        {"driver": "GTiff", "tiled": True, "compress": "PACKBITS", "overviews": [2]},
        RGB,
        False,
        "gdal",
    ),
    "striped": ({"driver": "GTiff", "compress": "DEFLATE"}, RGB, False, "gdal"),
    "striped_mask": ({"driver": "GTiff", "compress": "LZW"}, RGB, True, "gdal"),
    "naip": (
        {"driver": "GTiff", "tiled": True, "compress": "JPEG", "photometric": "RGB"},
        np.concatenate([RGB, NIR]),
        False,
        "gdal",
    ),
    "naip_mask": (
        {"driver": "GTiff", "tiled": True, "compress": "JPEG", "photometric": "RGB"},
        np.concatenate([RGB, NIR]),
        True,
        "gdal",
    ),
    "ycbcr": ({"driver": "COG", "compress": "JPEG", "blocksize": 256}, RGB, False, "gdal"),
    "lerc": ({"driver": "COG", "compress": "LERC", "blocksize": 256}, RGB, False, "async-tiff"),
    "webp": ({"driver": "COG", "compress": "WEBP", "blocksize": 256}, RGB, False, "async-tiff"),
}


def _write(path: Path, options: dict, data: np.ndarray, mask: bool) -> Path:
    profile = {"width": SIZE, "height": SIZE, "count": data.shape[0], "dtype": "uint8"}
    profile |= {"crs": CRS, "transform": TRANSFORM}
    options = dict(options)
    overviews = options.pop("overviews", None)
    with (
        rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True),
        rasterio.open(path, "w", **profile, **options) as dst,
    ):
        dst.write(data)
        if mask:
            dst.write_mask(MASK)
        if overviews:
            dst.build_overviews(overviews, rasterio.enums.Resampling.average)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("decode")
    return {
        name: _write(out / f"{name}.tif", options, data, mask)
        for name, (options, data, mask, _) in KINDS.items()
    }


def test_files_are_what_they_claim(files: dict[str, Path]) -> None:
    """The corpus is the real thing: strips, PackBits, YCbCr, 4-band RGB JPEG."""
    with rasterio.open(files["striped"]) as src:
        assert src.block_shapes[0][1] == SIZE and src.block_shapes[0][0] < SIZE
    with rasterio.open(files["packbits"]) as src:
        assert src.compression.name == "packbits"
    with rasterio.open(files["ycbcr"]) as src:
        assert src.photometric.name == "ycbcr"
    with rasterio.open(files["naip_mask"]) as src:
        assert src.count == 4 and src.compression.name == "jpeg"
        assert src.colorinterp[:3] == (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        assert src.colorinterp[3] == ColorInterp.undefined  # NIR, not alpha
        assert src.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]


@pytest.mark.parametrize("name", sorted(KINDS))
async def test_window_equals_gdal_read(files: dict[str, Path], name: str) -> None:
    """An unaligned window (and an overview window where the file has overviews) read by the
    Fetcher equals rasterio's read of the same window: data and mask, value for value."""
    path = files[name]
    fetcher = Fetcher()
    header = await fetcher.header(str(path))
    assert header.decoder == KINDS[name][3]
    grids = [Grid(CRS, TRANSFORM * Affine.translation(37, 45), 300, 260)]
    if len(header.levels) > 1:  # 20 m pixels: the first overview
        grids.append(Grid(CRS, TRANSFORM * Affine.translation(10, 6) * Affine.scale(2), 120, 90))
    for level, grid in enumerate(grids):
        read = plan_asset("a", header, grid, "nearest")
        assert read is not None and read.level == level and read.decoder == header.decoder
        pixels = await fetcher.read(read)
        options = {"overview_level": level - 1} if level else {}
        with rasterio.open(path, **options) as src:
            window = Window(*read.window)
            expected = src.read(window=window)
            mask = src.read_masks(1, window=window) != 0
        assert pixels.data.dtype == expected.dtype
        assert np.array_equal(pixels.data, expected), (name, level)
        assert np.array_equal(pixels.valid, mask), (name, level)
    if header.decoder == "gdal":
        assert fetcher.stats["gdal_tiles"] > 0


async def test_strips_are_planned_as_full_width_blocks(files: dict[str, Path]) -> None:
    """A striped file plans as blocks of image width x RowsPerStrip; a window reads only the
    strips it covers, cached like tiles (a second read fetches nothing)."""
    fetcher = Fetcher()
    header = await fetcher.header(str(files["striped"]))
    with rasterio.open(files["striped"]) as src:
        rows = src.block_shapes[0][0]
    level = header.levels[0]
    assert (level.tile_width, level.tile_height) == (SIZE, rows)
    read = plan_asset(
        "a", header, Grid(CRS, TRANSFORM * Affine.translation(0, 100), 64, 32), "nearest"
    )
    assert read is not None
    first, last = read.window[1] // rows, (read.window[1] + read.window[3] - 1) // rows
    assert read.tiles == tuple((0, y) for y in range(first, last + 1))
    await fetcher.read(read)
    tiles = fetcher.stats["tiles"]
    assert tiles == len(read.tiles)
    await fetcher.read(read)
    assert fetcher.stats["tiles"] == tiles  # served from the tile cache


async def test_a_striped_read_over_budget_is_refused(files: dict[str, Path]) -> None:
    """Strips count against the per-read decoded budget like tiles do."""
    fetcher = Fetcher(max_read_bytes=64 * 1024)
    header = await fetcher.header(str(files["striped"]))
    read = plan_asset("a", header, Grid(CRS, TRANSFORM, SIZE, SIZE), "nearest")
    assert read is not None
    with pytest.raises(ValueError, match="per-read budget"):
        await fetcher.read(read)
    assert fetcher.stats["tiles"] == 0


def test_sparse_view_refuses_bytes_it_was_not_given() -> None:
    """GDAL never sees zeros for bytes the fetch stage did not read: it gets an error."""
    view = SparseFile("x.tif", 100, [(0, b"a" * 10), (50, b"b" * 10)])
    assert view.read(10) == b"a" * 10
    view.seek(52)
    assert view.read(5) == b"bbbbb"
    view.seek(5)
    with pytest.raises(OSError, match="did not fetch"):
        view.read(10)


# -- end to end -------------------------------------------------------------------------------


def _checkerboard(combos: list[tuple], cell: int = 16) -> np.ndarray:
    """(h, w) index into `combos`: every combination in every part of the image."""
    i = (_yy // cell) * 3 + (_xx // cell)
    return i % len(combos)


COMBOS = list(itertools.product([False, True], repeat=3))  # which bands hold data


def _nodata_files(out: Path) -> dict[str, Path]:
    """Rule-table files: 3 bands where each band of a pixel is data or nodata independently
    (uint8 nodata 0, float32 NaN), an RGBA file with an alpha band, an internal mask."""
    which = _checkerboard(COMBOS)
    valid = np.stack([np.array([c[b] for c in COMBOS])[which] for b in range(3)])
    files = {}
    u8 = np.where(valid, RGB, 0).astype("uint8")
    files["nodata_u8"] = write_cog(
        out / "nodata_u8.tif", u8, crs=CRS, transform=TRANSFORM, nodata=0
    )
    f32 = np.where(valid, RGB.astype("float32") / 7, np.nan).astype("float32")
    files["nodata_nan"] = write_cog(
        out / "nodata_nan.tif", f32, crs=CRS, transform=TRANSFORM, nodata=float("nan")
    )
    alpha = np.where(_checkerboard([0, 1, 2]) == 0, 0, 255).astype("uint8")
    rgba = np.concatenate([np.where(valid, RGB, 0).astype("uint8"), alpha[None]])
    path = out / "alpha.tif"
    profile = {"width": SIZE, "height": SIZE, "count": 4, "dtype": "uint8", "crs": CRS}
    options = {"tiled": True, "compress": "DEFLATE", "photometric": "RGB", "alpha": "YES"}
    with rasterio.open(path, "w", driver="GTiff", transform=TRANSFORM, **profile, **options) as dst:
        dst.write(rgba)  # band 4 is alpha (ExtraSamples=2)
    with rasterio.open(path) as src:
        assert src.colorinterp[3] == ColorInterp.alpha
    files["alpha"] = path
    files["mask"] = write_cog(
        out / "mask.tif", u8, crs=CRS, transform=TRANSFORM, mask=_checkerboard([0, 1, 2, 3]) != 1
    )
    return files


@pytest.fixture(scope="module")
def nodata_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _nodata_files(tmp_path_factory.mktemp("nodata"))


@pytest.fixture(scope="module")
def served(
    files: dict[str, Path], nodata_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[httpx.Client, dict[str, Path]]]:
    """One real `terrazzo serve` over an item per file (all at the same place)."""
    every = {**files, **nodata_files}
    out = tmp_path_factory.mktemp("decode-catalog")
    items = [
        stac_item(
            name,
            {"data": path},
            datetime=f"2024-01-{day:02d}T00:00:00Z",
            collection="c",
        )
        for day, (name, path) in enumerate(sorted(every.items()), start=1)
    ]
    for item in items:  # nodata 0 and "nan" in one column: one Arrow type cannot hold both
        item["assets"]["data"].pop("raster:bands")
    source = out / "items.ndjson"
    source.write_text("".join(json.dumps(i) + "\n" for i in items))
    index_items(source, out / "items.parquet")
    dirs = ",".join(sorted({str(p.parent) for p in every.values()}))
    server = Server(
        out / "items.parquet", env={"TERRAZZO_LOG_LEVEL": "warning"}, args=("--allow", dirs)
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield http, every
    finally:
        server.stop()


def _tile() -> morecantile.Tile:
    centre = TRANSFORM * (SIZE / 2, SIZE / 2)
    lon, lat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True).transform(*centre)
    return morecantile.tms.get("WebMercatorQuad").tile(lon, lat, ZOOM)


def _terrazzo(http: httpx.Client, name: str) -> tuple[np.ndarray, np.ndarray]:
    t = _tile()
    response = http.get(f"/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy", params={"ids": name})
    assert response.status_code == 200, response.text
    assert response.headers.get("x-terrazzo-errors", "") == ""
    array = np.load(io.BytesIO(response.content))
    return array[:-1], array[-1] > 0


def _rio_tiler(path: Path) -> tuple[np.ndarray, np.ndarray, np.ma.MaskedArray]:
    t = _tile()
    with Reader(str(path)) as src:
        img = src.tile(t.x, t.y, t.z)
    return img.data, img.mask > 0, img.array


@pytest.mark.parametrize("name", sorted(KINDS))
def test_tile_equals_rio_tiler(served: tuple[httpx.Client, dict[str, Path]], name: str) -> None:
    """A native-zoom tile of each kind equals rio-tiler's: same mask, ≥ 99.9% of valid pixels
    equal (measured: all of them); /plan names the decoder that read it."""
    http, every = served
    data, valid = _terrazzo(http, name)
    expected, expected_valid, _ = _rio_tiler(every[name])
    assert data.shape == expected.shape
    assert np.array_equal(valid, expected_valid)
    assert valid.sum() > 10_000
    same = np.all(data == expected, axis=0)[valid].mean()
    assert same >= 0.999, (name, same)
    t = _tile()
    plan = http.get(f"/plan/WebMercatorQuad/{t.z}/{t.x}/{t.y}", params={"ids": name}).json()
    assert [r["decoder"] for i in plan["items"] for r in i["reads"]] == [KINDS[name][3]]


@pytest.mark.parametrize("name", ["nodata_u8", "nodata_nan"])
def test_nodata_rule_table_matches_rio_tiler(
    served: tuple[httpx.Client, dict[str, Path]], name: str
) -> None:
    """Every combination of data/nodata bands appears in the tile; rio-tiler masks exactly
    the pixels where all three bands are nodata ([11, 0, 0] is valid), and so does Terrazzo."""
    http, every = served
    expected, expected_valid, array = _rio_tiler(every[name])
    holds = ~np.isnan(expected) if name == "nodata_nan" else expected != 0
    table: dict[tuple[bool, ...], set[bool]] = {}
    for combo, ok in zip(map(tuple, holds.reshape(3, -1).T), expected_valid.ravel(), strict=True):
        table.setdefault(combo, set()).add(bool(ok))
    assert set(table) == set(COMBOS)  # the tile exercises every row of the table
    for combo, masks in table.items():
        assert masks == {any(combo)}, (combo, masks)  # masked iff no band holds data
    assert np.array_equal(expected_valid, ~np.all(np.ma.getmaskarray(array), axis=0))
    data, valid = _terrazzo(http, name)
    assert np.array_equal(valid, expected_valid)
    both = np.isnan(data) & np.isnan(expected) if name == "nodata_nan" else False
    assert np.all(((data == expected) | both)[:, valid])


@pytest.mark.parametrize("name", ["alpha", "mask"])
def test_alpha_and_mask_bands_match_rio_tiler(
    served: tuple[httpx.Client, dict[str, Path]], name: str
) -> None:
    """An alpha band or an internal mask decides alone: a pixel whose bands are all 0 under
    an opaque alpha (or a valid mask) is valid, in rio-tiler and Terrazzo alike."""
    http, every = served
    expected, expected_valid, _ = _rio_tiler(every[name])
    data, valid = _terrazzo(http, name)
    assert 0.2 < expected_valid.mean() < 0.9
    assert (np.all(expected == 0, axis=0) & expected_valid).any()  # all-zero yet valid
    assert np.array_equal(valid, expected_valid)
    assert np.array_equal(data[:, valid], expected[:, valid])


def test_valid_mask_rule() -> None:
    """core.fetch.valid_mask, row by row: nodata when every band is nodata; NaN likewise; a
    mask or an alpha band overrides values."""
    data = np.array([[[11, 0, 0, 0]], [[0, 12, 0, 0]], [[0, 0, 13, 0]]], dtype="uint8")
    assert valid_mask(data, None, 0, None)[1].tolist() == [[True, True, True, False]]
    nan = np.where(data == 0, np.nan, data).astype("float32")
    assert valid_mask(nan, None, float("nan"), None)[1].tolist() == [[True, True, True, False]]
    mask = np.array([[False, True, True, True]])
    assert valid_mask(data, mask, 0, None)[1].tolist() == mask.tolist()
    rgba = np.concatenate([data, np.array([[[0, 255, 255, 255]]], dtype="uint8")])
    out, valid = valid_mask(rgba, None, None, 3)
    assert out.shape[0] == 3 and valid.tolist() == [[False, True, True, True]]
