"""A catalog's lifecycle: build a searchable snapshot of the source, notice a replaced one,
validate it, swap.

Why a snapshot, not the parquet file itself: a search over a 1M-item file read in place
scans every bbox (~190 ms); loaded as a table in memory it costs ~6x the file in RAM. A
snapshot is a DuckDB database built once per catalog version from the parquet parts:

- rows sorted by a Z-order key of the bbox centre, with the bbox also as flat columns, so
  DuckDB's zone maps skip every row group away from the searched box (12 ms at 1M items
  instead of 190) and a search reads only the rows it returns;
- on disk in the cache directory (`catalog_cache`), opened read-only and paged in by DuckDB's
  buffer manager under `catalog_memory_mb`: the RSS does not grow with the catalog, and a
  restart opens the built database in milliseconds (the file name is the digest of the
  source's parts and stamps, so a changed catalog is a new file); or in memory for small
  catalogs (below IN_MEMORY_MAX_BYTES of parquet, unless told otherwise: 50 MB of
  Sentinel-2-shaped parquet, 200k items, took 1.2 GB in memory against 0.76 GB on disk);
- with what start-up needs precomputed once per version: the href groups the access policy
  is derived from and the content problems of the start-up report.

A replacement is taken only once it builds: a broken or half-written file is logged and the
snapshot in use stays. Searches that run during a rebuild keep the old snapshot; the one
before last is detached after the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb

from core import filters, schema
from core.catalog import sql
from core.catalog.query import SearchQuery
from core.catalog.sources import Part, Source

log = logging.getLogger("terrazzo.catalog")

FORMAT = 1  # the snapshot layout; a cached database of another format is rebuilt
IN_MEMORY_MAX_BYTES = 16 << 20  # parquet below this is snapshotted in memory by default
_SPREAD = (  # Morton bit spreading of a 16-bit integer (interleave with zeros)
    (8, 0x00FF00FF),
    (4, 0x0F0F0F0F),
    (2, 0x33333333),
    (1, 0x55555555),
)


def _spread(v: str) -> str:
    for shift, mask in _SPREAD:
        v = f"(({v} | ({v} << {shift})) & {mask})"
    return v


def _zorder() -> str:
    """A Z-order key of the bbox centre on a 65536² lon/lat grid (NULL for no bbox)."""
    cells = []
    for lo, hi, span in (("bbox.xmin", "bbox.xmax", 360.0), ("bbox.ymin", "bbox.ymax", 180.0)):
        shift = 180.0 if span == 360.0 else 90.0
        centre = f"(({lo} + {hi}) / 2 + {shift}) / {span} * 65535"
        cells.append(f"least(greatest(floor({centre}), 0), 65535)::BIGINT")
    x, y = (f"(CASE WHEN isfinite({c}) THEN {c} END)" for c in cells)
    return f"({_spread(x)} | ({_spread(y)} << 1))"


def digest(spec: str, parts: list[Part], in_memory: bool) -> str:
    text = "\n".join(
        [f"format {FORMAT}", spec, str(in_memory), *(f"{p.key} {p.stamp}" for p in parts)]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Snapshots:
    """The snapshot in use (`items` view over `snap_<n>.items`) and the cursors over it."""

    def __init__(
        self,
        source: Source,
        *,
        cache: Path,
        threads: int = 2,
        in_memory: bool | None = None,
        memory_mb: int = 1024,
    ) -> None:
        self.source = source
        self.cache = Path(cache)
        self.in_memory_setting = in_memory
        self._generation = 0
        self._root = duckdb.connect(config={"threads": 1})
        self.memory_mb = int(memory_mb)
        self._root.execute(f"SET memory_limit = '{self.memory_mb}MB'")
        # what does not fit (a build's sort, an in-memory snapshot's overflow) spills here,
        # not into the working directory
        spill = self.cache / "tmp"
        spill.mkdir(parents=True, exist_ok=True)
        self._root.execute(f"SET temp_directory = '{sql.string(str(spill))}'")
        _settings(self._root)
        self._attached: list[tuple[str, Path | None]] = []
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="terrazzo-search")
        self._stamp = self._open_snapshot(source.list())
        self._checked = time.monotonic()
        self.after_swap()

    def after_swap(self) -> None:
        """Refresh what is derived from the snapshot (asset names...); see the backend."""

    # -- building ------------------------------------------------------------------------------

    def _open_snapshot(self, listed: list[Part]) -> str:
        """Build (or open the cached) snapshot of `listed` parts and point `items` at it."""
        parts = self.source.fetch(listed)
        size = sum(os.path.getsize(p.path) for p in parts)
        in_memory = (
            size <= IN_MEMORY_MAX_BYTES
            if self.in_memory_setting is None
            else self.in_memory_setting
        )
        key = digest(self.source.spec, parts, in_memory)
        self._generation += 1
        alias = f"snap_{self._generation}"
        started = time.monotonic()
        if in_memory:
            self._root.execute(f"ATTACH ':memory:' AS {alias}")
            # the sort may need more than the serving limit; the table stays in RAM anyway
            self._root.execute("RESET memory_limit")
            try:
                build(self._root, alias, parts, self.source.hive, self.source.spec)
            except BaseException:
                self._root.execute(f"DETACH {alias}")
                raise
            finally:
                self._root.execute(f"SET memory_limit = '{self.memory_mb}MB'")
            path = None
        else:
            path = self._disk_snapshot(key, parts)
            self._root.execute(f"ATTACH '{sql.string(str(path))}' AS {alias} (READ_ONLY)")
        columns = {
            row[0]: row[1]
            for row in self._root.execute(f"DESCRIBE SELECT * FROM {alias}.items").fetchall()
        }
        self._root.execute(f"CREATE OR REPLACE VIEW items AS SELECT * FROM {alias}.items")
        self._root.execute(f"CREATE OR REPLACE VIEW hrefs AS SELECT * FROM {alias}.hrefs")
        self._root.execute(f"CREATE OR REPLACE VIEW problems AS SELECT * FROM {alias}.problems")
        self.columns = {k: v for k, v in columns.items() if k not in sql.BBOX}
        self.parts = parts
        self.snapshot_path = path
        self.in_memory = in_memory
        self._attached.append((alias, path))
        while len(self._attached) > 2:  # the one before last may still serve running searches
            old, old_path = self._attached.pop(0)
            self._root.execute(f"DETACH {old}")
            if old_path is not None and old_path != path:
                with contextlib.suppress(OSError):
                    old_path.unlink()
        log.info(
            "catalog %s: snapshot %s (%s, %d parts, %.1f s)",
            self.source.spec,
            key,
            "memory" if in_memory else path,
            len(parts),
            time.monotonic() - started,
        )
        return key

    def _disk_snapshot(self, key: str, parts: list[Part]) -> Path:
        """The database file of this version, built unless a finished one is cached (one
        builder at a time across processes: server workers share the cache)."""
        folder = self.cache / "snapshots"
        folder.mkdir(parents=True, exist_ok=True)
        family = hashlib.sha256(self.source.spec.encode()).hexdigest()[:12]
        path = folder / f"{family}-{key}.duckdb"
        with open(folder / f"{family}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.is_file():
                return path
            tmp = path.with_suffix(f".building-{os.getpid()}")
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            _build_in_child(tmp, parts, self.source.hive, self.source.spec, self.cache / "tmp")
            os.replace(tmp, path)
            in_use = {p for _, p in self._attached}
            for old in folder.glob(f"{family}-*.duckdb"):  # earlier versions of this source
                if old != path and old not in in_use:
                    with contextlib.suppress(OSError):  # a process reading it keeps its copy
                        old.unlink()
            return path

    # -- noticing a replaced catalog -------------------------------------------------------------

    @property
    def version(self) -> str:
        """The snapshot in use (the digest of the source's parts and their stamps)."""
        return self._stamp

    async def version_async(self) -> str:
        """Which catalog version is in use, after taking a replaced one: part of every tile's
        ETag, so a new catalog changes them all. On a search thread (the check may list an
        object store). Between checks (`refresh_s`) no thread hop: it was one per tile."""
        if time.monotonic() - self._checked < self.source.refresh_s:
            return self._stamp
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self.reload_if_replaced)
        return self._stamp

    def reload_if_replaced(self, every_s: float | None = None) -> bool:
        """Switch to a catalog that replaced ours (e.g. `terrazzo index` renames its output
        into place, or a new object is put at the URL), once it builds; a broken or
        half-written file is ignored and the snapshot in use is kept. Checked at most every
        `every_s` seconds (the source's refresh interval by default)."""
        now = time.monotonic()
        if now - self._checked < (self.source.refresh_s if every_s is None else every_s):
            return False
        self._checked = now
        try:
            listed = self.source.list()
        except Exception as exc:  # a source that cannot be listed now: keep serving
            log.warning(
                "catalog %s cannot be listed (%s); keeping the one in use", self.source.spec, exc
            )
            return False
        with self._lock:
            if digest(self.source.spec, listed, self.in_memory) == self._stamp:
                return False
            if getattr(self, "_refused_listing", None) == listed:
                return False  # the same broken version: do not rebuild until it changes
            try:
                self._stamp = self._open_snapshot(listed)
            except Exception as exc:
                log.warning(
                    "catalog %s changed but does not read (%s); keeping the old one",
                    self.source.spec,
                    exc,
                )
                self._refused_listing = listed
                return False
            self._refused_listing = None
            self.after_swap()
        count, examples = self.problems()
        log.warning(
            "catalog %s reloaded; %d items cannot be served%s",
            self.source.spec,
            count,
            "".join(f"; {i}: {why}" for i, why in examples),
        )
        return True

    def problems(self, examples: int = 5) -> tuple[int, list[tuple[str, str]]]:
        """Items whose own content cannot be served: (how many, a few (id, why))."""
        rows = self._root.execute(
            f"SELECT total, id, why FROM problems LIMIT {examples}"
        ).fetchall()
        return (rows[0][0] if rows else 0), [(i, w) for _, i, w in rows]

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for cursor in self._cursors:
            cursor.close()
        self._root.close()

    def _fetch(self, sql: str, params: list[Any], query: SearchQuery) -> list[tuple[Any, ...]]:
        """Run a search on this thread's cursor. A filter's values reach DuckDB as bound
        parameters, so a value DuckDB cannot cast (`eo:cloud_cover < 'x'`) fails here: that is
        the user's filter, a 400 that quotes DuckDB's reason, not a server error."""
        try:
            return self._cursor().execute(sql, params).fetchall()
        except (
            duckdb.ConversionException,
            duckdb.BinderException,
            duckdb.InvalidInputException,
        ) as exc:
            if query.filter is None:
                raise
            reason = str(exc).splitlines()[0]
            raise filters.FilterError(f"filter: the catalog cannot evaluate it ({reason})") from exc

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's own cursor: a DuckDB connection runs one query at a time."""
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._lock:
                cursor = self._root.cursor()
                cursor.execute("SET TimeZone = 'UTC'")  # per connection, like the root's
                self._cursors.append(cursor)
            self._local.cursor = cursor
        return cursor


