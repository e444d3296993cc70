"""The tile PNG writer decodes to the same pixels as rio-tiler's (GDAL) PNG, on real tiles."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
import rasterio
from PIL import Image
from rio_tiler.utils import render

from app.encoders import encode
from app.png import encode_png, supports
from tests.test_tiles_api import TMS

LOW_ZOOM = TMS.tile(9.0, 45.0, 8)  # a dozen scenes and the strip's no-data edges
EDGE = TMS.tile(5.2, 45.2, 10)  # the western end of the strip


def decoded(body: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(body))
    assert image.format == "PNG"
    return np.asarray(image)


@pytest.mark.parametrize("tile", [LOW_ZOOM, EDGE])
@pytest.mark.parametrize("bidx", [(), (2,)])
def test_same_pixels_as_gdal_on_real_tiles(http: httpx.Client, tile, bidx: tuple) -> None:
    params = {"bidx": ",".join(map(str, bidx))} if bidx else {}
    arr = np.load(
        io.BytesIO(http.get(f"/tiles/{tile.z}/{tile.x}/{tile.y}.npy", params=params).content)
    )
    data, mask = arr[:-1], arr[-1]
    assert supports(data) and (mask == 0).any(), "a tile with some no-data pixels"
    ours = decoded(encode(data, mask > 0, "png"))
    gdal = decoded(render(data, mask=mask, img_format="PNG"))
    assert ours.shape == gdal.shape and ours.dtype == gdal.dtype
    assert np.array_equal(ours, gdal)


def test_sixteen_bit_keeps_values_and_a_full_alpha() -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 65535, (1, 40, 30), dtype=np.uint16)
    valid = rng.random((40, 30)) > 0.3
    body = encode_png(data, np.where(valid, 65535, 0))
    with rasterio.MemoryFile(body) as mem, mem.open() as ds:  # GDAL reads 16-bit PNG
        assert ds.dtypes == ("uint16", "uint16") and (ds.width, ds.height) == (30, 40)
        grey, alpha = ds.read()
    assert np.array_equal(grey, data[0])
    assert np.array_equal(alpha, np.where(valid, 65535, 0))


def test_other_band_counts_fall_back_to_gdal() -> None:
    data = np.zeros((2, 8, 8), dtype=np.uint8)
    assert not supports(data)
    body = encode(data, np.ones((8, 8), bool), "png")
    assert body.startswith(b"\x89PNG")
