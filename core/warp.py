"""Reprojection of one source window onto (part of) an output grid; runs in the compute pool.

Two kernels, one contract — (data, valid) in, (data, valid) out on the destination grid:
- nearest, up to 256² output pixels (web tiles): numpy, sampling source pixels at coordinates
  from GDAL's own approximate-transformer algorithm (re-implemented below, vectorised over
  rows), so results equal GDAL's (and rio-tiler's) pixel for pixel, without GDAL's per-call
  set-up. Measured per 256² UTM→WebMercator tile: 1.5 ms vs GDAL's 4.2 ms.
- everything else: `rasterio.warp.reproject`, the mask travelling as an alpha band so kernels
  are weighted by validity and no spare nodata value is needed. For larger outputs GDAL's
  single C pass wins over numpy's many (512² UTM→UTM: 1.7 ms vs 14.7 ms).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from affine import Affine

from core.masked import zero_outside, zeroed
from core.plan import transformer

MAX_ERROR = 0.125  # GDAL's default approximation error, in source pixels
NUMPY_NEAREST_MAX_PIXELS = 256 * 256  # above this, GDAL's nearest is faster (see above)
_ALPHA_MAX = {"uint16": 65535, "int16": 32767}  # GDAL's default SRC_ALPHA_MAX per type

Window = tuple[int, int, int, int]


def warp(
    data: np.ndarray,
    valid: np.ndarray,
    src_transform: Affine,
    src_crs: str,
    dst_transform: Affine,
    dst_crs: str,
    dst_shape: tuple[int, int],
    window: Window | None,
    resampling: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp onto the (height, width) grid, computing only `window` (col, row, w, h) of it."""
    part, part_valid, (col, row, w, h) = warp_part(
        data, valid, src_transform, src_crs, dst_transform, dst_crs, dst_shape, window, resampling
    )
    out = np.zeros((data.shape[0], *dst_shape), dtype=data.dtype)
    out_valid = np.zeros(dst_shape, dtype=bool)
    out[:, row : row + h, col : col + w] = part
    out_valid[row : row + h, col : col + w] = part_valid
    return out, out_valid


def warp_part(
    data: np.ndarray,
    valid: np.ndarray,
    src_transform: Affine,
    src_crs: str,
    dst_transform: Affine,
    dst_crs: str,
    dst_shape: tuple[int, int],
    window: Window | None,
    resampling: str,
    memo: dict | None = None,
) -> tuple[np.ndarray, np.ndarray, Window]:
    """`warp`, returning only the window's pixels (zero where not valid) and the window: an
    item covering a sliver of a chunk sends back the sliver, not a chunk-sized layer.

    `memo` keeps the nearest kernel's sampling index between calls (one job's assets): the
    bands of an item stored as one COG per band (Sentinel-2's B04, B03, B02) share a grid, and
    their index is the same."""
    height, width = dst_shape
    col, row, w, h = window or (0, 0, width, height)
    offset = aligned(src_transform, src_crs, dst_transform, dst_crs, col, row)
    if resampling == "nearest" and offset is not None:
        return _copy(data, valid, offset, (col, row, w, h))  # zero where not valid already
    if resampling == "nearest" and w * h <= NUMPY_NEAREST_MAX_PIXELS:
        key = (  # nearest_index's arguments: the same for assets on one grid
            src_transform,
            src_crs,
            dst_transform,
            dst_crs,
            width,
            (col, row, w, h),
            valid.shape,
        )
        memo = {} if memo is None else memo
        if key not in memo:
            memo[key] = nearest_index(*key)
        part, part_valid = _sample(data, valid, memo[key], (h, w))
    else:
        transform = dst_transform @ Affine.translation(col, row)
        part, part_valid = _gdal(
            data, valid, src_transform, src_crs, transform, dst_crs, (h, w), resampling
        )
    # no stale values under the mask; in place: both kernels above return arrays of their own
    if not part_valid.all():
        zero_outside(part, part_valid)
    return part.astype(data.dtype, copy=False), part_valid, (col, row, w, h)