def href_groups_sql(alias: str, names: list[str]) -> str:
    """One row per (asset, group) of hrefs, for the access policy and its report: remote
    hrefs grouped by store (scheme://bucket/, or scheme://host/first-segment/ for HTTP),
    local and relative ones by directory. A few rows for an object-store catalog, whatever
    its folder layout."""
    if not names:
        return (
            "SELECT NULL::VARCHAR AS asset, NULL::VARCHAR AS grp, 0::BIGINT AS items,"
            " NULL::VARCHAR AS example LIMIT 0"
        )
    selects = []
    for name in names:
        href = f"assets.{sql.quote(name)}.href"
        group = (
            f"CASE WHEN regexp_matches({href}, '^https?://') THEN"
            f" regexp_extract({href}, '^(https?://[^/]*/(?:[^/]+/)?)', 1)"
            f" WHEN regexp_matches({href}, '^[a-z][a-z0-9+.-]*://') THEN"
            f" regexp_extract({href}, '^([a-z][a-z0-9+.-]*://[^/]*/)', 1)"
            f" ELSE regexp_extract({href}, '^(.*)/', 1) END"
        )
        selects.append(
            f"SELECT '{sql.string(name)}' AS asset, {group} AS grp, count(*) AS items,"
            f" min({href}) AS example FROM {alias}.items WHERE {href} IS NOT NULL GROUP BY grp"
        )
    return " UNION ALL ".join(selects)


