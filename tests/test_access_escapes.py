"""Hostile hrefs never reach anything outside the configured stores (issues 11 and 19).

Real parts throughout: a `terrazzo serve` subprocess, uvicorn and asyncio servers on
loopback, moto's S3 server. Fakes only inject a fault at a boundary: a DNS answer that
changes between the policy check and the connection (socket.getaddrinfo), servers that
ignore Range or send more than asked, an S3 endpoint that answers 307.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import numpy as np
import obstore
import pytest
from affine import Affine
from moto.server import ThreadedMotoServer
from obstore.store import S3Store
from pyproj import Transformer
from starlette.applications import Starlette
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core import access
from core.access import AccessDenied, AccessPolicy, internal_address, parse_remote
from core.cogs import write_cog
from core.fetch import Fetcher
from core.httpstore import HTTPRangeStore, ResponseTooLarge
from core.stores import SignedS3Store, Stores
from tests.conftest import EVERY_ITEM, Server, href_catalog, serve_in_thread

TRANSFORM = Affine(30, 0, 500000, 0, -30, 5000000)
TILE = "/tiles/12/2150/1471.npy"
BUCKET = "terrazzo-escapes"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


class Hits:
    """ASGI wrapper recording the path of every request a server receives."""

    def __init__(self, app) -> None:
        self.app, self.paths = app, Counter()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.paths[scope["path"]] += 1
        await self.app(scope, receive, send)

    def total(self) -> int:
        return sum(self.paths.values())

    def outside(self, prefix: str) -> int:
        return sum(n for p, n in self.paths.items() if not p.startswith(prefix))


uvicorn_on = serve_in_thread  # a real uvicorn server on any 127.0.0.0/8 address


@pytest.fixture(scope="module")
def cogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("escapes")
    data = (np.arange(3 * 256 * 256) % 250 + 1).astype("uint8").reshape(3, 256, 256)
    for where in ("catalog/good.tif", "public/remote.tif", "private/secret.tif"):
        (root / where).parent.mkdir(parents=True, exist_ok=True)
        write_cog(root / where, data, crs="EPSG:32632", nodata=0, transform=TRANSFORM)
    return root


@pytest.fixture(scope="module")
def canary() -> Iterator[tuple[str, Hits]]:
    """A loopback service nothing may reach: counts every request, answers with pixels."""
    hits = Hits(Starlette(routes=[Route("/{p:path}", lambda r: Response(b"\0" * 64))]))
    with uvicorn_on(hits, "127.0.0.1") as url:
        yield url, hits


@pytest.fixture(scope="module")
def allowed(cogs: Path, canary: tuple[str, Hits]) -> Iterator[tuple[str, Hits]]:
    """The operator's HTTP store on 127.0.0.2: /public/ is allowed, /private/ is not."""
    bounce = f"{canary[0]}/bounced.tif"
    hits = Hits(
        Starlette(
            routes=[
                Route("/public/bounce.tif", lambda r: RedirectResponse(bounce, 307)),
                Mount("/public", StaticFiles(directory=cogs / "public")),
                Mount("/private", StaticFiles(directory=cogs / "private")),
            ]
        )
    )
    with uvicorn_on(hits, "127.0.0.2") as url:
        yield url, hits


@pytest.fixture(scope="module")
def moto(cogs: Path) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with one bucket holding a COG."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **_lower(S3_KEYS))
    s3.create_bucket(Bucket=BUCKET)
    s3.put_object(
        Bucket=BUCKET, Key="cogs/remote.tif", Body=(cogs / "public" / "remote.tif").read_bytes()
    )
    yield endpoint
    server.stop()