def aligned(
    src: Affine, src_crs: str, dst: Affine, dst_crs: str, col: int, row: int
) -> tuple[int, int] | None:
    """The source (col, row) under the window's first pixel when both grids are the same
    (same CRS, north-up, same pixel size, offset by whole pixels), else None: then nearest
    is a copy (what GDAL's and the numpy kernel's nearest give there, without either)."""
    if src_crs != dst_crs or src.b or src.d or dst.b or dst.d:
        return None
    if not (math.isclose(src.a, dst.a, rel_tol=1e-9) and math.isclose(src.e, dst.e, rel_tol=1e-9)):
        return None
    x = (dst.c + col * dst.a - src.c) / src.a
    y = (dst.f + row * dst.e - src.f) / src.e
    if abs(x - round(x)) > 1e-6 or abs(y - round(y)) > 1e-6:
        return None
    return round(x), round(y)


def _copy(
    data: np.ndarray, valid: np.ndarray, offset: tuple[int, int], window: Window
) -> tuple[np.ndarray, np.ndarray, Window]:
    """The block of the source under `window` when the source's pixel (0, 0) is at `offset`
    from the window's first pixel, zero where not valid, with the part of the window it fills
    (the window less any rows and columns beyond the source). A block valid throughout is
    returned as views: a chunk read on the COGs' own grid copies its pixels once, into the
    mosaic."""
    col, row, w, h = window
    x0, y0 = offset
    src_h, src_w = valid.shape
    sx0, sy0 = max(x0, 0), max(y0, 0)
    sx1, sy1 = min(x0 + w, src_w), min(y0 + h, src_h)
    if sx1 <= sx0 or sy1 <= sy0:  # the source is not under the window at all
        empty = np.zeros((data.shape[0], h, w), dtype=data.dtype)
        return empty, np.zeros((h, w), dtype=bool), window
    block = data[:, sy0:sy1, sx0:sx1]
    block_valid = valid[sy0:sy1, sx0:sx1]
    if not block_valid.all():
        block = zeroed(block, block_valid)
    return block, block_valid, (col + sx0 - x0, row + sy0 - y0, sx1 - sx0, sy1 - sy0)


def _gdal(
    data: np.ndarray,
    valid: np.ndarray,
    src_transform: Affine,
    src_crs: str,
    dst_transform: Affine,
    dst_crs: str,
    shape: tuple[int, int],
    resampling: str,
) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    bands = data.shape[0]
    src = np.empty((bands + 1, *data.shape[1:]), dtype=data.dtype)
    src[:bands] = data
    src[bands] = np.where(valid, _ALPHA_MAX.get(data.dtype.name, 255), 0)
    dst = np.zeros((bands + 1, *shape), dtype=data.dtype)
    reproject(
        source=src,
        destination=dst,
        src_transform=src_transform,
        src_crs=src_crs,
        dst_transform=dst_transform,
        dst_crs=dst_crs,
        src_alpha=bands + 1,
        dst_alpha=bands + 1,
        resampling=Resampling[resampling],
    )
    return dst[:bands], dst[bands] > 0


