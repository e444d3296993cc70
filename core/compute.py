"""Compute stage: reprojection and mosaicking in a process pool.

Why a process pool: warping and mosaicking are CPU work; in the server process they would
compete with the event loop (and the fetch stage it drives) for the GIL and the cores. Only
numpy arrays, affine tuples and CRS strings cross the boundary, because that is what pickles
cheaply (async-geotiff objects do not pickle at all).

The job functions here are plain module-level functions so workers can import them; workers
are started with `forkserver` (never `fork`: the parent holds DuckDB and tokio threads).

Why not `concurrent.futures.ProcessPoolExecutor`: its workers share one result pipe, written
under one lock, and its manager thread checks that pipe before the workers' sentinels. A worker
SIGKILLed (or segfaulting) while writing a large result leaves half a message in the pipe and
the lock held: the manager thread blocks for ever in `Connection._recv` (the parent itself
holds the pipe's write end, so no EOF ever comes), every other worker blocks on the lock, and
every later job waits. Nothing can unblock the thread, and interpreter exit joins it. Here
each worker has its own pipe, written only by that worker, and its own feeding thread: a death
is an EOF on that pipe (or its sentinel firing), which fails or retries only that worker's job.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import struct
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from affine import Affine

from core import faults, process
from core.mosaic import METHODS
from core.plan import AssetRead
from core.process import Process
from core.warp import Window, aligned, warp_part

T = TypeVar("T")
log = logging.getLogger("terrazzo.compute")


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


Layer = tuple[np.ndarray, np.ndarray, Window]  # pixels and validity of a window, the window


def warp_one(source: Source, target: Target, resampling: str) -> Layer:
    """Reproject one source window onto the target grid (only where it can land)."""
    return warp_part(
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


INLINE_COPY_MAX_BYTES = 16 << 20  # a copy this size takes a few ms: the loop may do it


def is_copy(sources: Sequence[Source], target: Target, resampling: str) -> bool:
    """Whether `warp_item` of these is a plain copy (nearest, every source on the target's
    own grid: a chunk read in the COGs' CRS and resolution) small enough for the event loop
    (INLINE_COPY_MAX_BYTES): a memcpy there is cheaper than two trips through a pipe."""
    dst = Affine(*target.transform[:6])
    size = sum(s.data.nbytes + s.valid.nbytes for s in sources)
    return (
        resampling == "nearest"
        and size <= INLINE_COPY_MAX_BYTES
        and all(
            aligned(Affine(*s.transform[:6]), s.crs, dst, target.crs, *(s.dst_window or (0, 0))[:2])
            is not None
            for s in sources
        )
    )


def warp_item(
    sources: Sequence[Source],
    target: Target,
    resampling: str,
    steps: Sequence[Process] = (),
    unscale: Sequence[tuple[float, float]] | None = None,
) -> Layer:
    """Warp each asset of one item and stack their bands (valid where every asset is), on
    the part of the grid the item reaches: that window, not a grid-sized layer, is what goes
    back through the pipe (an item covering a sliver of a 1024² chunk sent the whole chunk).

    `unscale` is (scale, offset) per stacked band: applied after warping, in float32, the way
    rio-tiler does (its kernels run on the stored values), before any mosaic; then the
    item's `steps` (core.process: bidx's selection, an expression)."""
    parts = [warp_one(s, target, resampling) for s in sources]
    window = _union([w for _, _, w in parts])
    dtype = np.result_type(*(d.dtype for d, _, _ in parts))
    placed = [_place(p, window) for p in parts]
    data = np.concatenate([d.astype(dtype, copy=False) for d, _ in placed], axis=0)
    valid = np.logical_and.reduce([v for _, v in placed])
    if unscale is not None:
        scaling = np.asarray(unscale, dtype=np.float64).reshape(-1, 2, 1, 1)
        data = data.astype(np.float32)
        np.multiply(data, scaling[:, 0], out=data, casting="unsafe")
        np.add(data, scaling[:, 1], out=data, casting="unsafe")
    data, valid = process.run(steps, data, valid)
    return data, valid, window


def _union(windows: Sequence[Window]) -> Window:
    col, row = min(w[0] for w in windows), min(w[1] for w in windows)
    right = max(w[0] + w[2] for w in windows)
    bottom = max(w[1] + w[3] for w in windows)
    return (col, row, right - col, bottom - row)


def _place(layer: Layer, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """A layer's pixels on `window` (which holds its own window); not valid elsewhere."""
    data, valid, (col, row, w, h) = layer
    if (col, row, w, h) == window:
        return data, valid
    c0, r0, width, height = window
    out = np.zeros((data.shape[0], height, width), dtype=data.dtype)
    out_valid = np.zeros((height, width), dtype=bool)
    out[:, row - r0 : row - r0 + h, col - c0 : col - c0 + w] = data
    out_valid[row - r0 : row - r0 + h, col - c0 : col - c0 + w] = valid
    return out, out_valid


