"""Search stage: STAC item searches over a catalog backend.

- query: the query model every backend takes (SearchQuery, Item, SearchResult);
- backend: the protocol the engine and the app use;
- sources: `--catalog` (a file, a directory or glob of partitions, an object-store URL);
- snapshot: the DuckDB snapshot's lifecycle (build, cache, validate-then-swap);
- sql, search, browse: the SQL, the item search, the summaries;
- backend_duckdb: the DuckDB backend (Catalog) made of those.
"""

from core.catalog.backend import CatalogBackend
from core.catalog.backend_duckdb import Catalog, default_cache
from core.catalog.query import (
    DEFAULT_LIMIT,
    MAX_COLLECTIONS,
    MAX_IDS,
    MAX_SORT_FIELDS,
    Item,
    SearchError,
    SearchQuery,
    SearchResult,
    item_problem,
    parse_datetime_range,
)
from core.catalog.snapshot import check_catalog
from core.catalog.sources import SourceError

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_COLLECTIONS",
    "MAX_IDS",
    "MAX_SORT_FIELDS",
    "Catalog",
    "CatalogBackend",
    "Item",
    "SearchError",
    "SearchQuery",
    "SearchResult",
    "SourceError",
    "check_catalog",
    "default_cache",
    "item_problem",
    "parse_datetime_range",
]
