"""The `terrazzo` command line: serve, index, demo, overviews, plan, bench."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

DEFAULT_DEMO_DIR = Path(os.environ.get("TERRAZZO_DEMO_DIR", "data/demo"))


def _serve(args: argparse.Namespace) -> int:
    import core.lean_imports  # noqa: F401  this process runs no user code: no xarray/pandas

    if args.workers == 1:  # the compute workers' imports overlap the app's (app.warm)
        from app.warm import WARM_MODULES
        from core.compute import start_forkserver

        start_forkserver(WARM_MODULES)
    import uvicorn

    from app.logs import configure
    from app.main import create_app
    from core.settings import Settings

    overrides = {
        name: value
        for name in Settings.model_fields
        if name != "allow" and (value := getattr(args, name, None)) is not None
    }
    if args.allow:
        overrides["allow"] = ",".join([os.environ.get("TERRAZZO_ALLOW", ""), *args.allow])
    settings = Settings(**overrides)
    if settings.catalog is None:
        print(
            "terrazzo serve: no catalog; pass --catalog PATH or set TERRAZZO_CATALOG",
            file=sys.stderr,
        )
        return 2
    if args.workers < 1:
        print("terrazzo serve: --workers must be at least 1", file=sys.stderr)
        return 2
    from core.catalog import check_catalog

    try:  # a catalog that cannot be served is one line naming the column, not a traceback
        check_catalog(settings.catalog)
    except (ValueError, FileNotFoundError) as exc:
        print(f"terrazzo serve: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_format, settings.log_level)
    print("terrazzo settings:", json.dumps(settings.public()), flush=True)
    from app.protocol import ENV as HEADER_TIMEOUT_ENV
    from app.protocol import HeaderTimeoutProtocol

    os.environ[HEADER_TIMEOUT_ENV] = str(settings.header_timeout_s)  # workers inherit it
    common: dict[str, Any] = {
        "http": HeaderTimeoutProtocol,  # slow request heads are cut off (app.protocol)
        "host": settings.host,
        "port": settings.port,
        "root_path": settings.root_path,
        "log_config": None,  # app.logs configured the loggers (worker_app does in workers)
        "access_log": False,  # the observer middleware logs each request with its id
    }
    if args.workers == 1:
        uvicorn.run(create_app(settings), **common)
        return 0
    # Several server processes under uvicorn's supervisor, which replaces one that dies (a
    # native crash in the server process itself) within about a second. Workers are spawned
    # processes that import the app by name, so the settings travel as TERRAZZO_* variables.
    os.environ.update(settings_environ(settings))
    uvicorn.run("app.cli:worker_app", factory=True, workers=args.workers, **common)
    return 0


def settings_environ(settings: Any) -> dict[str, str]:
    """`settings` as the TERRAZZO_* environment variables that rebuild it in another process
    (flags given to `terrazzo serve` included)."""
    out = {}
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            out[f"TERRAZZO_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def worker_app() -> Any:
    """The app of one `terrazzo serve --workers N` process (uvicorn's factory): settings from
    the environment `_serve` exported, logs configured as in the parent."""
    from app.logs import configure
    from app.main import create_app
    from core.settings import Settings

    settings = Settings()
    configure(settings.log_format, settings.log_level)
    return create_app(settings)


def _setting_flags(parser: argparse.ArgumentParser) -> None:
    """A --flag for every setting (TERRAZZO_* env var), with its description and default."""
    from core.settings import Settings

    for name, field in Settings.model_fields.items():
        if name == "allow":  # repeatable, merged with TERRAZZO_ALLOW (see its own flag)
            continue
        common = {
            "dest": name,
            "default": None,
            "help": f"{field.description or ''} (default {field.default}; "
            f"env TERRAZZO_{name.upper()})",
        }
        if field.annotation in (bool, bool | None):
            kind = {"action": argparse.BooleanOptionalAction}
        else:
            kind = {
                "type": {int: int, float: float}.get(field.annotation, str),  # type: ignore[call-overload]
                "metavar": name.split("_")[-1].upper(),
            }
        parser.add_argument(f"--{name.replace('_', '-')}", **common, **kind)


BENCHMARKS = ("tiles", "remote", "chunks", "search", "load", "catalog", "sdk")


def _bench(args: argparse.Namespace) -> int:
    """Run bench/<name>.py from the source tree (benchmarks are not part of the wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / f"{args.name}.py").exists():
        print(f"terrazzo bench: no bench/{args.name}.py under {root}", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", f"bench.{args.name}", *args.args]
    return subprocess.call(command, cwd=root)


def _index(args: argparse.Namespace) -> int:
    from core.indexing import index_items

    count = index_items(Path(args.source), Path(args.output), row_group_size=args.row_group_size)
    print(f"wrote {count} items to {args.output}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from core.demo import build_demo

    out = Path(args.output)
    catalog = out / "items.parquet"
    if catalog.exists() and not args.force:
        print(f"demo catalog already at {catalog} (use --force to rebuild)")
        return 0
    print(f"demo catalog written to {build_demo(out, size=args.size)}")
    return 0


def _overviews(args: argparse.Namespace) -> int:
    from core.overviews import build

    split = lambda text: tuple(v for v in (text or "").split(",") if v.strip())  # noqa: E731
    report = build(
        args.catalog,
        Path(args.out),
        assets=split(args.assets),
        method=args.method,
        max_zoom=args.max_zoom,
        datetime=args.datetime,
        collections=split(args.collections),
        filter=args.filter,
        sortby=split(args.sortby),
        dask=args.dask,
        echo=lambda line: print(line, flush=True),
    )
    print("\n".join(report.lines()))
    return 0


def _plan(args: argparse.Namespace) -> int:
    from core.catalog import SearchQuery, parse_datetime_range
    from core.engine import Engine, ReadParams
    from core.plan import tile_grid
    from core.settings import Settings

    z, x, y = (int(v) for v in args.tile.split("/"))
    settings = Settings(**({"catalog": args.catalog} if args.catalog else {}))
    engine = Engine(settings)
    try:
        grid = tile_grid(args.tms, z, x, y, args.tilesize)
        query = SearchQuery(datetime=parse_datetime_range(args.datetime) if args.datetime else None)
        params = ReadParams(
            assets=tuple(a for a in (args.assets or "").split(",") if a),
            method=args.method,
            resampling=args.resampling,
        )
        plan = asyncio.run(engine.plan(grid, query, params))
        print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.describe())
    finally:
        engine.close()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="terrazzo", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "serve",
        help="Serve tiles and chunks for a STAC-GeoParquet catalog.",
        description="Serve a catalog. Every setting is a flag here and an env var "
        "TERRAZZO_<NAME>; flags win. The settings in use are printed at start-up.",
    )
    _setting_flags(s)
    s.add_argument(
        "--allow",
        action="append",
        metavar="PREFIX",
        help="Also allow reads under this directory or URL prefix (repeatable; "
        "env TERRAZZO_ALLOW, comma-separated). Needed for internal hosts.",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("TERRAZZO_WORKERS", "1")),
        metavar="N",
        help="Server processes under uvicorn's supervisor, which restarts one that dies; "
        "each has its own engine and compute pool (default 1; env TERRAZZO_WORKERS).",
    )
    s.set_defaults(run=_serve)

    i = sub.add_parser(
        "index",
        help="Turn STAC items (JSON, NDJSON, ItemCollection) into "
        "STAC-GeoParquet laid out for fast search.",
    )
    i.add_argument("source", help="Items file: .json (Item/ItemCollection) or .ndjson.")
    i.add_argument("-o", "--output", required=True, help="Parquet file to write.")
    i.add_argument(
        "--row-group-size",
        type=int,
        default=5000,
        help="Rows per row group (small groups prune better on bbox).",
    )
    i.set_defaults(run=_index)

    d = sub.add_parser("demo", help="Write the demo catalog: real COGs in three UTM zones.")
    d.add_argument("-o", "--output", default=str(DEFAULT_DEMO_DIR), help="Directory.")
    d.add_argument("--size", type=int, default=1024, help="Pixels per image side.")
    d.add_argument("--force", action="store_true", help="Rebuild even if present.")
    d.set_defaults(run=_demo)

    o = sub.add_parser(
        "overviews",
        help="Pre-render low zooms (WebMercatorQuad 0..Z) as a pyramid terrazzo serve "
        "--pyramid uses.",
        description="Render zooms 0..Z of CATALOG through the engine's read path into DIR: one "
        "COG per block (the tile at zoom max(z-4, 0), zoom-z pixels), pyramid.parquet (a "
        "STAC-GeoParquet of the blocks) and pyramid.json (the recipe and a fingerprint of the "
        "source items per block). Run it again to re-render only the blocks whose items "
        "changed. Serve with terrazzo serve --pyramid DIR: tiles of the same request at zooms "
        "<= Z are then read from the blocks.",
    )
    o.add_argument(
        "catalog", help="STAC-GeoParquet: a file, a directory or glob of parquet files, or a URL."
    )
    o.add_argument("--out", required=True, metavar="DIR", help="Pyramid directory.")
    o.add_argument("--assets", help="Comma-separated assets (default: the first image asset).")
    o.add_argument("--method", default="first", help="Mosaic method (default first).")
    o.add_argument(
        "--max-zoom",
        type=int,
        metavar="Z",
        help="Finest zoom rendered. Default: the coarsest zoom at which every 256-px tile's "
        "bbox touches at most 50 items, or the catalog's native zoom if that comes first "
        "(at most 12); the output says which.",
    )
    o.add_argument("--datetime", help="As the tile routes' datetime.")
    o.add_argument("--collections", help="Comma-separated collection ids.")
    o.add_argument("--filter", help="CQL2-text or CQL2-JSON, as the tile routes' filter.")
    o.add_argument("--sortby", default="-datetime", help="Mosaic order (default -datetime).")
    o.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="Render on a dask.distributed cluster (scheduler address, or 'local' for a "
        "LocalCluster of 2 workers); workers need the same paths. Needs dask[distributed].",
    )
    o.set_defaults(run=_overviews)

    pl = sub.add_parser("plan", help="Print the read plan of a tile: items, levels, windows.")
    pl.add_argument("tile", help="z/x/y")
    pl.add_argument(
        "--catalog", help="STAC-GeoParquet file, directory, glob or URL (env TERRAZZO_CATALOG)."
    )
    pl.add_argument("--tms", default="WebMercatorQuad")
    pl.add_argument("--tilesize", type=int, default=256)
    pl.add_argument("--assets", help="Comma-separated asset names.")
    pl.add_argument("--datetime")
    pl.add_argument("--method", default="first")
    pl.add_argument("--resampling", default="nearest")
    pl.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    pl.set_defaults(run=_plan)

    b = sub.add_parser(
        "bench",
        help="Run a benchmark against rio-tiler/GDAL in one process tree (source tree only).",
        description="tiles: local tiles vs rio-tiler mosaic_reader; remote: tiles over HTTP "
        "with a delay vs GDAL /vsicurl/; chunks: bulk chunks vs rasterio warps; search: 10k "
        "vs 1M items; load: 64 clients against a real server. Extra arguments go to the "
        "benchmark (e.g. terrazzo bench tiles -- --help).",
    )
    b.add_argument("name", choices=BENCHMARKS)
    b.add_argument("args", nargs=argparse.REMAINDER, help="Passed to the benchmark.")
    b.set_defaults(run=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"terrazzo {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
