"""Which hrefs the service may read: item hrefs are data from catalogs we may not control.

Allowed by default: the catalog's own directory tree, and the remote prefixes
(scheme://host/bucket) its items use. Never, unless allowed explicitly (`--allow`): local
paths outside those roots (after resolving symlinks), and HTTP hosts that are — or resolve
to — loopback, link-local, private, shared (100.64/10), reserved or multicast addresses,
including IPv4 addresses wrapped in IPv6 (mapped, compatible, 6to4, NAT64, Teredo).

The decision is made on the URL exactly as the store will request it (`parse_remote`: scheme
and host lower-cased, default port dropped, path percent-decoded and re-encoded one canonical
way). Whatever a server could read as a different path is refused outright rather than
normalised: dot segments (`..`, `%2e%2e`, `..;`), encoded separators (`%2F`, `%5C`),
backslashes, userinfo, control characters, non-canonical IPv4 hosts. Names are checked again
when the connection is made (core.httpstore's resolver, which pins the checked address), so a
name that changes its answer between the check and the connection (DNS rebinding) is caught
there; the check here only caches answers for a few seconds. Redirects are not followed at
all (core.httpstore, core.stores). A refused href fails its item with a clear error and is
never fetched.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit

HTTP_SCHEMES = ("http", "https")
OBJECT_SCHEMES = ("s3", "gs", "az", "abfs", "abfss", "azure")
REMOTE_SCHEMES = HTTP_SCHEMES + OBJECT_SCHEMES
DEFAULT_PORTS = {"http": 80, "https": 443}
DNS_TTL_S = 10.0  # policy-time answers only; the connect-time check is the authoritative one

# A bucket or container as the URL's host. Object stores take the endpoint, region, account
# and credentials from the operator's configuration; a host with dots, `@` or a port could
# make obstore derive an account or endpoint from the href (abfs://c@acct.dfs..., fabric).
_BUCKET = {
    "s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
    "gs": re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"),
}
_CONTAINER = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")  # az, abfs(s), azure: no dots
_HOST_LABELS = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")
_ENCODED = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)
_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PATH_SAFE = "/:@!$&'()*,;=~"  # left as they are when a decoded path is encoded again


class AccessDenied(PermissionError):
    """An href outside the allowed stores."""


def is_url(href: str) -> bool:
    return "://" in href and not href.startswith("file://")


def local_path(href: str) -> Path:
    return Path(unquote(urlsplit(href).path) if href.startswith("file://") else href)


@dataclass(frozen=True)
class Remote:
    """A remote href as its store will request it.

    `path` is what the store is asked for: for HTTP the decoded path encoded again one
    canonical way (the server decodes it back to exactly the path the policy checked); for
    object stores the key as written (no encoding layer between the href and the key).
    """

    scheme: str
    host: str  # lower-case name, canonical IPv4, or [canonical IPv6]
    port: int | None  # None: the scheme's default
    path: str  # starts with "/"

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port else "")

    @property
    def url(self) -> str:
        return self.origin + self.path

    @property
    def bare_host(self) -> str:
        return self.host.strip("[]")


def _refuse(href: str, why: str) -> AccessDenied:
    return AccessDenied(f"{href}: {why}")


def _canonical_host(href: str, scheme: str, netloc: str) -> str:
    if not netloc:
        raise _refuse(href, "no host")
    if "@" in netloc:
        raise _refuse(href, "user information in the URL (user@host) is not allowed")
    if "%" in netloc:
        raise _refuse(href, "percent-encoded or zone-scoped host is not allowed")
    host = netloc.rsplit(":", 1)[0] if not netloc.endswith("]") else netloc
    if host.startswith("["):
        if not host.endswith("]"):
            raise _refuse(href, "malformed IPv6 host")
        try:
            ip = ipaddress.IPv6Address(host[1:-1])
        except ValueError as exc:
            raise _refuse(href, f"malformed IPv6 host ({exc})") from None
        return f"[{ip.compressed}]"
    if not host.isascii():
        raise _refuse(href, "non-ASCII host; write it in its ASCII (xn--) form")
    if not host:
        raise _refuse(href, "empty host")
    if scheme in OBJECT_SCHEMES:  # case kept: the bucket named is the bucket read
        pattern = _BUCKET.get(scheme, _CONTAINER)
        if not pattern.fullmatch(host) or ".." in host:
            raise _refuse(
                href,
                f"{host!r} is not a plain {scheme} bucket/container name (the endpoint, "
                "account and region come from the operator's configuration only)",
            )
        return host
    host = host.lower()
    if host.endswith(".") or not _HOST_LABELS.fullmatch(host):
        raise _refuse(href, f"malformed host {host!r}")
    if _NUMERIC_LABEL.fullmatch(host.rsplit(".", 1)[-1]):
        # 2130706433, 0x7f.1, 127.1, 0177.0.0.1: resolvers read these as IPv4 addresses
        try:
            canonical = str(ipaddress.IPv4Address(host))
        except ValueError:
            canonical = ""
        if canonical != host:
            raise _refuse(href, f"non-canonical IPv4 address {host!r}")
    return host


def _canonical_path(href: str, scheme: str, raw: str) -> str:
    if "\\" in raw:
        raise _refuse(href, "backslash in the path")
    segments = raw.split("/")
    for segment in segments:
        if _SEPARATOR.search(segment):
            raise _refuse(href, "encoded path separator (%2F or %5C)")
        once = unquote_to_bytes(segment)
        try:
            decoded = once.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(href, "path is not valid UTF-8 once decoded") from None
        if "\\" in decoded:
            raise _refuse(href, "encoded backslash in the path")
        for form in (segment, decoded, unquote(decoded)):
            if form.split(";", 1)[0] in (".", ".."):
                raise _refuse(href, f"dot segment {segment!r} in the path")
        if _ENCODED.search(decoded):
            raise _refuse(href, f"double-encoded dot or separator in {segment!r}")
        if scheme in OBJECT_SCHEMES and _ENCODED.search(segment):
            raise _refuse(href, f"encoded dot or separator in the key segment {segment!r}")
    if scheme in OBJECT_SCHEMES:
        return raw if raw.startswith("/") else "/" + raw
    decoded_path = unquote(raw, errors="strict") or "/"
    return quote(decoded_path, safe=_PATH_SAFE)


def parse_remote(href: str) -> Remote:
    """The remote href as the store will request it, or AccessDenied saying what is wrong."""
    if _CONTROL.search(href):
        raise _refuse(href.encode("unicode_escape").decode(), "control character in the URL")
    try:
        parts = urlsplit(href)
        port = parts.port
    except ValueError as exc:
        raise _refuse(href, f"malformed URL ({exc})") from None
    scheme = parts.scheme
    if scheme not in REMOTE_SCHEMES:
        raise _refuse(href, f"scheme {scheme!r} is not a supported store")
    host = _canonical_host(href, scheme, parts.netloc)
    if port is not None:
        if scheme in OBJECT_SCHEMES:
            raise _refuse(href, "a port on an object-store URL is not allowed")
        if port == 0:
            raise _refuse(href, "port 0")
        if port == DEFAULT_PORTS[scheme]:
            port = None
    return Remote(scheme, host, port, _canonical_path(href, scheme, parts.path))


def remote_prefix(href: str) -> str:
    """scheme://host/bucket/ of a URL (for http: the first path segment plays the bucket)."""
    try:
        target = parse_remote(href)
    except AccessDenied:
        parts = urlsplit(href)
        return f"{parts.scheme}://{parts.netloc}/"
    first = target.path.lstrip("/").split("/", 1)[0]
    if target.scheme in HTTP_SCHEMES and first and "/" in target.path.lstrip("/"):
        return f"{target.origin}/{first}/"
    return f"{target.origin}/"


