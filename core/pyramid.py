"""Serving a pre-rendered overview pyramid (built by `terrazzo overviews`, core/overviews.py).

A pyramid directory holds `pyramid.json` (the recipe: which catalog, which search, which read
parameters, up to which zoom) and `pyramid.parquet`, a STAC-GeoParquet catalog of its own: one
item per block, a COG in EPSG:3857 whose pixel grid is the zoom's WebMercatorQuad tile grid
(a block at zoom z is the tile at zoom max(z - 4, 0)). A 256-px WebMercatorQuad tile at a
pyramid zoom, for the recipe's request, is read from its one block through the ordinary read
path: the plan picks level 0 and the nearest warp copies pixels 1:1.

`Pyramid.serves` decides per request. What is applied after the read may differ (`bidx`,
`rescale`, `colormap_name`, `format`, limits such as `items_limit`); what changes which pixels
the read picks must equal the recipe: datetime, collections, filter, sortby, no ids, assets,
method, resampling, no `nodata` override, and `unscale` (blocks hold the stored values, and
items of one block may carry different scale/offset, so `unscale=true` is served dynamically).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import shapely

from core.catalog import Catalog, SearchQuery, parse_datetime_range
from core.plan import Grid, ReadPlan, matrix_set

log = logging.getLogger("terrazzo.pyramid")

TMS = "WebMercatorQuad"
TILESIZE = 256
BLOCK_ZOOMS = 4  # a block spans 2**4 x 2**4 tiles of its zoom (4096 px)
RECIPE = "pyramid.json"
CATALOG = "pyramid.parquet"
FORMAT = "terrazzo-pyramid/1"


def block_zoom(z: int) -> int:
    """The zoom of the tile that is a block at pyramid zoom `z`."""
    return max(z - BLOCK_ZOOMS, 0)


def block_of(z: int, x: int, y: int) -> tuple[int, int]:
    """(bx, by) of the block holding tile z/x/y (a tile at zoom `block_zoom(z)`)."""
    shift = z - block_zoom(z)
    return x >> shift, y >> shift


def block_key(z: int, bx: int, by: int) -> str:
    """`terrazzo:block`: the pyramid zoom, then the block tile's x/y at `block_zoom(z)`."""
    return f"{z}/{bx}/{by}"


def block_id(z: int, bx: int, by: int) -> str:
    """The STAC item id of a block in pyramid.parquet."""
    return f"pyramid-{z}-{bx}-{by}"


def tile_zoom(grid: Grid) -> tuple[int, int, int] | None:
    """(z, x, y) when `grid` is exactly a 256-px WebMercatorQuad tile, else None."""
    if grid.width != TILESIZE or grid.height != TILESIZE or grid.crs != "EPSG:3857":
        return None
    tms = matrix_set(TMS)
    left, _, right, top = grid.bounds
    span = right - left
    world = tms.xy_bounds(0, 0, 0)
    z = round(math.log2((world.right - world.left) / span))
    if not 0 <= z <= tms.maxzoom:
        return None
    size = (world.right - world.left) / 2**z
    x, y = round((left - world.left) / size), round((world.top - top) / size)
    if not (0 <= x < 2**z and 0 <= y < 2**z):
        return None
    expected = tms.xy_bounds(x, y, z)
    tolerance = size * 1e-9
    if any(abs(a - b) > tolerance for a, b in zip(grid.bounds, tuple(expected), strict=True)):
        return None
    return z, x, y