def expand(layer: Layer, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A layer on the whole (height, width) grid."""
    return _place(layer, (0, 0, shape[1], shape[0]))


def mosaic(
    layers: Sequence[Layer], method: str, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Combine warped layers in order with one fresh instance of `method`, on the whole
    (height, width) grid (each layer arrives as its window, expanded here in the worker)."""
    combiner = METHODS[method]()
    for layer in layers:
        combiner.feed(*expand(layer, shape))
    return combiner.result()


def _warm(modules: tuple[str, ...] = ()) -> int:
    """Import the heavy modules in a worker before the first request needs them (a fresh
    install's first tile otherwise spent 0.6 s importing the encoders)."""
    import rasterio.warp  # noqa: F401

    for name in modules:
        importlib.import_module(name)
    return os.getpid()


class WorkerDied(RuntimeError):
    """A compute job whose worker died twice (a retry already ran) or ran past its deadline.

    The service answers it with a 502 (a read of a warp job: that item's error); it is never an
    unexpected error, because crashes of native code in a worker are expected to happen."""


class _RemoteTraceback(Exception):
    """The worker-side traceback of a job's exception, attached as its __cause__."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _job_name(fn: Callable[..., Any]) -> str:
    return getattr(getattr(fn, "func", fn), "__name__", repr(fn))


@dataclass(frozen=True)
class _Message:
    """A pickle whose large buffers (the numpy arrays' memory) travel out of band (pickle
    protocol 5, PEP 574): written to the pipe as they are and read into writable memory of
    their own, instead of being copied into the pickle and out of it again on each side."""

    head: bytes  # the frame: buffer count and sizes, then the pickle without the buffers
    buffers: list[memoryview]


def _pack(obj: Any) -> _Message:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = [r.nbytes for r in raws]
    return _Message(struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes) + data, raws)


def _send(conn: multiprocessing.connection.Connection, message: _Message) -> None:
    conn.send_bytes(message.head)
    for raw in message.buffers:
        conn.send_bytes(raw)


def _recv(conn: multiprocessing.connection.Connection) -> Any:
    head = conn.recv_bytes()
    (count,) = struct.unpack_from("<I", head)
    sizes = struct.unpack_from(f"<{count}Q", head, 4)
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        conn.recv_bytes_into(buffer)
        buffers.append(buffer)
    return pickle.loads(memoryview(head)[4 + 8 * count :], buffers=buffers)


def _worker_main(conn: multiprocessing.connection.Connection, modules: tuple[str, ...]) -> None:
    """A compute worker: read a job from its own pipe, run it, write the reply; until EOF.

    Workers run at a lower CPU priority: when cores are short, the event loop (and the fetches
    it drives) go first, so latency stays low and the loop never starves. SIGINT is ignored:
    a Ctrl-C reaches the whole process group, and the server decides when workers stop (their
    pipe closes, or the server kills them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(10)
    injected = faults.ComputeFault.from_env()
    _send(conn, _pack(_warm(modules)))  # ready: imports done
    while True:
        name = "?"
        try:
            job = _recv(conn)
        except (EOFError, OSError):
            return  # the server closed the pipe or is gone: go with it
        try:
            fn, args = job
            name = _job_name(fn)
            faults.before_job(injected, name)
            reply: tuple = (True, fn(*args))
        except BaseException as exc:  # the job's own error goes back to the caller
            reply = (False, exc, traceback.format_exc())
        try:
            payload = _pack(reply)
        except Exception as exc:
            error = RuntimeError(f"compute job {name}: its result does not pickle: {exc!r}")
            payload = _pack((False, error, traceback.format_exc()))
        faults.before_reply(injected, name, conn.fileno(), [payload.head, *payload.buffers])
        try:
            _send(conn, payload)
        except OSError:
            return


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any]
    args: tuple
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    abandoned_at: float | None = None  # when the awaiting request gave up (monotonic)

    @property
    def name(self) -> str:
        return _job_name(self.fn)


class _Died(Exception):
    """Internal: the worker died (or was killed) while it held a job; `retry` says whether the
    job may run again (not after a deadline or for a request that is gone)."""

    def __init__(self, reason: str, *, retry: bool = True, ran: bool = True) -> None:
        super().__init__(reason)
        self.retry = retry
        self.ran = ran  # False: dead before the job reached it (the job is not to blame)


class _Worker:
    """One compute process, its own pipe, and the thread that feeds it jobs one at a time.

    The thread blocks on the pipe, never the event loop; the pipe's far end is held only by the
    process, so its death reads as EOF (or its sentinel fires) and affects only this job."""

    def __init__(self, pool: ComputePool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: multiprocessing.connection.Connection | None = None
        self.pid: int | None = None  # set once the process said it is ready
        self.started = 0  # processes started for this slot
        self.thread = threading.Thread(
            target=self._loop, name=f"terrazzo-compute-{index}", daemon=True
        )

    # -- process life --------------------------------------------------------------------

    def _start(self) -> None:
        """Start a process and wait for its ready message (imports done). Blocking."""
        ctx = self.pool._context
        parent, child = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=_worker_main,
            args=(child, self.pool._modules),
            name=f"terrazzo-compute-{self.index}",
            daemon=True,
        )
        process.start()
        child.close()  # the process holds the only other end: its death is our EOF
        self.process, self.conn = process, parent
        if not multiprocessing.connection.wait([parent, process.sentinel], self.pool.start_timeout):
            raise _Died(f"did not start within {self.pool.start_timeout} s")
        try:
            self.pid = _recv(parent)
        except (EOFError, OSError) as exc:
            raise _Died(f"died while starting ({self._exit_reason()})") from exc

    def _stop(self) -> None:
        """Kill the process (if alive) and reap it; the pipe goes with it."""
        self.pid = None
        if self.process is not None:
            if self.process.exitcode is None:
                self.process.kill()
            self.process.join(5)
        if self.conn is not None:
            self.conn.close()
        self.process = self.conn = None

    def _exit_reason(self) -> str:
        if self.process is None:
            return "not started"
        self.process.join(1)
        code = self.process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return signal.Signals(-code).name
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    def _replace(self) -> None:
        """Stop this worker's process and start a new one, backing off while starts fail (the
        pool is then not ready: /readyz says so)."""
        self._stop()
        delay = 0.1
        while not self.pool._closing:
            try:
                self._start()
                self.started += 1
                if self.started > 1:
                    self.pool.restarts += 1
                return
            except Exception as exc:  # _Died, OSError from the forkserver, ...
                log.error("compute worker %d did not start: %s; retrying", self.index, exc)
                self._stop()
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- jobs ------------------------------------------------------------------------------

    def _loop(self) -> None:
        self._replace()
        while True:
            job = self.pool._take(self)
            if job is None:
                break
            try:
                self._run(job)
            except Exception as exc:  # a bug here must fail the job, never this thread
                log.exception("compute worker %d: running %s failed", self.index, job.name)
                if not job.future.done():
                    job.future.set_exception(exc)
        self._stop()

    def idle_check(self) -> None:
        """Called while idle: a worker killed between jobs is replaced before the next job."""
        if self.process is None or self.process.exitcode is not None:
            log.warning("compute worker %d died while idle (%s)", self.index, self._exit_reason())
            self.pool.deaths += 1
            self._replace()

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        try:
            payload = _pack((job.fn, job.args))
        except Exception as exc:
            job.future.set_exception(exc)
            return
        crashes = 0  # deaths while this job ran
        for attempt in (1, 2, 3):
            if self.process is None:
                job.future.set_exception(WorkerDied("compute pool closed"))
                return
            try:
                reply = self._exchange(job, payload)
            except _Died as died:
                self.pool.deaths += 1
                reason = str(died)
                log.warning(
                    "compute worker %d (pid %s), job %s (attempt %d): %s",
                    self.index,
                    self.process.pid if self.process else "?",
                    job.name,
                    attempt,
                    reason,
                )
                self._replace()
                if not died.retry or job.abandoned_at is not None:
                    job.future.set_exception(WorkerDied(f"compute job {job.name}: {reason}"))
                    return
                crashes += died.ran
                if crashes == 2 or attempt == 3:
                    job.future.set_exception(
                        WorkerDied(
                            f"compute worker {reason} running {job.name}, "
                            "twice (retried once on a fresh worker)"
                        )
                    )
                    return
                continue
            if reply[0]:
                job.future.set_result(reply[1])
            else:
                _, exc, text = reply
                if not isinstance(exc, Exception):
                    # a job's CancelledError, KeyboardInterrupt or SystemExit must not reach
                    # the awaiting request as itself: it would read as that request's own
                    # cancellation, or stop the server's event loop
                    exc = RuntimeError(
                        f"compute job {job.name} raised {type(exc).__name__} in its worker"
                    )
                exc.__cause__ = _RemoteTraceback(text)
                job.future.set_exception(exc)
            return

    def _exchange(self, job: _Job, payload: _Message) -> tuple:
        """Send one job and wait for its reply, the worker's death, or a deadline (then kill
        it). Waits in short slices to notice a job its request abandoned, which is killed once
        past the grace period instead of holding the worker until its deadline."""
        assert self.conn is not None and self.process is not None
        conn, process, pool = self.conn, self.process, self.pool
        try:
            _send(conn, payload)
        except OSError as exc:
            raise _Died(f"died ({self._exit_reason()}) before taking the job", ran=False) from exc
        deadline = time.monotonic() + pool.job_timeout
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise _Died(
                    f"ran past its {pool.job_timeout} s deadline, its worker was killed",
                    retry=False,
                )
            if job.abandoned_at is not None and now - job.abandoned_at >= pool.abandon_grace:
                raise _Died(
                    "abandoned by its request and still running, its worker was killed", retry=False
                )
            ready = multiprocessing.connection.wait(
                [conn, process.sentinel], min(0.25, deadline - now)
            )
            if conn in ready:
                try:
                    return _recv(conn)
                except (EOFError, OSError) as exc:  # died mid-write: EOF inside the message
                    raise _Died(f"died ({self._exit_reason()})") from exc
            if ready:  # the sentinel alone: dead, nothing written
                raise _Died(f"died ({self._exit_reason()})")


_PRELOAD = ("core.compute", "rasterio.warp", "numpy")  # imported once, in the forkserver


class ComputePool:
    """Compute worker processes that the event loop awaits; a dead worker is replaced.

    A job whose worker dies (segfault, OOM kill, SIGKILL) runs once more on the replacement —
    jobs are pure functions, so that is safe — and a job that kills its worker twice fails with
    `WorkerDied`. A job runs at most `job_timeout` seconds, and at most `abandon_grace` seconds
    after the request awaiting it was cancelled; then its worker is killed and replaced."""

    def __init__(
        self,
        workers: int,
        *,
        job_timeout: float = 120.0,
        abandon_grace: float = 2.0,
        start_timeout: float = 60.0,
    ) -> None:
        self.workers = workers
        self.job_timeout = job_timeout
        self.abandon_grace = abandon_grace
        self.start_timeout = start_timeout
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(_PRELOAD))
        self._modules: tuple[str, ...] = ()  # imported by every worker before it is ready
        self._jobs: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._workers: list[_Worker] = []
        self.pending = 0  # jobs submitted and not finished: queue depth plus running jobs
        self.restarts = 0  # worker processes started to replace another
        self.deaths = 0  # workers that died or were killed holding a job or while idle

    def _ensure_started(self) -> None:
        """Start the worker threads (each starts its process) on first use: building the pool
        costs nothing, and an engine that never computes never forks."""
        with self._cond:
            if self._workers or self._closing:
                return
            self._workers = [_Worker(self, i) for i in range(self.workers)]
        for worker in self._workers:
            worker.thread.start()

    def _take(self, worker: _Worker) -> _Job | None:
        """The next job for `worker` (None when closing); checks the worker while idle."""
        while True:
            with self._cond:
                if self._closing:
                    return None
                if self._jobs:
                    return self._jobs.popleft()
                self._cond.wait(0.5)
                if self._jobs or self._closing:
                    continue
            worker.idle_check()

    def _queue(self, fn: Callable[..., Any], args: tuple) -> _Job:
        self._ensure_started()
        job = _Job(fn, args)
        with self._cond:
            if self._closing:
                raise RuntimeError("compute pool closed")
            self._jobs.append(job)
            self._cond.notify()
        return job

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future:
        """Queue a job from any thread; its future resolves in a worker thread."""
        return self._queue(fn, args).future

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a job in a worker and await it. Cancelling drops a queued job at once; a running
        one is killed with its worker if it has not finished `abandon_grace` s later."""
        job = self._queue(fn, args)
        self.pending += 1
        try:
            return await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:
            job.abandoned_at = time.monotonic()
            with self._cond, contextlib.suppress(ValueError):
                self._jobs.remove(job)  # still queued: never sent
            raise
        finally:
            self.pending -= 1

    def ready(self) -> int:
        """Workers whose process is running and took its ready message."""
        return sum(1 for w in self._workers if w.pid is not None)

    def warm(self, modules: tuple[str, ...] = ()) -> list[int]:
        """Start every worker now and import `modules` in each (blocking), so the first tile
        does not pay for it; replacements import them before they say they are ready."""
        self._modules = tuple(modules)  # before the first start: workers import them at once
        # and the forkserver too, if it has not started yet: every worker forked from it then
        # has them already (the first start and each restart after a crash)
        self._context.set_forkserver_preload([*_PRELOAD, *self._modules])
        futures = [self.submit(_warm, self._modules) for _ in range(self.workers * 2)]
        for future in futures:
            future.result(self.start_timeout)
        deadline = time.monotonic() + self.start_timeout
        while self.ready() < self.workers and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pids()

    async def ping(self) -> int:
        """Run a trivial job: proves a worker is alive and takes jobs. Fails at once when no
        worker is running (all died and are being replaced, or cannot start)."""
        self._ensure_started()
        if not self.ready():
            raise WorkerDied(f"no compute worker is running ({self.workers} starting)")
        return await self.run(_warm)

    def pids(self) -> list[int]:
        return [w.pid for w in self._workers if w.pid is not None]

    def stats(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "ready": self.ready(),
            "pids": self.pids(),
            "pending": self.pending,
            "deaths": self.deaths,
            "restarts": self.restarts,
        }

    def close(self) -> None:
        """Stop the workers: queued jobs fail, running ones are killed (jobs are pure, nobody
        is waiting once the service shuts down). Never waits on a job."""
        with self._cond:
            self._closing = True
            queued = list(self._jobs)
            self._jobs.clear()
            self._cond.notify_all()
        for job in queued:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("compute pool closed"))
        for worker in self._workers:
            if worker.process is not None and worker.process.exitcode is None:
                worker.process.kill()
        for worker in self._workers:
            worker.thread.join(10)
