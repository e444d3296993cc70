"""What the server's processes hold: rio-tiler's optional xarray (and pandas under it) stays out
of `terrazzo serve` and its compute workers (core.lean_imports), while everything that uses
rio-tiler there still works: colormaps, rescaling, GDAL-rendered JPEG, statistics."""

from __future__ import annotations

from pathlib import Path

import httpx
import psutil

from tests.conftest import Server

TILE = "/tiles/WebMercatorQuad/10/537/368"


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_no_xarray_or_pandas_in_the_server_or_its_workers(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for path, params in [
            (TILE + ".png", {"assets": "visual"}),
            (TILE + ".jpg", {"assets": "visual"}),  # rio-tiler's render (GDAL) in a worker
            (TILE + ".png", {"assets": "visual", "bidx": "1", "colormap_name": "viridis"}),
            (TILE + ".png", {"assets": "visual", "bidx": "1", "rescale": "0,200"}),
            ("/statistics", {"assets": "visual", "bbox": "10.1,45.0,10.3,45.2"}),
        ]:
            r = http.get(path, params=params)
            assert r.status_code == 200, (path, params, r.text[:300])
    me = psutil.Process(server.proc.pid)
    processes = [me, *me.children(recursive=True)]
    workers = [p for p in processes if "forkserver" in " ".join(p.cmdline())]
    assert len(workers) >= 2, "the forkserver and at least one compute worker"
    for process in processes:
        maps = mapped(process.pid)
        assert "rasterio" in maps or process.pid != me.pid  # the check reads real mappings
        assert "/pandas/" not in maps, f"pandas loaded in {process.cmdline()[:4]}"
        assert "/xarray/" not in maps  # pure Python: never mapped; pandas' .so are
