"""Algorithms on the mosaic (TiTiler's names): hillshade tiles meet without seams (a 3x3
block of tiles equals hillshade of one read of the whole block), the DEM encodings decode back
to the heights, normalizedIndex is the formula on the raw bands, and bad algorithm parameters
are 400s naming the fix on tiles and TileJSON alike."""

from __future__ import annotations

import io

import httpx
import morecantile
import numpy as np
import pytest
from PIL import Image
from terrazzo.framing import parse_frames

from core.algorithms import Hillshade, Slope
from core.plan import Grid

TMS = morecantile.tms.get("WebMercatorQuad")
Z, X0, Y0 = 12, 2132, 1472  # a 3x3 block inside one of the demo's DEMs (UTM 32N, 7.4 E 45 N)


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    return np.asarray(Image.open(io.BytesIO(response.content)))


def npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    return np.load(io.BytesIO(response.content))


def _block(
    http: httpx.Client,
    tms_id: str,
    z: int,
    x0: int,
    y0: int,
    algorithm: str = "hillshade",
    **extra: str,
) -> np.ndarray:
    """The 3x3 tiles of `algorithm` from (x0, y0), side by side (768 x 768, first band)."""
    tiles = [
        [
            npy(
                http.get(
                    f"/tiles/{tms_id}/{z}/{x0 + col}/{y0 + row}.npy",
                    params={"assets": "dem", "algorithm": algorithm, **extra},
                )
            )[0]
            for col in range(3)
        ]
        for row in range(3)
    ]
    return np.block(tiles)


def _one_read(
    http: httpx.Client, tms_id: str, z: int, x0: int, y0: int, crs: str, buffer: int = 3
) -> np.ndarray:
    """One raw read (float32 DEM, (1, h, w)) of the whole block plus `buffer` pixels on every
    side, through POST /chunks."""
    tms = morecantile.tms.get(tms_id)
    first, last = tms.xy_bounds(x0, y0, z), tms.xy_bounds(x0 + 2, y0 + 2, z)
    res = (last.right - first.left) / 768
    b = buffer
    bbox = [first.left - b * res, last.bottom - b * res, last.right + b * res, first.top + b * res]
    body = {
        "crs": crs,
        "chunks": [{"id": "block", "bbox": bbox, "width": 768 + 2 * b, "height": 768 + 2 * b}],
        "assets": ["dem"],
    }
    chunk = parse_frames(http.post("/chunks", json=body).content)[0]
    assert chunk.status == "ok", chunk.error
    assert chunk.mask[0].all(), "the block and its buffer must be inside the DEM"
    return chunk.data[0]


def _hillshade_of_one_read(
    http: httpx.Client, tms_id: str, z: int, x0: int, y0: int, crs: str
) -> np.ndarray:
    """Hillshade of one read of the whole block plus the algorithm's buffer, cropped."""
    raw = _one_read(http, tms_id, z, x0, y0, crs, Hillshade().buffer)
    shaded, _ = Hillshade().apply(raw, np.ones(raw.shape[1:], dtype=bool))
    return shaded[0]


SEAMS = np.zeros((768, 768), dtype=bool)
for _k in (0, 255, 256, 511, 512, 767):  # rows and columns on either side of each tile edge
    SEAMS[_k, :] = SEAMS[:, _k] = True


def test_hillshade_tiles_have_no_seams_in_the_sources_crs(http: httpx.Client) -> None:
    """UTM31WGS84Quad tiles over a zone-31 DEM: the warp is affine, so every pixel of a
    tile's buffered read is the pixel a larger read has there, and the 3x3 tiles side by side
    equal hillshade of one 774² read of the block, bit for bit."""
    tiles = _block(http, "UTM31WGS84Quad", 13, 2087, 3074)
    np.testing.assert_array_equal(
        tiles, _hillshade_of_one_read(http, "UTM31WGS84Quad", 13, 2087, 3074, "EPSG:32631")
    )
    # the buffer is what does it: without, every tile's edges are one-sided gradients
    bare = _block(http, "UTM31WGS84Quad", 13, 2087, 3074, algorithm_params='{"buffer": 0}')
    assert (bare != tiles)[SEAMS].mean() > 0.3
    assert (bare == tiles)[~SEAMS].all()


def test_hillshade_seams_across_a_reprojection_are_no_worse_than_the_interior(
    http: httpx.Client,
) -> None:
    """WebMercatorQuad tiles over a UTM DEM: GDAL's approximate transformer (which tiles
    follow, to equal rio-tiler's) depends on the window, so a tile and one larger read sample
    ~2% of pixels differently everywhere; at the tile edges they differ no more than inside
    (without the buffer: several times more)."""
    reference = _hillshade_of_one_read(http, "WebMercatorQuad", Z, X0, Y0, "EPSG:3857")
    reference = reference.astype(int)
    tiles = np.abs(_block(http, "WebMercatorQuad", Z, X0, Y0).astype(int) - reference)
    bare = _block(http, "WebMercatorQuad", Z, X0, Y0, algorithm_params='{"buffer": 0}')
    bare_d = np.abs(bare.astype(int) - reference)
    assert (tiles == 0)[~SEAMS].mean() > 0.8  # mostly the same pixels
    assert tiles[SEAMS].mean() < 1.5 * tiles[~SEAMS].mean() + 0.5
    assert bare_d[SEAMS].mean() > 3 * tiles[SEAMS].mean()


