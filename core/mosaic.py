"""Pixel-selection (mosaic) methods: combine warped layers, in mosaic order, into one.

Each method is a small stateful class fed one layer at a time, as in rio-tiler: one instance
per request, never shared. They run inside the compute pool (see core.compute).
"""

from __future__ import annotations

import numpy as np


class MosaicMethod:
    """Base: feed (bands, h, w) data with an (h, w) validity mask, then take the result."""

    #: True when a single layer is already the answer (no pool round trip needed).
    identity_for_one = True

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
        self.data[:, ~self.valid] = 0  # no stale values under the mask
        return self.data, self.valid

    def _start(self, data: np.ndarray, valid: np.ndarray) -> bool:
        if self.data is None:
            self.data, self.valid = data.copy(), valid.copy()
            return True
        return False


class First(MosaicMethod):
    """Each pixel from the first layer that has data there (newest on top by default)."""

    def feed(self, data: np.ndarray, valid: np.ndarray) -> None:
        if self._start(data, valid):
            return
        take = valid & ~self.valid
        self.data[:, take] = data[:, take]
        self.valid |= valid


class Last(MosaicMethod):
    """Each pixel from the last layer that has data there."""

    def feed(self, data: np.ndarray, valid: np.ndarray) -> None:
        if self._start(data, valid):
            return
        self.data[:, valid] = data[:, valid]
        self.valid |= valid


class Highest(MosaicMethod):
    """Per band, the highest value among the layers with data."""

    pick = staticmethod(np.maximum)

    def feed(self, data: np.ndarray, valid: np.ndarray) -> None:
        if self._start(data, valid):
            return
        both = valid & self.valid
        only_new = valid & ~self.valid
        self.data[:, both] = self.pick(self.data[:, both], data[:, both])
        self.data[:, only_new] = data[:, only_new]
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
