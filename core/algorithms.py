"""Algorithms after the mosaic, with TiTiler's names and parameters (`algorithm=hillshade`,
`algorithm_params={"azimuth": 315}`): hillshade, slope, contours, terrarium, terrainrgb,
normalizedIndex. Each is a core.process step (declares its output bands and dtype, runs in
the compute pool) run on the mosaicked bands.

A step that looks at neighbouring pixels (hillshade, slope) declares a `buffer`: the engine reads
the grid that many pixels larger on every side and the step crops it back, so each tile is
computed from the same pixels a larger read would give it and tiles meet without seams.
The formulas are TiTiler's (gradient per pixel, not per metre; its default light from above),
so a TiTiler user gets the same picture. Slope is in ground units, so it needs the read's
pixel size, which only the read knows: `for_grid` hands it over (the engine calls it on each
read's own grid, buffer included).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from core.process import ProcessError

if TYPE_CHECKING:
    from core.plan import Grid

MAX_PARAMS_CHARS = 1000


def _one_band(name: str, names: list[str]) -> None:
    if len(names) != 1:
        raise ProcessError(
            f"algorithm: {name} takes one band and the read has {len(names)}; "
            "pick it with bidx or assets"
        )


@dataclass(frozen=True)
class Hillshade:
    azimuth: float = 90
    angle_altitude: float = 90.0
    buffer: int = 3
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "azimuth": (0, 360),
        "angle_altitude": (-90, 90),
        "buffer": (0, 99),
    }

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        _one_band("hillshade", names)
        return ["hillshade"], np.dtype("uint8")

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.gradient(data[0].astype("float64"))
        slope = math.pi / 2.0 - np.arctan(np.sqrt(x * x + y * y))
        aspect = np.arctan2(-x, y)
        azimuth, altitude = math.radians(self.azimuth), math.radians(self.angle_altitude)
        shaded = np.sin(altitude) * np.sin(slope) + np.cos(altitude) * np.cos(slope) * np.cos(
            azimuth - aspect
        )
        out = (255 * (shaded + 1) / 2).astype("uint8")[None]
        return crop_border(out, valid, self.buffer)


@dataclass(frozen=True)
class Slope:
    """TiTiler's `slope`: the steepest descent in degrees (0 flat, towards 90), from numpy's
    central-difference gradient divided by the pixel size (in the grid's CRS units, as
    TiTiler divides by its tile transform's). `pixel_size` is not a request parameter: the
    read's grid sets it (`for_grid`)."""

    buffer: int = 3
    z_exaggeration: float = 1.0
    pixel_size: tuple[float, float] | None = None  # (x, y) of the grid read, set by for_grid
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "buffer": (0, 99),
        "z_exaggeration": (1e-6, 1e6),
    }

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        _one_band("slope", names)
        return ["slope"], np.dtype("float32")

    def on_grid(self, grid: Grid) -> Slope:
        return dataclasses.replace(self, pixel_size=(abs(grid.transform.a), abs(grid.transform.e)))

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.pixel_size is None:  # a caller that forgot for_grid: never a silent 1 m pixel
            raise ProcessError("slope: no pixel size; run it through core.algorithms.for_grid")
        size_x, size_y = self.pixel_size
        # rows run along y, columns along x (TiTiler divides the row gradient by the x size:
        # the same for the square pixels of its tiles)
        along_y, along_x = np.gradient(data[0].astype("float64"))
        dx = along_x * self.z_exaggeration / size_x
        dy = along_y * self.z_exaggeration / size_y
        out = np.degrees(np.arctan(np.sqrt(dx * dx + dy * dy))).astype("float32")[None]
        return crop_border(out, valid, self.buffer)


@dataclass(frozen=True)
class Contours:
    increment: float = 35
    thickness: float = 1
    minz: float = -12000
    maxz: float = 8000
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "increment": (1e-9, 99999),
        "thickness": (0, 10),
        "minz": (-99999, 99999),
        "maxz": (-99999, 99999),
    }

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        _one_band("contours", names)
        if not self.minz < self.maxz:
            raise ProcessError("algorithm_params: contours needs minz < maxz")
        return ["red", "green", "blue"], np.dtype("uint8")

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from rio_tiler.colormap import apply_cmap, cmap
        from rio_tiler.utils import linear_rescale

        values = data.astype("float64")
        scaled = linear_rescale(values, (self.minz, self.maxz), (1, 255))
        rgb, _ = apply_cmap(np.clip(scaled, 0, 255).astype("uint8"), cmap.get("terrain"))
        rgb = rgb[:3]
        out = np.where(values % self.increment < self.thickness, 0, rgb).astype("uint8")
        return out, valid


