"""The engine: plan → search → fetch → compute for one output grid.

One read path serves every route (tiles now, chunks later): `Engine.read(grid, query, params)`.
Each stage runs in its own executor — search on DuckDB threads, fetch on the event loop,
compute in the process pool — and the engine only moves plain data between them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import shapely

from core import compute
from core.access import AccessPolicy, audit, is_url, remote_prefix
from core.algorithms import for_grid
from core.allocator import keep_freed_memory
from core.catalog import Catalog, CatalogBackend, SearchQuery, SearchResult
from core.compute import ComputePool, Source, Target
from core.fetch import Fetcher
from core.mosaic import METHODS
from core.plan import (
    RESAMPLING,
    AssetRead,
    Grid,
    Header,
    ItemRead,
    ReadPlan,
    describe_error,
    make_plan,
    transformer,
)
from core.process import (
    MAX_EXPRESSION_CHARS,
    Bands,
    Expression,
    Process,
    ProcessError,
    band_variables,
    item_layout,
)
from core.process import run as process_run
from core.pyramid import TMS, Pyramid, tile_zoom
from core.settings import Settings
from core.stores import object_store_report
from core.timing import StageClock

MAX_ASSETS = 32  # assets one request may read (each is a COG per item)
MAX_BANDS = 256  # output bands one request may ask for (bidx)
LAYOUT_SAMPLE = 16  # items `Engine.layout` looks at for one that has every asset


class ParamError(ValueError):
    """A read parameter that cannot be honoured; the message says what to change."""


class ReadFailed(RuntimeError):
    """Items covered the grid but none of them could be read."""

    def __init__(self, errors: list[tuple[str, str]]) -> None:
        self.errors = errors
        detail = "; ".join(f"{i}: {e}" for i, e in errors[:5])
        super().__init__(f"every item failed to read ({len(errors)}): {detail}")


@dataclass(frozen=True)
class ReadParams:
    """How to read and combine pixels (shared by tiles and chunks)."""

    assets: tuple[str, ...] = ()
    bidx: tuple[int, ...] = ()
    method: str = "first"
    resampling: str = "nearest"
    nodata: float | None = None
    unscale: bool = False  # apply each band's scale/offset (file, else raster:bands): float32
    expression: str | None = None  # band math per item (core.process.Expression), float32
    algorithm: Any = None  # a core.algorithms step run on the mosaic (hillshade...)

    @property
    def uses_bands(self) -> bool:
        """Whether an item's bands can refuse these params (bidx, expression, algorithm)."""
        return bool(self.bidx or self.expression or self.algorithm is not None)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ParamError(f"method: unknown {self.method!r}; choose one of {sorted(METHODS)}")
        if self.resampling not in RESAMPLING:
            raise ParamError(
                f"resampling: unknown {self.resampling!r}; choose one of {list(RESAMPLING)}"
            )
        if any(b < 1 for b in self.bidx):
            raise ParamError(f"bidx: band indexes start at 1, got {list(self.bidx)}")
        if self.bidx and self.expression:
            raise ParamError("bidx, expression: choose one (an expression names its bands)")
        if self.expression is not None and len(self.expression) > MAX_EXPRESSION_CHARS:
            raise ParamError(f"expression: longer than {MAX_EXPRESSION_CHARS} characters")
        for name, values, limit in (
            ("assets", self.assets, MAX_ASSETS),
            ("bidx", self.bidx, MAX_BANDS),
        ):
            if len(values) > limit:
                raise ParamError(f"{name}: at most {limit} per request, got {len(values)}")

    def item_steps(self, reads: Sequence[AssetRead | BandSource]) -> list[Process]:
        """The processes each item's stacked bands go through before the mosaic: `bidx`'s
        band selection or the expression (its band names from these reads' assets)."""
        if self.bidx:
            return [Bands(self.bidx, tuple(dict.fromkeys(r.asset for r in reads)))]
        if self.expression:
            variables = band_variables([(r.asset, r.count) for r in reads])
            return [Expression(self.expression, tuple(variables))]
        return []


