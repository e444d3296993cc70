"""The DuckDB catalog backend: a snapshot of a STAC-GeoParquet source (core.catalog.snapshot)
searched (core.catalog.search) and browsed (core.catalog.browse) on DuckDB worker threads."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from core.catalog import sources
from core.catalog.browse import Browsing
from core.catalog.search import Searching
from core.catalog.stac import StacItems


def default_cache() -> Path:
    """Where on-disk snapshots and downloaded catalogs live: TERRAZZO_CATALOG_CACHE, else
    $XDG_CACHE_HOME/terrazzo, else ~/.cache/terrazzo (never beside the catalog: its
    directory may be read-only, a mounted volume or an object store)."""
    if os.environ.get("TERRAZZO_CATALOG_CACHE"):
        return Path(os.environ["TERRAZZO_CATALOG_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "terrazzo"


class Catalog(Searching, Browsing, StacItems):
    """A STAC-GeoParquet catalog (a file, a directory or glob of partitions, or an object
    store URL) opened for concurrent searches."""

    def __init__(
        self,
        source: sources.Source | Path | str,
        *,
        threads: int = 2,
        in_memory: bool | None = None,
        cache: Path | str | None = None,
        memory_mb: int = 1024,
        refresh_s: float = 30.0,
    ) -> None:
        cache = Path(cache) if cache else default_cache()
        if not isinstance(source, sources.Source):
            source = sources.resolve(source, cache, refresh_s)
        super().__init__(
            source, cache=cache, threads=threads, in_memory=in_memory, memory_mb=memory_mb
        )

    def after_swap(self) -> None:
        self.asset_names: tuple[str, ...] = self._asset_names()
        self.default_assets: tuple[str, ...] = self._default_assets()

    @property
    def name(self) -> str:
        """The catalog as the user named it, for titles and logs."""
        return self.source.name

    @property
    def local_root(self) -> Path | None:
        """The directory tree item hrefs may read by default (None for a remote catalog)."""
        return self.source.root

    def resolve_href(self, href: str) -> str:
        return self.source.resolve_href(href)

    def href_groups(self) -> list[tuple[str, int, str]]:
        """(group, items, an href) per store prefix or local directory the items' assets
        use (precomputed per snapshot: a few rows for an object-store catalog)."""
        rows = (
            self._cursor()
            .execute(
                "SELECT grp, sum(items)::BIGINT, min(example) FROM hrefs GROUP BY grp ORDER BY grp"
            )
            .fetchall()
        )
        return [(g or "", int(n), self.resolve_href(h)) for g, n, h in rows]

    def count_hrefs(self, hrefs: list[str]) -> int:
        """Items with an asset at one of these (resolved) hrefs: for the access report of
        single files a policy refuses (a symlink out of the catalog's tree)."""
        if not hrefs:
            return 0
        names = [f"assets.{_q(a)}.href" for a in self.asset_names]
        if not names:
            return 0
        raw = {h: h for h in hrefs}
        root = self.source.root
        if root is not None:  # hrefs may be written relative to the catalog
            raw.update({os.path.relpath(h, root): h for h in hrefs if h.startswith(str(root))})
        match = " OR ".join(f"{n} IN (SELECT unnest(?::VARCHAR[]))" for n in names)
        row = (
            self._cursor()
            .execute(f"SELECT count(*) FROM items WHERE {match}", [list(raw)] * len(names))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def content_hash(self) -> str:
        """sha256 of the catalog's content (a single file's own digest; for partitions,
        of each part's key and digest): a copy elsewhere has another stamp, the same hash."""
        digests = []
        for part in self.parts:
            h = hashlib.sha256()
            with open(part.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            digests.append((part.key, h.hexdigest()))
        if len(digests) == 1:
            return digests[0][1]
        return hashlib.sha256("\n".join(f"{k} {d}" for k, d in digests).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """Where the catalog comes from and how it is held, for /info and the start-up log."""
        return {
            "source": self.source.spec,
            "parts": len(self.parts),
            "snapshot": "memory" if self.in_memory else str(self.snapshot_path),
        }


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
