"""The client never hands back silent holes: item errors, per-chunk server errors and empty
searches, against real servers (a truncated COG written by GDAL, cut at test time).

What a data scientist meets: odc-stac's `fail_on_error` raises naming the item; so does
`errors="raise"` (the default), and "warn"/"ignore" return the read with its holes.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from terrazzo import ChunkError, Client, ItemError, ItemErrorWarning, NoItemsFound, ServerError

from tests.conftest import Server, assert_clear_error, utm_area

BROKEN = "demo-32632-2024-06-01-04"  # the newest item at (6.45, 45.0); its COG is cut short


def area(size: int, res: float, lon: float = 6.45, lat: float = 45.0) -> list[float]:
    return utm_area(size, res, lon, lat)


@pytest.fixture(scope="module")
def broken(demo_catalog: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The demo catalog with one COG truncated to 40% of its bytes (header intact)."""
    root = tmp_path_factory.mktemp("broken") / "demo"
    shutil.copytree(demo_catalog.parent, root)
    cog = root / "cogs" / f"{BROKEN}_visual.tif"
    data = cog.read_bytes()
    cog.write_bytes(data[: int(len(data) * 0.4)])
    srv = Server(root / demo_catalog.name)
    yield srv
    srv.stop()


READ = {"crs": "EPSG:32632", "resolution": 30, "assets": ["visual"], "progress": False}


def valid_share(da) -> float:
    return float((da.values != 0).any(axis=1).mean())


def test_item_errors_raise_naming_the_item_and_keep_the_partial_read(
    broken: Server, server: Server
) -> None:
    bbox = area(1024, 30)
    with Client(server.url) as client:
        clean = client.read(bbox, **READ)
    with Client(broken.url) as client, pytest.raises(ItemError) as info:
        client.read(bbox, **READ)
    error = info.value
    assert BROKEN in str(error) and "chunk" in str(error)
    assert {e["item"] for e in error.errors} == {BROKEN}
    assert all(e["chunk"] for e in error.errors)
    # what did arrive is kept: the partial read, with holes where only the broken item had data
    assert error.result is not None and error.result.shape == clean.shape
    assert valid_share(error.result) < valid_share(clean)
    assert valid_share(error.result) > 0


def test_errors_warn_and_ignore_return_the_read_with_holes(broken: Server) -> None:
    bbox = area(1024, 30)
    with Client(broken.url) as client:
        with pytest.warns(ItemErrorWarning, match=BROKEN):
            warned = client.read(bbox, errors="warn", **READ)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            quiet = client.read(bbox, errors="ignore", **READ)
        with pytest.raises(ValueError, match="errors"):
            client.read(bbox, errors="loud", **READ)
    np.testing.assert_array_equal(warned.values, quiet.values)


def test_lazy_blocks_raise_item_errors_when_computed(broken: Server) -> None:
    with Client(broken.url) as client:
        lazy = client.open(area(1024, 30), chunk_size=512, **READ)
    with pytest.raises(ItemError, match=BROKEN):
        lazy.compute(scheduler="synchronous")


def test_a_chunk_error_is_raised_with_the_servers_message_and_not_retried(
    server: Server,
) -> None:
    """A chunk over the server's per-chunk output cap (4096² x 3 bands as float64 is ~400 MiB;
    the cap is 256): that chunk's own error, with the server's message, at once (a retry
    would wait the 20 s backoff this client is given)."""
    with Client(server.url, backoff=20, backoff_cap=20) as client:
        started = time.monotonic()
        with pytest.raises(ChunkError, match="MiB") as info:
            client.read(area(4096, 30), chunk_size=4096, dtype="float64", **READ)
        assert time.monotonic() - started < 15
    assert isinstance(info.value, ServerError) and info.value.chunk


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"sortby": ["-cloudiness"]}, "sortby"),
        ({"filter": "nosuchfield > 3"}, "nosuchfield"),
        ({"bidx": [9]}, "bidx"),  # past the 3 bands: known from one header, before any chunk
    ],
)
def test_request_wide_mistakes_are_one_400(server: Server, params: dict, needle: str) -> None:
    with Client(server.url, backoff=20) as client, pytest.raises(ServerError) as info:
        client.read(area(512, 30), **{**READ, **params})
    assert info.value.status == 400 and needle in info.value.detail


def test_a_bad_crs_fails_before_any_request_and_is_a_400_on_the_wire(server: Server) -> None:
    with Client(server.url) as client, pytest.raises(ValueError, match="EPSG:999999"):
        client.read(area(512, 30), **{**READ, "crs": "EPSG:999999"})
    body = {"crs": "EPSG:999999", "chunks": [{"id": "a", "bbox": [0, 0, 1, 1], "width": 8}]}
    body["chunks"][0]["height"] = 8
    response = httpx.post(server.url + "/chunks", json=body)
    assert_clear_error(response, 400, "crs")


def test_no_match_raises_and_allow_empty_is_typed(server: Server) -> None:
    far = area(512, 30, lon=9.0, lat=60.0)  # zone 32632, far north of the demo strip
    with Client(server.url) as client:
        with pytest.raises(NoItemsFound, match="no STAC items"):
            client.read(far, **READ)
        with pytest.raises(NoItemsFound):
            client.open(far, **READ)
        empty = client.read(far, allow_empty=True, **READ)
        lazy = client.open(far, allow_empty=True, **READ)
        full = client.read(area(64, 30), **READ)
    # typed as a read of these assets is elsewhere: uint8, visual.1..3; no time layer
    for array in (empty, lazy):
        assert array.sizes["time"] == 0 and array.dtype == full.dtype == np.uint8
        assert (
            list(array.band.values)
            == list(full.band.values)
            == ["visual.1", "visual.2", "visual.3"]
        )
        assert array.sizes["y"] == 512 and array.sizes["x"] == 512
