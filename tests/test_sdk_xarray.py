"""xarray's own entry points over a real server: `xr.open_dataset(url, engine="terrazzo")`,
lazy windows that read only themselves, and `load_async` through the backend's
`async_getitem` (xarray's async load)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import xarray as xr
from terrazzo import Client

from tests.conftest import Server, utm_area

READ = {"crs": "EPSG:32632", "resolution": 30}
TWO_DATES = {"lon": 9.35, "lat": 45.05}


def test_open_dataset_is_lazy_and_equals_the_read(server: Server) -> None:
    bbox = utm_area(256, 30, **TWO_DATES)
    ds = xr.open_dataset(server.url, engine="terrazzo", bbox=bbox, bands=["visual"], **READ)
    assert set(ds.data_vars) == {"visual.1", "visual.2", "visual.3"}
    assert ds["visual.1"].dims == ("time", "y", "x") and ds.sizes["time"] == 2
    assert ds["visual.1"].variable._in_memory is False  # nothing read yet
    with Client(server.url) as client:
        eager = client.read(bbox, assets=["visual"], progress=False, **READ)
    np.testing.assert_array_equal(
        ds.to_dataarray("band").transpose(*eager.dims).values, eager.values
    )
    # a window reads only itself, and equals the same cut of the whole read
    window = ds["visual.2"].isel(time=1, y=slice(10, 74), x=slice(100, 228)).values
    np.testing.assert_array_equal(window, eager.values[1, 1, 10:74, 100:228])
    np.testing.assert_array_equal(ds.x.values, eager.x.values)


def test_one_band_by_name_and_drop_variables(server: Server) -> None:
    bbox = utm_area(64, 30, lon=7.0)
    ds = xr.open_dataset(server.url, engine="terrazzo", bbox=bbox, bands=["visual.3"], **READ)
    dropped = xr.open_dataset(
        server.url,
        engine="terrazzo",
        bbox=bbox,
        bands=["visual"],
        drop_variables=["visual.1"],
        **READ,
    )
    with Client(server.url) as client:
        eager = client.read(bbox, assets=["visual"], progress=False, **READ)
    assert list(ds.data_vars) == ["visual.3"]
    np.testing.assert_array_equal(ds["visual.3"].values, eager.values[:, 2])
    assert set(dropped.data_vars) == {"visual.2", "visual.3"}


async def test_load_async_reaches_the_backend(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a running loop (a notebook): two datasets load concurrently through
    async_getitem (the blocking path is barred), with the same values as the blocking load."""
    from terrazzo.xarray_backend import TerrazzoArray

    blocking_read = TerrazzoArray._read

    def barred(self: TerrazzoArray, key: tuple) -> np.ndarray:
        raise AssertionError("load_async took the blocking path")

    monkeypatch.setattr(TerrazzoArray, "_read", barred)
    boxes = [utm_area(128, 30, lon=lon) for lon in (7.0, 7.5)]
    opened = [
        xr.open_dataset(server.url, engine="terrazzo", bbox=b, bands=["visual.1"], **READ)
        for b in boxes
    ]
    loaded = await asyncio.gather(*(ds.load_async() for ds in opened))
    monkeypatch.setattr(TerrazzoArray, "_read", blocking_read)
    for ds, bbox in zip(loaded, boxes, strict=True):
        assert ds["visual.1"].variable._in_memory
        blocking = xr.open_dataset(
            server.url, engine="terrazzo", bbox=bbox, bands=["visual.1"], **READ
        ).load()
        np.testing.assert_array_equal(ds["visual.1"].values, blocking["visual.1"].values)
