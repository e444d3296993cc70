"""Service settings: one object, read from `TERRAZZO_*` environment variables or CLI flags.

Every bound the engine enforces lives here, so an operator can see and tune all of them in one
place (they are printed at start-up).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Terrazzo's knobs. Defaults suit a 2-core machine."""

    model_config = SettingsConfigDict(env_prefix="TERRAZZO_", extra="ignore")

    catalog: str | Path | None = Field(
        None,
        description="STAC-GeoParquet to serve: a file, a directory or glob of parquet files "
        "(hive partitions become columns), or an s3://, gs://, az:// or https:// URL.",
    )
    pyramid: Path | None = Field(
        None, description="Overview pyramid directory (terrazzo overviews) for low zooms."
    )
    host: str = "127.0.0.1"
    port: int = 8000
    root_path: str = Field(
        "",
        pattern=r"^(/[A-Za-z0-9._~-]+)*$",
        description="Public path prefix the service is served under by a proxy that strips "
        "it before forwarding, e.g. /maps (uvicorn's --root-path; a proxy may instead send "
        "X-Forwarded-Prefix per request).",
    )

    # Access: local roots or URL prefixes allowed besides the catalog's own (comma-separated)
    allow: str = Field("", description="Extra allowed stores: directories or URL prefixes.")

    # Search stage
    catalog_in_memory: bool | None = Field(
        None,
        description="Keep the catalog's search snapshot in memory (true) or in an on-disk "
        "DuckDB database in catalog_cache (false); unset: in memory below 16 MB of parquet.",
    )
    catalog_cache: Path | None = Field(
        None,
        description="Directory for on-disk snapshots and downloaded remote catalogs "
        "(default $XDG_CACHE_HOME/terrazzo or ~/.cache/terrazzo).",
    )
    catalog_memory_mb: int = Field(
        1024, ge=64, description="DuckDB's memory for the catalog (buffer pool, builds), MiB."
    )
    catalog_refresh_s: float = Field(
        30, gt=0, description="How often a remote catalog's ETags are checked for a new version."
    )
    search_threads: int = Field(2, ge=1, description="DuckDB worker threads (one cursor each).")
    max_items: int = Field(
        500, ge=1, description="Items per tile or chunk at most (caps a request's items_limit)."
    )
    max_scan: int = Field(
        10_000, ge=1, description="Candidate items one search looks at (caps scan_limit)."
    )
    max_search_s: float = Field(
        5, gt=0, description="Seconds one item search may take (caps time_limit)."
    )

    # Fetch stage
    fetch_concurrency: int = Field(64, ge=1, description="Store reads in flight, whole service.")
    request_concurrency: int = Field(8, ge=1, description="Items read at once for one request.")
    read_concurrency: int = Field(
        16,
        ge=1,
        description="Tile and area reads served at once; the others wait their turn, in order "
        "(waiting costs no event-loop time). Raise it for stores slower than ~100 ms a request.",
    )
    header_cache_size: int = Field(512, ge=1, description="Opened COG headers kept (LRU).")
    tile_cache_mb: int = Field(512, ge=0, description="Decoded COG tiles kept (LRU, by size).")
    max_read_mb: int = Field(
        512, ge=1, description="Decoded bytes one window read may need (else an item error)."
    )
    header_read_timeout_s: float = Field(
        20, gt=0, description="A COG header must be read within this (else an item error)."
    )
    retries: int = Field(3, ge=0, description="Retries of a transient store error.")
    retry_base_s: float = Field(0.05, gt=0, description="First backoff step (full jitter).")
    retry_cap_s: float = Field(2.0, gt=0, description="Longest backoff step.")

    # Compute stage
    compute_workers: int = Field(2, ge=1, description="Processes that warp and mosaic.")
    compute_arena_mb: int = Field(
        64,
        ge=0,
        description="Shared memory per compute worker for the arrays of a job, MiB (0: by pipe).",
    )
    malloc_trim_mb: int = Field(
        64,
        ge=0,
        description="Free heap each process keeps for the next arrays, MiB (glibc; 0: default).",
    )
    malloc_mmap_mb: int = Field(
        16,
        ge=0,
        le=32,
        description="Arrays up to this size reuse heap memory, MiB (glibc; 0: default).",
    )

    # Request limits
    max_tilesize: int = Field(1024, ge=64, description="Largest tilesize a tile request may ask.")
    max_chunks: int = Field(10_000, ge=1, description="Chunks in one POST /chunks request.")
    max_chunk_pixels: int = Field(4096 * 4096, ge=1, description="Pixels (w*h) in one chunk.")
    max_chunk_mb: int = Field(
        256, ge=1, description="Output of one chunk (times x bands x pixels x dtype), MiB."
    )

    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="POST body size at most.")
    max_query_bytes: int = Field(8192, ge=256, description="Query string size at most.")
    max_inflight: int = Field(64, ge=1, description="Data requests at once; more get 503.")
    header_timeout_s: float = Field(
        10, gt=0, description="A request's line and headers must arrive within this (else closed)."
    )
    body_timeout_s: float = Field(
        30, gt=0, description="A request body must arrive within this (else 408)."
    )
    tile_timeout_s: float = Field(30, gt=0, description="Time budget of one tile (else 504).")

    # HTTP caching and logs
    cache_max_age_s: int = Field(
        3600, ge=0, description="Cache-Control max-age of complete tiles (ETag revalidates)."
    )
    log_format: str = Field("json", pattern="^(json|text)$", description="json or text logs.")
    log_level: str = Field("info", description="debug, info, warning or error.")

    # Access control and CORS
    api_key: str | None = Field(None, description="If set, data routes need X-API-Key.")
    cors_origins: str = Field(
        "*",
        description="Origins allowed by CORS: * (the default, as TiTiler: GET/HEAD/OPTIONS from "
        "any page, no credentials), a comma-separated list (POST /chunks too), or empty: off.",
    )

    # Chunks
    chunk_concurrency: int = Field(4, ge=1, description="Chunks of one request read at once.")
    chunk_timeout_s: float = Field(120, gt=0, description="Time budget of one chunk.")
    stream_stall_timeout_s: float = Field(
        60, gt=0, description="A /chunks client that reads nothing this long is disconnected."
    )

    def public(self) -> dict:
        """The settings as JSON-ready data with secrets masked, for the start-up line."""
        out = self.model_dump(mode="json")
        if out.get("api_key"):
            out["api_key"] = "***"
        return out
