"""The peers' side of bench/servers.py: run by the peer venv's python (data/bench-peers/venv),
never imported by Terrazzo's (it imports only the peers' packages: titiler.core, titiler.mosaic,
cogeo-mosaic).

- `mosaic_app`: a minimal titiler.mosaic server, TiTiler's `MosaicTilerFactory` over
  cogeo-mosaic's `MosaicBackend` under /mosaicjson (tiles at
  /mosaicjson/tiles/{tms}/{z}/{x}/{y}.png?url=MOSAIC.json), with TiTiler's error handlers and a
  /healthz. Served by uvicorn: `python -m uvicorn peers_app:mosaic_app --app-dir bench`.
- `python bench/peers_app.py mosaicjson ITEMS.ndjson OUT_DIR ASSET`: one MosaicJSON per
  collection of the STAC items (OUT_DIR/<collection>.json), the asset's href per item, items in
  datetime-descending order (pgstac's default order), quadkeys at zoom 12.

titiler-pgstac needs no code here: bench/servers.py runs its own app,
`titiler.pgstac.main:app`, with DATABASE_URL set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cogeo_mosaic.backends import MosaicBackend
from cogeo_mosaic.mosaic import MosaicJSON
from fastapi import FastAPI
from titiler.core.errors import DEFAULT_STATUS_CODES, add_exception_handlers
from titiler.mosaic.errors import MOSAIC_STATUS_CODES
from titiler.mosaic.factory import MosaicTilerFactory

mosaic_app = FastAPI(title="titiler.mosaic (bench/servers.py)")
_mosaic = MosaicTilerFactory(backend=MosaicBackend, router_prefix="/mosaicjson")
mosaic_app.include_router(_mosaic.router, prefix="/mosaicjson")
add_exception_handlers(mosaic_app, DEFAULT_STATUS_CODES)
add_exception_handlers(mosaic_app, MOSAIC_STATUS_CODES)


@mosaic_app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def write_mosaics(items_path: Path, out: Path, asset: str) -> list[Path]:
    """One MosaicJSON per collection, features = the items' footprints with the asset's href."""
    by_collection: dict[str, list[dict[str, Any]]] = {}
    for line in items_path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            by_collection.setdefault(item["collection"], []).append(item)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for collection, items in sorted(by_collection.items()):
        items.sort(key=lambda i: i["properties"]["datetime"], reverse=True)
        features = [
            {
                "type": "Feature",
                "geometry": i["geometry"],
                "properties": {"path": i["assets"][asset]["href"]},
            }
            for i in items
        ]
        mosaic = MosaicJSON.from_features(features, minzoom=7, maxzoom=14, quadkey_zoom=12)
        path = out / f"{collection}.json"
        path.write_text(mosaic.model_dump_json(exclude_none=True))
        written.append(path)
    return written


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "mosaicjson":
        sys.exit("usage: peers_app.py mosaicjson ITEMS.ndjson OUT_DIR ASSET")
    paths = write_mosaics(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
    print(f"{len(paths)} MosaicJSON files in {sys.argv[3]}")