UTM31 = ("UTM31WGS84Quad", 13, 2087, 3074)  # a 3x3 block inside a zone-31 DEM


def _numpy_slope(dem: np.ndarray, res: float, exaggeration: float = 1.0) -> np.ndarray:
    """Slope in degrees by numpy alone: np.gradient with the pixel spacing given to it."""
    along_y, along_x = np.gradient(dem.astype("float64") * exaggeration, res, res)
    return np.degrees(np.arctan(np.hypot(along_x, along_y)))


def test_slope_tiles_are_numpys_slope_and_have_no_seams(http: httpx.Client) -> None:
    """TiTiler's `slope` on UTM31WGS84Quad tiles over a zone-31 DEM (the warp is affine): the
    3x3 tiles side by side equal numpy's gradient slope of one 774² read of the block (float32
    rounding), and bit for bit the algorithm run on that read: no seams. POST /chunks gives
    the same pixels (its pixel size set from the chunk), z_exaggeration steepens as numpy's."""
    tms_id, z, x0, y0 = UTM31
    bounds = morecantile.tms.get(tms_id).xy_bounds(x0, y0, z)
    res = (bounds.right - bounds.left) / 256
    raw = _one_read(http, tms_id, z, x0, y0, "EPSG:32631", buffer=3)
    expected = _numpy_slope(raw[0], res)[3:-3, 3:-3]
    tiles = _block(http, tms_id, z, x0, y0, algorithm="slope")
    assert tiles.dtype == np.float32
    assert expected.mean() > 2 and expected.max() > 10  # real relief, not a flat test
    np.testing.assert_allclose(tiles, expected, rtol=1e-6, atol=1e-5)
    step = Slope().on_grid(Grid.from_bounds("EPSG:32631", (0, 0, res, res), 1, 1))
    one, _ = step.apply(raw, np.ones(raw.shape[1:], dtype=bool))
    np.testing.assert_array_equal(tiles, one[0])
    # without the buffer the edges are one-sided differences: the seams show
    bare = _block(http, tms_id, z, x0, y0, algorithm="slope", algorithm_params='{"buffer": 0}')
    assert (np.abs(bare - tiles) > 0.01)[SEAMS].mean() > 0.3
    assert (bare == tiles)[~SEAMS].all()
    # a chunk of the block's grid: the same slope (app.chunks gives it the chunk's pixel size)
    last = morecantile.tms.get(tms_id).xy_bounds(x0 + 2, y0 + 2, z)
    block = [bounds.left, last.bottom, last.right, bounds.top]
    body = {
        "crs": "EPSG:32631",
        "chunks": [{"id": "b", "bbox": block, "width": 768, "height": 768}],
        "assets": ["dem"],
        "algorithm": "slope",
    }
    chunk = parse_frames(http.post("/chunks", json=body).content)[0]
    assert chunk.status == "ok", chunk.error
    np.testing.assert_array_equal(chunk.data[0][0], tiles)
    # chunks of two pixel sizes cannot share one slope: a 400 naming the fix
    body["chunks"].append({"id": "c", "bbox": block, "width": 384, "height": 384})
    response = http.post("/chunks", json=body)
    assert response.status_code == 400 and "one pixel size" in response.json()["detail"]
    steep = npy(
        http.get(
            f"/tiles/{tms_id}/{z}/{x0}/{y0}.npy",
            params={
                "assets": "dem",
                "algorithm": "slope",
                "algorithm_params": '{"z_exaggeration": 3}',
            },
        )
    )[0]
    np.testing.assert_allclose(
        steep, _numpy_slope(raw[0], res, 3.0)[3:259, 3:259], rtol=1e-6, atol=1e-5
    )


def test_dem_encodings_decode_to_the_heights(http: httpx.Client) -> None:
    path = f"/tiles/{Z}/{X0}/{Y0}"
    raw = npy(http.get(path + ".npy", params={"assets": "dem"}))
    height, valid = raw[0].astype("float64"), raw[-1] == 255
    assert valid.mean() > 0.9
    rgb = png(http.get(path + ".png", params={"assets": "dem", "algorithm": "terrarium"}))
    r, g, bl = (rgb[..., i].astype("float64") for i in range(3))
    decoded = r * 256 + g + bl / 256 - 32768  # Mapzen's decoding
    assert np.abs(decoded - height)[valid].max() <= 1 / 256 + 1e-9
    rgb = png(http.get(path + ".png", params={"assets": "dem", "algorithm": "terrainrgb"}))
    r, g, bl = (rgb[..., i].astype("float64") for i in range(3))
    decoded = -10000 + (r * 256 * 256 + g * 256 + bl) * 0.1  # Mapbox's decoding
    assert np.abs(decoded - height)[valid].max() <= 0.05 + 1e-6


