"""The nearest kernel equals GDAL's warper pixel for pixel; the GDAL path handles the rest."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from core.warp import _gdal, aligned, approx_rows, pixel_transform, warp

SRC = Affine(120, 0, 520000, 0, -120, 4990000)  # UTM 32N, near 9.3°E 45°N
RNG = np.random.default_rng(0)


# Up to ~2x downsampling the kernel equals GDAL's; further out GDAL's warper picks a neighbouring
# source pixel for ~1% of pixels (seen with GDAL 3.10; not from the approximate transformer,
# which is reproduced above), so there the bar is 98%.
@pytest.mark.parametrize(
    ("res", "bar"), [(38.2, 0.999), (152.87, 0.999), (200, 0.999), (305.7, 0.98), (611.5, 0.98)]
)
@pytest.mark.parametrize("dst_crs", ["EPSG:3857", "EPSG:4326", "EPSG:32633"])
def test_nearest_equals_gdal(res: float, bar: float, dst_crs: str) -> None:
    data = RNG.integers(1, 255, (2, 400, 400), dtype=np.uint8)
    valid = RNG.random((400, 400)) > 0.05
    if dst_crs == "EPSG:4326":
        dst = Affine(res / 111000, 0, 9.35, 0, -res / 111000, 45.05)
    elif dst_crs == "EPSG:32633":
        dst = Affine(res, 0, 50000, 0, -res, 5000000)
    else:
        dst = Affine(res, 0, 1042000, 0, -res, 5615000)
    ours, ours_valid = warp(
        data, valid, SRC, "EPSG:32632", dst, dst_crs, (256, 256), None, "nearest"
    )
    gdal, gdal_valid = _gdal(data, valid, SRC, "EPSG:32632", dst, dst_crs, (256, 256), "nearest")
    assert ours_valid.any()
    assert (ours_valid == gdal_valid).mean() > 0.999
    both = ours_valid & gdal_valid
    assert (ours[:, both] == gdal[:, both]).mean() > bar


def test_large_outputs_use_gdal_and_agree_with_the_numpy_kernel() -> None:
    data = RNG.integers(1, 255, (1, 400, 400), dtype=np.uint8)
    valid = np.ones((400, 400), dtype=bool)
    dst = Affine(76.4, 0, 1042000, 0, -76.4, 5615000)
    big, big_valid = warp(
        data, valid, SRC, "EPSG:32632", dst, "EPSG:3857", (512, 512), None, "nearest"
    )  # one 512² window: GDAL
    quarter, _ = warp(
        data, valid, SRC, "EPSG:32632", dst, "EPSG:3857", (512, 512), (0, 0, 256, 256), "nearest"
    )  # 256² window: numpy (rows span 512 px)
    assert big_valid[:256, :256].any()
    assert (big[:, :256, :256] == quarter[:, :256, :256]).mean() > 0.999


def test_window_gives_the_same_pixels_as_the_whole_grid() -> None:
    data = RNG.integers(1, 255, (1, 400, 400), dtype=np.uint8)
    valid = np.ones((400, 400), dtype=bool)
    dst = Affine(152.87, 0, 1042000, 0, -152.87, 5615000)
    full, _ = warp(data, valid, SRC, "EPSG:32632", dst, "EPSG:3857", (256, 256), None, "nearest")
    part, part_valid = warp(
        data, valid, SRC, "EPSG:32632", dst, "EPSG:3857", (256, 256), (10, 20, 100, 50), "nearest"
    )
    assert np.array_equal(part[:, 20:70, 10:110], full[:, 20:70, 10:110])
    assert not part_valid[:20].any() and not part_valid[:, 110:].any()


def test_approx_rows_within_gdal_error_of_exact() -> None:
    exact = pixel_transform(
        SRC, "EPSG:32632", Affine(611.5, 0, 1042000, 0, -611.5, 5615000), "EPSG:3857"
    )
    ys = np.arange(256) + 0.5
    cols, rows = approx_rows(exact, 256, ys)
    ex_c, ex_r = exact(*np.meshgrid(np.arange(256) + 0.5, ys))
    assert np.abs(cols - ex_c).max() + np.abs(rows - ex_r).max() < 0.25
    assert not np.isnan(cols).any()


@pytest.mark.parametrize("resampling", ["bilinear", "cubic", "average"])
def test_gdal_kernels_respect_the_mask(resampling: str) -> None:
    data = np.full((1, 200, 200), 100, dtype=np.uint16)
    valid = np.ones((200, 200), dtype=bool)
    valid[:, :100] = False
    data[:, :, :100] = 60000  # garbage under the mask must not bleed into valid pixels
    dst = Affine(120, 0, 520000, 0, -120, 4990000)
    out, out_valid = warp(
        data, valid, SRC, "EPSG:32632", dst, "EPSG:32632", (200, 200), None, resampling
    )
    assert out_valid[:, 110:].all() and not out_valid[:, :90].any()
    assert (out[0][out_valid] == 100).all()


@pytest.mark.parametrize("shift", [(0, 0), (37, -12), (-50, 300), (390, 390)])
@pytest.mark.parametrize("size", [64, 512])
def test_a_gridaligned_to_the_source_is_a_copy_equal_to_gdals_nearest(
    shift: tuple[int, int], size: int
) -> None:
    """Same CRS, same pixel size, whole-pixel offset (a chunk read in the COG's own grid):
    nearest is a copy, and equals GDAL's warper (and the numpy kernel) exactly, edges included."""
    data = RNG.integers(1, 255, (3, 400, 400), dtype=np.uint8)
    valid = RNG.random((400, 400)) > 0.05
    dx, dy = shift
    dst = SRC * Affine.translation(dx, dy)
    ours, ours_valid = warp(
        data, valid, SRC, "EPSG:32632", dst, "EPSG:32632", (size, size), None, "nearest"
    )
    gdal, gdal_valid = _gdal(
        data, valid, SRC, "EPSG:32632", dst, "EPSG:32632", (size, size), "nearest"
    )
    np.testing.assert_array_equal(ours_valid, gdal_valid)
    np.testing.assert_array_equal(np.where(ours_valid, ours, 0), np.where(gdal_valid, gdal, 0))
    assert aligned(SRC, "EPSG:32632", dst, "EPSG:32632", 0, 0) == shift
    half = SRC * Affine.translation(0.5, 0)  # half a pixel off: not a copy
    assert aligned(SRC, "EPSG:32632", half, "EPSG:32632", 0, 0) is None
    assert aligned(SRC, "EPSG:32632", dst, "EPSG:32633", 0, 0) is None


def test_assets_on_one_grid_share_one_sampling_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """An item stored as one COG per band (B04, B03, B02 on one grid) warps as its three-band
    equivalent would, computing the nearest kernel's sampling index once for the job."""
    import core.warp
    from core.compute import Source, Target, warp_item

    data = RNG.integers(1, 255, (3, 400, 400), dtype=np.uint8)
    valid = RNG.random((400, 400)) > 0.05
    target = Target("EPSG:3857", (76.4, 0, 1042000, 0, -76.4, 5615000), 256, 256)
    bands = [Source(data[i : i + 1], valid, tuple(SRC)[:6], "EPSG:32632") for i in range(3)]
    whole = Source(data, valid, tuple(SRC)[:6], "EPSG:32632")
    computed = []
    real = core.warp.nearest_index
    monkeypatch.setattr(core.warp, "nearest_index", lambda *a: computed.append(a) or real(*a))
    split, split_valid, window = warp_item(bands, target, "nearest")
    assert len(computed) == 1
    one, one_valid, one_window = warp_item([whole], target, "nearest")
    assert window == one_window and split_valid.any()
    assert (split == one).all() and (split_valid == one_valid).all()


def test_copy_on_the_sources_grid() -> None:
    """Nearest on the source's own grid is a copy: views of a block valid throughout (no
    pixel copied before the mosaic), a zeroed copy where not (the input left as it was), and
    the window trimmed to the part the source fills."""
    from core.warp import warp_part

    data = RNG.integers(1, 255, (3, 64, 64), dtype=np.uint8)
    valid = np.ones((64, 64), dtype=bool)
    valid[:10, :10] = False
    dst = SRC * Affine.translation(16, 16)  # the grid's pixel (0, 0) is the source's (16, 16)
    args = (SRC, "EPSG:32632", dst, "EPSG:32632", (64, 64))

    part, part_valid, window = warp_part(data, valid, *args, (0, 0, 32, 32), "nearest")
    assert window == (0, 0, 32, 32) and part_valid.all()
    assert np.shares_memory(part, data) and np.array_equal(part, data[:, 16:48, 16:48])

    before = data.copy()
    dst = SRC * Affine.translation(4, 4)
    part, part_valid, _ = warp_part(
        data, valid, *args[:2], dst, *args[3:], (0, 0, 32, 32), "nearest"
    )
    assert not np.shares_memory(part, data) and np.array_equal(data, before)
    assert np.array_equal(part_valid, valid[4:36, 4:36])
    assert (part[:, ~part_valid] == 0).all()
    assert np.array_equal(part[:, part_valid], data[:, 4:36, 4:36][:, part_valid])

    dst = SRC * Affine.translation(48, 48)  # half the window beyond the source's edge
    part, part_valid, _ = warp_part(
        data, valid, *args[:2], dst, *args[3:], (0, 0, 32, 32), "nearest"
    )
    assert part_valid[:16, :16].all() and not part_valid[16:, :].any()
    assert (part[:, 16:, :] == 0).all() and np.array_equal(part[:, :16, :16], data[:, 48:, 48:])


def test_approx_rows_writes_every_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """approx_rows allocates its outputs unfilled: every point must be written, interpolated
    or transformed, for any pair of CRSs and grid (memory poisoned to catch one missed)."""
    poison = 1.2345e300
    empty = np.empty

    def poisoned(*args: object, **kwargs: object) -> np.ndarray:
        out = empty(*args, **kwargs)
        if out.dtype == np.float64:
            out.fill(poison)
        return out

    monkeypatch.setattr(np, "empty", poisoned)
    rng = np.random.default_rng(7)
    crss = ["EPSG:32632", "EPSG:32633", "EPSG:3857", "EPSG:4326", "EPSG:3031", "EPSG:32601"]
    for _ in range(150):
        src_crs, dst_crs = (crss[i] for i in rng.choice(len(crss), 2))
        degrees = dst_crs == "EPSG:4326"
        res = float(10 ** rng.uniform(-5, -1) if degrees else 10 ** rng.uniform(0, 4))
        x0 = rng.uniform(-180, 180) if degrees else rng.uniform(-2e7, 2e7)
        y0 = rng.uniform(-85, 85) if degrees else rng.uniform(-1e7, 1e7)
        src = Affine(0.001, 0, 9, 0, -0.001, 46) if src_crs == "EPSG:4326" else SRC
        exact = pixel_transform(src, src_crs, Affine(res, 0, x0, 0, -res, y0), dst_crs)
        width, height = int(rng.integers(1, 700)), int(rng.integers(1, 40))
        with np.errstate(all="ignore"):
            cols, rows = approx_rows(exact, width, np.arange(height) + 0.5)
        assert cols.shape == rows.shape == (height, width)
        assert not (cols == poison).any() and not (rows == poison).any()
