"""Masked pixel copies as bit operations: what `np.copyto(..., where=mask)` does, faster.

Why: numpy's masked copy branches per element; over a real footprint edge (or a speckled
nodata mask) it costs 1.1-7.5 ms per 1024² RGB window where a memcpy costs 0.1 ms, and the
hot path of every tile and chunk pays it (zeroing under the mask, pasting layers). Selecting
by bits (`dst ^ ((dst ^ src) & bits)`, `bits` all ones where the mask is set) runs as plain
vectorised loops: 0.5 ms whatever the mask. It copies bit patterns, so it is exact for every
integer and float dtype (NaN payloads and -0.0 included); other dtypes fall back to copyto.
"""

from __future__ import annotations

import numpy as np

_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(mask: np.ndarray, itemsize: int) -> np.ndarray:
    """All ones where `mask` (2-D bool) is set, zero elsewhere, `itemsize` bytes wide."""
    bits = mask.astype(_UNSIGNED[itemsize])
    np.negative(bits, out=bits)  # 1 -> 0xFF..FF (unsigned wrap), 0 -> 0
    return bits


def _raw(array: np.ndarray) -> np.ndarray | None:
    """`array` viewed as unsigned integers of its width, or None when it has no such view."""
    kind, size = array.dtype.kind, array.dtype.itemsize
    if kind not in "iuf" or size not in _UNSIGNED:
        return None
    return array.view(_UNSIGNED[size])


def put(dst: np.ndarray, src: np.ndarray, where: np.ndarray) -> None:
    """`dst[:, where] = src[:, where]` in place for (bands, h, w) arrays and an (h, w) mask."""
    raw_dst = _raw(dst) if dst.dtype == src.dtype else None
    if raw_dst is None:
        np.copyto(dst, src, where=where, casting="unsafe")
        return
    raw_src = src.view(raw_dst.dtype)
    bits = _bits(where, dst.dtype.itemsize)
    diff = np.empty_like(bits)
    for band in range(dst.shape[0]):
        np.bitwise_xor(raw_dst[band], raw_src[band], out=diff)
        diff &= bits
        raw_dst[band] ^= diff


def zero_outside(data: np.ndarray, valid: np.ndarray) -> None:
    """Set every band of (bands, h, w) `data` to 0 where (h, w) `valid` is False, in place."""
    raw = _raw(data)
    if raw is None:
        np.copyto(data, 0, where=~valid)
        return
    raw &= _bits(valid, data.dtype.itemsize)


def zeroed(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """A copy of (bands, h, w) `data` with every band 0 where (h, w) `valid` is False: the
    copy and the zeroing in one pass."""
    raw = _raw(data)
    if raw is None:
        return np.where(valid, data, 0).astype(data.dtype, copy=False)
    out = np.empty(data.shape, dtype=raw.dtype)
    np.bitwise_and(raw, _bits(valid, data.dtype.itemsize), out=out)
    return out.view(data.dtype)
