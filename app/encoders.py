"""Encoders: a mosaic (data, validity) to image bytes — PNG, JPEG, WebP, NPY, GeoTIFF.

Post-processing follows TiTiler's render, in its order: `rescale` maps each band's min,max
to 0..255 (uint8), `color_formula` applies rio-color's operations (app.color_formula), a
`colormap_name` colours a single band, and npy returns the data bands followed by the mask band
(0 = no data, 255 = data). These are plain functions so the compute pool can run them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from app import png
from app.color_formula import ColorFormula

# rio_tiler is imported where it is used: importing it costs ~0.7 s (it imports xarray and
# pandas), which the server's start-up would pay before the catalog opens; app.main imports it
# while the catalog and the compute workers start (WARM_MODULES)

FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "jpg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
    "npy": ("NPY", "application/x-binary"),
    "tif": ("GTiff", "image/tiff; application=geotiff"),
    "pngraw": ("PNG", "image/png"),  # TiTiler's: the values only, no mask (alpha) band
}
_EIGHT_BIT_ONLY = ("jpeg", "jpg", "webp")


class EncodeError(ValueError):
    """Data that the requested format cannot carry; the message says how to fix the request."""


MAX_COLORMAP_CHARS = 20_000


def parse_colormap(text: str) -> dict[int, tuple[int, ...]] | tuple:
    """TiTiler's `colormap` JSON: discrete `{"1": "#ff0000", "2": [0, 255, 0, 255]}` or
    intervals `[[[0, 10], "#ff0000"], [[10, 20], [0, 0, 255]]]`, colours as rio-tiler's
    `parse_color` reads them (hex, or 3-4 numbers)."""
    from rio_tiler.colormap import parse_color

    if len(text) > MAX_COLORMAP_CHARS:
        raise EncodeError(f"colormap: longer than {MAX_COLORMAP_CHARS} characters")
    try:
        value = json.loads(text)
        if isinstance(value, dict):
            if not value:
                raise ValueError("no entries")
            return {int(k): tuple(parse_color(v)) for k, v in value.items()}
        if isinstance(value, list) and value:
            out = []
            for (lo, hi), color in value:
                if not float(lo) < float(hi):
                    raise ValueError(f"interval {[lo, hi]} is empty")
                out.append(((float(lo), float(hi)), tuple(parse_color(color))))
            return tuple(out)
        raise ValueError("expected an object or a list of [[min, max], colour]")
    except Exception as exc:  # json's, int()'s and rio-tiler's InvalidColorFormat alike
        raise EncodeError(
            f'colormap: {exc}; e.g. {{"1": "#ff0000", "2": [0, 255, 0]}} or '
            '[[[0, 10], "#ff0000"], [[10, 20], "#0000ff"]]'
        ) from exc


def colormap_names() -> list[str]:
    from rio_tiler.colormap import cmap

    return sorted(cmap.list())


def check_colormap(name: str | None) -> None:
    if name is not None and name not in colormap_names():
        raise EncodeError(f"colormap_name: unknown {name!r}; e.g. viridis, terrain, gray")


def apply_rescale(data: np.ndarray, rescale: Sequence[tuple[float, float]]) -> np.ndarray:
    """Stretch band i from rescale[i] (the last range repeats) to 0..255 uint8."""
    from rio_tiler.utils import linear_rescale

    out = np.empty(data.shape, dtype="uint8")
    for band in range(data.shape[0]):
        lo, hi = rescale[min(band, len(rescale) - 1)]
        stretched = linear_rescale(data[band].astype("float64"), in_range=(lo, hi))
        out[band] = np.clip(stretched, 0, 255).astype("uint8")
    return out


def check_render(
    bands: int,
    dtype: np.dtype | str,
    fmt: str | None,
    *,
    rescale: Sequence[tuple[float, float]] = (),
    colormap_name: str | None = None,
    colormap: Any = None,
    color_formula: ColorFormula | None = None,
) -> None:
    """Refuse, with the fix in the message, what `fmt` cannot carry of `bands` bands of
    `dtype`: decided from the layout alone, so `encode` asks it of each tile and TileJSON and
    WMTS of the catalog's layout (core.engine.Engine.layout) before handing out URLs that
    every tile would refuse. `fmt` None is the tile routes' choice, which is PNG (or JPEG
    for full 8-bit tiles): PNG's rules apply. `colormap` is a parsed custom one."""
    dtype = np.dtype(dtype)
    eight_bit = bool(rescale) or dtype == np.uint8
    if color_formula is not None:
        # rio-color scales by the integer dtype's range (rio-tiler's to_math_type): floats
        # have none, so they are rescaled first, as a TiTiler user does
        if not (eight_bit or dtype.kind in "iu"):
            raise EncodeError(
                f"color_formula: works on integer data and the tile is {dtype}; add rescale=min,max"
            )
        if bands < color_formula.bands:
            raise EncodeError(
                f"color_formula: uses band {color_formula.bands} (saturation: bands 1-3) and "
                f"the tile has {bands}; pick bands with bidx or assets"
            )
        eight_bit = True  # its output is uint8
    fmt = "png" if fmt in (None, "pngraw") else fmt
    if colormap_name and colormap is not None:
        raise EncodeError("colormap, colormap_name: give one")
    if colormap_name or colormap is not None:
        name = "colormap_name" if colormap_name else "colormap"
        if colormap_name:
            check_colormap(colormap_name)
        if bands != 1:
            raise EncodeError(
                f"{name}: a colormap needs one band, the tile has {bands}; pick one with bidx"
            )
        if colormap_name and not eight_bit:
            raise EncodeError("colormap_name: colormaps need 8-bit data; add rescale=min,max")
        if isinstance(colormap, dict) and not (eight_bit or dtype.kind in "iu"):
            raise EncodeError(
                f"colormap: a discrete colormap needs integers and the tile is {dtype}; "
                "add rescale=min,max or give intervals"
            )
    colored = colormap_name is not None or colormap is not None
    if fmt in _EIGHT_BIT_ONLY and not (eight_bit or colored):
        raise EncodeError(
            f"format: {fmt} holds 8-bit data only and the tile is {dtype}; "
            "add rescale=min,max or ask for png, npy or tif"
        )
    if fmt == "png" and not (eight_bit or colored) and dtype != np.uint16:
        raise EncodeError(
            f"format: png holds 8- or 16-bit integers and the tile is {dtype}; "
            "add rescale=min,max or ask for npy or tif"
        )


