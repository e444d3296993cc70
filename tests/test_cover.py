"""core.cover's shortcuts (a box area, a footprint over the whole window) give exactly the
samples the per-point test gives."""

from __future__ import annotations

import numpy as np
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, box

from core.cover import SAMPLES, Coverage

AREA = box(10.0, 45.0, 10.5, 45.3)  # a tile's lon/lat box


def _by_points(cover: Coverage, footprint) -> np.ndarray:
    """Every sample of the area inside `footprint`, tested one by one."""
    xs, ys = np.meshgrid(cover.xs, cover.ys)
    return shapely.contains_xy(footprint, xs, ys)


def _by_coverage(cover: Coverage, footprint) -> np.ndarray:
    out = np.zeros((SAMPLES, SAMPLES), dtype=bool)
    points = cover.points(footprint)
    if points is not None:
        rows, cols, inside = points
        out[rows, cols] = inside
    return out


footprints = st.builds(
    lambda kind, cx, cy, w, h, angle: {
        "box": box(cx - w, cy - h, cx + w, cy + h),
        "rotated": affinity.rotate(box(cx - w, cy - h, cx + w, cy + h), angle),
        "triangle": Polygon([(cx - w, cy - h), (cx + w, cy - h), (cx, cy + h)]),
        "donut": box(cx - w, cy - h, cx + w, cy + h).difference(
            box(cx - w / 3, cy - h / 3, cx + w / 3, cy + h / 3)
        ),
        "multi": MultiPolygon(
            [box(cx - w, cy - h, cx, cy), affinity.rotate(box(cx, cy, cx + w, cy + h), angle)]
        ),
    }[kind],
    st.sampled_from(["box", "rotated", "triangle", "donut", "multi"]),
    st.floats(9.8, 10.7),
    st.floats(44.9, 45.4),
    st.floats(0.001, 0.6),
    st.floats(0.001, 0.4),
    st.floats(-30, 30),
)


@settings(max_examples=300, deadline=None)
@given(footprints)
def test_a_footprints_samples_are_the_per_point_tests(footprint) -> None:
    cover = Coverage(AREA)
    assert not cover.covered.any()  # a box area: every sample needs cover
    assert (_by_coverage(cover, footprint) == _by_points(cover, footprint)).all()


def test_a_footprint_over_the_whole_area_holds_every_sample() -> None:
    cover = Coverage(AREA)
    over = affinity.rotate(box(9.9, 44.9, 10.6, 45.4), 3)  # a UTM footprint, slightly turned
    cover.add(cover.points(over))
    assert cover.full


def test_an_area_that_is_not_a_box_needs_cover_only_inside() -> None:
    area = Polygon([(10.0, 45.0), (10.5, 45.0), (10.0, 45.3)])
    cover = Coverage(area)
    xs, ys = np.meshgrid(cover.xs, cover.ys)
    assert (cover.covered == ~shapely.contains_xy(area, xs, ys)).all()
    assert 0.4 < cover.covered.mean() < 0.6
