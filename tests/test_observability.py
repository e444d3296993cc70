"""Metrics, Server-Timing, request ids in JSON logs, and HTTP caching of tiles."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server
from tests.test_tiles_api import EMPTY, TWO_DATES

T = f"{TWO_DATES.z}/{TWO_DATES.x}/{TWO_DATES.y}"


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_requests_stages_caches_and_loop_lag(http: httpx.Client) -> None:
    before = scrape(http)
    route = ("route", "/tiles/{z}/{x}/{y}")
    passed = ("rejected", "")  # let through by the request guard
    ok = (("method", "GET"), passed, route, ("status", "200"))
    assert http.get(f"/tiles/{T}", params={"tilesize": 200}).status_code == 200
    assert http.get("/tiles/99/0/0").status_code == 404
    after = scrape(http)
    count = ("terrazzo_requests_total", ok)
    assert after[count] == before.get(count, 0) + 1
    not_found = (("method", "GET"), passed, route, ("status", "404"))
    assert after[("terrazzo_requests_total", not_found)] >= 1
    assert after[("terrazzo_request_duration_seconds_count", (passed, route))] >= 2
    for stage in ("search", "headers", "fetch", "warp", "encode"):
        key = ("terrazzo_stage_duration_seconds_count", (("stage", stage),))
        assert after[key] == before.get(key, 0) + 1, stage
    header = (("cache", "header"),)
    lookups = sum(after[(f"terrazzo_cache_{k}_total", header)] for k in ("hits", "misses"))
    assert lookups >= 1
    assert 0 <= after[("terrazzo_cache_hit_ratio", (("cache", "tile"),))] <= 1
    assert after[("terrazzo_compute_pending_jobs", ())] == 0, "no job left behind"
    assert after[("terrazzo_compute_workers", ())] >= 1
    assert after[("terrazzo_event_loop_lag_seconds_count", ())] > 0


def test_server_timing_has_every_stage_within_the_total(http: httpx.Client) -> None:
    r = http.get(f"/tiles/{T}", params={"tilesize": 300})
    assert r.status_code == 200
    stages = {
        part.split(";")[0].strip(): float(part.split("dur=")[1])
        for part in r.headers["Server-Timing"].split(",")
    }
    assert {"search", "headers", "fetch", "warp", "encode", "total"} <= set(stages)
    for name, ms in stages.items():
        assert 0 <= ms <= stages["total"] + 0.1, name


def test_etag_revalidates_without_reading(http: httpx.Client) -> None:
    url = f"/tiles/{T}.png"
    first = http.get(url, params={"tilesize": 320})
    assert first.status_code == 200
    etag = first.headers["ETag"]
    assert "max-age=" in first.headers["Cache-Control"]
    reads = http.get("/stats").json()["fetch"]["reads"]
    again = http.get(url, params={"tilesize": 320}, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b""
    assert again.headers["ETag"] == etag
    assert http.get("/stats").json()["fetch"]["reads"] == reads, "a 304 reads nothing"
    other = http.get(url, params={"tilesize": 320, "method": "last"})
    assert other.headers["ETag"] != etag, "the query is part of the tile"


def test_empty_and_failed_tiles_are_not_cached(http: httpx.Client) -> None:
    empty = http.get(f"/tiles/{EMPTY.z}/{EMPTY.x}/{EMPTY.y}")
    assert empty.status_code == 204
    assert empty.headers["Cache-Control"] == "no-cache" and "ETag" not in empty.headers
    bad = http.get(f"/tiles/{T}", params={"method": "nope"})
    assert bad.status_code == 400 and "ETag" not in bad.headers
    assert "max-age" not in bad.headers.get("Cache-Control", "")


def test_replaced_catalog_changes_etags(demo_catalog: Path, tmp_path: Path) -> None:
    root = shutil.copytree(demo_catalog.parent, tmp_path / "demo")  # hrefs are relative
    catalog = root / "items.parquet"
    server = Server(catalog)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            before = http.get(f"/tiles/{T}").headers["ETag"]
            assert http.get(f"/tiles/{T}").headers["ETag"] == before, "stable while unchanged"
            fresh = root / "new.parquet"
            shutil.copy(demo_catalog, fresh)
            fresh.replace(catalog)  # `terrazzo index` renames its output into place
            time.sleep(1.2)  # the catalog is checked for replacement at most once a second
            r = http.get(f"/tiles/{T}", headers={"If-None-Match": before})
            assert r.status_code == 200 and r.headers["ETag"] != before
    finally:
        server.stop()


def test_json_logs_carry_the_request_id(demo_catalog: Path) -> None:
    server = Server(demo_catalog)
    try:
        r = httpx.get(f"{server.url}/tiles/{T}", headers={"X-Request-ID": "trace-42"}, timeout=60)
        assert r.status_code == 200 and r.headers["X-Request-ID"] == "trace-42"
        minted = httpx.get(f"{server.url}/healthz").headers["X-Request-ID"]
        assert len(minted) == 32
        time.sleep(0.2)
    finally:
        output = server.stop()
    assert output.startswith("terrazzo settings: {"), output[:200]
    records = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    ours = [r for r in records if r.get("request_id") == "trace-42"]
    assert ours, output[-2000:]
    assert ours[-1]["route"] == "/tiles/{z}/{x}/{y}" and ours[-1]["status"] == 200
    assert ours[-1]["duration_ms"] > 0 and ours[-1]["level"] == "info"
    assert any(r.get("request_id") == minted for r in records)
