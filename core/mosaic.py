"""Pixel-selection (mosaic) methods: combine warped layers, in mosaic order, into one.

Each method is a small stateful class fed one layer at a time, as in rio-tiler: one instance
per request, never shared. They run inside the compute pool (see core.compute).
"""

from __future__ import annotations

import numpy as np

from core.masked import put


class MosaicMethod:
    """Base: feed (bands, h, w) data with an (h, w) validity mask, then take the result.

    `paste` (first, last) says a method only copies pixels: it is fed each layer as its window
    of the grid (`Paste`), without expanding it to the whole grid first."""

    paste = False

    #: True when a single layer is already the answer (no pool round trip needed).
    identity_for_one = True
    #: False when a layer equal to an earlier one cannot change the result (first, last,
    #: highest, lowest): items that read the very same windows are then read once.
    repeats_count = True

    @staticmethod
    def output_dtype(dtype: np.dtype) -> np.dtype:
        """The dtype of the result for input layers of `dtype` (rio-tiler keeps the input's)."""
        return np.dtype(dtype)

    def __init__(self) -> None:
        self.data: np.ndarray | None = None
        self.valid: np.ndarray | None = None

    def feed(self, data: np.ndarray, valid: np.ndarray) -> None:
        raise NotImplementedError

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.data is not None and self.valid is not None, "no layer was fed"
        # no stale values under the mask; np.where with the (h, w) mask broadcast over the
        # bands is ~7x faster than boolean fancy indexing (data[:, mask]) on tile-sized arrays
        return np.where(self.valid, self.data, 0).astype(self.data.dtype, copy=False), self.valid

    def _start(self, data: np.ndarray, valid: np.ndarray) -> bool:
        if self.data is None:
            self.data, self.valid = data.copy(), valid.copy()
            return True
        return False


class Paste:
    """First or last on windows: each layer's valid pixels copied into one grid-sized result
    where they may land (under `first`, where nothing is yet), in place.

    Why: `First.feed` on grid-sized layers allocated a grid per layer (expanding its window)
    and a new grid per `np.where`; a 1024² chunk of 2-4 items paid ~5 ms of that per layer
    where the copy itself is ~1 ms. The result is the same: pixels nowhere valid are 0."""

    def __init__(self, bands: int, shape: tuple[int, int], dtype: np.dtype, first: bool) -> None:
        self.data = np.zeros((bands, *shape), dtype=dtype)
        self.valid = np.zeros(shape, dtype=bool)
        self.first = first

    def feed(self, data: np.ndarray, valid: np.ndarray, window: tuple[int, int, int, int]) -> None:
        col, row, width, height = window
        here = self.valid[row : row + height, col : col + width]  # a view: updated in place
        target = self.data[:, row : row + height, col : col + width]
        if valid.all() and not (self.first and here.any()):
            target[...] = data  # the whole window: a plain copy (a masked one costs ~5x)
            here[...] = True
            return
        take = valid & ~here if self.first else valid
        put(target, data, take)
        here |= take

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data, self.valid


class First(MosaicMethod):
    """Each pixel from the first layer that has data there (newest on top by default);
    pasted window by window (`Paste`)."""

    repeats_count = False
    paste = True


class Last(MosaicMethod):
    """Each pixel from the last layer that has data there; pasted window by window (`Paste`)."""

    repeats_count = False
    paste = True


class Highest(MosaicMethod):
    """Per band, the highest value among the layers with data."""

    repeats_count = False

    pick = staticmethod(np.maximum)

    def feed(self, data: np.ndarray, valid: np.ndarray) -> None:
        if self._start(data, valid):
            return
        both = valid & self.valid
        picked = np.where(both, self.pick(self.data, data), self.data)
        self.data = np.where(valid & ~self.valid, data, picked)
        self.valid |= valid


class Lowest(Highest):
    """Per band, the lowest value among the layers with data."""

    pick = staticmethod(np.minimum)


class _Stack(MosaicMethod):
    """Methods that need every layer: keep them, reduce at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def feed(self, data: np.ndarray, valid: np.ndarray) -> None:
        self.layers.append(data)
        self.masks.append(valid)

    def _masked(self) -> np.ma.MaskedArray:
        stack = np.stack(self.layers)  # (n, bands, h, w)
        invalid = ~np.stack(self.masks)[:, None, :, :]
        return np.ma.MaskedArray(stack, mask=np.broadcast_to(invalid, stack.shape))

    def reduce(self, stack: np.ma.MaskedArray) -> np.ndarray:
        raise NotImplementedError

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.layers, "no layer was fed"
        dtype = self.layers[0].dtype
        valid = np.logical_or.reduce(self.masks)
        out = self.reduce(self._masked())
        out = np.ma.filled(out, 0)
        return self.cast(out, dtype), valid

    @classmethod
    def cast(cls, out: np.ndarray, dtype: np.dtype) -> np.ndarray:
        """To `output_dtype`, rounding and clipping for integers."""
        dtype = cls.output_dtype(dtype)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            return np.clip(np.rint(out), info.min, info.max).astype(dtype)
        return out.astype(dtype)


class Mean(_Stack):
    def reduce(self, stack: np.ma.MaskedArray) -> np.ndarray:
        return stack.mean(axis=0)


class Median(_Stack):
    def reduce(self, stack: np.ma.MaskedArray) -> np.ndarray:
        return np.ma.median(stack, axis=0)


class Stdev(_Stack):
    """Standard deviation across layers; float32 output."""

    identity_for_one = False

    def reduce(self, stack: np.ma.MaskedArray) -> np.ndarray:
        return stack.std(axis=0)

    @staticmethod
    def output_dtype(dtype: np.dtype) -> np.dtype:
        return np.dtype("float32")


class Count(_Stack):
    """How many layers have data at each pixel (uint16, one band per input band)."""

    identity_for_one = False

    def reduce(self, stack: np.ma.MaskedArray) -> np.ndarray:
        return stack.count(axis=0)

    @staticmethod
    def output_dtype(dtype: np.dtype) -> np.dtype:
        return np.dtype("uint16")


METHODS: dict[str, type[MosaicMethod]] = {
    "first": First,
    "last": Last,
    "highest": Highest,
    "lowest": Lowest,
    "mean": Mean,
    "median": Median,
    "stdev": Stdev,
    "count": Count,
}
