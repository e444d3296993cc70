"""`unscale` (TiTiler's spelling) against rio-tiler's `unscale=True`, over a real server.

Two items with the same stored pixels: one whose GeoTIFF carries GDAL scale/offset metadata
(what rio-tiler applies), one whose file has none and whose STAC item carries them in
`raster:bands` (Landsat Collection 2 Level-2 does this). Both must give rio-tiler's unscaled
values of the file with metadata; without `unscale` both give the stored counts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from affine import Affine
from rio_tiler.io import Reader
from terrazzo.framing import parse_frames

from core.cogs import stac_item
from core.indexing import index_items
from tests.conftest import Server, assert_clear_error

TMS = morecantile.tms.get("WebMercatorQuad")
SCALE, OFFSET = 2.75e-05, -0.2  # Landsat C2 L2 surface reflectance
TRANSFORM = Affine(30, 0, 500000, 0, -30, 5000000)
SIZE = 1024


def write(path: Path, data: np.ndarray, scaled: bool) -> Path:
    """A GDAL-written COG (2 bands, nodata 0); GDAL scale/offset metadata when `scaled`."""
    profile = {
        "driver": "COG",
        "width": SIZE,
        "height": SIZE,
        "count": 2,
        "dtype": "uint16",
        "crs": "EPSG:32632",
        "transform": TRANSFORM,
        "nodata": 0,
        "compress": "DEFLATE",
        "blocksize": 256,
        "overviews": "AUTO",
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        if scaled:
            dst.scales = (SCALE, SCALE * 2)
            dst.offsets = (OFFSET, 0.1)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Path]]:
    root = tmp_path_factory.mktemp("unscale")
    rng = np.random.default_rng(3)
    data = rng.integers(7000, 20000, (2, SIZE, SIZE)).astype("uint16")
    data[:, :, :64] = 0  # nodata collar
    own = write(root / "own.tif", data, scaled=True)
    plain = write(root / "plain.tif", data, scaled=False)
    with rasterio.open(own) as src:
        assert src.scales == (SCALE, SCALE * 2) and src.offsets == (OFFSET, 0.1)
    items = [
        stac_item("own", {"sr": own}, datetime="2024-06-01T00:00:00Z", collection="t"),
        stac_item("stac", {"sr": plain}, datetime="2024-06-02T00:00:00Z", collection="t"),
    ]
    for band, (scale, offset) in zip(
        items[1]["assets"]["sr"]["raster:bands"], [(SCALE, OFFSET), (SCALE * 2, 0.1)], strict=True
    ):
        band.update(scale=scale, offset=offset)
    (root / "items.ndjson").write_text("\n".join(json.dumps(i) for i in items))
    index_items(root / "items.ndjson", root / "items.parquet")
    srv = Server(root / "items.parquet")
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            yield http, own
    finally:
        srv.stop()


def centre_tile(z: int) -> morecantile.Tile:
    x, y = TRANSFORM * (SIZE // 2, SIZE // 2)
    lon, lat = rasterio.warp.transform("EPSG:32632", "EPSG:4326", [x], [y])
    return TMS.tile(lon[0], lat[0], z)


def npy(http: httpx.Client, tile: morecantile.Tile, **params: str):
    r = http.get(f"/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}.npy", params=params)
    assert r.status_code == 200, r.text
    arr = np.load(io.BytesIO(r.content))
    return arr[:-1], arr[-1] == 255


@pytest.mark.parametrize("item", ["own", "stac"])
@pytest.mark.parametrize(("z", "resampling"), [(13, "nearest"), (12, "nearest"), (11, "nearest")])
def test_unscaled_tiles_equal_rio_tiler(
    setup: tuple[httpx.Client, Path], item: str, z: int, resampling: str
) -> None:
    http, own = setup
    tile = centre_tile(z)
    common = {"ids": item, "resampling": resampling}
    data, valid = npy(http, tile, unscale="true", **common)
    with Reader(str(own)) as src:
        img = src.tile(
            tile.x,
            tile.y,
            tile.z,
            unscale=True,
            resampling_method=resampling,
            reproject_method=resampling,
        )
        raw = src.tile(
            tile.x, tile.y, tile.z, resampling_method=resampling, reproject_method=resampling
        )
    theirs, their_valid = img.data, ~np.ma.getmaskarray(img.array).all(axis=0)
    assert data.dtype == np.float32 == theirs.dtype
    both = valid & their_valid
    assert both.mean() > 0.3 and (valid == their_valid).mean() > 0.99
    np.testing.assert_allclose(data[:, both], theirs[:, both], rtol=1e-6)
    assert 0.0 < data[0, both].mean() < 1.0  # reflectance, not counts
    # without unscale: the stored counts, the stored dtype
    stored, stored_valid = npy(http, tile, **common)
    assert stored.dtype == np.uint16 and (stored_valid == valid).all()
    assert (stored[:, both] == raw.data[:, both]).mean() > 0.999


def test_point_and_chunks_unscale(setup: tuple[httpx.Client, Path]) -> None:
    http, own = setup
    tile = centre_tile(12)
    with Reader(str(own)) as src:
        img = src.tile(tile.x, tile.y, tile.z, unscale=True)
        lon, lat = rasterio.warp.transform(
            src.crs, "EPSG:4326", *[[v] for v in src.dataset.xy(500, 500)]
        )
        want = src.point(lon[0], lat[0], unscale=True).data
    r = http.get(f"/point/{lon[0]},{lat[0]}", params={"ids": "stac", "unscale": "true"})
    assert r.status_code == 200, r.text
    got = r.json()["items"][0]["assets"]["sr"]["values"]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    bounds = TMS.xy_bounds(tile)
    body = {
        "crs": "EPSG:3857",
        "chunks": [{"id": "c", "bbox": list(bounds), "width": 256, "height": 256}],
        "ids": ["stac"],
        "unscale": True,
    }
    r = http.post("/chunks", json=body)
    assert r.status_code == 200, r.text
    (chunk,) = parse_frames(r.content)[:-1]
    assert chunk.status == "ok" and chunk.data.dtype == np.float32
    both = chunk.mask[0] & ~np.ma.getmaskarray(img.array).all(axis=0)
    assert both.mean() > 0.3
    np.testing.assert_allclose(chunk.data[0][:, both], img.data[:, both], rtol=1e-6)


def test_bad_unscale_is_a_400_naming_it(setup: tuple[httpx.Client, Path]) -> None:
    http, _ = setup
    tile = centre_tile(12)
    r = http.get(f"/tiles/WebMercatorQuad/{tile.z}/{tile.x}/{tile.y}", params={"unscale": "maybe"})
    assert_clear_error(r, 400, "unscale")
