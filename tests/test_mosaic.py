"""Pixel-selection methods on small hand-made layers (values checked by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from core.compute import mosaic
from core.mosaic import METHODS


def layers() -> list[tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]]:
    a = np.array([[[1, 2], [3, 4]]], dtype="uint8")
    b = np.array([[[9, 8], [7, 6]]], dtype="uint8")
    c = np.array([[[5, 5], [5, 5]]], dtype="uint8")
    va = np.array([[True, False], [True, False]])
    vb = np.array([[True, True], [False, False]])
    vc = np.array([[False, True], [True, False]])
    whole = (0, 0, 2, 2)
    return [(a, va, whole), (b, vb, whole), (c, vc, whole)]


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("first", [[1, 8], [3, 0]]),
        ("last", [[9, 5], [5, 0]]),
        ("highest", [[9, 8], [5, 0]]),
        ("lowest", [[1, 5], [3, 0]]),
        ("mean", [[5, 6], [4, 0]]),  # (1+9)/2, (8+5)/2=6.5→6 (banker's), (3+5)/2
        ("median", [[5, 6], [4, 0]]),
        ("count", [[2, 2], [2, 0]]),
    ],
)
def test_methods(method: str, expected: list[list[int]]) -> None:
    data, valid = mosaic(layers(), method, (2, 2))
    assert data[0].tolist() == expected
    assert valid.tolist() == [[True, True], [True, False]]


def test_stdev_is_float_and_correct() -> None:
    data, _ = mosaic(layers(), "stdev", (2, 2))
    assert data.dtype == np.float32
    assert data[0, 0, 0] == pytest.approx(4.0)  # std of 1 and 9
    assert data[0, 1, 0] == pytest.approx(1.0)  # std of 3 and 5


def test_one_instance_per_call_keeps_no_state() -> None:
    first = mosaic(layers(), "first", (2, 2))[0].copy()
    again = mosaic(layers(), "first", (2, 2))[0]
    assert np.array_equal(first, again)
    assert set(METHODS) >= {
        "first",
        "last",
        "highest",
        "lowest",
        "mean",
        "median",
        "stdev",
        "count",
    }


def test_layers_arrive_as_their_windows() -> None:
    """A layer covering part of the grid travels as that part and lands where it belongs."""
    a = np.full((1, 2, 2), 7, dtype="uint8")
    b = np.full((1, 1, 3), 9, dtype="uint8")
    data, valid = mosaic(
        [(a, np.ones((2, 2), bool), (1, 0, 2, 2)), (b, np.ones((1, 3), bool), (0, 2, 3, 1))],
        "first",
        (3, 3),
    )
    assert data[0].tolist() == [[0, 7, 7], [0, 7, 7], [9, 9, 9]]
    assert valid.tolist() == [[False, True, True], [False, True, True], [True, True, True]]


@pytest.mark.parametrize("method", ["first", "last"])
def test_pasting_whole_valid_windows_equals_the_masked_paste(method: str) -> None:
    """Fully valid layers take the plain-copy path; the result is the pixel-by-pixel rule
    (first: the earliest layer valid there; last: the latest), checked on random windows."""
    rng = np.random.default_rng(3)
    shape = (40, 50)
    layers = []
    for n in range(12):
        col, row = int(rng.integers(0, 45)), int(rng.integers(0, 35))
        w, h = int(rng.integers(1, 51 - col)), int(rng.integers(1, 41 - row))
        valid = np.ones((h, w), bool) if n % 2 else rng.random((h, w)) > 0.3
        data = np.where(valid, rng.integers(1, 255, (2, h, w)), 0).astype("uint8")
        layers.append((data, valid, (col, row, w, h)))
    got, got_valid = mosaic(layers, method, shape)
    want = np.zeros((2, *shape), "uint8")
    want_valid = np.zeros(shape, bool)
    for data, valid, (col, row, w, h) in layers if method == "last" else layers[::-1]:
        win = np.s_[row : row + h, col : col + w]
        want[(slice(None), *win)] = np.where(valid, data, want[(slice(None), *win)])
        want_valid[win] |= valid
    assert (got_valid == want_valid).all()
    assert (got == want).all()
