"""GET /map: a MapLibre viewer of the mosaic, served by Terrazzo itself.

A person should see the catalog on a map with nothing but the service running: no CDN, no
base map from the internet, no build step. The page (static/map.html, map.js) talks only to
this service's own routes: /tilejson.json, /items, /collections, /info and /point.
MapLibre GL JS is vendored under static/vendor/ (version in its README).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(tags=["viewer"])
# check_dir=False: an install without the page's files must still serve tiles
router.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")


@router.get("/map", summary="Map viewer (HTML)", response_class=FileResponse)
async def map_page() -> Response:
    """The viewer; its state (assets, datetime, method, rescale…) lives in the query string,
    so a view can be shared as a link."""
    page = STATIC_DIR / "map.html"
    if not page.is_file():
        detail = f"the viewer's files are not installed ({STATIC_DIR} is missing)"
        return JSONResponse({"detail": detail}, status_code=404)
    return FileResponse(page, headers={"Cache-Control": "no-cache"})