@dataclass(frozen=True)
class Terrarium:
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {}

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        _one_band("terrarium", names)
        return ["red", "green", "blue"], np.dtype("uint8")

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        height = np.clip(data[0].astype("float64") + 32768.0, 0.0, 65535.0)
        rgb = np.stack([height / 256, height % 256, (height * 256) % 256])
        return rgb.astype("uint8"), valid


@dataclass(frozen=True)
class TerrainRGB:
    interval: float = 0.1
    baseval: float = -10000.0
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "interval": (1e-9, 1.0),
        "baseval": (-99999, 99999),
    }

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        _one_band("terrainrgb", names)
        return ["red", "green", "blue"], np.dtype("uint8")

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mapbox Terrain-RGB: (height - baseval) / interval as a 24-bit integer, R G B."""
        code = np.around((data[0].astype("float64") - self.baseval) / self.interval)
        code = np.clip(code, 0, 256**3 - 1).astype("int64")
        rgb = np.stack([(code >> 16) & 255, (code >> 8) & 255, code & 255])
        return rgb.astype("uint8"), valid


@dataclass(frozen=True)
class NormalizedIndex:
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {}

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        if len(names) != 2:
            raise ProcessError(
                f"algorithm: normalizedIndex takes two bands and the read has {len(names)}; "
                "pick them with bidx or assets"
            )
        first, second = names
        return [f"({second} - {first}) / ({second} + {first})"], np.dtype("float32")

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        first, second = data[0].astype("float32"), data[1].astype("float32")
        with np.errstate(all="ignore"):
            return ((second - first) / (second + first))[None], valid


ALGORITHMS: dict[str, type] = {
    "hillshade": Hillshade,
    "slope": Slope,
    "contours": Contours,
    "terrarium": Terrarium,
    "terrainrgb": TerrainRGB,
    "normalizedIndex": NormalizedIndex,
}


def crop_border(data: np.ndarray, valid: np.ndarray, buffer: int) -> tuple[np.ndarray, np.ndarray]:
    """A read of `Grid.buffered(buffer)` back to the grid: `buffer` pixels off every side of
    (bands, h, w) data and its (h, w) validity (views). The algorithms' buffer and the tile
    routes' padding both crop so."""
    if not buffer:
        return data, valid
    return data[:, buffer:-buffer, buffer:-buffer], valid[buffer:-buffer, buffer:-buffer]


def for_grid(step: Any, grid: Grid) -> Any:
    """`step` as it runs on `grid`, the grid actually read (buffer included): a step in ground
    units (slope) takes its pixel size; the others run as they are."""
    on_grid = getattr(step, "on_grid", None)
    return on_grid(grid) if on_grid is not None else step


def make(name: str, params: str | dict[str, Any] | None = None) -> Any:
    """The algorithm `name` with `params` (a JSON object, as TiTiler's `algorithm_params`),
    each checked against its type and range (ProcessError names the fix)."""
    kind = ALGORITHMS.get(name)
    if kind is None:
        raise ProcessError(f"algorithm: unknown {name!r}; choose one of {sorted(ALGORITHMS)}")
    if isinstance(params, str):
        if len(params) > MAX_PARAMS_CHARS:
            raise ProcessError(f"algorithm_params: longer than {MAX_PARAMS_CHARS} characters")
        try:
            params = json.loads(params) if params.strip() else {}
        except ValueError as exc:
            raise ProcessError(f"algorithm_params: not JSON ({exc})") from exc
    params = params or {}
    if not isinstance(params, dict):
        raise ProcessError('algorithm_params: expected a JSON object, e.g. {"azimuth": 315}')
    fields = kind.LIMITS  # the request's parameters (not what a read sets, e.g. pixel_size)
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise ProcessError(
            f"algorithm_params: {name} has no {unknown}; it takes {sorted(fields) or 'none'}"
        )
    values: dict[str, Any] = {}
    for key, value in params.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ProcessError(f"algorithm_params: {key} must be a number, got {value!r}")
        lo, hi = kind.LIMITS[key]
        if not lo <= value <= hi:
            raise ProcessError(f"algorithm_params: {key} must be within {lo}..{hi}, got {value}")
        if key == "buffer" and value != int(value):
            raise ProcessError(f"algorithm_params: buffer is a whole number of pixels, got {value}")
        values[key] = int(value) if key == "buffer" else value
    return kind(**values)
