"""/metrics on a real uvicorn server: every kind of request under its own bounded labels (route
template, or what the request guard rejected), promtool's lint, and process metrics that agree
with /proc."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import morecantile
import psutil
import pytest
from obstore.store import LocalStore
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from core.engine import Engine
from core.faults import FaultyStore
from core.fetch import Fetcher
from core.settings import Settings
from core.stores import Stores
from tests.conftest import serve_in_thread

KEY = "s3cret"
TMS = morecantile.tms.get("WebMercatorQuad")
T = TMS.tile(6.0, 45.0, 11)
TILE_ROUTE = "/tiles/{z}/{x}/{y}.{format}"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Guarded:
    url: str
    http: httpx.Client  # sends the API key
    store: FaultyStore
    engine: Engine


@pytest.fixture(scope="module")
def guarded(demo_catalog: Path) -> Iterator[Guarded]:
    """A server with every guard on: an API key, one request in flight at most, 2 KiB bodies,
    300-byte queries; no decoded-tile cache, so every tile read reaches the (delayable) store."""
    store = FaultyStore(LocalStore())
    settings = Settings(
        catalog=demo_catalog,
        compute_workers=1,
        api_key=KEY,
        max_inflight=1,
        max_body_bytes=2048,
        max_query_bytes=300,
    )
    fetcher = Fetcher(stores=Stores(lambda key: store), tile_cache_bytes=0)
    engine = Engine(settings, fetcher=fetcher)
    try:
        with (
            serve_in_thread(create_app(settings, engine=engine)) as url,
            httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": KEY}) as http,
        ):
            yield Guarded(url, http, store, engine)
    finally:
        engine.close()


def scrape(http: httpx.Client) -> tuple[Samples, str]:
    r = http.get("/metrics")
    assert r.status_code == 200, r.text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }
    return samples, r.text


def requests(
    route: str, method: str, status: int, rejected: str = ""
) -> tuple[str, tuple[tuple[str, str], ...]]:
    labels = {"route": route, "method": method, "status": str(status), "rejected": rejected}
    return "terrazzo_requests_total", tuple(sorted(labels.items()))


def test_each_kind_of_request_lands_under_its_own_labels(guarded: Guarded) -> None:
    http, url = guarded.http, guarded.url
    before, _ = scrape(http)
    tile = f"/tiles/{T.z}/{T.x}/{T.y}.png"
    chunks = {"crs": "EPSG:3857", "chunks": [{"id": "x" * 3000, "bbox": [0, 0, 1, 1]}]}
    preflight = {"Origin": "https://map.example", "Access-Control-Request-Method": "GET"}
    sent = [
        (http.get(tile), requests(TILE_ROUTE, "GET", 200)),
        (http.get("/docs"), requests("/docs", "GET", 200)),
        (http.head("/redoc"), requests("/redoc", "HEAD", 200)),  # served as GET on a copy
        (http.get("/static/docs/swagger-ui.css"), requests("/static/docs/{path}", "GET", 200)),
        (http.get("/static/map.js"), requests("/static/{path}", "GET", 200)),
        (httpx.options(url + tile, headers=preflight), requests(TILE_ROUTE, "OPTIONS", 200)),
        (httpx.get(url + tile), requests(TILE_ROUTE, "GET", 401, "auth")),
        (http.post("/chunks", json=chunks), requests("/chunks", "POST", 413, "too_large")),
        (
            http.post("/chunks", content=b"{}", headers={"Content-Type": "text/plain"}),
            requests("/chunks", "POST", 415, "media_type"),
        ),
        (
            http.get(tile, params={"ids": "x" * 400}),
            requests(TILE_ROUTE, "GET", 414, "query_too_long"),
        ),
        (http.get("/chunks"), requests("/chunks", "GET", 405)),
        (http.get("/no/such/path"), requests("unmatched", "GET", 404)),
        (http.get("/wp-login.php"), requests("unmatched", "GET", 404)),
        (http.request("PROPFIND", "/map"), requests("/map", "other", 405)),  # bounded
    ]
    after, text = scrape(http)
    expected: dict = {}
    for response, key in sent:
        assert response.status_code == int(dict(key[1])["status"]), (key, response.text)
        expected[key] = expected.get(key, 0) + 1
    for key, n in expected.items():
        assert after.get(key, 0) - before.get(key, 0) == n, key
    assert sent[5][0].headers["access-control-allow-origin"] == "*"
    latency = (
        "terrazzo_request_duration_seconds_count",
        (("rejected", "auth"), ("route", TILE_ROUTE)),
    )
    assert after[latency] - before.get(latency, 0) == 1
    # no raw path (or raw method) ever becomes a label value
    assert "/no/such" not in text and "wp-login" not in text and "PROPFIND" not in text


def test_overload_is_labelled_and_the_scrape_still_answers(guarded: Guarded) -> None:
    """One slow tile holds the only slot: the next tile is a 503 labelled `overload` under its
    route, and /metrics answers meanwhile (it is outside the in-flight cap). While the store is
    slow the holder cannot finish (its tile has pixels and no tile cache), so the 503 is sure."""
    http = guarded.http
    before, _ = scrape(http)
    guarded.store.delay = 1.5
    slow: list[httpx.Response] = []
    holder = threading.Thread(
        target=lambda: slow.append(http.get(f"/tiles/{T.z}/{T.x + 1}/{T.y}.png"))
    )
    try:
        holder.start()
        deadline = time.monotonic() + 5
        while scrape(http)[0][("terrazzo_inflight_requests", ())] < 1:
            assert time.monotonic() < deadline, "the slow tile never took the slot"
            time.sleep(0.02)
        busy = http.get(f"/tiles/{T.z}/{T.x}/{T.y + 1}.png")
    finally:
        guarded.store.delay = 0.0
        holder.join(timeout=30)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert slow and slow[0].status_code in (200, 204)
    after, _ = scrape(http)
    key = requests(TILE_ROUTE, "GET", 503, "overload")
    assert after[key] - before.get(key, 0) == 1
    served = requests(TILE_ROUTE, "GET", slow[0].status_code)
    assert after[served] - before.get(served, 0) == 1


def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.fail("promtool is missing: run `make tools` (Debian's prometheus package)")
    return found


def test_promtool_check_metrics_passes(guarded: Guarded) -> None:
    http = guarded.http
    assert http.get(f"/tiles/{T.z}/{T.x}/{T.y}.png").status_code == 200
    assert httpx.get(guarded.url + "/info").status_code == 401  # a rejected series too
    _, text = scrape(http)
    assert 'rejected="auth"' in text and "terrazzo_stage_duration_seconds_bucket" in text
    lint = subprocess.run(
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # the same call does reject what breaks the conventions (a counter without _total)
    bad = subprocess.run(
        [promtool(), "check", "metrics"],
        input="# HELP hits Hits.\n# TYPE hits counter\nhits 1\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0 and "_total" in bad.stdout + bad.stderr


def test_process_metrics_agree_with_proc(guarded: Guarded) -> None:
    """The server here is this process (uvicorn in a thread): its figures are /proc/self's."""
    me = psutil.Process()
    cpu_before = time.process_time()
    samples, _ = scrape(guarded.http)
    cpu_after = time.process_time()
    rss = samples[("process_resident_memory_bytes", ())]
    assert 0.67 < rss / me.memory_info().rss < 1.5
    assert cpu_before - 0.05 <= samples[("process_cpu_seconds_total", ())] <= cpu_after + 0.05
    assert abs(samples[("process_start_time_seconds", ())] - me.create_time()) < 2
    fds = samples[("process_open_fds", ())]
    assert 0.67 < fds / len(os.listdir("/proc/self/fd")) < 1.5
    assert samples[("process_max_fds", ())] > fds
    assert samples[("process_virtual_memory_bytes", ())] >= rss
    # the compute worker: its own RSS, not this process's
    (pid,) = guarded.engine.compute.pids()
    worker = samples[("terrazzo_compute_worker_resident_memory_bytes", (("worker", "0"),))]
    assert 0.67 < worker / psutil.Process(pid).memory_info().rss < 1.5