def _settings(con: duckdb.DuckDBPyConnection) -> None:
    """The session settings of every catalog connection:
    - geometries stay WKB bytes: DuckDB's GeoParquet conversion parses every geometry at load
      and one garbage WKB fails the whole catalog; shapely checks each item instead;
    - TIMESTAMPTZ values reach Python in the session's zone, the machine's by default: UTC, so
      a server under TZ=Asia/Tokyo labels an item 23:00Z as 23:00Z;
    - every query that needs an order says so (ORDER BY), so DuckDB may stream the rest (a
      build's sort fits its memory limit only then)."""
    con.execute("SET enable_geoparquet_conversion = false")
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = false")


def build(
    con: duckdb.DuckDBPyConnection, alias: str, parts: list[Part], hive: bool, spec: str
) -> None:
    """Read the parts through the schema layer into `alias`.items (sorted along the Z-order
    key, flat bbox), then the start-up summaries. Raises schema.SchemaError for a catalog it
    cannot serve."""
    files = ", ".join(f"'{sql.string(p.path)}'" for p in parts)
    options = (
        "hive_partitioning = true, union_by_name = true" if hive else "hive_partitioning = false"
    )
    scan = f"read_parquet([{files}], {options})"
    bounds = "derived_bounds"
    con.execute(f"SET threads = {max(1, os.cpu_count() or 1)}")  # the build may use all
    try:
        raw = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()}
        schema.check(spec, raw)
        normalised, _ = schema.select(scan, raw, bounds)
        if "bbox" not in raw:  # only a geometry: derive each item's bbox from it
            derived = schema.derive_bbox(
                lambda: con.sql(f"SELECT geometry::BLOB FROM {scan}").to_arrow_table()
            )
            con.register("derived_bbox", derived)
            con.execute(f"CREATE OR REPLACE TEMP TABLE {bounds} AS SELECT * FROM derived_bbox")
            con.unregister("derived_bbox")
        flat = ", ".join(
            f"bbox.{k} AS {c}"
            for k, c in zip(("xmin", "ymin", "xmax", "ymax"), sql.BBOX, strict=True)
        )
        con.execute(
            f"CREATE TABLE {alias}.items AS SELECT *, {flat} FROM ({normalised})"
            f" ORDER BY {_zorder()} NULLS LAST"
        )
        con.execute(f"DROP TABLE IF EXISTS {bounds}")
        columns = {
            r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {alias}.items").fetchall()
        }
        names = asset_names(con, f"{alias}.items", columns)
        con.execute(f"CREATE TABLE {alias}.hrefs AS {href_groups_sql(alias, names)}")
        con.execute(f"CREATE TABLE {alias}.problems AS {problems_sql(alias, columns, names)}")
    except duckdb.Error as exc:
        reason = str(exc).splitlines()[0]
        raise schema.SchemaError(f"{spec}: cannot be read ({reason})") from exc
    finally:
        con.execute("SET threads = 1")


