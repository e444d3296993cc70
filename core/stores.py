"""Where an href's bytes come from: one store per scheme/host/bucket, created once and reused.

Kept apart from the fetch stage because which store may be built, and how (no redirects,
operator-configured endpoints only), is part of the access policy, not of reading tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from obstore.store import LocalStore, from_url

from core.httpstore import HTTPRangeStore


def split_href(href: str) -> tuple[str, str]:
    """(store key, path inside that store) for an href: local path, file://, s3://, http(s)://..."""
    parts = urlsplit(href)
    if parts.scheme in ("", "file"):
        return ("file", parts.path if parts.scheme == "file" else href)
    # http(s)://host:port/path, s3://bucket/key, gs://bucket/key, az://container/key, ...
    return (f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/"))


class Stores:
    """One obstore store per scheme/host/bucket, created on first use and reused."""

    def __init__(self, factory: Callable[[str], Any] | None = None) -> None:
        self._stores: dict[str, Any] = {}
        self._factory = factory or self._default_store

    @staticmethod
    def _default_store(key: str) -> Any:
        if key == "file":
            return LocalStore()
        if key.startswith(("http://", "https://")):
            return HTTPRangeStore(key)  # never follows redirects (see core.access)
        return from_url(key)

    async def aclose(self) -> None:
        """Close the stores that hold connections on this event loop."""
        for store in self._stores.values():
            close = getattr(store, "aclose", None)
            if close is not None:
                await close()

    def get(self, href: str) -> tuple[Any, str]:
        key, path = split_href(href)
        store = self._stores.get(key)
        if store is None:
            store = self._stores[key] = self._factory(key)
        return store, path
