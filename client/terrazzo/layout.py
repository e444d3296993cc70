"""From an area to chunk requests, and from chunk results back to one xarray.DataArray.

The DataArray is (time, band, y, x) with x/y pixel-centre coordinates, a `time` coordinate
(one layer per group_by label; a single NaT layer without group_by), and the CRS recorded the
way rioxarray reads it (a `spatial_ref` coordinate with `crs_wkt`/`spatial_ref` attributes and
a GDAL GeoTransform). Masked pixels are NaN for float data, else `fill_value` (default 0).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from terrazzo.errors import ChunkError, ItemError, ItemErrorWarning, NoItemsFound, ReadTooLarge
from terrazzo.framing import Chunk
from terrazzo.grid import Grid

ERRORS = ("raise", "warn", "ignore")  # odc-stac's fail_on_error=True/False, and a quiet False

SEARCH_AND_READ = (
    "collections",
    "datetime",
    "ids",
    "filter",
    "sortby",
    "assets",
    "bidx",
    "expression",
    "algorithm",
    "algorithm_params",
    "method",
    "resampling",
    "dtype",
    "nodata",
    "group_by",
)


def chunk_specs(grid: Grid, size: int | tuple[int, int]) -> list[dict[str, Any]]:
    """Chunks of `size` pixels ((y, x), or one number for both; smaller at the right and
    bottom edges), row-major; each bbox is exact multiples of the grid's pixel size."""
    sy, sx = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if sy < 1 or sx < 1:
        raise ValueError(f"chunk_size: at least one pixel, got {size!r}")
    rx, ry = grid.res
    specs = []
    for r0 in range(0, grid.height, sy):
        for c0 in range(0, grid.width, sx):
            w, h = min(sx, grid.width - c0), min(sy, grid.height - r0)
            specs.append(
                {
                    "id": f"{r0}-{c0}",
                    "bbox": [
                        grid.minx + c0 * rx,
                        grid.maxy - (r0 + h) * ry,
                        grid.minx + (c0 + w) * rx,
                        grid.maxy - r0 * ry,
                    ],
                    "width": w,
                    "height": h,
                    "_offset": (r0, c0),
                }
            )
    return specs


def normalise_params(params: dict[str, Any]) -> dict[str, Any]:
    """odc-stac's spellings as the server's: `groupby` for `group_by` (default "time": one
    layer per datetime; None: one mosaic layer), `bands` (asset names, or "asset.N" bands of
    one asset) for assets/bidx."""
    out = dict(params)
    if "groupby" in out:
        if "group_by" in out:
            raise TypeError("give groupby or group_by, not both")
        out["group_by"] = out.pop("groupby")
    out.setdefault("group_by", "time")
    bands = out.pop("bands", None)
    if bands is not None:
        if out.get("assets") or out.get("bidx"):
            raise TypeError("give bands, or assets/bidx, not both")
        out.update(_bands(bands))
    return out


def _bands(bands: str | Sequence[str]) -> dict[str, Any]:
    names = [bands] if isinstance(bands, str) else list(bands)
    assets = list(dict.fromkeys(n.rsplit(".", 1)[0] if _numbered(n) else n for n in names))
    numbered = [n for n in names if _numbered(n)]
    if not numbered:
        return {"assets": assets}
    if len(assets) > 1 or len(numbered) != len(names):
        raise ValueError(
            f"bands: {names}: 'asset.N' bands can be taken from one asset at a time (or pass "
            "assets= and bidx=, which count the bands of all assets in order)"
        )
    return {"assets": assets, "bidx": [int(n.rsplit(".", 1)[1]) for n in numbered]}


def _numbered(name: str) -> bool:
    head, _, tail = name.rpartition(".")
    return bool(head) and tail.isdigit()


