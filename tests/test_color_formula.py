"""`color_formula` (issue 17): rio-color's operations after `rescale`, as TiTiler renders them.

Each tile with a formula is compared with the same tile without it, transformed in the test:
gamma and sigmoidal by their formulas written out here in numpy (rio-color's documented
transfer functions, scaled by the dtype's range and truncated back to uint8), the whole
three-operation example by rio-tiler's `ImageData.apply_color_formula` (what TiTiler's render
calls; on tiles and crops), and saturation 0 must leave grey. Float data without `rescale`,
too few bands and malformed formulas are 400s naming the fix on tiles and TileJSON."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from rio_tiler.models import ImageData

from tests.conftest import assert_clear_error

TILE = "/tiles/12/2132/1472.npy"  # inside the demo (UTM 32N, 7.4 E 45 N): RGB and DEM
EXAMPLE = "Gamma RGB 3.5 Saturation 1.7 Sigmoidal RGB 15 0.35"


def npy(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text[:300]
    out = np.load(io.BytesIO(response.content))
    return out[:-1], out[-1] == 255


@pytest.fixture(scope="module")
def raw(http: httpx.Client) -> tuple[np.ndarray, np.ndarray]:
    data, valid = npy(http.get(TILE, params={"assets": "visual"}))
    assert data.dtype == np.uint8 and data.shape[0] == 3 and valid.mean() > 0.5
    return data, valid


def _formula(http: httpx.Client, formula: str, **params: str) -> tuple[np.ndarray, np.ndarray]:
    return npy(http.get(TILE, params={"assets": "visual", "color_formula": formula, **params}))


def _close(got: np.ndarray, expected: np.ndarray, valid: np.ndarray) -> None:
    """Equal on the valid pixels, but for float rounding at a uint8 truncation boundary."""
    assert got.dtype == np.uint8 and got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))[:, valid]
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_gamma_is_the_power_law_on_the_bands_named(http: httpx.Client, raw) -> None:
    data, valid = raw
    got, got_valid = _formula(http, "gamma R 2.2, gamma gb 0.7")
    u = data.astype("float64") / 255
    expected = np.stack([u[0] ** (1 / 2.2), u[1] ** (1 / 0.7), u[2] ** (1 / 0.7)])
    _close(got, (expected * 255).astype("uint8"), valid)
    assert (got_valid == valid).all()
    assert (got[0] != data[0])[valid].mean() > 0.5  # it did brighten


def test_sigmoidal_is_rio_colors_transfer_function(http: httpx.Client, raw) -> None:
    data, valid = raw
    contrast, bias = 10.0, 0.4
    got, _ = _formula(http, f"sigmoidal rgb {contrast} {bias}")
    u = data.astype("float64") / 255

    def s(x: np.ndarray | float) -> np.ndarray | float:
        return 1 / (1 + np.exp(contrast * (bias - x)))

    expected = (s(u) - s(0.0)) / (s(1.0) - s(0.0))  # scaled so 0 -> 0 and 1 -> 1
    _close(got, (expected * 255).astype("uint8"), valid)


def test_the_example_equals_rio_tilers_apply_color_formula(http: httpx.Client, raw) -> None:
    """TiTiler's render: rescale, then ImageData.apply_color_formula, then encode. Here on
    npy and, with rescale, on PNG (uint8 out of any input)."""
    data, valid = raw
    got, got_valid = _formula(http, EXAMPLE)
    theirs = ImageData(np.ma.MaskedArray(data.copy(), mask=~np.broadcast_to(valid, data.shape)))
    theirs.apply_color_formula(EXAMPLE)
    np.testing.assert_array_equal(got[:, valid], theirs.data[:, valid])
    assert (got_valid == valid).all() and (got != data)[:, valid].mean() > 0.5
    grey, _ = _formula(http, "saturation 0")
    spread = grey.astype(int).max(axis=0) - grey.astype(int).min(axis=0)
    assert spread[valid].max() <= 1 and (data.max(axis=0) != data.min(axis=0))[valid].any()
    # the DEM (float32) through rescale: the formula works on the stretched uint8 band
    dem, dem_valid = npy(http.get(TILE, params={"assets": "dem", "rescale": "300,900"}))
    stretched, _ = npy(
        http.get(TILE, params={"assets": "dem", "rescale": "300,900", "color_formula": "gamma 1 2"})
    )
    expected = ((dem.astype("float64") / 255) ** 0.5 * 255).astype("uint8")
    _close(stretched, expected, dem_valid)


def test_crops_take_the_formula_too(http: httpx.Client) -> None:
    """/bbox renders through the same encode: the formula on its pixels, rio-tiler's way."""
    url = "/bbox/7.0,44.95,7.1,45.0/96x64.npy"
    data, valid = npy(http.get(url, params={"assets": "visual"}))
    got, _ = npy(http.get(url, params={"assets": "visual", "color_formula": EXAMPLE}))
    theirs = ImageData(np.ma.MaskedArray(data.copy(), mask=~np.broadcast_to(valid, data.shape)))
    theirs.apply_color_formula(EXAMPLE)
    assert valid.mean() > 0.9
    np.testing.assert_array_equal(got[:, valid], theirs.data[:, valid])


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"color_formula": ""}, "color_formula: empty"),
        ({"color_formula": "brighten 2"}, "'brighten' is not an operation"),
        ({"color_formula": "gamma"}, "gamma needs its bands first"),
        ({"color_formula": "gamma rgbx 2"}, "gamma needs its bands first"),
        ({"color_formula": "gamma rgb"}, "gamma takes 1 number(s) (gamma BANDS gamma)"),
        ({"color_formula": "gamma rgb 1 2"}, "takes 1 number(s)"),
        ({"color_formula": "gamma rgb 0"}, "gamma must be above 0"),
        ({"color_formula": "gamma rgb nan"}, "must be a finite number"),
        ({"color_formula": "sigmoidal rgb 10 2"}, "bias is within 0..1"),
        ({"color_formula": "saturation"}, "saturation takes 1 number(s)"),
        ({"color_formula": "gamma r 2 " * 100}, "longer than 500"),
        ({"color_formula": "gamma r 2 " * 17}, "at most 16 operations"),
        ({"assets": "dem", "color_formula": "gamma 1 2"}, "add rescale=min,max"),
        ({"assets": "dem", "rescale": "0,1", "color_formula": "saturation 2"}, "uses band 3"),
        ({"bidx": "1", "color_formula": "gamma b 2"}, "uses band 3"),
    ],
)
def test_bad_color_formulas_are_400s(http: httpx.Client, params: dict, needle: str) -> None:
    params = {"assets": "visual", **params}
    for response in (
        http.get(TILE, params=params),
        http.get("/tilejson.json", params={**params, "tile_format": "npy"}),
    ):
        assert_clear_error(response, 400, needle)