def _lower(env: dict[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in env.items()}


def s3_env(endpoint: str) -> dict[str, str]:
    return {
        **S3_KEYS,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }


def build_catalog(cogs: Path, hrefs: dict[str, str]) -> Path:
    """A STAC-GeoParquet catalog of one item per href (geometry from the good COG)."""
    return href_catalog(cogs / "catalog" / "good.tif", hrefs, cogs / "catalog" / "items.parquet")


def hostile_hrefs(allowed: str, canary: str) -> dict[str, str]:
    """Each escape kind, named; the canary port makes the loopback ones land on the canary."""
    cport = canary.rsplit(":", 1)[1]
    return {
        "dotdot_lower": f"{allowed}/public/%2e%2e/private/secret.tif",
        "dotdot_upper": f"{allowed}/public/%2E%2E/private/secret.tif",
        "dotdot_mixed": f"{allowed}/public/.%2E/private/secret.tif",
        "dotdot_plain": f"{allowed}/public/../private/secret.tif",
        "dotdot_param": f"{allowed}/public/..;/private/secret.tif",
        "double_encoded": f"{allowed}/public/%252e%252e/private/secret.tif",
        "encoded_slash": f"{allowed}/public%2F..%2Fprivate/secret.tif",
        "encoded_backslash": f"{allowed}/public/..%5Cprivate%5Csecret.tif",
        "backslash": f"{allowed}/public\\..\\private\\secret.tif",
        "userinfo": f"http://127.0.0.2@127.0.0.1:{cport}/public/remote.tif",
        "loopback": f"{canary}/public/remote.tif",
        "localhost": f"http://localhost:{cport}/public/remote.tif",
        "decimal_ip": f"http://2130706433:{cport}/public/remote.tif",
        "short_ip": f"http://127.1:{cport}/public/remote.tif",
        "mapped_ipv6": f"http://[::ffff:127.0.0.1]:{cport}/public/remote.tif",
        "redirect": f"{allowed}/public/bounce.tif",
        "cgnat_metadata": "http://100.100.100.200/latest/meta-data/x.tif",
        "sixtofour": "http://[2002:a9fe:a9fe::]/latest/x.tif",
        "passwd": "file:///etc/passwd",
        "file_host": "file://evil/etc/passwd",
        "nul": "good.tif\x00.png",
        "s3_userinfo": f"s3://{BUCKET}@127.0.0.1:{cport}/cogs/remote.tif",
        "s3_port": f"s3://{BUCKET}:{cport}/cogs/remote.tif",
    }


def test_hostile_hrefs_reach_nothing_and_fail_their_items(
    cogs: Path,
    allowed: tuple[str, Hits],
    canary: tuple[str, Hits],
    moto: str,
) -> None:
    allowed_url, allowed_hits = allowed
    canary_url, canary_hits = canary
    hostile = hostile_hrefs(allowed_url, canary_url)
    legit = {
        "good": "good.tif",
        "remote": f"{allowed_url}/public/remote.tif",
        "s3": f"s3://{BUCKET}/cogs/remote.tif",
    }
    cat = build_catalog(cogs, {**legit, **hostile})
    env = {"TERRAZZO_ALLOW": f"{allowed_url}/public/", **s3_env(moto)}
    server = Server(cat, env=env)
    lon, lat = Transformer.from_crs("EPSG:32632", "EPSG:4326", always_xy=True).transform(
        500000 + 128 * 30, 5000000 - 128 * 30
    )
    try:
        plan = httpx.get(
            f"{server.url}/plan/WebMercatorQuad/12/2150/1471",
            params=EVERY_ITEM,  # one footprint for all: skipcovered would plan only the newest
            timeout=60,
        )
        tile = httpx.get(f"{server.url}{TILE}", timeout=60)
        point = httpx.get(f"{server.url}/point/{lon},{lat}", timeout=60)
    finally:
        output = server.stop()
    assert canary_hits.total() == 0, dict(canary_hits.paths)
    assert allowed_hits.outside("/public/") == 0, dict(allowed_hits.paths)
    assert plan.status_code == 200, plan.text
    body = plan.json()
    errors = {e["id"]: e["error"] for e in body["errors"]}
    assert sorted(i["id"] for i in body["items"]) == sorted(legit), errors
    assert set(errors) == set(hostile), sorted(set(hostile) - set(errors))
    for why, ids in {
        "dot segment": [
            "dotdot_lower",
            "dotdot_upper",
            "dotdot_mixed",
            "dotdot_plain",
            "dotdot_param",
            "double_encoded",
        ],
        "backslash": ["backslash"],
        "encoded path separator": ["encoded_slash", "encoded_backslash"],
        "user information": ["userinfo", "s3_userinfo"],
        "loopback": ["loopback", "localhost", "mapped_ipv6"],
        "non-canonical IPv4": ["decimal_ip", "short_ip"],
        "redirect to": ["redirect"],
        "carrier-grade NAT": ["cgnat_metadata"],
        "6to4 link-local": ["sixtofour"],
        "outside the allowed roots": ["passwd"],
        "names a host": ["file_host"],
        "NUL": ["nul"],
        "port on an object-store URL": ["s3_port"],
    }.items():
        for item_id in ids:
            assert why in errors[item_id], (item_id, errors[item_id])
    assert tile.status_code == 200, tile.text
    data = np.load(io.BytesIO(tile.content))
    assert (data[-1] == 255).any(), "the legitimate items are served"
    assert "AccessDenied" in tile.headers["X-Terrazzo-Errors"]
    assert point.status_code == 200, point.text
    values = {i["id"]: i for i in point.json()["items"]}
    assert "error" not in values["remote"] and "error" not in values["s3"], values
    # start-up report: the operator's stores, named
    assert f"allowed prefix (explicit): {allowed_url}/public/" in output
    assert f"s3 store: endpoint AWS_ENDPOINT_URL={moto}" in output, output[:4000]


def test_s3_redirects_are_refused_where_obstore_would_follow_them(
    moto: str, cogs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """object_store follows a 307 from the S3 endpoint (shown with obstore's own store);
    Terrazzo's S3 store (presigned GET, no redirects) refuses it and the target sees nothing."""
    target = Hits(Starlette(routes=[Route("/{p:path}", lambda r: Response(b"\0" * 64))]))
    bouncer = Starlette(
        routes=[
            Route(
                "/{p:path}",
                lambda r: RedirectResponse(f"{target_url}/stolen", 307),
                methods=["GET", "HEAD", "PUT"],
            )
        ]
    )
    with uvicorn_on(target, "127.0.0.3") as target_url, uvicorn_on(bouncer, "127.0.0.4") as bounce:
        plain = S3Store(
            BUCKET,
            endpoint=bounce,
            region="us-east-1",
            client_options={"allow_http": True},
            **_lower(S3_KEYS),
        )
        with pytest.raises(Exception):  # noqa: B017 - the canary below is the point
            obstore.get_range(plain, "cogs/remote.tif", start=0, end=16)
        assert target.total() >= 1, "obstore followed the redirect (why S3 is presigned)"
        before = target.total()

        async def read() -> bytes:
            store = SignedS3Store(BUCKET)
            try:
                return await store.get_range_async("cogs/remote.tif", start=0, end=16)
            finally:
                await store.aclose()

        for name, value in s3_env(bounce).items():
            monkeypatch.setenv(name, value)
        with pytest.raises(AccessDenied, match=r"redirect to .*stolen refused"):
            asyncio.run(read())
        assert target.total() == before

        async def read_moto() -> bytes:
            store = SignedS3Store(BUCKET)
            try:
                return await store.get_range_async("cogs/remote.tif", start=0, end=16)
            finally:
                await store.aclose()

        monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
        raw = (cogs / "public" / "remote.tif").read_bytes()
        assert asyncio.run(read_moto()) == raw[:16]


async def test_dns_rebinding_is_caught_at_connect_time(
    monkeypatch: pytest.MonkeyPatch, canary: tuple[str, Hits]
) -> None:
    """The name is public when the policy looks and 127.0.0.1 when the connection is made."""
    canary_url, hits = canary
    port = int(canary_url.rsplit(":", 1)[1])
    real = socket.getaddrinfo
    asked: list[object] = []

    def rebinding(host, port_, *args, **kw):  # the boundary: the system resolver
        if host == "rebind.example":
            asked.append(port_)
            address = "93.184.216.34" if port_ is None else "127.0.0.1"  # policy vs connect
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port_ or 0))]
        return real(host, port_, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    href = f"http://rebind.example:{port}/public/remote.tif"
    policy = AccessPolicy.build(Path("/nonexistent"), used=[f"http://rebind.example:{port}/"])
    policy.check(href)  # public at policy time
    fetcher = Fetcher(policy=policy, stores=Stores(policy=policy), retries=0)
    before = hits.total()
    # async-tiff re-raises the store's AccessDenied as its own exception, message kept
    with pytest.raises(
        Exception, match=r"rebind.example resolves to a loopback address .* at connect time"
    ):
        await fetcher.header(href)
    await fetcher.stores.aclose()
    assert hits.total() == before, "the rebound name reached the loopback canary"
    assert port in asked, "the connection resolved the name itself"

    # control: the same fake answer does reach the canary when the operator allowed it
    explicit = AccessPolicy.build(
        Path("/nonexistent"), used=[], allow=[f"http://rebind.example:{port}/"]
    )
    store = Stores(policy=explicit).get(href)[0]
    await store.get_range_async("public/remote.tif", start=0, end=8)
    await store.aclose()
    assert hits.total() == before + 1


def test_policy_dns_answers_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name that later resolves to loopback is refused once the short TTL has passed."""
    answer = {"ip": "93.184.216.34"}
    real = socket.getaddrinfo

    def fake(host, port_, *args, **kw):
        if host == "ttl.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer["ip"], 0))]
        return real(host, port_, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(access, "DNS_TTL_S", 0.05)
    assert internal_address("ttl.example") is None
    answer["ip"] = "127.0.0.1"
    assert internal_address("ttl.example") is None, "answers are cached for the TTL"
    time.sleep(0.1)
    assert "loopback" in (internal_address("ttl.example") or "")


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("100.64.0.1", "shared"),
        ("100.100.100.200", "shared"),
        ("100.127.255.254", "shared"),
        ("[2002:a9fe:a9fe::]", "6to4 link-local"),
        ("2002:7f00:1::", "6to4 loopback"),
        ("::ffff:127.0.0.1", "IPv4-mapped loopback"),
        ("::ffff:169.254.169.254", "IPv4-mapped link-local"),
        ("::ffff:10.0.0.1", "IPv4-mapped private"),
        ("::127.0.0.1", "IPv4-compatible"),
        ("64:ff9b::7f00:1", "NAT64 loopback"),
        ("64:ff9b::a9fe:a9fe", "NAT64 link-local"),
        ("64:ff9b:1::1", "local-use NAT64"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ("0.0.0.0", "private"),
        ("::", "private"),
        ("198.18.0.1", "private"),
        ("fc00::1", "private"),
        ("ff02::1", "multicast"),
    ],
)
def test_internal_address_sees_wrapped_and_shared_addresses(host: str, kind: str) -> None:
    assert kind in (internal_address(host) or ""), internal_address(host)


@pytest.mark.parametrize(
    "host", ["8.8.8.8", "2606:4700::1111", "2002:808:808::", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_stay_public(host: str) -> None:
    assert internal_address(host) is None


@pytest.mark.parametrize(
    ("href", "why"),
    [
        ("http://h.example/p/%2e%2e/x.tif", "dot segment"),
        ("http://h.example/p/./x.tif", "dot segment"),
        ("http://h.example/p%2fx.tif", "encoded path separator"),
        ("http://h.example/p%5Cx.tif", "encoded path separator"),
        ("http://h.example\\@evil.example/x.tif", "user information"),
        ("http://h.example@evil.example/x.tif", "user information"),
        ("http://:80/x.tif", "empty host"),
        ("http://h.example:0/x.tif", "port 0"),
        ("http://h.example:99999/x.tif", "malformed URL"),
        ("http://0x7f.0.0.1/x.tif", "non-canonical IPv4"),
        ("http://0177.0.0.1/x.tif", "non-canonical IPv4"),
        ("http://exаmple.com/x.tif", "non-ASCII host"),  # Cyrillic а
        ("http://h.example./x.tif", "malformed host"),
        ("http://h.example/x\x00.tif", "control character"),
        ("http://[fe80::1%25eth0]/x.tif", "zone-scoped"),
        ("http://h.example/%ff.tif", "not valid UTF-8"),
        ("abfss://c@acct.dfs.core.windows.net/x.tif", "user information"),
        ("az://acct.blob.core.windows.net/x.tif", "not a plain az"),
        ("s3://Bucket/x.tif", "not a plain s3"),
        ("s3://bucket/%2e%2e/x.tif", "dot segment"),
        ("gopher://h.example/x", "not a supported store"),
    ],
)
def test_parse_remote_refuses_ambiguous_urls(href: str, why: str) -> None:
    with pytest.raises(AccessDenied, match=why):
        parse_remote(href)


def test_policy_compares_canonical_urls() -> None:
    """Case, default ports and percent-encoding cannot step around an explicit prefix."""
    policy = AccessPolicy.build(
        Path("/nonexistent"), used=[], allow=["HTTP://127.0.0.2:8080/public"]
    )
    policy.check("http://127.0.0.2:8080/public/a.tif")
    policy.check("http://127.0.0.2:8080/p%75blic/a%20b.tif")  # decodes under /public/
    assert parse_remote("http://127.0.0.2:8080/p%75blic/a%20b.tif").path == "/public/a%20b.tif"
    assert parse_remote("https://H.example:443/x").url == "https://h.example/x"
    for href in (
        "http://127.0.0.2:8080/publicity/a.tif",  # not under /public/
        "http://127.0.0.2:8081/public/a.tif",  # another port (and internal)
        "http://127.0.0.2:8080/private/a.tif",
    ):
        with pytest.raises(AccessDenied):
            policy.check(href)


def test_local_hrefs_that_cannot_be_read_are_refused_clearly(tmp_path: Path) -> None:
    policy = AccessPolicy.build(tmp_path, used=[])
    for href, why in [
        (str(tmp_path / "a\x00.tif"), "NUL"),
        ("file://evil.example/etc/passwd", "names a host"),
        ("file:///etc/passwd", "outside the allowed roots"),
    ]:
        with pytest.raises(AccessDenied, match=why):
            policy.check(href)


# -- byte caps ------------------------------------------------------------------------------

BIG = 512 * 2**20


def _vmhwm_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _vmhwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


class Flood:
    """An asyncio HTTP server that sends `head` and then streams zeros lazily up to BIG."""

    def __init__(self, head: bytes) -> None:
        self.head, self.sent = head, 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        chunk = b"\0" * 2**20
        try:
            writer.write(self.head)
            while self.sent < BIG:
                writer.write(chunk)
                self.sent += len(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("name", "head", "start", "end", "expect"),
    [
        (
            "200 ignoring Range, 512 MB declared",
            f"HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n".encode(),
            0,
            1000,
            None,  # served: the first 1000 bytes, then the connection is dropped
        ),
        (
            "200 ignoring Range, far offset",
            f"HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n".encode(),
            400 * 2**20,
            400 * 2**20 + 1000,
            "ignores Range",
        ),
        (
            "206 without length, streams 512 MB",
            b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\n\r\n",
            0,
            1000,
            "longer than the 1000 bytes",
        ),
        (
            "206 declaring 4 GB",
            f"HTTP/1.1 206 Partial Content\r\nContent-Length: {4 * 2**30}\r\n\r\n".encode(),
            0,
            1000,
            "declared for a 1000-byte range",
        ),
    ],
)
async def test_reads_stop_at_the_range_whatever_the_server_sends(
    name: str, head: bytes, start: int, end: int, expect: str | None
) -> None:
    flood = Flood(head)
    server = await asyncio.start_server(flood.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    store = HTTPRangeStore(f"http://127.0.0.1:{port}", allow_internal=True)
    _vmhwm_reset()
    before = _vmhwm_mb()
    t0 = time.perf_counter()
    try:
        if expect is None:
            body = await store.get_range_async("big.bin", start=start, end=end)
            assert body == b"\0" * (end - start)
        else:
            with pytest.raises(ResponseTooLarge, match=expect):
                await store.get_range_async("big.bin", start=start, end=end)
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # let the server notice the hang-up
    finally:
        await store.aclose()
        server.close()
        await server.wait_closed()
    grew = _vmhwm_mb() - before
    assert elapsed < 5, f"{name}: {elapsed:.1f} s"
    assert grew < 64, f"{name}: peak RSS grew {grew:.0f} MB"
    assert flood.sent < 64 * 2**20, f"{name}: the server got to send {flood.sent >> 20} MB"


async def test_range_store_refuses_requests_over_its_cap() -> None:
    store = HTTPRangeStore("http://127.0.0.1:9", allow_internal=True, max_range=1000)
    with pytest.raises(ResponseTooLarge, match="cap per request"):
        await store.get_range_async("x", start=0, end=1001)
