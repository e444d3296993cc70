"""`xr.open_dataset(url, engine="terrazzo", bbox=..., crs=..., resolution=..., bands=...)`.

Why a backend and not only `Client.open`: xarray's own lazy indexing then decides what is
read — `ds.isel(x=slice(0, 256)).load()` asks the server for that window only — and
`await ds.load_async()` reaches `async_getitem` (xarray's async load, ../shared/seeds'
xarray PR), so a notebook loads many datasets concurrently on its running loop. Each band is
one variable (time, y, x); the grid, time labels, band names and dtype come from the same
dry run `Client.open` makes (all of its checks: NoItemsFound, unit mistakes, errors=).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from xarray import Dataset, Variable
from xarray.backends import BackendArray, BackendEntrypoint
from xarray.core import indexing

from terrazzo.grid import Grid

CLIENT_OPTIONS = ("concurrency", "retries", "timeout", "headers", "chunks_per_request")


class TerrazzoArray(BackendArray):
    """One band of a read, (time, y, x); a window is one read of that band when indexed."""

    def __init__(
        self,
        url: str,
        options: dict[str, Any],
        grid: Grid,
        times: np.ndarray,
        dtype: np.dtype,
        fill: Any,
        read: dict[str, Any],
    ) -> None:
        self.url, self.options, self.grid, self.times = url, options, grid, times
        self.shape = (len(times), grid.height, grid.width)
        self.dtype = dtype
        self.fill = fill
        self.read = read  # read() keywords for this band: assets, bidx=[n], groupby, filters...

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    async def async_getitem(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return await indexing.async_explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read_async
        )

    def _window(self, key: tuple) -> tuple[dict[str, Any], tuple, tuple]:
        """The read of `key`'s rows and columns (whole pixels, step 1) and how to cut it."""
        spans = [k if isinstance(k, slice) else slice(k, k + 1) for k in key]
        (t0, t1, ts), (y0, y1, ys), (x0, x1, xs) = (
            s.indices(n) for s, n in zip(spans, self.shape, strict=True)
        )
        g = self.grid
        sub = Grid(g.crs, g.minx + x0 * g.rx, g.maxy - y0 * g.ry, g.rx, g.ry, x1 - x0, y1 - y0)
        area = {"bbox": sub.bounds, "crs": g.crs, "shape": (max(1, y1 - y0), max(1, x1 - x0))}
        cut = (slice(t0, t1, ts), slice(None, None, ys), slice(None, None, xs))
        squeeze = tuple(i for i, k in enumerate(key) if not isinstance(k, slice))
        return area, cut, squeeze

    def _place(self, read: Any, cut: tuple, squeeze: tuple) -> np.ndarray:
        """The read's layers at their place among all the dataset's times (fill elsewhere)."""
        h, w = read.sizes["y"], read.sizes["x"]
        out = np.full((len(self.times), h, w), self.fill, dtype=self.dtype)
        index = {t: i for i, t in enumerate(self.times.astype("datetime64[ns]").tolist())}
        for t, when in enumerate(read.time.values.astype("datetime64[ns]").tolist()):
            if when in index:
                out[index[when]] = read.values[t, 0]
        out = out[cut]
        return out.squeeze(axis=squeeze) if squeeze else out

    def _read(self, key: tuple) -> np.ndarray:
        from terrazzo.client import Client

        area, cut, squeeze = self._window(key)
        empty = self._empty(key)
        if empty is not None:
            return empty
        with Client(self.url, **self.options) as client:
            read = client.read(**area, **self.read)
        return self._place(read, cut, squeeze)

    async def _read_async(self, key: tuple) -> np.ndarray:
        from terrazzo.client import AsyncClient

        area, cut, squeeze = self._window(key)
        empty = self._empty(key)
        if empty is not None:
            return empty
        async with AsyncClient(self.url, **self.options) as client:
            read = await client.read(**area, **self.read)
        return self._place(read, cut, squeeze)

    def _empty(self, key: tuple) -> np.ndarray | None:
        """The result of a key that selects nothing (no request), else None."""
        sizes = [
            len(range(*(k if isinstance(k, slice) else slice(k, k + 1)).indices(n)))
            for k, n in zip(key, self.shape, strict=True)
        ]
        if all(sizes):
            return None
        kept = [n for k, n in zip(key, sizes, strict=True) if isinstance(k, slice)]
        return np.empty(kept, dtype=self.dtype)


class TerrazzoBackend(BackendEntrypoint):
    """xarray's `engine="terrazzo"`: a Terrazzo server URL and a read's keywords."""

    description = "Lazy reads from a Terrazzo server (STAC-GeoParquet mosaics over POST /chunks)"
    url = "https://github.com/terrazzo/terrazzo"
    open_dataset_parameters = ("filename_or_obj", "drop_variables")

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        client: dict[str, Any] | None = None,
        **read: Any,
    ) -> Dataset:
        """`read`: what `Client.read` takes (bbox/geopolygon/like, crs, resolution/shape,
        bands or assets, datetime, filter, groupby, errors...); `client`: Client options."""
        from terrazzo.client import AREA, Client

        url = str(filename_or_obj).removeprefix("terrazzo+")
        options = {k: v for k, v in (client or {}).items() if k in CLIENT_OPTIONS}
        read = {**read, "progress": False}
        with Client(url, **options) as c:
            lazy = c.open(**read)  # the dry run: grid, times, bands, dtype; checks
        grid = Grid.like(lazy)
        bidx = lazy.attrs.get("bidx")  # as normalised: bands=["visual.2"] is bidx [2]
        # each band's window reads give their own area and bands (AREA: the client's grid keys)
        skip = {*AREA, "chunks", "chunk_size", "bands"}
        plain = {k: v for k, v in read.items() if k not in skip}
        assets = list(lazy.attrs.get("assets") or [])
        drop = {drop_variables} if isinstance(drop_variables, str) else set(drop_variables or ())
        variables: dict[str, Variable] = {}
        for i, name in enumerate(str(b) for b in lazy.band.values):
            if name in drop:
                continue
            band_read = {**plain, "assets": assets or plain.get("assets"), "allow_empty": True}
            band_read["bidx"] = [bidx[i] if bidx else i + 1]
            band_read["group_by"] = lazy.attrs.get("group_by")
            band_read.pop("groupby", None)
            array = TerrazzoArray(
                url,
                options,
                grid,
                lazy.time.values,
                lazy.dtype,
                lazy.attrs["_FillValue"],
                band_read,
            )
            data = indexing.LazilyIndexedArray(array)
            variables[name] = Variable(
                ("time", "y", "x"), data, attrs={"grid_mapping": "spatial_ref"}
            )
        coords = {k: lazy.coords[k].variable for k in ("time", "y", "x", "id", "spatial_ref")}
        attrs = {k: v for k, v in lazy.attrs.items() if k not in ("_FillValue", "bidx")}
        attrs = {k: v for k, v in attrs.items() if v is not None}  # netCDF-writable
        return Dataset(variables, coords=coords, attrs=attrs)

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return isinstance(filename_or_obj, str) and filename_or_obj.startswith("terrazzo+http")