@dataclass
class Pyramid:
    """An opened pyramid directory: its recipe and its block catalog."""

    path: Path
    recipe: dict[str, Any]
    catalog: Catalog
    _recipe_stamp: int = 0
    _checked: float = 0.0
    _warned: str = ""  # the stale catalog version already logged
    _hashes: tuple[str, str] | None = None  # (catalog version, its sha256) last computed

    @classmethod
    def open(cls, path: Path | str, *, threads: int = 1, in_memory: bool = True) -> Pyramid:
        path = Path(path).resolve()
        recipe_path = path / RECIPE
        if not recipe_path.is_file():
            raise FileNotFoundError(
                f"pyramid: no {RECIPE} in {path} (build one with terrazzo overviews)"
            )
        recipe = json.loads(recipe_path.read_text())
        if recipe.get("format") != FORMAT:
            raise ValueError(f"pyramid: {recipe_path} is not a {FORMAT} recipe")
        catalog = Catalog(path / CATALOG, threads=threads, in_memory=in_memory)
        return cls(path, recipe, catalog, _recipe_stamp=recipe_path.stat().st_mtime_ns)

    def close(self) -> None:
        self.catalog.close()

    @property
    def max_zoom(self) -> int:
        return int(self.recipe["max_zoom"])

    def describe(self) -> str:
        r = self.recipe
        return (
            f"pyramid {self.path}: zooms 0..{r['max_zoom']}, {len(r['blocks'])} blocks, assets "
            f"{','.join(r['assets'])}, method {r['method']}, source {r['catalog']}"
        )

    def _refresh(self) -> None:
        """Take a rebuilt recipe (a rebuild rewrites pyramid.json last); at most once a second."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        try:
            stamp = (self.path / RECIPE).stat().st_mtime_ns
            if stamp != self._recipe_stamp:
                self.recipe = json.loads((self.path / RECIPE).read_text())
                self._recipe_stamp = stamp
        except (OSError, ValueError) as exc:
            log.warning("pyramid %s: recipe unreadable (%s); keeping the old one", self.path, exc)

    def current(self, catalog: Catalog, version: str) -> bool:
        """Whether the pyramid was built from the catalog in use (`version`, as
        `Catalog.version_async` says). The same inode and mtime, or else the same content
        (sha256, computed once per version: a copied catalog has another inode). A stale
        pyramid is logged once per catalog version; then tiles are served dynamically."""
        self._refresh()
        if version == self.recipe.get("catalog_version"):
            return True
        if self._hashes is None or self._hashes[0] != version:
            try:
                self._hashes = (version, catalog.content_hash())
            except OSError:
                self._hashes = (version, "")
        if self._hashes[1] and self._hashes[1] == self.recipe.get("catalog_sha256"):
            return True
        if self._warned != version:
            self._warned = version
            log.warning(
                "pyramid %s was built from another version of %s (%s, now %s): serving "
                "dynamically until terrazzo overviews rebuilds it",
                self.path,
                catalog.name,
                self.recipe.get("catalog_version"),
                version,
            )
        return False

    async def current_async(self, catalog: Catalog, version: str) -> bool:
        """`current` off the event loop when it has to hash the catalog file."""
        if version == self.recipe.get("catalog_version") or (
            self._hashes is not None and self._hashes[0] == version and self._warned == version
        ):
            return self.current(catalog, version)  # a stat at most, no hashing
        return await asyncio.to_thread(self.current, catalog, version)

    def serves(self, tms: str, z: int, query: SearchQuery, params: Any) -> bool:
        """True when tile `z` of `tms` for this search and these read params is what the
        pyramid holds (see the module docstring for which parameters must match)."""
        r = self.recipe
        if tms != TMS or not 0 <= z <= int(r["max_zoom"]):
            return False
        when = parse_datetime_range(r["datetime"]) if r.get("datetime") else None
        return (
            query.datetime == when
            and sorted(query.collections) == sorted(r.get("collections") or [])
            and not query.ids
            and query.filter == r.get("filter")
            and [s.strip() for s in query.sortby if s.strip()] == list(r["sortby"])
            and list(params.assets) == list(r["assets"])
            and params.method == r["method"]
            and params.resampling == r["resampling"]
            and params.nodata is None
            and bool(params.unscale) == bool(r.get("unscale", False))
            and not getattr(params, "expression", None)  # band math runs per item: dynamic
        )

    def block_query(self, grid: Grid, z: int, x: int, y: int) -> SearchQuery:
        """The pyramid catalog search for tile z/x/y (whose grid is `grid`): its one block."""
        bx, by = block_of(z, x, y)
        bounds = grid.lonlat_bounds()
        return SearchQuery(
            bbox=bounds,
            intersects=shapely.box(*bounds),
            ids=(block_id(z, bx, by),),
            sortby=("id",),
            limit=2,
        )

    @staticmethod
    def sourced(plan: ReadPlan) -> ReadPlan:
        return replace(plan, source="pyramid")


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
