"""A Dask job over Terrazzo: the one-shot `job` service of docker-compose.yml.

The client SDK opens an area lazily (`terrazzo.Client(url).open(...)`: a Dask-backed
xarray.DataArray, one Dask chunk per POST /chunks request), the Dask cluster computes
statistics over it, and the job prints them as JSON. Every worker reads its chunks from the
service itself, so with the compose file the reads are spread over the workers and, through the
load balancer, over the service replicas.

    TERRAZZO_URL=http://127.0.0.1:8000 DASK_SCHEDULER_ADDRESS=tcp://127.0.0.1:8786 \\
        python deploy/dask_job.py

Environment (empty means the default):
    TERRAZZO_URL                 the service or its load balancer (default http://lb)
    DASK_SCHEDULER_ADDRESS       the Dask scheduler (default tcp://dask-scheduler:8786)
    TERRAZZO_API_KEY             sent as X-API-Key when the service requires one
    TERRAZZO_JOB_BBOX            minx,miny,maxx,maxy in TERRAZZO_JOB_CRS
                                 (default: the demo catalog across the 32N/33N zone boundary)
    TERRAZZO_JOB_CRS             default EPSG:32632
    TERRAZZO_JOB_RESOLUTION      pixel size in CRS units (default 60)
    TERRAZZO_JOB_CHUNK_SIZE      pixels per chunk side (default 256)
    TERRAZZO_JOB_ASSETS          comma-separated (default dem)
    TERRAZZO_JOB_DATETIME        e.g. 2024-06-01/2024-09-30 (default: all)
    TERRAZZO_JOB_GROUP_BY        day, month, year, datetime, item or none (default day)
    TERRAZZO_JOB_MIN_WORKERS     Dask workers to wait for (default 1)

The exit status is 1 when no pixel of the area had data (a catalog that does not cover the
area, or wrong assets), so a misconfigured job does not pass unnoticed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

DEFAULT_URL = "http://lb"
DEFAULT_SCHEDULER = "tcp://dask-scheduler:8786"
DEFAULT_CRS = "EPSG:32632"
# 61.44 x 30.72 km around 12°E 45°N: demo scenes of UTM zones 32N and 33N, both dates; on
# multiples of 120 m (reads snap to their pixel grid, as odc-stac's do)
DEFAULT_BBOX = (705240.0, 4977600.0, 766680.0, 5008320.0)
DEFAULT_RESOLUTION = 60.0
DEFAULT_CHUNK_SIZE = 256
DEFAULT_ASSETS = ("dem",)
DEFAULT_GROUP_BY = "day"


def _number(value: Any) -> float | None:
    """A JSON-safe float: NaN (no valid pixel) becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def main(
    server_url: str,
    scheduler_address: str,
    *,
    bbox: Sequence[float] = DEFAULT_BBOX,
    crs: str = DEFAULT_CRS,
    resolution: float = DEFAULT_RESOLUTION,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    assets: Sequence[str] = DEFAULT_ASSETS,
    datetime: str | None = None,
    group_by: str | None = DEFAULT_GROUP_BY,
    api_key: str | None = None,
    min_workers: int = 1,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Compute the area's statistics on the Dask cluster at `scheduler_address`.

    Returns the layout of the lazy array (shape, chunks, time labels), the number of valid
    pixels, their mean, min and max, the mean of each time layer, and how many chunk reads
    each Dask worker made.
    """
    import dask
    import distributed
    from terrazzo import Client, NoItemsFound

    started = time.perf_counter()
    headers = {"X-API-Key": api_key} if api_key else {}
    with (
        distributed.Client(scheduler_address, timeout=timeout) as cluster,
        Client(server_url, headers=headers) as terrazzo,
    ):
        cluster.wait_for_workers(min_workers, timeout=timeout)
        workers = len(cluster.scheduler_info()["workers"])
        try:
            lazy = terrazzo.open(
                list(bbox),
                crs=crs,
                resolution=resolution,
                chunk_size=chunk_size,
                assets=list(assets),
                datetime=datetime,
                group_by=group_by,
                dtype="float32",  # no data is NaN
            )
        except NoItemsFound as exc:  # nothing to compute: the job says so and exits 1
            return {
                "url": server_url,
                "bbox": [float(v) for v in bbox],
                "crs": crs,
                "valid_pixels": 0,
                "mean": None,
                "min": None,
                "max": None,
                "error": str(exc),
            }
        values = lazy.astype("float64")
        with distributed.get_task_stream(cluster) as stream:
            valid, total, low, high, per_time = dask.compute(
                values.count(),
                values.sum(),
                values.min(),
                values.max(),
                values.mean(dim=("band", "y", "x")),
            )
    reads = Counter(
        task["worker"] for task in stream.data if "fetch_block" in str(task.get("key", ""))
    )
    valid = int(valid)
    return {
        "url": server_url,
        "scheduler": scheduler_address,
        "workers": workers,
        "bbox": [float(v) for v in bbox],
        "crs": crs,
        "resolution": float(resolution),
        "assets": list(assets),
        "shape": [int(n) for n in lazy.shape],
        "chunks": int(lazy.data.npartitions),
        "time": _labels(lazy.time.values),
        "valid_pixels": valid,
        "mean": float(total) / valid if valid else None,
        "min": _number(low),
        "max": _number(high),
        "mean_per_time": [_number(v) for v in per_time.values],
        "chunk_reads_per_worker": dict(sorted(reads.items())),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _labels(values: Any) -> list[str]:
    """Time labels as text: ISO seconds for datetimes (NaT without group_by)."""
    import numpy as np

    if np.asarray(values).dtype.kind == "M":
        return [str(v) for v in np.datetime_as_string(values, unit="s")]
    return [str(v) for v in values]


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or default


def options_from_env() -> dict[str, Any]:
    """main()'s keyword arguments from the TERRAZZO_JOB_* variables (see the module doc)."""
    options: dict[str, Any] = {"api_key": _env("TERRAZZO_API_KEY")}
    if bbox := _env("TERRAZZO_JOB_BBOX"):
        values = [float(v) for v in bbox.replace(" ", "").split(",")]
        if len(values) != 4:
            raise ValueError(f"TERRAZZO_JOB_BBOX: needs minx,miny,maxx,maxy, got {bbox!r}")
        options["bbox"] = values
    if crs := _env("TERRAZZO_JOB_CRS"):
        options["crs"] = crs
    if resolution := _env("TERRAZZO_JOB_RESOLUTION"):
        options["resolution"] = float(resolution)
    if chunk_size := _env("TERRAZZO_JOB_CHUNK_SIZE"):
        options["chunk_size"] = int(chunk_size)
    if assets := _env("TERRAZZO_JOB_ASSETS"):
        options["assets"] = [a.strip() for a in assets.split(",") if a.strip()]
    options["datetime"] = _env("TERRAZZO_JOB_DATETIME")
    if group_by := _env("TERRAZZO_JOB_GROUP_BY"):
        options["group_by"] = None if group_by.lower() == "none" else group_by
    if min_workers := _env("TERRAZZO_JOB_MIN_WORKERS"):
        options["min_workers"] = int(min_workers)
    return options


def run() -> int:
    url = _env("TERRAZZO_URL", DEFAULT_URL)
    scheduler = _env("DASK_SCHEDULER_ADDRESS", DEFAULT_SCHEDULER)
    result = main(url, scheduler, **options_from_env())
    print(json.dumps(result, indent=2), flush=True)
    if not result["valid_pixels"]:
        print(
            "dask_job: no pixel of the area had data; set TERRAZZO_JOB_BBOX, TERRAZZO_JOB_CRS "
            "and TERRAZZO_JOB_ASSETS for your catalog",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run())