def request_body(crs: str, params: dict[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(SEARCH_AND_READ) - {"fill_value"}
    if unknown:
        raise TypeError(f"unknown read parameters {sorted(unknown)}; known: {SEARCH_AND_READ}")
    body: dict[str, Any] = {"crs": crs}
    for key in SEARCH_AND_READ:
        value = params.get(key)
        if value is None:
            continue
        if key in ("assets", "collections", "ids", "bidx") and isinstance(value, str | int):
            value = [value]
        body[key] = value
    return body


def prepare(
    area: dict[str, Any],
    chunk_size: int | tuple[int, int],
    params: dict[str, Any],
    chunks: Mapping[str, int] | None = None,
) -> tuple[Grid, list[dict[str, Any]], dict[str, Any]]:
    """The output grid (`area`: Grid.make's arguments), its chunk specs and the shared
    request body of a read (`params` normalised in place). `chunks` ({"x": .., "y": ..},
    xarray's spelling) overrides `chunk_size` along the dimensions it names."""
    if chunks:
        unknown = set(chunks) - {"x", "y", "time"}
        if unknown:
            raise ValueError(f"chunks: dimensions {sorted(unknown)}; known: x, y, time")
        sy, sx = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
        chunk_size = (int(chunks.get("y", sy)), int(chunks.get("x", sx)))
    grid = Grid.make(**area)
    normalised = normalise_params(params)
    params.clear()
    params.update(normalised)
    return grid, chunk_specs(grid, chunk_size), request_body(grid.crs, params)


def wire(specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The specs as sent (without client-side fields)."""
    return [{k: v for k, v in s.items() if not k.startswith("_")} for s in specs]


def check_errors_option(errors: str) -> None:
    if errors not in ERRORS:
        raise ValueError(f"errors: {errors!r}; one of {ERRORS}")


def item_errors(chunks: Mapping[str, Chunk]) -> list[dict[str, str]]:
    """Every item the server could not read, with the chunk it was read for."""
    return [
        {"chunk": str(c.id), "item": str(e.get("id")), "error": str(e.get("error"))}
        for c in chunks.values()
        for e in c.header.get("item_errors") or []
    ]


def check_errors(chunks: Mapping[str, Chunk], errors: str, result: Any = None) -> None:
    """Apply `errors=` to a read's chunks: a chunk the server failed (ChunkError) or items it
    could not read (ItemError, carrying `result`: the read with their holes) raise, warn or
    pass. A chunk whose every item failed is reported as those items, naming them."""
    failed = {
        str(c.id): c.error or "error"
        for c in chunks.values()
        if c.status == "error" and not c.header.get("item_errors")
    }
    items = item_errors(chunks)
    if errors == "ignore" or not (failed or items):
        return
    if errors == "raise":
        if failed:
            first = next(iter(failed))
            raise ChunkError(first, failed[first], failed, dict(chunks))
        raise ItemError(items, result)
    names = sorted({e["item"] for e in items})
    parts = [f"{len(failed)} chunks failed ({next(iter(failed.values()))})"] if failed else []
    if items:
        first = items[0]
        parts.append(
            f"{len(names)} items could not be read, e.g. {first['item']}: {first['error']}"
        )
    warnings.warn("; ".join(parts) + ": their pixels are missing", ItemErrorWarning, stacklevel=3)


def available_memory() -> int | None:
    """Bytes of memory available now (Linux: MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_size(
    grid: Grid,
    params: Mapping[str, Any],
    max_bytes: int | None,
    *,
    bands: int = 0,
    itemsize: int = 0,
    times: int = 1,
) -> None:
    """Refuse an eager read larger than `max_bytes` (default: half the memory available)
    before any request: its pixels times what is known of bands and dtype (at least one
    band of one byte), so a 40-gigapixel `read` fails at once and says what to do instead."""
    limit = max_bytes
    if limit is None:
        free = available_memory()
        limit = free // 2 if free else None
    if limit is None:
        return
    if not bands and params.get("expression"):  # one float32 band per ;-separated block
        bands = len([b for b in str(params["expression"]).split(";") if b.strip()])
        itemsize = itemsize or 4
    if not bands:
        bidx, assets = params.get("bidx"), params.get("assets")
        bands = len(bidx) if isinstance(bidx, list | tuple) else 1 if bidx else 0
        bands = bands or (len(assets) if isinstance(assets, list | tuple) else 1)
    if not itemsize:
        itemsize = np.dtype(params["dtype"]).itemsize if params.get("dtype") else 1
    size = grid.width * grid.height * max(1, bands) * itemsize * max(1, times)
    if size > limit:
        raise ReadTooLarge(
            f"this read would hold at least {size / 2**30:.1f} GiB ({grid.height} x "
            f"{grid.width} pixels x {bands} bands x {itemsize} bytes x {times} times), over "
            f"max_bytes={limit} ({'half the memory available' if max_bytes is None else 'yours'})"
            ": use client.open(...) for a lazy Dask array, a coarser resolution or a smaller "
            "area, or pass max_bytes="
        )


def check_found(chunks: Sequence[Mapping[str, Any]], body: Mapping[str, Any]) -> None:
    """Raise NoItemsFound when no chunk matched any item (chunks: frame headers or plans)."""
    if chunks and not any(c.get("items") for c in chunks):
        asked = {k: body[k] for k in ("datetime", "collections", "ids", "filter") if k in body}
        raise NoItemsFound(
            f"no STAC items matched this read (crs {body.get('crs')}"
            + "".join(f", {k}={v!r}" for k, v in asked.items())
            + "): check the area, its CRS and the time range against the catalog "
            "(client.info() has its extent); allow_empty=True returns an empty array"
        )


def _time_coord(labels: Sequence[str | None]) -> np.ndarray:
    values = []
    for label in labels:
        if label is None:
            values.append(np.datetime64("NaT", "ns"))
            continue
        text = label.split("/")[0].replace("Z", "").split("+")[0]
        try:
            values.append(np.datetime64(text, "ns"))
        except ValueError:
            return np.asarray(labels, dtype=object)
    return np.asarray(values, dtype="datetime64[ns]")


def _fill_value(dtype: np.dtype, params: dict[str, Any]) -> Any:
    """Where there is no data: `fill_value`, else NaN for floats; never NaN for integers."""
    fill = params.get("fill_value")
    if fill is None:
        fill = np.nan
    if isinstance(fill, float) and math.isnan(fill) and np.dtype(dtype).kind not in "fc":
        return 0
    return fill


def _time_labels(labels: Any) -> list[str | None]:
    """Distinct time labels, None (no group_by) first; [None] when there are none."""
    return sorted(set(labels), key=lambda v: (v is not None, v or "")) or [None]


def describe(headers: Sequence[Mapping[str, Any]]) -> tuple[list[str] | None, dict[Any, str]]:
    """Band names and each time label's item ids, from chunk frame headers or dry-run plans."""
    names = None
    ids: dict[Any, set[str]] = {}
    for h in headers:
        names = names or h.get("bands") or (h.get("layout") or {}).get("names")
        for label, items in zip(h.get("time") or [], h.get("time_items") or [], strict=False):
            ids.setdefault(label, set()).update(items)
    return names, {label: ",".join(sorted(v)) for label, v in ids.items()}


def to_dataarray(
    grid: Grid,
    data: Any,
    labels: Sequence[str | None],
    params: dict[str, Any],
    names: Sequence[str] | None = None,
    ids: Mapping[Any, str] | None = None,
):
    """Wrap a (time, band, y, x) array (numpy or dask) with coordinates and the CRS: `band`
    holds the band names ("visual.1", or the asset's name for a one-band asset; so
    `.to_dataset(dim="band")` gives one variable per band) and `id` along time the items of
    each layer, as stackstac gives them."""
    import xarray as xr

    rx, ry = grid.res
    x = grid.minx + (np.arange(grid.width) + 0.5) * rx
    y = grid.maxy - (np.arange(grid.height) + 0.5) * ry
    geotransform = f"{grid.minx} {rx} 0 {grid.maxy} 0 {-ry}"
    spatial_ref = xr.Variable(
        (),
        0,
        attrs={
            "crs_wkt": grid.crs,
            "spatial_ref": grid.crs,
            "GeoTransform": geotransform,
        },
    )
    return xr.DataArray(
        data,
        dims=("time", "band", "y", "x"),
        coords={
            "time": _time_coord(labels),
            "band": list(names)
            if names and len(names) == data.shape[1]
            else np.arange(1, data.shape[1] + 1),
            "id": ("time", [(ids or {}).get(label, "") for label in labels]),
            "y": y,
            "x": x,
            "spatial_ref": spatial_ref,
        },
        attrs={
            "crs": grid.crs,
            "grid_mapping": "spatial_ref",
            "assets": list(params.get("assets") or []),
            **({"bidx": list(params["bidx"])} if params.get("bidx") else {}),
            **({"expression": params["expression"]} if params.get("expression") else {}),
            **({"group_by": params["group_by"]} if params.get("group_by") else {}),
            "_FillValue": _fill_value(data.dtype, params),
        },
        name="terrazzo",
    )


def place(out: np.ndarray, labels: Sequence[str | None], chunk: Chunk, r0: int, c0: int) -> None:
    """Copy a chunk's valid pixels into `out` (which holds the fill value already: masked
    pixels keep it) at the rows of its time labels: one pass, no temporary layer."""
    if chunk.data is None or chunk.mask is None:
        return
    index = {label: i for i, label in enumerate(labels)}
    _, _, h, w = chunk.data.shape
    for t, label in enumerate(chunk.header.get("time") or [None]):
        window = out[index[label], :, r0 : r0 + h, c0 : c0 + w]
        np.copyto(window, chunk.data[t], casting="unsafe", where=chunk.mask[t])


def assemble(
    grid: Grid,
    specs: Sequence[dict[str, Any]],
    chunks: dict[str, Chunk],
    params: dict[str, Any],
    hint: Mapping[str, Any] | None = None,
):
    """The eager DataArray from every chunk of the read (`hint`: the layout an empty read
    takes its bands and dtype from, see AsyncClient.probe_layout)."""
    with_data = [c for c in chunks.values() if c.data is not None]
    labels = _time_labels(label for c in with_data for label in (c.header.get("time") or [None]))
    if not any(c.header.get("items") for c in chunks.values()):
        labels = []  # nothing matched (allow_empty): no time layer, not one of fill
    if with_data:
        dtype = np.result_type(*(c.data.dtype for c in with_data))
        bands = with_data[0].data.shape[1]
    elif hint:
        dtype, bands = np.dtype(params.get("dtype") or hint["dtype"]), int(hint["bands"])
    else:
        dtype, bands = np.dtype(params.get("dtype") or "float32"), 1
    fill = _fill_value(dtype, params)
    out = np.full((len(labels), bands, grid.height, grid.width), fill, dtype=dtype)
    for spec in specs:
        chunk = chunks.get(spec["id"])
        if chunk is not None:
            place(out, labels, chunk, *spec["_offset"])
    names, ids = describe(
        [c.header for c in chunks.values()] + ([{"layout": hint}] if hint else [])
    )
    return to_dataarray(grid, out, labels, params, names, ids)


def lazy(
    config: Any,
    grid: Grid,
    specs: Sequence[dict[str, Any]],
    body: dict[str, Any],
    plans: Sequence[dict[str, Any]],
    params: dict[str, Any],
    errors: str = "raise",
):
    """A Dask-backed DataArray; each block is one chunk request made when computed."""
    import dask
    import dask.array as da

    layouts = [p["layout"] for p in plans if p.get("layout")]
    labels = _time_labels(label for p in plans for label in (p.get("time") or []))
    if not any(p.get("items") for p in plans):
        labels = []  # nothing matched (allow_empty): no time layer
    dtype = np.dtype(layouts[0]["dtype"]) if layouts else np.dtype(params.get("dtype") or "uint8")
    bands = layouts[0]["bands"] if layouts else 1
    fill = _fill_value(dtype, params)
    rows: dict[int, list] = {}
    for spec in specs:
        r0, _ = spec["_offset"]
        block = dask.delayed(fetch_block, pure=True)(
            config, wire([spec])[0], body, labels, bands, dtype.str, fill, errors
        )
        shape = (len(labels), bands, spec["height"], spec["width"])
        rows.setdefault(r0, []).append(da.from_delayed(block, shape=shape, dtype=dtype))
    array = da.block([[[rows[r] for r in sorted(rows)]]])
    names, ids = describe(plans)
    return to_dataarray(grid, array, labels, params, names, ids)


_CLIENTS: dict[Any, Any] = {}


def fetch_block(
    config: Any,
    spec: dict[str, Any],
    body: dict[str, Any],
    labels: list[str | None],
    bands: int,
    dtype: str,
    fill: Any,
    errors: str = "raise",
) -> np.ndarray:
    """One Dask block: read one chunk with a per-process client (pooled connections), one
    per whole configuration (headers included: another config's API key is never reused)."""
    from terrazzo.client import Client

    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = Client(**dataclasses.asdict(config))
    chunks = client.fetch_chunks([spec], body, progress=False)
    out = np.full((len(labels), bands, spec["height"], spec["width"]), fill, dtype=dtype)
    chunk = chunks.get(spec["id"])
    if chunk is not None:
        place(out, labels, chunk, 0, 0)
    check_errors(chunks, errors, out)
    return out
