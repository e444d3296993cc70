"""Render options as TiTiler has them: `@{scale}x` tiles, `pngraw` and `return_mask=false`
(no alpha band), custom `colormap` JSON (discrete and intervals) coloured as rio-tiler colours
the same values; bad ones are 400s on tiles and TileJSON alike."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image
from rio_tiler.colormap import apply_cmap, parse_color

TILE = "10/537/368"


def image(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text[:300]
    return np.asarray(Image.open(io.BytesIO(response.content)))


def raw(http: httpx.Client, **params: str) -> tuple[np.ndarray, np.ndarray]:
    r = http.get(f"/tiles/{TILE}.npy", params=params)
    assert r.status_code == 200, r.text
    out = np.load(io.BytesIO(r.content))
    return out[:-1], out[-1] == 255


def test_scale_suffix_is_a_bigger_tile_over_the_same_ground(http: httpx.Client) -> None:
    for path, size in ((f"/tiles/{TILE}@2x.png", 512), (f"/tiles/WebMercatorQuad/{TILE}@3x", 768)):
        big = http.get(path)
        assert image(big).shape[:2] == (size, size)
    same = http.get(f"/tiles/{TILE}.png", params={"tilesize": 512})
    assert http.get(f"/tiles/{TILE}@2x.png").content == same.content
    bad = http.get(f"/tiles/{TILE}@9x.png")
    assert bad.status_code == 400 and "scale" in bad.json()["detail"]


def test_pngraw_and_return_mask_false_leave_the_alpha_out(http: httpx.Client) -> None:
    with_mask = image(http.get(f"/tiles/{TILE}.png"))
    assert with_mask.shape[2] == 4
    for response in (
        http.get(f"/tiles/{TILE}.pngraw"),
        http.get(f"/tiles/{TILE}.png", params={"return_mask": "false"}),
    ):
        rgb = image(response)
        assert rgb.shape[2] == 3
        valid = with_mask[..., 3] > 0
        np.testing.assert_array_equal(rgb[valid], with_mask[..., :3][valid])
    bad = http.get(f"/tiles/{TILE}.png", params={"return_mask": "maybe"})
    assert bad.status_code == 400 and "return_mask" in bad.json()["detail"]


def test_interval_colormap_colours_as_rio_tiler_does(http: httpx.Client) -> None:
    intervals = [
        [[0, 1000], "#ff0000"],
        [[1000, 1500], [0, 255, 0, 255]],
        [[1500, 9000], "#0000ff"],
    ]
    dem, valid = raw(http, assets="dem")
    got = image(
        http.get(f"/tiles/{TILE}.png", params={"assets": "dem", "colormap": json.dumps(intervals)})
    )
    heights = dem[0][valid]
    for (lo, hi), colour in intervals:
        inside = (heights >= lo) & (heights < hi)
        if inside.any():
            assert (got[..., :3][valid][inside] == parse_color(colour)[:3]).all(), (lo, hi)
    assert (got[..., 3][~valid] == 0).all()


def test_discrete_colormap_equals_rio_tilers_apply_cmap(http: httpx.Client) -> None:
    band, valid = raw(http, bidx="1")
    values = np.unique(band[0][valid])[:3]
    colours = {
        str(int(v)): c for v, c in zip(values, ("#ff0000", "#00ff00", "#0000ff"), strict=False)
    }
    got = image(
        http.get(f"/tiles/{TILE}.png", params={"bidx": "1", "colormap": json.dumps(colours)})
    )
    expected, _ = apply_cmap(
        band.astype("uint8"), {int(k): parse_color(v) for k, v in colours.items()}
    )
    listed = np.isin(band[0], values) & valid
    assert listed.any()
    np.testing.assert_array_equal(
        np.moveaxis(got[..., :3], -1, 0)[:, listed], expected[:3][:, listed]
    )


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"colormap": "{bad"}, "colormap:"),
        ({"colormap": '{"1": "#ff0000"}'}, "needs one band"),  # visual has 3
        ({"assets": "dem", "colormap": '{"1": "#ff0000"}'}, "needs integers"),
        ({"colormap": '[[[5, 1], "#ff0000"]]', "bidx": "1"}, "is empty"),
        ({"colormap": '{"1": "#f00"}', "colormap_name": "viridis", "bidx": "1"}, "give one"),
        ({"colormap": '{"x": "#ff0000"}', "bidx": "1"}, "colormap:"),
        ({"colormap": '{"1": "blue"}', "bidx": "1"}, "colormap:"),  # colours: hex or numbers
    ],
)
def test_bad_colormaps_are_400s(http: httpx.Client, params: dict, needle: str) -> None:
    for response in (
        http.get(f"/tiles/{TILE}", params=params),
        http.get("/tilejson.json", params=params),
    ):
        assert response.status_code == 400, (response.request.url, response.text[:200])
        assert needle in response.json()["detail"]
