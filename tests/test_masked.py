"""core.masked's bit-select copies give exactly numpy's masked copies, for every dtype."""

from __future__ import annotations

import numpy as np
import pytest

from core.masked import put, zero_outside, zeroed

DTYPES = ["uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64", "complex64"]


def _arrays(dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(3, 37, 53, np.dtype(dtype).itemsize), dtype=np.uint8)
    data = raw.view(dtype).reshape(3, 37, 53)  # any bit pattern: NaNs, -0.0, extremes
    dst = rng.integers(0, 256, size=raw.shape, dtype=np.uint8).view(dtype).reshape(3, 37, 53)
    mask = rng.random((37, 53)) > 0.4
    return data, dst, mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_put_is_copyto_where(dtype: str) -> None:
    data, dst, mask = _arrays(dtype, 1)
    expected = dst.copy()
    np.copyto(expected, data, where=mask)
    ours = dst.copy()
    put(ours, data, mask)
    assert ours.tobytes() == expected.tobytes()  # bit for bit (NaN != NaN in ==)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeroing_is_copyto_zero(dtype: str) -> None:
    data, _, mask = _arrays(dtype, 2)
    expected = data.copy()
    np.copyto(expected, 0, where=~mask)
    copied = zeroed(data, mask)
    assert copied.dtype == data.dtype and copied.tobytes() == expected.tobytes()
    assert not np.shares_memory(copied, data)
    in_place = data.copy()
    zero_outside(in_place, mask)
    assert in_place.tobytes() == expected.tobytes()


def test_put_on_strided_views() -> None:
    """Pixel-interleaved sources (a moveaxis view) into a window of a larger grid."""
    rng = np.random.default_rng(3)
    interleaved = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    source = np.moveaxis(interleaved, -1, 0)
    grid = rng.integers(0, 256, size=(3, 100, 100), dtype=np.uint8)
    expected = grid.copy()
    mask = rng.random((40, 60)) > 0.5
    np.copyto(expected[:, 10:50, 20:80], source, where=mask)
    put(grid[:, 10:50, 20:80], source, mask)
    assert np.array_equal(grid, expected)  # outside the window untouched too


def test_put_casts_across_dtypes() -> None:
    """Source and target of different dtypes: numpy's cast, as before."""
    src = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    dst = np.full((1, 3, 4), -1.0, dtype=np.float32)
    mask = np.arange(12).reshape(3, 4) % 2 == 0
    put(dst, src, mask)
    assert np.array_equal(dst, np.where(mask, src, -1.0).astype(np.float32))
