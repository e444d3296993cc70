"""TiTiler's tile `buffer` and `padding` (issue 17) against rio-tiler's `Reader.tile(...,
buffer=, padding=)` on the same COG: a tile restricted to one item (`ids`) equals rio-tiler's
tile of that item's COG pixel for pixel, in the source's CRS (UTM31WGS84Quad over a zone-31
DEM, finer and coarser than the data) and across a reprojection with bilinear resampling, where
padding does change the pixels (and rio-tiler's change the same way). Bad values are 400s
naming the fix on tiles, TileJSON and WMTS."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from rio_tiler.io import Reader

from tests.conftest import assert_clear_error
from tests.test_correctness import near_edges

# 5.40..5.62°E at 45°N lies in this zone-31 item alone (its neighbours end at 5.401 and begin
# at 5.624; the second pass starts east of 9°E)
ITEM = "demo-32631-2024-06-01-01"
PLACE = (5.5, 45.0)


def _tile(http: httpx.Client, tms_id: str, z: int, **params: str) -> tuple[np.ndarray, np.ndarray]:
    t = morecantile.tms.get(tms_id).tile(*PLACE, z)
    r = http.get(
        f"/tiles/{tms_id}/{z}/{t.x}/{t.y}.npy", params={"assets": "dem", "ids": ITEM, **params}
    )
    assert r.status_code == 200, r.text
    out = np.load(io.BytesIO(r.content))
    return out[:-1], out[-1] == 255


def _rio_tiler(
    catalog: Path, tms_id: str, z: int, resampling: str = "nearest", **options: float
) -> tuple[np.ndarray, np.ndarray]:
    tms = morecantile.tms.get(tms_id)
    t = tms.tile(*PLACE, z)
    with Reader(str(catalog.parent / "cogs" / f"{ITEM}_dem.tif"), tms=tms) as src:
        img = src.tile(
            t.x, t.y, z, resampling_method=resampling, reproject_method=resampling, **options
        )
    return img.data, ~np.ma.getmaskarray(img.array).all(axis=0)


@pytest.mark.parametrize(
    ("z", "options"),
    [
        (13, {"buffer": 0.5}),  # 19 m pixels over the DEM's 120 m
        (13, {"buffer": 1}),
        (13, {"padding": 2}),
        (13, {"buffer": 1.5, "padding": 3}),
        (10, {"buffer": 1.5, "padding": 3}),  # 153 m: coarser, at the item's edge
    ],
)
def test_buffer_and_padding_equal_rio_tiler_in_the_sources_crs(
    http: httpx.Client, demo_catalog: Path, z: int, options: dict[str, float]
) -> None:
    data, valid = _tile(http, "UTM31WGS84Quad", z, **{k: str(v) for k, v in options.items()})
    theirs, their_valid = _rio_tiler(demo_catalog, "UTM31WGS84Quad", z, **options)
    size = 256 + int(2 * options.get("buffer", 0))
    assert data.shape == theirs.shape == (1, size, size) and data.dtype == theirs.dtype
    if z == 13:  # inside the item: every pixel, mask included
        assert valid.all() and their_valid.all()
    # at the item's nodata edge the two masks may differ by a pixel (as without a buffer)
    assert not ((valid != their_valid) & ~near_edges(their_valid)).any()
    both = valid & their_valid
    assert both.mean() > 0.3
    np.testing.assert_array_equal(data[:, both], theirs[:, both])


def test_padding_across_a_reprojection_changes_pixels_as_rio_tilers_does(
    http: httpx.Client, demo_catalog: Path
) -> None:
    """WebMercatorQuad over the UTM DEM, bilinear: a padded read warps a larger window (GDAL's
    warper and approximate transformer see other extents), so nearly every pixel moves a
    little; ours and rio-tiler's agree pixel for pixel with and without padding."""
    plain, valid = _tile(http, "WebMercatorQuad", 12, resampling="bilinear")
    padded, padded_valid = _tile(http, "WebMercatorQuad", 12, resampling="bilinear", padding="2")
    assert valid.all() and padded_valid.all()
    assert (plain != padded).mean() > 0.5
    np.testing.assert_array_equal(
        plain, _rio_tiler(demo_catalog, "WebMercatorQuad", 12, "bilinear")[0]
    )
    np.testing.assert_array_equal(
        padded, _rio_tiler(demo_catalog, "WebMercatorQuad", 12, "bilinear", padding=2)[0]
    )


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"buffer": "0.3"}, "buffer: a multiple of 0.5"),
        ({"buffer": "-1"}, "buffer: a multiple of 0.5"),
        ({"buffer": "nan"}, "buffer: a multiple of 0.5"),
        ({"buffer": "65"}, "from 0 to 64"),
        ({"buffer": "wide"}, "buffer: expected float"),
        ({"padding": "1.5"}, "padding: expected int"),
        ({"padding": "-2"}, "padding: whole pixels from 0 to 64"),
        ({"padding": "999"}, "padding: whole pixels from 0 to 64"),
    ],
)
def test_bad_buffer_and_padding_are_400s(http: httpx.Client, params: dict, needle: str) -> None:
    params = {"assets": "dem", **params}
    for url, extra in (
        ("/tiles/12/2110/1473.npy", {}),
        ("/tilejson.json", {"tile_format": "npy"}),
        ("/WMTSCapabilities.xml", {"tile_format": "npy"}),
    ):
        assert_clear_error(http.get(url, params={**params, **extra}), 400, needle)


def test_tilejson_and_wmts_hand_the_options_to_the_tiles(http: httpx.Client) -> None:
    params = {"assets": "dem", "buffer": "1", "padding": "2"}
    r = http.get("/tilejson.json", params={**params, "tile_format": "npy"})
    assert r.status_code == 200, r.text
    tiles = r.json()["tiles"][0]
    assert "buffer=1" in tiles and "padding=2" in tiles
    kvp = {
        "SERVICE": "WMTS",
        "REQUEST": "GetTile",
        "LAYER": "terrazzo",
        "TILEMATRIXSET": "WebMercatorQuad",
        "TILEMATRIX": "12",
        "TILECOL": "2110",
        "TILEROW": "1473",
        "FORMAT": "application/x-binary",
    }
    r = http.get("/WMTSCapabilities.xml", params={**params, **kvp})
    assert r.status_code == 200, r.text
    assert np.load(io.BytesIO(r.content)).shape[1:] == (258, 258)
