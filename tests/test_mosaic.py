"""Pixel-selection methods on small hand-made layers (values checked by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from core.compute import mosaic
from core.mosaic import METHODS


def layers() -> list[tuple[np.ndarray, np.ndarray]]:
    a = np.array([[[1, 2], [3, 4]]], dtype="uint8")
    b = np.array([[[9, 8], [7, 6]]], dtype="uint8")
    c = np.array([[[5, 5], [5, 5]]], dtype="uint8")
    va = np.array([[True, False], [True, False]])
    vb = np.array([[True, True], [False, False]])
    vc = np.array([[False, True], [True, False]])
    return [(a, va), (b, vb), (c, vc)]


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
    data, valid = mosaic(layers(), method)
    assert data[0].tolist() == expected
    assert valid.tolist() == [[True, True], [True, False]]


def test_stdev_is_float_and_correct() -> None:
    data, _ = mosaic(layers(), "stdev")
    assert data.dtype == np.float32
    assert data[0, 0, 0] == pytest.approx(4.0)  # std of 1 and 9
    assert data[0, 1, 0] == pytest.approx(1.0)  # std of 3 and 5


def test_one_instance_per_call_keeps_no_state() -> None:
    first = mosaic(layers(), "first")[0].copy()
    again = mosaic(layers(), "first")[0]
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
