"""Which hrefs the service may read: item hrefs are data from catalogs we may not control.

Allowed by default: the catalog's own directory tree, and the remote prefixes
(scheme://host/bucket) its items use. Never, unless allowed explicitly (`--allow`): local
paths outside those roots (after resolving `..` and symlinks), and HTTP hosts that are — or
resolve to — loopback, link-local, private, reserved or multicast addresses. Redirects are not
followed at all (see core.httpstore). A refused href fails its item with a clear error and is
never fetched.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote, urlsplit

REMOTE_SCHEMES = ("http", "https", "s3", "gs", "az", "abfs", "abfss", "azure")


class AccessDenied(PermissionError):
    """An href outside the allowed stores."""


def is_url(href: str) -> bool:
    return "://" in href and not href.startswith("file://")


def local_path(href: str) -> Path:
    return Path(unquote(urlsplit(href).path) if href.startswith("file://") else href)


def remote_prefix(href: str) -> str:
    """scheme://host/bucket/ of a URL (for http: the first path segment plays the bucket)."""
    parts = urlsplit(href)
    first = parts.path.lstrip("/").split("/", 1)[0]
    if parts.scheme in ("http", "https"):
        return (
            f"{parts.scheme}://{parts.netloc.lower()}/{first}/"
            if first
            else (f"{parts.scheme}://{parts.netloc.lower()}/")
        )
    return f"{parts.scheme}://{parts.netloc}/"


@lru_cache(maxsize=1024)
def _addresses(host: str) -> tuple[str, ...]:
    try:
        return tuple({info[4][0] for info in socket.getaddrinfo(host, None)})
    except OSError:
        return ()


def internal_address(host: str) -> str | None:
    """Why `host` is internal (loopback, private, ...), or None for a public host."""
    host = host.strip("[]")
    try:
        candidates = [ipaddress.ip_address(host)]
    except ValueError:
        resolved = _addresses(host)
        if not resolved:
            return f"{host} does not resolve"
        candidates = [ipaddress.ip_address(a.split("%")[0]) for a in resolved]
    for ip in candidates:
        for kind in ("loopback", "link_local", "private", "reserved", "multicast", "unspecified"):
            if getattr(ip, f"is_{kind}"):
                label = kind.replace("_", "-")
                return (
                    f"{host} is a {label} address ({ip})"
                    if str(ip) == host
                    else (f"{host} resolves to a {label} address ({ip})")
                )
    return None


@dataclass(frozen=True)
class AccessPolicy:
    """Allowed local roots and URL prefixes; `explicit` prefixes may name internal hosts."""

    roots: tuple[Path, ...] = ()
    prefixes: tuple[str, ...] = ()
    explicit: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)  # default prefix -> why refused

    @classmethod
    def build(
        cls, catalog_dir: Path, used: Iterable[str], allow: Iterable[str] = ()
    ) -> AccessPolicy:
        """Defaults from the catalog (its directory, the remote prefixes its items use)."""
        roots = [Path(os.path.realpath(catalog_dir))]
        explicit: list[str] = []
        for entry in allow:
            entry = entry.strip()
            if not entry:
                continue
            if is_url(entry):
                explicit.append(entry if entry.endswith("/") else entry + "/")
            else:
                roots.append(Path(os.path.realpath(local_path(entry))))
        prefixes: list[str] = []
        refused: dict[str, str] = {}
        for prefix in sorted(set(used)):
            if any(prefix.startswith(e) for e in explicit):
                continue
            parts = urlsplit(prefix)
            if parts.scheme not in REMOTE_SCHEMES:
                refused[prefix] = f"scheme {parts.scheme!r} is not a supported store"
                continue
            why = (
                internal_address(parts.hostname or "")
                if parts.scheme in ("http", "https")
                else None
            )
            if why:
                refused[prefix] = why
            else:
                prefixes.append(prefix)
        return cls(tuple(roots), tuple(prefixes), tuple(explicit), refused)

    def check(self, href: str) -> None:
        """Raise AccessDenied unless `href` may be read."""
        if not is_url(href):
            path = local_path(href)
            real = Path(os.path.realpath(path))
            if any(real == root or root in real.parents for root in self.roots):
                return
            shown = ", ".join(str(r) for r in self.roots)
            hint = " (it resolves elsewhere through a link)" if real != path.absolute() else ""
            raise AccessDenied(
                f"{href}: local path outside the allowed roots ({shown}){hint}; "
                "allow it with --allow DIR / TERRAZZO_ALLOW"
            )
        if any(href.startswith(p) for p in self.explicit):
            return
        parts = urlsplit(href)
        if parts.scheme not in REMOTE_SCHEMES:
            raise AccessDenied(f"{href}: scheme {parts.scheme!r} is not a supported store")
        if parts.scheme in ("http", "https"):
            why = internal_address(parts.hostname or "")
            if why:
                raise AccessDenied(f"{href}: {why}; internal hosts need an explicit --allow")
        if not any(href.startswith(p) for p in self.prefixes):
            raise AccessDenied(
                f"{href}: not under an allowed prefix ({', '.join(self.prefixes) or 'none'}); "
                "allow it with --allow PREFIX / TERRAZZO_ALLOW"
            )

    def describe(self) -> list[str]:
        lines = [f"allowed local root: {r}" for r in self.roots]
        lines += [f"allowed prefix: {p}" for p in self.prefixes]
        lines += [f"allowed prefix (explicit): {p}" for p in self.explicit]
        lines += [f"refused prefix: {p} ({why})" for p, why in self.refused.items()]
        return lines