@dataclass
class Mosaic:
    """A finished read: data (bands, h, w), validity (h, w), the plan that made it."""

    data: np.ndarray
    valid: np.ndarray
    plan: ReadPlan
    errors: list[tuple[str, str]] = field(default_factory=list)
    clock: StageClock = field(default_factory=StageClock)  # busy time of each stage


class Engine:
    """Owns the three executors and runs reads through them."""

    def __init__(
        self,
        settings: Settings,
        *,
        fetcher: Fetcher | None = None,
        catalog: CatalogBackend | None = None,
        warm: tuple[str, ...] | None = None,
    ) -> None:
        """`warm`: start the compute workers now and import these modules in them, while the
        catalog opens (its snapshot may take seconds to build); `warmed()` waits for it."""
        if catalog is None and settings.catalog is None:
            raise ValueError("no catalog: pass --catalog PATH or set TERRAZZO_CATALOG")
        self.settings = settings
        malloc = (settings.malloc_trim_mb, settings.malloc_mmap_mb)
        keep_freed_memory(*malloc)  # this process; the workers set it themselves
        self.compute = ComputePool(
            settings.compute_workers, arena_mb=settings.compute_arena_mb, malloc=malloc
        )
        self._reads = asyncio.Semaphore(settings.read_concurrency)  # see `read`
        self._warming: concurrent.futures.Future[list[int]] | None = None
        if warm is not None:
            starter = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="terrazzo-warm")
            self._warming = starter.submit(self.compute.warm, warm)
            starter.shutdown(wait=False)
        try:
            self.catalog: CatalogBackend = catalog or Catalog(
                settings.catalog or "",
                threads=settings.search_threads,
                in_memory=settings.catalog_in_memory,
                cache=settings.catalog_cache,
                memory_mb=settings.catalog_memory_mb,
                refresh_s=settings.catalog_refresh_s,
            )
        except BaseException:
            self.compute.close()
            raise
        self.fetcher = fetcher or Fetcher(
            concurrency=settings.fetch_concurrency,
            cache_size=settings.header_cache_size,
            retries=settings.retries,
            retry_base=settings.retry_base_s,
            retry_cap=settings.retry_cap_s,
            tile_cache_bytes=settings.tile_cache_mb * 2**20,
            max_read_bytes=settings.max_read_mb * 2**20,
            header_timeout=settings.header_read_timeout_s,
        )
        self.fetcher.pool = self.compute  # GDAL-decoded assets decode in the pool
        # pre-rendered low zooms (terrazzo overviews); its directory is readable too
        self.pyramid = Pyramid.open(settings.pyramid) if settings.pyramid else None
        groups = self.catalog.href_groups()
        self.policy = AccessPolicy.build(
            self.catalog.local_root,
            used=[remote_prefix(href) for _, _, href in groups if is_url(href)],
            allow=[*settings.allow.split(","), *([str(self.pyramid.path)] if self.pyramid else [])],
        )
        self.fetcher.policy = self.policy
        self.fetcher.stores.policy = self.policy  # connect-time check knows --allow'd origins
        self.refused = audit(self.policy, groups, self.catalog.count_hrefs)

    def warmed(self) -> None:
        """Wait for the warm-up started by `Engine(..., warm=...)` (raises what it raised)."""
        if self._warming is not None:
            self._warming.result()

    def access_report(self) -> str:
        lines = self.policy.describe()
        used = {p.split("://", 1)[0] for p in (*self.policy.prefixes, *self.policy.explicit)}
        lines += object_store_report(used)
        total = sum(n for n, _, _ in self.refused)
        lines.append(f"items refused by the access policy: {total}")
        lines += [f"  {n} like {href}: {why}" for n, href, why in self.refused[:5]]
        return "\n".join(lines)

    def close(self) -> None:
        self.compute.close()
        self.catalog.close()
        if self.pyramid is not None:
            self.pyramid.close()

    # -- planning ----------------------------------------------------------------------------

    def resolve_assets(self, assets: tuple[str, ...]) -> tuple[str, ...]:
        if not assets:
            if not self.catalog.default_assets:
                raise ParamError("assets: the catalog's items have no assets")
            return self.catalog.default_assets
        known = self.catalog.asset_names
        unknown = [a for a in assets if known and a not in known]
        if unknown:
            raise ParamError(
                f"assets: unknown {unknown}; this catalog has {list(self.catalog.asset_names)}"
            )
        return assets

    async def search(self, grid: Grid, query: SearchQuery, method: str = "first") -> SearchResult:
        """Items touching `grid`, in mosaic order, within the request's search limits capped
        by the server's (`max_items`, `max_scan`, `max_search_s`).

        `skipcovered` and `exitwhenfull` default to on for `first` (TiTiler-pgstac's
        defaults), where an item under newer full footprints cannot show; for the other
        methods every item counts, so they are off unless asked for. Where footprints promise
        more than the pixels hold, `complete` fills the gap.
        """
        bounds = grid.lonlat_bounds()
        first = method == "first"
        s = self.settings
        return await self.catalog.scan(
            dataclasses.replace(
                query,
                bbox=bounds,
                intersects=shapely.box(*bounds),
                limit=min(query.limit or s.max_items, s.max_items),
                scan_limit=min(query.scan_limit or s.max_scan, s.max_scan),
                time_limit=min(query.time_limit or s.max_search_s, s.max_search_s),
                exitwhenfull=first if query.exitwhenfull is None else query.exitwhenfull,
                skipcovered=first if query.skipcovered is None else query.skipcovered,
            )
        )

    async def plan(
        self,
        grid: Grid,
        query: SearchQuery,
        params: ReadParams,
        clock: StageClock | None = None,
        *,
        exclude: frozenset[str] = frozenset(),
    ) -> ReadPlan:
        """Search, open the headers and plan every item; items in `exclude` (already read)
        still count towards the item limit but are not planned again."""
        clock = clock or StageClock()
        assets = self.resolve_assets(params.assets)
        with clock.stage("search"):
            found = await self.search(
                grid, dataclasses.replace(query, assets=assets), params.method
            )
        items = [item for item in found.items if item.id not in exclude]
        hrefs = {
            item.assets[a] for item in items if not item.error for a in assets if a in item.assets
        }
        headers = await self._headers(hrefs, clock)
        return make_plan(
            grid,
            items,
            headers,
            assets=assets,
            method=params.method,
            resampling=params.resampling,
            search=found,
        )

    async def _headers(
        self, hrefs: set[str], clock: StageClock
    ) -> dict[str, Header | BaseException]:
        """Each COG header opened (concurrently), or the error that kept it from opening: a
        failed asset is its item's error in the plan, never the request's; cancellation is."""
        with clock.stage("headers"):
            opened = await asyncio.gather(
                *(self.fetcher.header(h) for h in hrefs), return_exceptions=True
            )
        headers: dict[str, Header | BaseException] = dict(zip(hrefs, opened, strict=True))
        for value in headers.values():
            if isinstance(value, asyncio.CancelledError):
                raise value
        return headers

    async def check(
        self, query: SearchQuery, params: ReadParams, *, headers: bool = True
    ) -> dict[str, Any] | None:
        """Refuse once what every read of this request would refuse: unknown assets, a filter
        or sortby the catalog cannot answer, bidx beyond the bands (ParamError/SearchError/
        FilterError). Returns the read's layout (`layout`), None when nothing matches.

        `headers=False` skips the layout when nothing in `params` depends on the bands
        (`ReadParams.uses_bands`): then no header can refuse the read, and a caller that only
        wants the refusal saves a store round trip before its first read."""
        self.resolve_assets(params.assets)
        await self.catalog.check(query)
        if not headers and not params.uses_bands:
            return None
        return await self.layout(query, params)

    async def layout(self, query: SearchQuery, params: ReadParams) -> dict[str, Any] | None:
        """The bands, dtype and band names a read with `params` returns, from the headers of
        the first item `query` matches that has every asset (no pixel read): what TileJSON
        and WMTS check a combination against before handing out URLs every tile would refuse.
        None when no item matches or its headers do not open (the tiles will say why).
        Catalogs whose items differ in band layout per asset are judged by that first item."""
        assets = self.resolve_assets(params.assets)
        found = await self.catalog.search(
            dataclasses.replace(query, assets=assets, limit=LAYOUT_SAMPLE, bbox=None)
        )
        sample = next(
            (i for i in found if not i.error and all(a in i.assets for a in assets)), None
        )
        if sample is None:
            return None
        headers = await self._headers({sample.assets[a] for a in assets}, StageClock())
        opened = [headers[sample.assets[a]] for a in assets]
        if any(isinstance(h, BaseException) for h in opened):
            return None
        reads = [
            BandSource(asset, h.count, h.dtype)
            for asset, h in zip(assets, opened, strict=True)
            if isinstance(h, Header)
        ]
        return band_layout(reads, params)

    # -- reading -----------------------------------------------------------------------------

    async def read(self, grid: Grid, query: SearchQuery, params: ReadParams) -> Mosaic | None:
        """Mosaic of every item covering `grid`; None when no item has data there. An
        algorithm runs on the mosaic in the pool; one that looks at neighbours (`buffer`)
        gets the grid that much larger and crops it back, so tiles meet without seams.

        At most `read_concurrency` reads run at once; the others wait (stage "queue"). Every
        read in progress puts its callbacks on the one event loop, which runs all the ready
        ones in each turn: 64 tiles at once made turns of ~60 ms (loop-lag p99 57-59 ms on the
        demo at 64 clients) without serving more (100-113 tiles/s); 16 at once: p99 17-26 ms,
        112-117 tiles/s, and over a 100 ms store 125 tiles/s at 64 clients where 64 at once
        gave 113 (bench/servers, 727 tiles). A tile waiting here costs nothing but its place."""
        clock = StageClock()
        with clock.stage("queue"):
            await self._reads.acquire()
        try:
            return await self._read(grid, query, params, clock)
        finally:
            self._reads.release()

    async def _read(
        self, grid: Grid, query: SearchQuery, params: ReadParams, clock: StageClock
    ) -> Mosaic | None:
        algorithm = params.algorithm
        read_grid = grid.buffered(getattr(algorithm, "buffer", 0)) if algorithm else grid
        plan = await self.plan_read(read_grid, query, params, clock)  # the pyramid's?
        mosaic = await self.complete(plan, query, params, clock)
        if mosaic is None or algorithm is None:
            return mosaic
        with clock.stage("algorithm"):
            mosaic.data, mosaic.valid = await self.compute.run(
                for_grid(algorithm, read_grid).apply, mosaic.data, mosaic.valid
            )
        return mosaic if mosaic.valid.any() else None

    async def complete(
        self, plan: ReadPlan, query: SearchQuery, params: ReadParams, clock: StageClock
    ) -> Mosaic | None:
        """`execute(plan)` with its holes filled (see `_fill_holes`). None when no item has data
        there; an empty mosaic (nothing valid) when a search limit left items out, so the
        caller can say the answer is incomplete rather than empty."""
        mosaic = await self._fill_holes(plan, query, params, clock)
        if mosaic is None and plan.truncated:
            g = plan.grid
            empty = np.zeros((g.height, g.width), dtype=bool)
            return Mosaic(data=empty[None].view(np.uint8), valid=empty, plan=plan, clock=clock)
        return mosaic

    async def _fill_holes(
        self, plan: ReadPlan, query: SearchQuery, params: ReadParams, clock: StageClock
    ) -> Mosaic | None:
        """`execute(plan)`, then, for `first`, fill what it left empty from the items the
        footprint shortcuts (skipcovered, exitwhenfull) left out.

        Footprints say where an item may have pixels, not where it has them: a footprint
        drawn around a nodata collar, or a newer item that failed to read, would otherwise
        leave a hole where an older item has data. The holes are filled by a second search
        without the shortcuts, reading only the items not read yet, in mosaic order — the
        result equals a read without shortcuts, which costs that much only where needed.
        """
        try:
            mosaic = await self.execute(plan, params, clock)
            failure = None
        except ReadFailed as exc:
            mosaic, failure = None, exc
        found = plan.search or {}
        shortcut = found.get("skipped_covered") or found.get("full")
        if params.method != "first" or not shortcut or (mosaic and mosaic.valid.all()):
            if failure:
                raise failure
            return mosaic
        done = frozenset(
            [i.item_id for i in plan.items] + [i for i, _ in (*plan.errors, *plan.skipped)]
        )
        everything = dataclasses.replace(query, skipcovered=False, exitwhenfull=False)
        rest = await self.plan(plan.grid, everything, params, clock, exclude=done)
        errors = list(mosaic.errors if mosaic else failure.errors if failure else [])
        layers = [mosaic] if mosaic else []
        try:
            more = await self.execute(rest, params, clock)  # rest's header errors included
        except ReadFailed as exc:
            errors += exc.errors
        else:
            if more is not None:
                layers.append(more)
                errors += more.errors
            else:
                errors += rest.errors
        if not layers:
            if errors:
                raise ReadFailed(errors)
            return None
        merged = dataclasses.replace(
            rest,
            items=plan.items + rest.items,
            skipped=plan.skipped + rest.skipped,
            errors=plan.errors + rest.errors,
        )
        if len(layers) == 1:
            data, valid = layers[0].data, layers[0].valid
        else:
            with clock.stage("mosaic"):
                whole = (0, 0, plan.grid.width, plan.grid.height)
                parts = [(m.data, m.valid, whole) for m in layers]
                shape = (plan.grid.height, plan.grid.width)
                data, valid = await self._mosaic(parts, "first", shape)
        return Mosaic(data=data, valid=valid, plan=merged, errors=errors, clock=clock)

    async def execute(
        self, plan: ReadPlan, params: ReadParams, clock: StageClock | None = None
    ) -> Mosaic | None:
        """Fetch and warp the plan's items concurrently, mosaic them in plan order.

        With `first`, once the layers done so far (in order) cover every pixel the remaining
        reads are cancelled: older items under a full mosaic are never fetched to the end.
        """
        clock = clock or StageClock()
        errors = list(plan.errors)
        if not plan.items:
            if errors:
                raise ReadFailed(errors)
            return None
        band_layout(plan.items[0].reads, params)  # bidx beyond the bands: a ParamError
        g = plan.grid
        target = Target(crs=g.crs, transform=tuple(g.transform)[:6], width=g.width, height=g.height)
        limit = asyncio.Semaphore(self.settings.request_concurrency)

        async def one(item: ItemRead) -> compute.Layer:
            async with limit:
                with clock.stage("fetch"):
                    pixels = await asyncio.gather(
                        *(self.fetcher.read(r, nodata=params.nodata) for r in item.reads)
                    )
                sources = [
                    Source.of(p.data, p.valid, r) for p, r in zip(pixels, item.reads, strict=True)
                ]
                scaling = _scaling(item) if params.unscale else None
                with clock.stage("warp"):
                    steps = params.item_steps(item.reads)
                    inline = scaling is None and not params.expression
                    if inline and compute.is_copy(sources, target, params.resampling):
                        return compute.warp_item(sources, target, params.resampling, steps)
                    return await self.compute.run(
                        compute.warp_item, sources, target, params.resampling, steps, scaling
                    )

        items = plan.items if METHODS[params.method].repeats_count else _distinct(plan.items)
        tasks = [asyncio.ensure_future(one(item)) for item in items]
        layers: list[compute.Layer | None] = [None] * len(tasks)
        early_exit = params.method == "first"
        covered = np.zeros((g.height, g.width), dtype=bool)
        next_in_order = 0
        try:
            for index, task in enumerate(tasks):
                try:
                    layers[index] = await task
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    errors.append((items[index].item_id, describe_error(exc)))
                if early_exit:
                    while next_in_order <= index:
                        layer = layers[next_in_order]
                        if layer is not None:
                            _, valid, (col, row, w, h) = layer
                            covered[row : row + h, col : col + w] |= valid
                        next_in_order += 1
                    if covered.all():
                        break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        done = [layer for layer in layers if layer is not None]
        if not done:
            raise ReadFailed(errors)
        bands = {d.shape[0] for d, _, _ in done}
        if len(bands) > 1:
            raise ParamError(
                f"assets: items have different band counts {sorted(bands)}; choose bands with bidx"
            )
        shape = (g.height, g.width)
        if len(done) == 1 and METHODS[params.method].identity_for_one:
            data, valid = compute.expand(done[0], shape)  # a copy into the grid at most
        else:
            with clock.stage("mosaic"):
                data, valid = await self._mosaic(done, params.method, shape)
        if not valid.any():
            return None
        return Mosaic(data=data, valid=valid, plan=plan, errors=errors, clock=clock)

    async def _mosaic(
        self, layers: list[compute.Layer], method: str, shape: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """`compute.mosaic` of these layers: on the loop when it is a small paste
        (`compute.is_paste`), else in the pool."""
        if compute.is_paste(layers, method):
            return compute.mosaic(layers, method, shape)
        return await self.compute.run(compute.mosaic, layers, method, shape)

    async def plan_read(
        self,
        grid: Grid,
        query: SearchQuery,
        params: ReadParams,
        clock: StageClock | None = None,
    ) -> ReadPlan:
        """The plan `read` executes: a tile the pyramid serves (see `Pyramid.serves`, and
        built from the catalog in use) is planned against its one block (source "pyramid"),
        anything else is `plan` over the catalog's items (source "dynamic")."""
        clock = clock or StageClock()
        tile = tile_zoom(grid) if self.pyramid is not None else None
        if tile is None or self.pyramid is None:
            return await self.plan(grid, query, params, clock)
        assets = self.resolve_assets(params.assets)
        resolved = ReadParams(
            assets=assets,
            method=params.method,
            resampling=params.resampling,
            nodata=params.nodata,
            unscale=params.unscale,
            expression=params.expression,  # band math runs per item: never the pyramid's
        )
        if not self.pyramid.serves(TMS, tile[0], query, resolved):
            return await self.plan(grid, query, params, clock)
        version = await self.catalog.version_async()  # built from the catalog in use?
        if not await self.pyramid.current_async(self.catalog, version):
            return await self.plan(grid, query, params, clock)
        with clock.stage("search"):
            items = await self.pyramid.catalog.search(self.pyramid.block_query(grid, *tile))
        hrefs = {h for item in items if not item.error for h in item.assets.values()}
        headers = await self._headers(hrefs, clock)
        plan = make_plan(
            grid, items, headers, assets=assets, method=params.method, resampling="nearest"
        )
        return self.pyramid.sourced(plan)

    # -- point values --------------------------------------------------------------------------

    async def point(
        self, lon: float, lat: float, query: SearchQuery, params: ReadParams
    ) -> list[dict[str, Any]]:
        """Each covering item's own pixel values at (lon, lat), in mosaic order.

        The same read path as a tile: a one-pixel lon/lat grid is planned (finest level, the
        window around the point) and fetched; the value is the source pixel holding the point,
        not a resampled one. Masked or nodata pixels come back as None.
        """
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise ParamError(f"lon,lat: ({lon}, {lat}) is outside -180..180, -90..90")
        eps = 1e-7
        grid = Grid.from_bounds("EPSG:4326", (lon - eps, lat - eps, lon + eps, lat + eps), 1, 1)
        # every covering item has a value here, covered by a newer footprint or not
        query = dataclasses.replace(query, skipcovered=False, exitwhenfull=False)
        plan = await self.plan(grid, query, params)

        async def one(item: ItemRead) -> dict[str, Any]:
            assets: dict[str, Any] = {}
            fetched = await asyncio.gather(
                *(self.fetcher.read(r, nodata=params.nodata) for r in item.reads)
            )  # an item's assets concurrently, as execute() reads them
            for read, pixels in zip(item.reads, fetched, strict=True):
                x, y = transformer("EPSG:4326", read.crs).transform(lon, lat)
                # in the level's own pixel grid (as rasterio's `index`), then into the window:
                # the window's transform is shifted in floating point and can put an exact
                # pixel edge (256.0) a hair to its left
                level = (await self.fetcher.header(read.href)).levels[read.level]
                full_col, full_row = (math.floor(v) for v in ~level.transform * (x, y))
                col, row = full_col - read.window[0], full_row - read.window[1]
                inside = 0 <= row < pixels.data.shape[1] and 0 <= col < pixels.data.shape[2]
                valid = inside and bool(pixels.valid[row, col])
                values = pixels.data[:, row, col] if inside else [None] * read.count
                if inside and params.unscale:  # as tiles do: float32, after the read
                    values = values.astype(np.float32) * np.asarray(read.scales) + read.offsets
                    values = values.astype(np.float32)
                values = values.tolist() if inside else values
                assets[read.asset] = {
                    "values": [v if valid else None for v in values],
                    "band_names": [f"b{i}" for i in range(1, read.count + 1)],
                    "level": read.level,
                }
            out: dict[str, Any] = {**_about(item), "assets": assets}
            steps = params.item_steps(item.reads)
            if steps:  # bidx or an expression: the item's output bands, as a tile has them
                stacked = [v for r in item.reads for v in assets[r.asset]["values"]]
                names = band_layout(item.reads, params)["names"]
                values: list[float | None] = [None] * len(names)
                if all(v is not None for v in stacked):
                    data = np.asarray(stacked, dtype=np.float64).reshape(-1, 1, 1)
                    result, _ = process_run(steps, data, np.ones((1, 1), dtype=bool))
                    values = [v if math.isfinite(v) else None for v in result[:, 0, 0].tolist()]
                out.update(values=values, band_names=names)
            return out

        results = await asyncio.gather(*(one(i) for i in plan.items), return_exceptions=True)
        out = []
        for item, result in zip(plan.items, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                out.append({**_about(item), "error": describe_error(result)})
            else:
                out.append(result)
        out += [{"id": i, "error": e} for i, e in plan.errors]
        return out


class BandSource(NamedTuple):
    """What `band_layout` needs of an asset read: its name, band count and dtype."""

    asset: str
    count: int
    dtype: str


def band_layout(
    reads: Sequence[AssetRead | BandSource], params: ReadParams, dtype: str | None = None
) -> dict[str, Any]:
    """Bands, dtype and band names a read of one item's `reads` returns with `params`,
    decided without pixels: one rule for the plan's layout (lazy clients), the bidx check of
    every read, and the check TileJSON and WMTS make. Band names as odc-stac gives them: the
    asset's name, "asset.N" for a multi-band asset. Raises ParamError for a bidx beyond the
    bands."""
    names = [
        name
        for r in reads
        for name in (
            [r.asset] if r.count == 1 else [f"{r.asset}.{b}" for b in range(1, r.count + 1)]
        )
    ]
    if params.unscale:  # scale/offset applied in float32 (compute.warp_item)
        layer = np.dtype("float32")
    else:
        layer = np.result_type(*(np.dtype(r.dtype) for r in reads))
    try:
        names, layer = item_layout(params.item_steps(reads), names, layer)
    except ProcessError as exc:  # each step's message names the parameter and the fix
        raise ParamError(str(exc)) from exc
    out = METHODS[params.method].output_dtype(layer)
    if params.algorithm is not None:  # after the mosaic, on its bands
        try:
            names, out = params.algorithm.layout(names, out)
        except ProcessError as exc:
            raise ParamError(str(exc)) from exc
    out = np.dtype(dtype) if dtype else out
    return {"bands": len(names), "dtype": out.str, "names": names}


def _distinct(items: tuple[ItemRead, ...]) -> list[ItemRead]:
    """Items in order, without those whose reads (same COG windows, levels, nodata and
    scaling) equal an earlier item's: items sharing a COG yield the same layer."""
    seen: set[tuple] = set()
    out = []
    for item in items:
        if item.reads not in seen:
            seen.add(item.reads)
            out.append(item)
    return out


def _scaling(item: ItemRead) -> list[tuple[float, float]]:
    """(scale, offset) of each band of the item, in the order warp_item stacks them."""
    return [p for r in item.reads for p in zip(r.scales, r.offsets, strict=True)]


def _about(item: ItemRead) -> dict[str, Any]:
    return {"id": item.item_id, "collection": item.collection, "datetime": item.datetime}