def default_format(dtype: Any, full: bool, options: dict[str, Any]) -> str:
    """The format when a request names none (TiTiler's choice): JPEG for 8-bit output (uint8
    data, or made 8-bit by `rescale` or `color_formula`) with no pixel masked, else PNG.
    `options`: `encode`'s render keywords (app.params.RenderParams.options())."""
    eight_bit = np.dtype(dtype) == np.uint8 or bool(options.get("rescale"))
    eight_bit = eight_bit or options.get("color_formula") is not None
    return "jpeg" if eight_bit and full else "png"


def plain_png(data: np.ndarray, fmt: str, options: dict[str, Any]) -> bool:
    """Whether `encode` of this is `app.png` alone (a PNG with its mask, no colormap or colour
    formula; a rescale is numpy): numpy and ISA-L, which release the GIL for their work, so
    a thread may run it. A compute-pool job cost ~1 ms of CPU more per tile than the encode
    itself (1024 demo-like 256² tiles: 2.08 vs 1.12 ms CPU per tile); the other renders are
    GDAL's (rio-tiler's `render`) and stay in the pool, where a native crash costs a worker."""
    if fmt != "png" or not options.get("return_mask", True):
        return False
    if options.get("colormap") is not None or options.get("colormap_name"):
        return False
    if options.get("color_formula") is not None:
        return False
    return png.supports(data, np.dtype("uint8") if options.get("rescale") else None)