def nearest_index(
    src_transform: Affine,
    src_crs: str,
    dst_transform: Affine,
    dst_crs: str,
    grid_width: int,
    window: Window,
    src_shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """For each pixel of the window, the flat index of its nearest source pixel (0 outside
    the source) and whether it is inside: GDAL's approximate transform, then floor."""
    col, row, w, h = window
    exact = pixel_transform(src_transform, src_crs, dst_transform, dst_crs)
    # Whole grid rows, as GDAL transforms them (the approximation depends on the row span).
    cols, rows = approx_rows(exact, grid_width, np.arange(row, row + h) + 0.5)
    src_h, src_w = src_shape
    with np.errstate(invalid="ignore"):  # NaN (a failed transform) casts to INT_MIN: outside
        index = []
        for coords in (cols, rows):
            part = coords[:, col : col + w]  # a view: approx_rows' arrays are this call's own
            part += 1e-10
            np.floor(part, out=part)
            index.append(part.astype(np.intp))
    col_index, row_index = index
    # negative indexes are huge as unsigned: one comparison per axis bounds both sides
    inside = col_index.view(np.uintp) < src_w
    inside &= row_index.view(np.uintp) < src_h
    row_index *= src_w
    row_index += col_index
    row_index *= inside  # 0 outside the source
    return row_index.ravel(), inside


def _sample(
    data: np.ndarray,
    valid: np.ndarray,
    index: tuple[np.ndarray, np.ndarray],
    shape: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """The source pixels at a `nearest_index`: (bands, h, w) and their validity."""
    flat, inside = index
    h, w = shape
    out_valid = inside & valid.ravel().take(flat).reshape(h, w)
    out = data.reshape(data.shape[0], -1).take(flat, axis=1).reshape(-1, h, w)
    return out, out_valid


Exact = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def pixel_transform(
    src_transform: Affine, src_crs: str, dst_transform: Affine, dst_crs: str
) -> Exact:
    """Destination pixel (x, y) → source pixel (col, row), exactly (GDAL's GenImgProj)."""
    to_src = None if src_crs == dst_crs else transformer(dst_crs, src_crs)
    inverse = ~src_transform

    def exact(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gx, gy = dst_transform @ (x, y)
        if to_src is not None:
            gx, gy = to_src.transform(gx, gy, errcheck=False)
        cols, rows = inverse @ (np.asarray(gx, dtype="float64"), np.asarray(gy, dtype="float64"))
        return np.asarray(cols, dtype="float64"), np.asarray(rows, dtype="float64")

    return exact


def approx_rows(
    exact: Exact, width: int, ys: np.ndarray, max_error: float = MAX_ERROR
) -> tuple[np.ndarray, np.ndarray]:
    """GDAL's GDALApproxTransform on the pixel centres of whole rows, vectorised over rows.

    Per row segment: transform start, middle and end exactly; if linear interpolation from
    start to end misses the middle by at most `max_error` (L1, source pixels), interpolate
    the segment; otherwise split it at the middle and recurse (segments of at most 5 points
    are transformed exactly). Returns (cols, rows) of shape (len(ys), width).
    """
    n_rows = len(ys)
    xs = np.arange(width) + 0.5
    # not filled first: the segments below partition every row, so each point is written
    # (interpolated or transformed); a NaN fill cost ~1 ms per 1024² array
    out_c = np.empty((n_rows, width))
    out_r = np.empty((n_rows, width))
    if n_rows == 0:
        return out_c, out_r

    def put_exact(seg_row: np.ndarray, first: np.ndarray, count: np.ndarray) -> None:
        """Exact transform of `count` points from `first` in each row segment."""
        if len(seg_row) == 0 or count.sum() == 0:
            return
        r_idx = np.repeat(seg_row, count)
        offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        c_idx = np.repeat(first, count) + offsets
        c, r = exact(xs[c_idx], ys[r_idx])
        out_c[r_idx, c_idx] = c
        out_r[r_idx, c_idx] = r

    if width <= 5:
        put_exact(np.arange(n_rows), np.zeros(n_rows, int), np.full(n_rows, width))
        return out_c, out_r

    seg_row = np.arange(n_rows)
    start = np.zeros(n_rows, dtype=int)
    count = np.full(n_rows, width)
    mid = (width - 1) // 2
    pts_x = np.concatenate(
        [np.zeros(n_rows, int), np.full(n_rows, mid), np.full(n_rows, width - 1)]
    )
    c, r = exact(xs[pts_x], np.tile(ys, 3))
    sme = np.stack([c.reshape(3, n_rows), r.reshape(3, n_rows)])  # (2 coords, 3 points, n)

    while len(seg_row):
        end = start + count - 1
        middle = start + (count - 1) // 2
        span = xs[end] - xs[start]
        slope = (sme[:, 2] - sme[:, 0]) / span  # (2, n)
        predicted = sme[:, 0] + slope * (xs[middle] - xs[start])
        error = np.abs(predicted - sme[:, 1]).sum(axis=0)
        ok = ~(error > max_error)  # NaN errors (failed transforms) are interpolated as NaN

        # accepted segments: linear interpolation from start. Rows mostly split alike, so
        # segments are grouped by (start, count) and filled as 2-D slices, not scattered.
        if ok.any():
            keys = start[ok] * (width + 1) + count[ok]
            for key in np.unique(keys):
                pick = np.flatnonzero(ok)[keys == key]
                first, n = int(start[pick[0]]), int(count[pick[0]])
                dist = xs[first : first + n] - xs[first]
                rows_ = seg_row[pick]
                if len(rows_) > 1 and (np.diff(rows_) == 1).all():
                    # a run of rows (all of them when the first pass fits): written in
                    # place, without the temporaries and the scatter of a fancy index
                    at = (slice(int(rows_[0]), int(rows_[-1]) + 1), slice(first, first + n))
                    for out, k in ((out_c, 0), (out_r, 1)):
                        np.multiply(slope[k, pick, None], dist, out=out[at])
                        out[at] += sme[k, 0, pick, None]
                    continue
                out_c[rows_, first : first + n] = (
                    sme[0, 0, pick, None] + slope[0, pick, None] * dist
                )
                out_r[rows_, first : first + n] = (
                    sme[1, 0, pick, None] + slope[1, pick, None] * dist
                )

        split = ~ok
        if not split.any():
            break
        s_row, s_start, s_count = seg_row[split], start[split], count[split]
        s_mid, s_end, s_sme = middle[split], end[split], sme[:, :, split]
        left_len = (s_count - 1) // 2
        right_len = s_count - left_len
        left_base = left_len <= 5
        right_base = right_len <= 5

        # small halves: exact interior, known end points written as GDAL does
        lb = left_base
        put_exact(s_row[lb], s_start[lb] + 1, np.maximum(left_len[lb] - 1, 0))
        out_c[s_row[lb], s_start[lb]] = s_sme[0, 0, lb]
        out_r[s_row[lb], s_start[lb]] = s_sme[1, 0, lb]
        rb = right_base
        put_exact(s_row[rb], s_mid[rb] + 1, np.maximum(right_len[rb] - 2, 0))
        for k, at in ((1, s_mid), (2, s_end)):
            out_c[s_row[rb], at[rb]] = s_sme[0, k, rb]
            out_r[s_row[rb], at[rb]] = s_sme[1, k, rb]

        # large halves: new segments with their start/middle/end transformed
        ll = ~left_base
        left_mid = s_start + (left_len - 1) // 2
        left_last = s_start + left_len - 1
        rl = ~right_base
        right_mid = s_mid + (right_len - 1) // 2
        want_x = np.concatenate([left_mid[ll], left_last[ll], right_mid[rl]])
        want_y = np.concatenate([ys[s_row[ll]], ys[s_row[ll]], ys[s_row[rl]]])
        c, r = exact(xs[want_x], want_y)
        n_l = int(ll.sum())
        lm = np.stack([c[:n_l], r[:n_l]])
        ls = np.stack([c[n_l : 2 * n_l], r[n_l : 2 * n_l]])
        rm = np.stack([c[2 * n_l :], r[2 * n_l :]])
        left_sme = np.stack([s_sme[:, 0, ll], lm, ls], axis=1)
        right_sme = np.stack([s_sme[:, 1, rl], rm, s_sme[:, 2, rl]], axis=1)

        seg_row = np.concatenate([s_row[ll], s_row[rl]])
        start = np.concatenate([s_start[ll], s_mid[rl]])
        count = np.concatenate([left_len[ll], right_len[rl]])
        sme = np.concatenate([left_sme, right_sme], axis=2)
    return out_c, out_r