def test_normalized_index_and_contours(http: httpx.Client) -> None:
    path = f"/tiles/{Z}/{X0}/{Y0}.npy"
    raw = npy(http.get(path, params={"assets": "visual", "bidx": "1,2"}))
    got = npy(
        http.get(path, params={"assets": "visual", "bidx": "1,2", "algorithm": "normalizedIndex"})
    )
    first, second = raw[0].astype("float32"), raw[1].astype("float32")
    with np.errstate(all="ignore"):
        expected = (second - first) / (second + first)
    valid = raw[-1] == 255
    assert got.dtype == np.float32 and valid.mean() > 0.5
    np.testing.assert_array_equal(got[0][valid], expected[valid])
    dem = npy(http.get(path, params={"assets": "dem"}))[0].astype("float64")
    contours = npy(
        http.get(
            path,
            params={
                "assets": "dem",
                "algorithm": "contours",
                "algorithm_params": '{"increment": 50}',
            },
        )
    )
    lines = (contours[:3] == 0).all(axis=0)
    assert (lines == (dem % 50 < 1))[valid].all()


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"algorithm": "hilshade"}, "unknown 'hilshade'"),
        ({"algorithm": "hillshade", "algorithm_params": '{"azimut": 1}'}, "has no ['azimut']"),
        ({"algorithm": "hillshade", "algorithm_params": '{"azimuth": 400}'}, "within 0..360"),
        ({"algorithm": "hillshade", "algorithm_params": "{bad"}, "not JSON"),
        ({"algorithm": "hillshade", "algorithm_params": "[1]"}, "a JSON object"),
        ({"algorithm": "hillshade", "algorithm_params": '{"buffer": 1.5}'}, "whole number"),
        ({"algorithm_params": '{"buffer": 1}'}, "without an algorithm"),
        ({"algorithm": "hillshade", "assets": "visual"}, "takes one band"),
        ({"algorithm": "slope", "assets": "visual"}, "takes one band"),
        ({"algorithm": "slope", "algorithm_params": '{"pixel_size": 1}'}, "has no ['pixel_size']"),
        ({"algorithm": "slope", "algorithm_params": '{"z_exaggeration": 0}'}, "within 1e-06"),
        ({"algorithm": "slope"}, "png holds"),
        ({"algorithm": "normalizedIndex", "assets": "dem"}, "takes two bands"),
        ({"algorithm": "normalizedIndex", "assets": "visual", "bidx": "1,2"}, "png holds"),
    ],
)
def test_bad_algorithm_parameters_are_400s(http: httpx.Client, params: dict, needle: str) -> None:
    params = {"assets": "dem", **params}
    for response in (
        http.get(f"/tiles/{Z}/{X0}/{Y0}", params=params),
        http.get("/tilejson.json", params=params),
    ):
        assert response.status_code == 400, (response.request.url, response.text[:200])
        assert needle in response.json()["detail"], response.json()["detail"]


def test_chunks_and_the_sdk_run_the_algorithm_with_its_buffer(server) -> None:
    """POST /chunks (through the SDK) with algorithm=hillshade equals hillshade of a raw read
    grown by the buffer, cropped: in the source's CRS, bit for bit."""
    from terrazzo import Client

    from tests.conftest import utm_area

    res, b = 30.0, Hillshade().buffer
    box = utm_area(128, res, 5.5, 45.0, crs="EPSG:32631")
    grown = [box[0] - b * res, box[1] - b * res, box[2] + b * res, box[3] + b * res]
    read = {"crs": "EPSG:32631", "resolution": res, "assets": ["dem"], "progress": False}
    with Client(server.url) as client:
        raw = client.read(grown, groupby=None, **read)
        shaded = client.read(box, groupby=None, algorithm="hillshade", **read)
        bad = None
        try:
            client.read(box, algorithm="hillshade", algorithm_params='{"azimut": 1}', **read)
        except Exception as exc:  # the server's 400, raised by the client
            bad = str(exc)
    assert shaded.dtype == np.uint8 and list(shaded.band.values) == ["hillshade"]
    data = raw.values[0].astype("float32")
    assert not np.isnan(data).any()
    expected, _ = Hillshade().apply(data, np.ones(data.shape[1:], dtype=bool))
    np.testing.assert_array_equal(shaded.values[0, 0], expected[0])
    assert bad is not None and "azimut" in bad
