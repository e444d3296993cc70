"""The four ways a STAC-GeoParquet catalog gets written, each by its own tool.

They disagree on the details a reader has to cope with: stac-geoparquet's arrow writer makes
`bbox` a struct and timestamps tz-aware microseconds; its GeoPandas path (`to_geodataframe`
then `GeoDataFrame.to_parquet`, the route of many existing catalogs) makes `bbox` a
list<double> and timestamps nanoseconds, and a column that is null in every row of a frame
may come out typeless; rustac writes its own schema in one row group; `terrazzo index` is
rustac rewritten with small row groups along a Hilbert curve.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import rustac
import stac_geoparquet
import stac_geoparquet.arrow

WRITERS = ("arrow", "geopandas", "rustac", "terrazzo-index")
Items = dict[str, list[dict[str, Any]]]  # archive name -> its STAC items


def _arrow(items: list[dict[str, Any]], out: Path) -> None:
    reader = stac_geoparquet.arrow.parse_stac_items_to_arrow(items)
    stac_geoparquet.arrow.to_parquet(reader, out)


def _geopandas(frames: list[list[dict[str, Any]]], out: Path) -> None:
    """One GeoDataFrame per archive (`to_geodataframe` needs the same properties on every
    item), concatenated as a user combining collections would, then `to_parquet`."""
    # numpy_nullable is today's default (passed only to silence the FutureWarning about it).
    parts = [stac_geoparquet.to_geodataframe(f, dtype_backend="numpy_nullable") for f in frames]
    pd.concat(parts, ignore_index=True).to_parquet(out)


def _rustac(items: list[dict[str, Any]], out: Path) -> None:
    rustac.write_sync(str(out), items, format="geoparquet")


def _terrazzo_index(items: list[dict[str, Any]], out: Path) -> None:
    """The CLI a user runs, in a subprocess: NDJSON in, STAC-GeoParquet out."""
    source = out.with_suffix(".ndjson")
    source.write_text("".join(json.dumps(item) + "\n" for item in items))
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", "index", str(source), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"terrazzo index failed: {done.stdout}{done.stderr}")


def _nested_properties(item: dict[str, Any]) -> frozenset[str]:
    return frozenset(k for k, v in item["properties"].items() if isinstance(v, dict))


def _groups(writer: str, items: Items) -> dict[str, list[str]]:
    """Which archives share one catalog file, per writer.

    Each file holds as many archives as the tool can write together. stac-geoparquet's arrow
    writer unifies any schemas: one file. GeoPandas cannot hold naive (all-null) and tz-aware
    datetime columns in one typed column: archives without a datetime get their own file.
    rustac 0.9 fails ("all columns in a record batch must have the same length") when only
    some items carry a nested-object property such as rio-stac's `proj:geometry`: one file
    per set of such properties. test_conformance checks the one-file case separately.
    """
    if writer == "arrow":
        return {"all": list(items)}
    if writer == "geopandas":
        key = {
            a: "timeless" if v[0]["properties"].get("datetime") is None else "timed"
            for a, v in items.items()
        }
    else:
        key = {
            a: "-".join(sorted(_nested_properties(v[0]))).replace(":", "-") or "flat"
            for a, v in items.items()
        }
    groups: dict[str, list[str]] = {}
    for archive, group in key.items():
        groups.setdefault(group, []).append(archive)
    return groups


def write_one(writer: str, items: list[dict[str, Any]], out: Path) -> Path:
    """All `items` in one file at `out` with `writer` (GeoPandas: one frame per collection)."""
    if writer == "geopandas":
        by_collection: dict[str, list[dict[str, Any]]] = {}
        for item in items:
            by_collection.setdefault(item["collection"], []).append(item)
        _geopandas(list(by_collection.values()), out)
    else:
        {"arrow": _arrow, "rustac": _rustac, "terrazzo-index": _terrazzo_index}[writer](items, out)
    return out


def write(writer: str, items: Items, root: Path) -> dict[str, Path]:
    """Write the corpus with `writer` under `root`; returns each archive's catalog file."""
    catalogs: dict[str, Path] = {}
    for group, archives in _groups(writer, items).items():
        out = root / f"{writer}-{group}.parquet"
        write_one(writer, [i for a in archives for i in items[a]], out)
        catalogs.update(dict.fromkeys(archives, out))
    return catalogs
