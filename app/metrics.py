"""Prometheus metrics: what an operator graphs to see where a tile's time goes.

One registry per app (tests build several apps in one process). Request counts and latency come
from the observer middleware; stage busy times (search, headers, fetch, warp, mosaic, encode)
from each read's StageClock; cache, pool and in-flight figures are read at scrape time from the
engine, so the hot path only bumps plain integers.

Requests are labelled by the route template they matched (never the raw path: label values
must stay few), by what the request guard rejected them for (`rejected`, empty when it let
them through), by method and status. The server's own `process_*` (CPU, RSS, fds, start time)
and `python_*` figures come from prometheus_client's collectors, the compute workers' RSS from
/proc at scrape time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from core.engine import Engine
from core.timing import StageClock

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes(pid: int) -> int | None:
    """A process's resident set size from /proc/<pid>/statm (Linux), or None when it is gone
    (a worker can die between listing and reading) or there is no /proc."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class EngineCollector:
    """Cache hits, pool queue depth and requests in flight, read when Prometheus scrapes."""

    def __init__(self, engine: Callable[[], Engine | None], inflight: Callable[[], int]) -> None:
        self._engine = engine
        self._inflight = inflight

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        stats, tiles = engine.fetcher.stats, engine.fetcher.tiles
        hits = CounterMetricFamily(
            "terrazzo_cache_hits", "Cache lookups that found the entry", labels=["cache"]
        )
        misses = CounterMetricFamily(
            "terrazzo_cache_misses", "Cache lookups that did not", labels=["cache"]
        )
        ratio = GaugeMetricFamily(
            "terrazzo_cache_hit_ratio", "Hits over lookups since start", labels=["cache"]
        )
        for name, hit, miss in (
            ("header", stats["header_hits"], stats["header_misses"]),
            ("tile", tiles.hits, tiles.misses),
        ):
            hits.add_metric([name], hit)
            misses.add_metric([name], miss)
            ratio.add_metric([name], hit / (hit + miss) if hit + miss else 0.0)
        yield from (hits, misses, ratio)
        yield GaugeMetricFamily(
            "terrazzo_tile_cache_bytes", "Decoded COG tiles held in memory", value=tiles.bytes
        )
        yield CounterMetricFamily(
            "terrazzo_store_tiles_fetched",
            "COG internal tiles fetched from stores",
            value=stats["tiles"],
        )
        yield GaugeMetricFamily(
            "terrazzo_compute_pending_jobs",
            "Compute pool jobs submitted and not finished (queued + running)",
            value=engine.compute.pending,
        )
        yield GaugeMetricFamily(
            "terrazzo_compute_workers", "Compute pool processes", value=engine.compute.workers
        )
        rss = GaugeMetricFamily(
            "terrazzo_compute_worker_resident_memory_bytes",
            "Resident memory of each running compute worker process (by position in the pool)",
            labels=["worker"],
        )
        for n, pid in enumerate(engine.compute.pids()):
            if (size := resident_bytes(pid)) is not None:
                rss.add_metric([str(n)], size)
        yield rss
        yield GaugeMetricFamily(
            "terrazzo_inflight_requests", "Data requests being served", value=self._inflight()
        )


class Metrics:
    """The app's registry and the instruments the routes and middleware update."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # this process's CPU, memory, fds and start time; interpreter version; GC passes
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "terrazzo_requests",
            "HTTP requests by route template (or 'unmatched'), method, status and what the "
            "request guard rejected them for (empty: let through)",
            ["route", "method", "status", "rejected"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "terrazzo_request_duration_seconds",
            "HTTP request latency by route template and guard rejection (empty: let through)",
            ["route", "rejected"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stages = Histogram(
            "terrazzo_stage_duration_seconds",
            "Busy wall time of each read stage within one request",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "terrazzo_event_loop_lag_seconds",
            "How late the event loop wakes from a 50 ms sleep",
            buckets=_LAG_BUCKETS,
            registry=self.registry,
        )

    def watch(self, engine: Callable[[], Engine | None], inflight: Callable[[], int]) -> None:
        self.registry.register(EngineCollector(engine, inflight))  # type: ignore[arg-type]

    def observe_stages(self, clock: StageClock, **extra: float) -> None:
        for stage, seconds in {**clock.busy, **extra}.items():
            self.stages.labels(stage).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
