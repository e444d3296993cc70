"""Complete mosaics at every zoom on a synthetic continent (bench/continent.py, small here):
every z0–z7 tile comes complete from the overview pyramid (`terrazzo overviews`), where dynamic
reads over thousands of items hit the item limit; a dynamic z10 tile over 250 stacked scenes is
complete. The pixels are checked against rio-tiler reading the shared COGs.
"""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
from rio_tiler.io import Reader

from bench.continent import HOTSPOT, build
from tests.conftest import Server

TMS = morecantile.tms.get("WebMercatorQuad")
BOUNDS = (6.0, 44.0, 16.0, 52.0)  # four shared COGs in UTM zones 32N and 33N
MAX_ZOOM = 7  # z7 tiles hold ~200 of the 2000 items: within the limit, dynamic reads agree


@pytest.fixture(scope="module")
def continent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("continent"), items=2000, bounds=BOUNDS, cell=0.2)


@pytest.fixture(scope="module")
def pyramid(continent: Path) -> Path:
    out = continent.parent / "pyramid"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "overviews",
            str(continent),
            "--out",
            str(out),
            "--max-zoom",
            str(MAX_ZOOM),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.fixture(scope="module")
def servers(continent: Path, pyramid: Path) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """The same catalog served with the pyramid and without it (default item limit)."""
    with ThreadPoolExecutor(2) as starting:  # both start at once: each waits on its imports
        with_pyramid, dynamic = starting.map(
            lambda args: Server(continent, args=args), [("--pyramid", str(pyramid)), ()]
        )
    try:
        yield (
            httpx.Client(base_url=with_pyramid.url, timeout=120),
            httpx.Client(base_url=dynamic.url, timeout=120),
        )
    finally:
        with_pyramid.stop()
        dynamic.stop()


def npy(response: httpx.Response) -> tuple[np.ndarray, np.ndarray]:
    assert response.status_code == 200, response.text
    arr = np.load(io.BytesIO(response.content))
    return arr[:-1], arr[-1] > 0


def test_every_low_zoom_tile_is_complete_from_the_pyramid(servers) -> None:
    pyramid_http, dynamic_http = servers
    tiles = list(TMS.tiles(*BOUNDS, zooms=list(range(MAX_ZOOM + 1))))
    truncated_dynamic = 0
    served = 0
    for t in tiles:
        url = f"/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy"
        r = pyramid_http.get(url)
        assert r.status_code in (200, 204), (t, r.text)
        assert "X-Terrazzo-Truncated" not in r.headers, t
        if r.status_code == 200:
            served += 1
            assert r.headers["X-Terrazzo-Source"] == "pyramid", t
            assert r.headers["Cache-Control"].startswith("public"), t
        if t.z <= 4:
            truncated_dynamic += "X-Terrazzo-Truncated" in dynamic_http.get(url).headers
    assert served >= len(tiles) - 2  # every tile over the continent has data
    assert truncated_dynamic > 0, "without the pyramid the low zooms hit the item limit"


def test_a_pyramid_tile_equals_a_dynamic_read_without_item_limit(servers) -> None:
    """Within the limit the dynamic read is complete too: the two must agree pixel for pixel."""
    pyramid_http, dynamic_http = servers
    t = TMS.tile(10.5, 47.5, MAX_ZOOM)
    url = f"/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy"
    dynamic = dynamic_http.get(url)
    assert "X-Terrazzo-Truncated" not in dynamic.headers
    ours, valid = npy(pyramid_http.get(url))
    ref, ref_valid = npy(dynamic)
    assert (valid == ref_valid).mean() > 0.99
    both = valid & ref_valid
    assert (ours[:, both] == ref[:, both]).all(axis=0).mean() > 0.99


def test_a_dynamic_z10_tile_over_250_scenes_is_complete(servers, continent: Path) -> None:
    pyramid_http, _ = servers
    t = TMS.tile(*HOTSPOT, 10)
    url = f"/tiles/WebMercatorQuad/{t.z}/{t.x}/{t.y}.npy"
    mean = pyramid_http.get(url, params={"method": "mean"})  # every item read
    data, valid = npy(mean)
    assert int(mean.headers["X-Terrazzo-Items"]) >= 250
    assert "X-Terrazzo-Truncated" not in mean.headers
    assert mean.headers["X-Terrazzo-Source"] == "dynamic"
    first = pyramid_http.get(url)
    first_data, first_valid = npy(first)
    assert "X-Terrazzo-Truncated" not in first.headers
    with Reader(continent.parent / "cog-00-00.tif") as src:  # every scene here shares it
        ref = src.tile(t.x, t.y, t.z)
    assert valid.all() and first_valid.all() and (ref.mask > 0).all()
    assert (first_data == ref.data).all(axis=0).mean() > 0.99
    assert (np.rint(data) == ref.data).all(axis=0).mean() > 0.99


def test_tilejson_minzoom_says_what_can_be_served_complete(servers) -> None:
    """With the pyramid every zoom is complete (minzoom 0); without it, TileJSON starts at the
    first zoom whose tiles fit the item limit. A request the pyramid does not serve (another
    method) gets the dynamic minzoom."""
    pyramid_http, dynamic_http = servers
    dynamic = dynamic_http.get("/tilejson.json").json()["minzoom"]
    assert dynamic > 0
    assert pyramid_http.get("/tilejson.json").json()["minzoom"] == 0
    other = pyramid_http.get("/tilejson.json", params={"method": "highest"}).json()["minzoom"]
    assert other == dynamic