def _build_in_child(out: Path, parts: list[Part], hive: bool, spec: str, spill: Path) -> None:
    """`build` into the database file `out` in a child process: a build sorts every row (GBs
    at 10M items, spilled under DuckDB's default memory limit), and that memory goes back to
    the system when the child exits instead of staying in the server's heap."""
    job = {"out": str(out), "parts": [p.path for p in parts], "hive": hive, "spec": spec}
    job["spill"] = str(spill)
    done = subprocess.run(
        [sys.executable, "-m", "core.catalog.snapshot", json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        return
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    message = lines[-1] if lines else f"exit status {done.returncode}"
    if done.returncode == 2:  # the child's SchemaError: the catalog, not the machine
        raise schema.SchemaError(message)
    raise RuntimeError(f"{spec}: building the catalog snapshot failed ({message})")


def _child(job: dict[str, Any]) -> int:
    con = duckdb.connect(config={"temp_directory": job["spill"]})
    try:
        _settings(con)
        con.execute(f"ATTACH '{sql.string(job['out'])}' AS built")
        parts = [Part(str(i), "", path) for i, path in enumerate(job["parts"])]
        build(con, "built", parts, job["hive"], job["spec"])
        con.execute("DETACH built")
    except schema.SchemaError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    finally:
        con.close()
    return 0


def asset_names(
    con: duckdb.DuckDBPyConnection, relation: str, columns: dict[str, str]
) -> list[str]:
    """The asset names of a STRUCT `assets` column (a struct has the same fields in every
    row); none for a MAP, whose keys vary by item."""
    if not columns.get("assets", "").upper().startswith("STRUCT"):
        return []
    rows = con.execute(
        f"SELECT unnest(json_keys(to_json(assets))) FROM (SELECT assets FROM {relation} LIMIT 1)"
    ).fetchall()
    return [r[0] for r in rows]


def problems_sql(alias: str, columns: dict[str, str], names: list[str]) -> str:
    """Items whose own content cannot be served — for the start-up report. One vectorised
    pass (no per-item Python): a missing id, a bbox that is not four finite numbers, a missing
    or non-WKB geometry (its header bytes; a garbage body is caught per item by the search),
    a datetime Python cannot hold, an href with a NUL byte. Such items stay item errors
    wherever they match."""
    box = " AND ".join(f"isfinite(bbox.{k})" for k in ("xmin", "ymin", "xmax", "ymax"))
    checks = [
        ("id IS NULL", "no id"),
        (f"bbox IS NULL OR NOT ({box})", "bbox is not four finite numbers"),
        (
            "geometry IS NULL OR octet_length(geometry::BLOB) < 9"
            " OR hex((geometry::BLOB)[1:1]) NOT IN ('00', '01')",
            "geometry is missing or not WKB",
        ),
    ]
    for name in schema.TIME_COLUMNS:
        if name in columns and columns[name].upper().startswith("TIMESTAMP"):
            checks.append(
                (f"{name} NOT BETWEEN {sql.TIME_MIN} AND {sql.TIME_MAX}", f"{name} out of range")
            )
    for name in names:
        checks.append(
            (f"contains(assets.{sql.quote(name)}.href, chr(0))", f"asset {name}: NUL in href")
        )
    reason = "CASE " + " ".join(f"WHEN {c} THEN '{sql.string(w)}'" for c, w in checks)
    return (
        f"SELECT count(*) OVER () AS total, coalesce(id, '(no id)') AS id, why FROM"
        f" (SELECT id, {reason} END AS why FROM {alias}.items) WHERE why IS NOT NULL LIMIT 5"
    )


def check_catalog(spec: str | os.PathLike[str], cache: Path | None = None) -> None:
    """Raise a one-line error if `spec` names no catalog Terrazzo can serve, before a server
    starts building its snapshot: the source must list parquet files, and local ones must
    have a servable schema (DESCRIBE reads their footers only)."""
    from core.catalog.sources import resolve

    source = resolve(spec, cache or Path(tempfile.gettempdir()))
    parts = source.list()
    if source.root is None:
        return  # remote: the schema is checked when the snapshot is built
    con = duckdb.connect(config={"threads": 1})
    try:
        con.execute("SET enable_geoparquet_conversion = false")
        files = ", ".join(f"'{sql.string(p.path)}'" for p in parts)
        options = (
            "hive_partitioning = true, union_by_name = true"
            if source.hive
            else ("hive_partitioning = false")
        )
        try:
            rows = con.execute(
                f"DESCRIBE SELECT * FROM read_parquet([{files}], {options})"
            ).fetchall()
        except duckdb.Error as exc:
            raise schema.SchemaError(
                f"{spec}: not a readable parquet file ({str(exc).splitlines()[0]})"
            ) from exc
        schema.check(os.fspath(spec), {row[0]: row[1] for row in rows})
    finally:
        con.close()


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