def encode(
    data: np.ndarray,
    valid: np.ndarray,
    fmt: str,
    *,
    rescale: Sequence[tuple[float, float]] = (),
    colormap_name: str | None = None,
    colormap: Any = None,
    color_formula: ColorFormula | None = None,
    return_mask: bool = True,
    crs: str | None = None,
    transform: tuple[float, ...] | None = None,
) -> bytes:
    """Render one tile. Raises EncodeError when the format cannot hold the data as asked.
    `return_mask=False` (and `pngraw`) leave the mask band out (TiTiler's `return_mask`)."""
    from rio_tiler.colormap import cmap
    from rio_tiler.utils import render

    check_render(
        data.shape[0],
        data.dtype,
        fmt,
        rescale=rescale,
        colormap_name=colormap_name,
        colormap=colormap,
        color_formula=color_formula,
    )
    if rescale:
        data = apply_rescale(data, rescale)
    if color_formula is not None:
        data = color_formula.apply(data)
    if colormap_name:
        colormap = cmap.get(colormap_name)
    if fmt == "pngraw":
        fmt, return_mask = "png", False
    driver, _ = FORMATS[fmt]
    if fmt == "png" and colormap is None and return_mask and png.supports(data):
        return png.encode_png(data, np.where(valid, np.iinfo(data.dtype).max, 0))
    alpha = np.where(valid, 255, 0).astype("uint8")
    if colormap is not None:
        # colours and their alpha applied here, the mask kept: rio-tiler's render tests a
        # float tile's mask against the float range and would make every pixel opaque
        from rio_tiler.colormap import apply_cmap

        table = list(colormap) if isinstance(colormap, tuple) else colormap  # intervals
        data, colour_alpha = apply_cmap(data, table)
        alpha = np.where(valid, colour_alpha, 0).astype("uint8")
    options: dict[str, object] = {}
    if driver == "GTiff" and crs and transform:
        from affine import Affine

        options = {"crs": crs, "transform": Affine(*transform[:6])}
    mask = alpha if return_mask else None
    return render(data, mask=mask, img_format=driver, **options)


# -- POST /chunks stream ("TZCH" frames; parsed by terrazzo.framing in the client) -----------

CHUNKS_MEDIA_TYPE = "application/x-terrazzo-chunks"
_FRAME_PREFIX = struct.Struct("<4sI")


def frame_parts(
    header: dict[str, Any], parts: Sequence[tuple[str, bytes | memoryview]] = ()
) -> list[bytes | memoryview]:
    """b"TZCH" | uint32 LE header length | JSON header | payload (named parts, in order), as
    the pieces to write one after the other: the arrays' memory is sent as it is (joining it
    into one bytes object first was two copies of every chunk's pixels on the event loop)."""
    spans, offset = {}, 0
    for name, blob in parts:
        size = memoryview(blob).nbytes
        spans[name] = [offset, size]
        offset += size
    head = json.dumps({**header, "payload": spans, "payload_bytes": offset}).encode()
    return [_FRAME_PREFIX.pack(b"TZCH", len(head)) + head, *(blob for _, blob in parts)]


def frame(header: dict[str, Any], parts: Sequence[tuple[str, bytes | memoryview]] = ()) -> bytes:
    """`frame_parts` as one bytes object."""
    return b"".join(frame_parts(header, parts))


def chunk_frame_parts(result: Any) -> list[bytes | memoryview]:
    """One chunk result (core.chunks.ChunkResult) as a frame's pieces (`frame_parts`): data
    C-order LE, mask packbits."""
    g = result.grid
    header: dict[str, Any] = {
        "id": result.id,
        "status": result.status,
        "error": result.error,
        "retry": result.retry,  # an error worth asking again for (else the request must change)
        "crs": g.crs,
        "transform": list(g.transform)[:6],
        "width": g.width,
        "height": g.height,
        "items": result.items,
        "item_errors": [{"id": i, "error": e} for i, e in result.item_errors],
        "truncated": result.truncated or None,
        "seconds": round(result.seconds, 4),
    }
    if result.plan is not None:
        header["plan"] = result.plan
    if getattr(result, "statistics", None) is not None:
        header["statistics"] = result.statistics
    parts: list[tuple[str, bytes | memoryview]] = []
    if result.data is not None:
        data = result.data.astype(result.data.dtype.newbyteorder("<"), copy=False)
        header.update(dtype=data.dtype.str, shape=list(data.shape), time=result.time)
        header["time_items"] = result.time_items
        if result.layout:
            header["bands"] = result.layout.get("names")
        parts = [
            ("data", memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))),
            ("mask", np.packbits(result.valid, axis=None).tobytes()),
        ]
    return frame_parts(header, parts)


def chunk_frame(result: Any) -> bytes:
    """`chunk_frame_parts` as one bytes object."""
    return b"".join(chunk_frame_parts(result))
