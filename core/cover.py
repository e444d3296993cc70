"""Which part of a search area the footprints found so far cover: skipcovered and exitwhenfull.

A raster of sample points over the area, not a union of polygons: the union of hundreds of
footprints grows with every item (1.5–2 s for 500 cells at z5–z7 on a 100,000-item catalog),
while testing an item's footprint against the samples costs the points in its bbox. The samples
only decide which items are worth reading; the engine still fills any pixel left empty from
the items skipped (core.engine.Engine.complete), so a footprint sliver thinner than a sample
step costs a second pass, never a hole.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

SAMPLES = 64  # sample points across the area's width and height (4 px of a 256 tile)


class Coverage:
    """Sample points over `area` (lon/lat); a footprint covers the points inside it."""

    def __init__(self, area: BaseGeometry, samples: int = SAMPLES) -> None:
        west, south, east, north = self.bounds = area.bounds
        self.dx = (east - west) / samples
        self.dy = (north - south) / samples
        self.xs = west + (np.arange(samples) + 0.5) * self.dx
        self.ys = north - (np.arange(samples) + 0.5) * self.dy  # row 0 is the north edge
        # samples outside the area (its bounds' corners) need no cover; a box (a tile's area)
        # holds every sample: its centres are inside its bounds
        if _is_box(area):
            self.covered = np.zeros((samples, samples), dtype=bool)
        else:
            self.covered = ~shapely.contains_xy(area, *np.meshgrid(self.xs, self.ys))

    def points(self, footprint: BaseGeometry) -> tuple[slice, slice, np.ndarray] | None:
        """The samples inside `footprint`: rows, cols and their mask;
        None when it holds no sample."""
        minx, miny, maxx, maxy = footprint.bounds
        rectangle = _is_box(footprint)
        if not rectangle and footprint.is_empty:
            return None
        west, _, _, north = self.bounds
        # the samples whose centres fall inside the footprint's bbox
        c0 = max(0, int(np.ceil((minx - west) / self.dx - 0.5)))
        c1 = min(len(self.xs), int(np.floor((maxx - west) / self.dx - 0.5)) + 1)
        r0 = max(0, int(np.ceil((north - maxy) / self.dy - 0.5)))
        r1 = min(len(self.ys), int(np.floor((north - miny) / self.dy - 0.5)) + 1)
        if c0 >= c1 or r0 >= r1:
            return None
        # its whole bbox when it is one, or when the box through these samples' centres lies
        # in its interior (one GEOS test instead of one per sample: a footprint over a tile)
        if rectangle or (
            c1 - c0 > 1
            and r1 - r0 > 1
            and shapely.contains_properly(
                footprint, shapely.box(self.xs[c0], self.ys[r1 - 1], self.xs[c1 - 1], self.ys[r0])
            )
        ):
            inside = np.ones((r1 - r0, c1 - c0), dtype=bool)
        else:
            inside = shapely.contains_xy(footprint, *np.meshgrid(self.xs[c0:c1], self.ys[r0:r1]))
            if not inside.any():
                return None
        return slice(r0, r1), slice(c0, c1), inside

    def adds(self, points: tuple[slice, slice, np.ndarray] | None) -> bool:
        """Whether these samples reach any point not covered yet (no samples: it may still
        hold pixels between them, so it counts as adding)."""
        if points is None:
            return True
        rows, cols, inside = points
        return bool((inside & ~self.covered[rows, cols]).any())

    def add(self, points: tuple[slice, slice, np.ndarray] | None) -> None:
        if points is not None:
            rows, cols, inside = points
            self.covered[rows, cols] |= inside

    @property
    def full(self) -> bool:
        return bool(self.covered.all())


def _is_box(geometry: BaseGeometry) -> bool:
    """Whether `geometry` fills its bounds (an axis-aligned rectangle)."""
    minx, miny, maxx, maxy = geometry.bounds
    box_area = (maxx - minx) * (maxy - miny)
    return box_area > 0 and abs(geometry.area - box_area) <= 1e-9 * box_area
