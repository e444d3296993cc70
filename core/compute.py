"""Compute stage: reprojection and mosaicking in a process pool.

Why a process pool: warping and mosaicking are CPU work; in the server process they would
compete with the event loop (and the fetch stage it drives) for the GIL and the cores. Only
numpy arrays, affine tuples and CRS strings cross the boundary, because that is what pickles
cheaply (async-geotiff objects do not pickle at all).

The job functions here are plain module-level functions so workers can import them; the pool
is started with `forkserver` (never `fork`: the parent holds DuckDB and tokio threads).
"""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from affine import Affine

from core.mosaic import METHODS
from core.plan import AssetRead
from core.warp import warp

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """One decoded source window, ready to warp."""

    data: np.ndarray  # (bands, h, w)
    valid: np.ndarray  # (h, w) bool
    transform: tuple[float, ...]  # affine of the window, 6 numbers
    crs: str
    dst_window: tuple[int, int, int, int] | None = None  # where it lands in the target

    @classmethod
    def of(cls, data: np.ndarray, valid: np.ndarray, read: AssetRead) -> Source:
        """The pixels of a planned read, with what the warp needs to place them."""
        return cls(data, valid, tuple(read.transform)[:6], read.crs, read.dst_window)


@dataclass(frozen=True)
class Target:
    crs: str
    transform: tuple[float, ...]
    width: int
    height: int


def warp_one(source: Source, target: Target, resampling: str) -> tuple[np.ndarray, np.ndarray]:
    """Reproject one source window onto the target grid (only where it can land)."""
    return warp(
        source.data,
        source.valid,
        Affine(*source.transform[:6]),
        source.crs,
        Affine(*target.transform[:6]),
        target.crs,
        (target.height, target.width),
        source.dst_window,
        resampling,
    )


def warp_item(
    sources: Sequence[Source], target: Target, resampling: str, bidx: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """Warp each asset of one item and stack their bands (valid where every asset is)."""
    layers = [warp_one(s, target, resampling) for s in sources]
    dtype = np.result_type(*(d.dtype for d, _ in layers))
    data = np.concatenate([d.astype(dtype, copy=False) for d, _ in layers], axis=0)
    valid = np.logical_and.reduce([v for _, v in layers])
    if bidx:
        data = data[[b - 1 for b in bidx]]
    return data, valid


def mosaic(
    layers: Sequence[tuple[np.ndarray, np.ndarray]], method: str
) -> tuple[np.ndarray, np.ndarray]:
    """Combine warped layers in order with one fresh instance of `method`."""
    combiner = METHODS[method]()
    for data, valid in layers:
        combiner.feed(data, valid)
    return combiner.result()


def _worker_init() -> None:
    """Workers run at a lower CPU priority: when cores are short, the event loop (and the
    fetches it drives) go first, so latency stays low and the loop never starves."""
    os.nice(10)


def _warm(modules: tuple[str, ...] = ()) -> int:
    """Import the heavy modules in a worker before the first request needs them (a fresh
    install's first tile otherwise spent 0.6 s importing the encoders)."""
    import rasterio.warp  # noqa: F401

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


class ComputePool:
    """A ProcessPoolExecutor that the event loop awaits, rebuilt if a worker dies."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(["core.compute", "rasterio.warp", "numpy"])
        self._pool = self._new_pool()
        self.pending = 0  # jobs submitted and not finished: queue depth plus running jobs

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers, mp_context=self._context, initializer=_worker_init
        )

    def warm(self, modules: tuple[str, ...] = ()) -> list[int]:
        """Start every worker now (blocking), so the first tile does not pay for it."""
        return list(self._pool.map(_warm, [modules] * (self.workers * 2)))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a job in a worker. If the pool broke (a worker died), rebuild it and run the
        job once more: jobs are pure functions, so a second run is safe."""
        loop = asyncio.get_running_loop()
        self.pending += 1
        try:
            for attempt in (1, 2):
                pool = self._pool
                try:
                    return await loop.run_in_executor(pool, fn, *args)
                except BrokenProcessPool:
                    if self._pool is pool:  # the first to notice rebuilds it
                        self._pool = self._new_pool()
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")
        finally:
            self.pending -= 1

    async def ping(self) -> int:
        """Run a trivial job: proves a worker is alive (rebuilding a broken pool)."""
        return await self.run(_warm)

    def pids(self) -> list[int]:
        return list(getattr(self._pool, "_processes", {}) or {})

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
