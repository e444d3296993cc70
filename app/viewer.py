"""GET /map: a MapLibre viewer of the mosaic, served by Terrazzo itself.

A person should see the catalog on a map with nothing but the service running: no CDN, no
base map from the internet, no build step. The page (static/map.html, map.js) talks only to
this service's own routes: /tilejson.json, /tiles, /items, /collections, /info, /point and
/map/colormaps (the colormaps the tile encoder uses, for the legend), always by URLs relative
to the page, so it also works under a proxy's path prefix.
MapLibre GL JS is vendored under static/vendor/ (version in its README).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from app.encoders import colormap_names

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(tags=["viewer"])
# check_dir=False: an install without the page's files must still serve tiles
router.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
CACHED = {"Cache-Control": "public, max-age=86400"}  # fixed for a given rio-tiler


@router.get("/map", summary="Map viewer (HTML)", response_class=FileResponse)
async def map_page() -> Response:
    """The viewer; its state (center, zoom, assets, datetime, method, rescale, colormap…)
    lives in the URL's fragment, so a view can be shared as a link."""
    page = STATIC_DIR / "map.html"
    if not page.is_file():
        detail = f"the viewer's files are not installed ({STATIC_DIR} is missing)"
        return JSONResponse({"detail": detail}, status_code=404)
    return FileResponse(page, headers={"Cache-Control": "no-cache"})


@router.get("/map/colormaps", summary="Colormap names accepted by colormap_name")
async def colormaps() -> Response:
    """The names `colormap_name` accepts (rio-tiler's colormaps, as the tile encoder uses)."""
    return JSONResponse({"colormaps": colormap_names()}, headers=CACHED)


@cache
def _colours(name: str) -> tuple[str, ...]:
    from rio_tiler.colormap import cmap

    table = cmap.get(name)
    return tuple(
        "#"
        + "".join(f"{int(v):02x}" for v in table[i][:3])
        + ("" if table[i][3] == 255 else f"{int(table[i][3]):02x}")
        for i in range(256)
    )


@router.get(
    "/map/colormaps/{name}",
    summary="One colormap's 256 colours (for a legend)",
    responses={404: {"description": "No colormap of that name"}},
)
async def colormap(name: str) -> Response:
    """Entry i is the colour of byte value i after `rescale`: `#rrggbb`, or `#rrggbbaa`
    where the colormap is not opaque."""
    if name not in colormap_names():
        return JSONResponse(
            {"detail": f"no colormap {name!r}; see /map/colormaps"}, status_code=404
        )
    return JSONResponse({"name": name, "colors": list(_colours(name))}, headers=CACHED)
