"""Load test: N concurrent clients for S seconds over a mixed workload, against a real
`terrazzo serve` on 127.0.0.1 (nothing else is ever contacted). Bounded in count and time.

Mix per client loop: tiles at z8–z13 in random formats (70%), a small POST /chunks (20%),
a tile plan (10%). Reports requests/s, status counts, 5xx, latency p50/p95, the server's
RSS in the first and last 20 s, and its event-loop lag (from /stats).

    .venv/bin/python -m bench.load --catalog data/demo/items.parquet --clients 64 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx
import morecantile

from bench.procstats import children, rss_mb

TMS = morecantile.tms.get("WebMercatorQuad")


def start_server(catalog: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--catalog", catalog, "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


async def client_loop(http: httpx.AsyncClient, stop: float, bbox, out: list, rng: random.Random):
    minx, miny, maxx, maxy = bbox
    while time.monotonic() < stop:
        kind = rng.random()
        lon, lat = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        t = TMS.tile(lon, lat, rng.randint(8, 13))
        started = time.perf_counter()
        try:
            if kind < 0.7:
                fmt = rng.choice(["png", "jpeg", "webp", "npy"])
                r = await http.get(
                    f"/tiles/{t.z}/{t.x}/{t.y}.{fmt}",
                    params={"method": rng.choice(["first", "first", "mean"])},
                )
            elif kind < 0.9:
                x, y = TMS.xy(lon, lat)
                chunks = [
                    {
                        "id": str(i),
                        "bbox": [x + i * 5000, y, x + (i + 1) * 5000, y + 5000],
                        "width": 128,
                        "height": 128,
                    }
                    for i in range(4)
                ]
                r = await http.post("/chunks", json={"crs": "EPSG:3857", "chunks": chunks})
            else:
                r = await http.get(f"/plan/WebMercatorQuad/{t.z}/{t.x}/{t.y}")
            out.append((time.monotonic(), r.status_code, time.perf_counter() - started))
        except httpx.HTTPError as exc:
            out.append((time.monotonic(), type(exc).__name__, time.perf_counter() - started))


async def run(url: str, clients: int, seconds: float, bbox, pid: int) -> dict:
    out: list = []
    rss: list[tuple[float, float]] = []
    start = time.monotonic()
    stop = start + seconds

    async def sample_rss() -> None:
        while time.monotonic() < stop:
            rss.append((time.monotonic() - start, rss_mb(children(pid))))
            await asyncio.sleep(1)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        sampler = asyncio.ensure_future(sample_rss())
        await asyncio.gather(
            *(client_loop(http, stop, bbox, out, random.Random(i)) for i in range(clients))
        )
        await sampler
        stats = (await http.get("/stats")).json()
    return {"results": out, "rss": rss, "stats": stats, "wall": time.monotonic() - start}


def report(r: dict, seconds: float) -> dict:
    codes = Counter(code for _, code, _ in r["results"])
    latencies = sorted(lat for _, code, lat in r["results"] if code == 200)
    five = sum(n for code, n in codes.items() if not isinstance(code, int) or code >= 500)
    window = min(20.0, seconds / 3)
    first = [m for t, m in r["rss"] if t <= window] or [0.0]
    last = [m for t, m in r["rss"] if t >= seconds - window] or [0.0]
    growth = (max(last) - max(first)) / max(first) if max(first) else 0.0
    lag = r["stats"]["loop_lag_ms"]
    summary = {
        "requests": len(r["results"]),
        "req_s": len(r["results"]) / r["wall"],
        "status": dict(codes),
        "5xx_or_errors": five,
        "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
        "p95_ms": 1000 * latencies[int(0.95 * len(latencies))] if latencies else None,
        "rss_first_mb": max(first),
        "rss_last_mb": max(last),
        "rss_growth": growth,
        "loop_lag_ms": lag,
    }
    for key, value in summary.items():
        print(f"{key:>15}: {value}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--catalog", default="data/demo/items.parquet")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.catalog, port, {"TERRAZZO_MAX_INFLIGHT": "256"})
    try:
        bbox = httpx.get(f"http://127.0.0.1:{port}/info").json()["bbox"]
        result = asyncio.run(
            run(f"http://127.0.0.1:{port}", args.clients, args.seconds, bbox, proc.pid)
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return report(result, args.seconds)


if __name__ == "__main__":
    main()
