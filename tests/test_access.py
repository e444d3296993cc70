"""Reads stay inside the allowed stores: no local escapes, no internal hosts, no redirects."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from affine import Affine
from starlette.applications import Starlette
from starlette.responses import RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from core.access import AccessDenied, AccessPolicy, internal_address
from core.cogs import write_cog
from tests.conftest import EVERY_ITEM, Server, href_catalog, serve_in_thread


class Counting:
    """ASGI wrapper counting the requests a server receives."""

    def __init__(self, app) -> None:
        self.app, self.requests = app, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            self.requests += 1
        await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def cog_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("access")
    data = (np.arange(3 * 256 * 256) % 250 + 1).astype("uint8").reshape(3, 256, 256)
    for where in ("catalog/cogs/good.tif", "outside/secret.tif", "web/remote.tif"):
        (root / where).parent.mkdir(parents=True, exist_ok=True)
        write_cog(
            root / where,
            data,
            crs="EPSG:32632",
            nodata=0,
            transform=Affine(30, 0, 500000, 0, -30, 5000000),
        )
    os.symlink(root / "outside" / "secret.tif", root / "catalog" / "cogs" / "link.tif")
    return root


@pytest.fixture(scope="module")
def web(cog_dir: Path) -> Iterator[tuple[str, Counting]]:
    """A range-capable HTTP server on 127.0.0.1 (a loopback service an href might target)."""
    app = Counting(
        Starlette(
            routes=[
                Route(
                    "/redirect/remote.tif",
                    lambda request: RedirectResponse("http://169.254.169.254/latest/meta-data"),
                ),
                Mount("/files", StaticFiles(directory=cog_dir / "web")),
            ]
        )
    )
    with serve_in_thread(app) as url:
        yield url, app


def catalog(cog_dir: Path, hrefs: dict[str, str]) -> Path:
    out = cog_dir / "catalog" / f"items-{len(hrefs)}.parquet"
    return href_catalog(cog_dir / "catalog" / "cogs" / "good.tif", hrefs, out)


def test_policy_unit(cog_dir: Path) -> None:
    policy = AccessPolicy.build(cog_dir / "catalog", used=["s3://bucket/", "http://127.0.0.1:9/x/"])
    policy.check(str(cog_dir / "catalog" / "cogs" / "good.tif"))
    policy.check("s3://bucket/a/b.tif")
    assert "http://127.0.0.1:9/x/" in policy.refused
    for href, needle in [
        ("file:///etc/passwd", "outside the allowed roots"),
        (str(cog_dir / "catalog" / ".." / "outside" / "secret.tif"), "outside the allowed roots"),
        (str(cog_dir / "catalog" / "cogs" / "link.tif"), "through a link"),
        ("s3://other/a.tif", "not under an allowed prefix"),
        ("http://169.254.169.254/latest/meta-data", "link-local address"),
        ("http://127.0.0.1:9/x/a.tif", "loopback address"),
        ("ftp://example.com/a.tif", "not a supported store"),
    ]:
        with pytest.raises(AccessDenied, match=needle):
            policy.check(href)
    explicit = AccessPolicy.build(cog_dir, used=[], allow=["http://169.254.169.254/"])
    explicit.check("http://169.254.169.254/latest/x.tif")  # an operator's explicit choice


@pytest.mark.parametrize(
    ("host", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("[::1]", "loopback"),
        ("fe80::1", "link-local"),
        ("localhost", "loopback"),
    ],
)
def test_internal_addresses(host: str, kind: str) -> None:
    assert kind in (internal_address(host) or "")


def test_refused_hrefs_are_never_fetched(cog_dir: Path, web: tuple[str, Counting]) -> None:
    url, counter = web
    hrefs = {
        "good": "cogs/good.tif",
        "passwd": "file:///etc/passwd",
        "escape": "../outside/secret.tif",
        "symlink": "cogs/link.tif",
        "loopback": f"{url}/files/remote.tif",
        "metadata": "http://169.254.169.254/latest/meta-data/cog.tif",
    }
    cat = catalog(cog_dir, hrefs)
    server = Server(cat)
    try:
        before = counter.requests
        plan = httpx.get(
            f"{server.url}/plan/WebMercatorQuad/12/2150/1471",
            params=EVERY_ITEM,  # one footprint for all: skipcovered would plan only the newest
            timeout=60,
        ).json()
        tile = httpx.get(f"{server.url}/tiles/12/2150/1471.npy", timeout=60)
        assert counter.requests == before, "no request reached the refused loopback server"
    finally:
        output = server.stop()
    errors = {e["id"]: e["error"] for e in plan["errors"]}
    assert [i["id"] for i in plan["items"]] == ["good"]
    assert "outside the allowed roots" in errors["passwd"]
    assert "outside the allowed roots" in errors["escape"]
    assert "through a link" in errors["symlink"]
    assert "127.0.0.1 is a loopback address" in errors["loopback"]
    assert "169.254.169.254 is a link-local address" in errors["metadata"]
    assert tile.status_code == 200 and "passwd" in tile.headers["X-Terrazzo-Errors"]
    # counted at start-up per directory, and per file for a link out of an allowed one: the
    # symlink's item, not the honest `good` beside it in cogs/
    assert "items refused by the access policy: 5" in output, output[:3000]
    assert re.search(r"\n  1 like \S+/cogs/link\.tif: .*through a link", output), output[:3000]
    assert "refused prefix: http://169.254.169.254/latest/" in output


def test_explicit_allow_reads_over_http_but_never_follows_redirects(
    cog_dir: Path, web: tuple[str, Counting]
) -> None:
    url, counter = web
    cat = catalog(
        cog_dir, {"remote": f"{url}/files/remote.tif", "bounce": f"{url}/redirect/remote.tif"}
    )
    server = Server(cat, env={"TERRAZZO_ALLOW": f"{url}/"})
    try:
        before = counter.requests
        plan = httpx.get(
            f"{server.url}/plan/WebMercatorQuad/12/2150/1471",
            params=EVERY_ITEM,  # one footprint for all: skipcovered would plan only the newest
            timeout=60,
        ).json()
        tile = httpx.get(f"{server.url}/tiles/12/2150/1471.npy", timeout=60)
    finally:
        server.stop()
    assert counter.requests > before, "the allowed loopback server was read"
    assert [i["id"] for i in plan["items"]] == ["remote"], plan["errors"]
    assert (
        "redirect to http://169.254.169.254/latest/meta-data refused" in plan["errors"][0]["error"]
    )
    assert tile.status_code == 200
    data = np.load(__import__("io").BytesIO(tile.content))
    assert (data[-1] == 255).any()


async def test_range_store_coalesces_neighbouring_ranges(
    cog_dir: Path, web: tuple[str, Counting]
) -> None:
    from core.httpstore import HTTPRangeStore

    url, counter = web
    store = HTTPRangeStore(url, allow_internal=True)  # the operator allowed this origin
    raw = (cog_dir / "web" / "remote.tif").read_bytes()
    starts, ends = [0, 20, 2000], [10, 30, 2010]
    before = counter.requests
    parts = await store.get_ranges_async("files/remote.tif", starts=starts, ends=ends)
    assert [bytes(p) for p in parts] == [raw[a:b] for a, b in zip(starts, ends, strict=True)]
    assert counter.requests - before == 1  # three neighbouring ranges, one request
    tail = await store.get_range_async("files/remote.tif", start=len(raw) - 5, length=100)
    assert bytes(tail) == raw[-5:]  # a range past the end returns what exists