_dns: OrderedDict[str, tuple[float, tuple[str, ...]]] = OrderedDict()


def _addresses(host: str) -> tuple[str, ...]:
    """Addresses of a name, remembered for DNS_TTL_S only (a name may change its answer)."""
    now = time.monotonic()
    hit = _dns.get(host)
    if hit is not None and now - hit[0] < DNS_TTL_S:
        return hit[1]
    try:
        found = tuple({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        found = ()
    _dns[host] = (now, found)
    _dns.move_to_end(host)
    while len(_dns) > 1024:
        _dns.popitem(last=False)
    return found


def address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address is internal (a label), or None when it is globally routable.

    IPv4 inside IPv6 (mapped, compatible, NAT64, 6to4) is judged by the IPv4 address it
    carries; Teredo and local-use NAT64 are refused as such.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = address_kind(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        if ip.teredo is not None:
            return "Teredo tunnel"
        if ip.sixtofour is not None:
            inner = address_kind(ip.sixtofour)
            return f"6to4 {inner}" if inner else None
        if ip in ipaddress.IPv6Network("64:ff9b::/96"):
            inner = address_kind(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"NAT64 {inner}" if inner else None
        if ip in ipaddress.IPv6Network("64:ff9b:1::/48"):
            return "local-use NAT64"
        if ip in ipaddress.IPv6Network("::/96") and int(ip) > 1:
            return "IPv4-compatible IPv6"
    if isinstance(ip, ipaddress.IPv4Address) and ip in ipaddress.IPv4Network("100.64.0.0/10"):
        return "shared (carrier-grade NAT, 100.64.0.0/10)"
    for kind in ("loopback", "link_local", "private", "reserved", "multicast", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:
        return "not globally routable"
    return None


def ip_internal(address: str) -> str | None:
    """Why an address literal is internal, or None (a string that is not one is internal)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0].strip("[]"))
    except ValueError:
        return "not an IP address"
    return address_kind(ip)


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
        kind = address_kind(ip)
        if kind:
            return (
                f"{host} is a {kind} address ({ip})"
                if str(ip) == host
                else f"{host} resolves to a {kind} address ({ip})"
            )
    return None


def _canonical_prefix(prefix: str) -> str:
    target = parse_remote(prefix if prefix.endswith("/") else prefix + "/")
    return target.url


@dataclass(frozen=True)
class AccessPolicy:
    """Allowed local roots and URL prefixes; `explicit` prefixes may name internal hosts.

    Prefixes are kept in canonical form (see `parse_remote`) and compared with the canonical
    form of each href, so a prefix decides about the URL the store will actually request.
    """

    roots: tuple[Path, ...] = ()
    prefixes: tuple[str, ...] = ()
    explicit: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)  # default prefix -> why refused

    @classmethod
    def build(
        cls, catalog_dir: Path | None, used: Iterable[str], allow: Iterable[str] = ()
    ) -> AccessPolicy:
        """Defaults from the catalog (its directory tree, if local; the remote prefixes its
        items use)."""
        roots = [Path(os.path.realpath(catalog_dir))] if catalog_dir is not None else []
        explicit: list[str] = []
        for entry in allow:
            entry = entry.strip()
            if not entry:
                continue
            if is_url(entry):
                explicit.append(_canonical_prefix(entry))  # a malformed --allow fails start-up
            else:
                roots.append(Path(os.path.realpath(local_path(entry))))
        prefixes: list[str] = []
        refused: dict[str, str] = {}
        for prefix in sorted(set(used)):
            try:
                canonical = _canonical_prefix(prefix)
            except AccessDenied as exc:
                refused[prefix] = str(exc).removeprefix(f"{prefix}: ")
                continue
            if any(canonical.startswith(e) for e in explicit):
                continue
            target = parse_remote(canonical)
            why = internal_address(target.host) if target.scheme in HTTP_SCHEMES else None
            if why:
                refused[prefix] = why
            else:
                prefixes.append(canonical)
        return cls(tuple(roots), tuple(prefixes), tuple(explicit), refused)

    def allows_internal(self, origin: str) -> bool:
        """Whether the operator named this origin in --allow (internal addresses allowed)."""
        return any(e.startswith(origin.rstrip("/") + "/") for e in self.explicit)

    def _check_local(self, href: str) -> None:
        if _CONTROL.search(href):
            shown = href.encode("unicode_escape").decode()
            raise AccessDenied(f"{shown}: control or NUL character in a local path")
        if href.startswith("file://"):
            netloc = urlsplit(href).netloc
            if netloc not in ("", "localhost"):
                raise AccessDenied(f"{href}: file:// URL names a host ({netloc!r})")
        try:
            path = local_path(href)
            real = Path(os.path.realpath(path))
            absolute = path.absolute()
        except (OSError, ValueError) as exc:
            raise AccessDenied(f"{href}: unreadable local path ({exc})") from None
        if any(real == root or root in real.parents for root in self.roots):
            return
        shown = ", ".join(str(r) for r in self.roots)
        hint = " (it resolves elsewhere through a link)" if real != absolute else ""
        raise AccessDenied(
            f"{href}: local path outside the allowed roots ({shown}){hint}; "
            "allow it with --allow DIR / TERRAZZO_ALLOW"
        )

    def check(self, href: str) -> None:
        """Raise AccessDenied unless `href` may be read."""
        if not isinstance(href, str) or not href:
            raise AccessDenied(f"{href!r}: not an href")
        if not is_url(href):
            self._check_local(href)
            return
        target = parse_remote(href)
        url = target.url
        if any(url.startswith(p) for p in self.explicit):
            return
        if target.scheme in HTTP_SCHEMES:
            why = internal_address(target.host)
            if why:
                raise AccessDenied(f"{href}: {why}; internal hosts need an explicit --allow")
        if not any(url.startswith(p) for p in self.prefixes):
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


def audit(
    policy: AccessPolicy,
    groups: Iterable[tuple[str, int, str]],
    count_hrefs: Callable[[list[str]], int],
) -> list[tuple[int, str, str]]:
    """(hrefs, an example, why) for what the policy refuses of a catalog's href groups
    (core.catalog's `href_groups`: one per store prefix or local directory), for the start-up
    report — without checking every item.

    A remote group is judged by its prefix. A local directory is refused whole when it
    resolves outside the allowed roots; otherwise only the files in it that are links out of
    them are, and `count_hrefs` counts the items that name those files, so the honest items
    of a directory holding one bad link are not reported refused.
    """
    refused: list[tuple[int, str, str]] = []
    for _, count, href in groups:
        if is_url(href):
            try:
                policy.check(href)
            except AccessDenied as exc:
                refused.append((count, href, str(exc)))
            continue
        directory = os.path.dirname(str(local_path(href))) or "."
        try:
            policy.check(directory)
        except AccessDenied as exc:
            refused.append((count, href, str(exc).replace(directory, href, 1)))
            continue
        bad: list[tuple[str, str]] = []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        try:
                            policy.check(entry.path)
                        except AccessDenied as exc:
                            bad.append((entry.path, str(exc)))
        except OSError:  # a missing directory: its items fail to read, the policy is not why
            continue
        if bad:
            refused.append((count_hrefs([p for p, _ in bad]), bad[0][0], bad[0][1]))
    return [r for r in refused if r[0] > 0]
