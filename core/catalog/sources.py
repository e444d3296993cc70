"""Where a catalog's parquet files are: `--catalog` resolved to a source, listed and fetched.

A source is a local file, a directory or glob of parquet files (hive partitions such as
`collection=…/year=…` in their paths become columns), or an object-store URL (`s3://`,
`gs://`, `az://`, `https://`) read with obstore. DuckDB only ever reads local files: remote
objects are downloaded into the cache first (DuckDB's httpfs extension needs the network to
install and is never required).

A source says which files it has and a stamp for each (inode/mtime/size locally, the ETag
remotely) without reading them (`list`), so the catalog can notice a replaced catalog
cheaply and rebuild its snapshot only then (core.catalog.snapshot).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("terrazzo.catalog")

REMOTE_SCHEMES = ("s3", "gs", "az", "abfs", "abfss", "azure", "http", "https")
_GLOB = re.compile(r"[*?\[]")
MAX_PARTS = 100_000  # parquet files in one catalog


class SourceError(ValueError):
    """A `--catalog` that names nothing servable; the message says what was looked for."""


@dataclass(frozen=True)
class Part:
    """One parquet file of a catalog: its key under the source's root and what changes
    when the file does. `path` is the local file DuckDB reads (for a remote object, its
    downloaded copy; empty until fetched)."""

    key: str
    stamp: str
    path: str = ""


class Source:
    """A catalog source. `base` is what relative hrefs are relative to (a directory or a URL
    prefix ending in `/`); `root` is the local directory tree hrefs may read by default
    (None for a remote catalog: its hrefs' own prefixes are allowed instead)."""

    spec: str
    base: str
    root: Path | None
    hive: bool  # whether `key=value` directories in the parts' keys become columns
    refresh_s: float  # how often `list` is asked whether the catalog changed

    def list(self) -> list[Part]:
        raise NotImplementedError

    def fetch(self, parts: list[Part]) -> list[Part]:
        """The parts with `path` set to a local file DuckDB can read."""
        return parts

    def resolve_href(self, href: str) -> str:
        """Relative hrefs are relative to the source's base: the catalog file's directory,
        the partitioned directory, or the object's URL prefix."""
        if "://" in href or href.startswith("/"):
            return href
        if self.root is None:
            return self.base + href
        # normalised, not resolved: symlinks stay visible to the access policy
        return os.path.abspath(os.path.join(self.base, href))

    @property
    def name(self) -> str:
        return self.spec.rstrip("/").rsplit("/", 1)[-1] or self.spec


def _local_stamp(path: str) -> str:
    st = os.stat(path)
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalSource(Source):
    """A parquet file, a directory of them (searched recursively), or a glob."""

    refresh_s = 1.0

    def __init__(self, spec: str) -> None:
        self.spec = spec
        path = Path(spec).expanduser()
        if _GLOB.search(spec):
            self.kind = "glob"
            fixed = _GLOB.split(str(path), 1)[0]
            self.root = Path(os.path.abspath(os.path.dirname(fixed) or "."))
            self.pattern = str(Path(os.path.abspath(path)))
        elif path.is_dir():
            self.kind = "directory"
            self.root = Path(os.path.abspath(path))
            self.pattern = str(self.root / "**" / "*.parquet")
        elif path.is_file():
            self.kind = "file"
            self.root = Path(os.path.abspath(path)).parent
            self.pattern = str(Path(os.path.abspath(path)))
        else:
            raise FileNotFoundError(f"catalog not found: {path.resolve()}")
        self.base = str(self.root)
        self.hive = self.kind != "file"

    def list(self) -> list[Part]:
        if self.kind == "file":
            paths = [self.pattern]
        else:
            paths = sorted(
                p
                for p in glob.glob(self.pattern, recursive=True)
                if os.path.isfile(p) and not _hidden(os.path.relpath(p, self.root))
            )
        if len(paths) > MAX_PARTS:
            raise SourceError(f"{self.spec}: {len(paths)} parquet files, at most {MAX_PARTS}")
        parts = []
        for p in paths:
            try:
                parts.append(Part(os.path.relpath(p, self.root), _local_stamp(p), p))
            except OSError:  # removed while listed: the next check sees the new state
                continue
        if not parts:
            raise SourceError(f"{self.spec}: no parquet files ({self.kind} {self.pattern})")
        return parts


def _hidden(key: str) -> bool:
    """Dot and underscore files and folders (`.terrazzo/`, `_SUCCESS`, `_delta_log/`) are
    not items, as Spark and pyarrow datasets treat them."""
    return any(part.startswith((".", "_")) for part in Path(key).parts)


class RemoteSource(Source):
    """Parquet objects under an object-store or HTTPS URL: one object, a prefix ending in `/`
    (every `*.parquet` below it) or a glob (`s3://bucket/stac/**/*.parquet`).

    Stores come from the URL's bucket and the operator's environment (AWS_*, GOOGLE_*,
    AZURE_*, as for COG reads); HTTPS serves single files only (it cannot list). Objects are
    downloaded into `cache` once per ETag.
    """

    def __init__(self, spec: str, cache: Path, refresh_s: float = 30.0) -> None:
        self.spec = spec
        parts = urlsplit(spec)
        self.scheme = parts.scheme
        if self.scheme not in REMOTE_SCHEMES:
            raise SourceError(f"{spec}: scheme {self.scheme!r} is not one of {REMOTE_SCHEMES}")
        if not parts.netloc:
            raise SourceError(f"{spec}: no bucket or host")
        self.origin = f"{self.scheme}://{parts.netloc}"
        key = parts.path.lstrip("/")
        self.single = ""
        if _GLOB.search(key):
            fixed = _GLOB.split(key, 1)[0]
            self.prefix = fixed[: fixed.rfind("/") + 1]
            self.pattern: str | None = key
        elif key.endswith("/") or not key:
            self.prefix, self.pattern = key, key + "**/*.parquet"
        else:
            self.prefix, self.pattern = key[: key.rfind("/") + 1], None
            self.single = key
        if self.pattern is not None and self.scheme in ("http", "https"):
            raise SourceError(f"{spec}: an HTTP server cannot be listed; name one parquet file")
        self.base = f"{self.origin}/{self.prefix}"
        self.root = None
        self.hive = self.pattern is not None
        self.refresh_s = refresh_s
        self.cache = cache / "remote" / hashlib.sha256(self.base.encode()).hexdigest()[:16]
        self._store: Any = None

    def store(self) -> Any:
        if self._store is None:
            from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

            bucket = urlsplit(self.origin).netloc
            if self.scheme == "s3":
                self._store = S3Store(bucket)
            elif self.scheme == "gs":
                self._store = GCSStore(bucket)
            elif self.scheme in ("http", "https"):
                self._store = HTTPStore.from_url(self.origin)
            else:
                self._store = AzureStore(bucket)
        return self._store

    def list(self) -> list[Part]:
        import obstore

        store = self.store()
        if self.pattern is None:
            meta = obstore.head(store, self.single)
            return [Part(self.single[len(self.prefix) :], _etag(meta))]
        found = []
        for batch in obstore.list(store, self.prefix or None):
            for meta in batch:
                key = meta["path"]
                relative = key[len(self.prefix) :]
                if _matches(key, self.pattern) and not _hidden(relative):
                    found.append(Part(relative, _etag(meta)))
                if len(found) > MAX_PARTS:
                    raise SourceError(f"{self.spec}: more than {MAX_PARTS} parquet objects")
        if not found:
            raise SourceError(f"{self.spec}: no parquet objects match")
        return sorted(found, key=lambda p: p.key)

    def fetch(self, parts: list[Part]) -> list[Part]:
        """Download each part not cached at its ETag (the copy's path carries the ETag, so a
        replaced object is a new file, and the whole key, so hive partitions above the
        listed prefix are columns as they are for a local glob)."""
        import obstore

        out = []
        for part in parts:
            local = self.cache / _safe(part.stamp) / (self.prefix + part.key)
            if not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                result = obstore.get(self.store(), self.prefix + part.key)
                stamp = _etag(result.meta)
                if stamp != part.stamp:  # replaced since listed: take the one we got
                    part = Part(part.key, stamp)
                    local = self.cache / _safe(stamp) / (self.prefix + part.key)
                    local.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=local.parent, suffix=".part")
                try:
                    with os.fdopen(fd, "wb") as f:
                        for chunk in result.stream(min_chunk_size=8 << 20):
                            f.write(chunk)
                    os.replace(tmp, local)
                except BaseException:
                    os.unlink(tmp)
                    raise
                log.info("catalog %s: downloaded %s (%s)", self.spec, part.key, part.stamp)
            out.append(Part(part.key, part.stamp, str(local)))
        return out


def _etag(meta: dict[str, Any]) -> str:
    tag = meta.get("e_tag") or f"{meta.get('last_modified')}-{meta.get('size')}"
    return str(tag).strip('"')


def _safe(stamp: str) -> str:
    """A directory name for a stamp (ETags may hold any character)."""
    return hashlib.sha256(stamp.encode()).hexdigest()[:16]


def _matches(key: str, pattern: str) -> bool:
    """Glob match where `*` stays inside one path segment and `**/` spans any number."""
    regex = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            regex, i = regex + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            regex, i = regex + ".*", i + 2
        elif pattern[i] == "*":
            regex, i = regex + "[^/]*", i + 1
        elif pattern[i] == "?":
            regex, i = regex + "[^/]", i + 1
        else:
            regex, i = regex + re.escape(pattern[i]), i + 1
    return re.fullmatch(regex, key) is not None


def resolve(spec: str | os.PathLike[str], cache: Path, refresh_s: float = 30.0) -> Source:
    """The source `--catalog` names: a URL with a store scheme, else a local path or glob."""
    text = os.fspath(spec)
    if "://" in text and not text.startswith("file://"):
        return RemoteSource(text, cache, refresh_s)
    return LocalSource(text.removeprefix("file://"))
