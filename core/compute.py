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
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from affine import Affine

from core import faults, process
from core.allocator import keep_freed_memory
from core.mosaic import METHODS, Paste
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


def warp_one(source: Source, target: Target, resampling: str, memo: dict | None = None) -> Layer:
    """Reproject one source window onto the target grid (only where it can land); `memo`
    shares sampling indexes between the sources of one job (core.warp.warp_part)."""
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
        memo,
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
    memo: dict = {}  # assets on one grid (a COG per band) share their sampling index
    parts = [warp_one(s, target, resampling, memo) for s in sources]
    window = _union([w for _, _, w in parts])
    if len(parts) == 1:  # one asset: its layer as it is (concatenate would copy it)
        data, valid, _ = parts[0]
    else:
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
    (height, width) grid (each layer arrives as its window: pasted there by first and last,
    expanded to the grid for the others)."""
    kind = METHODS[method]
    if kind.paste:
        dtype = np.result_type(*(data.dtype for data, _, _ in layers))
        paste = Paste(layers[0][0].shape[0], shape, dtype, first=method == "first")
        for data, valid, window in layers:
            paste.feed(data, valid, window)
        return paste.result()
    combiner = kind()
    for layer in layers:
        combiner.feed(*expand(layer, shape))
    return combiner.result()


def is_paste(layers: Sequence[Layer], method: str) -> bool:
    """Whether `mosaic` of these only copies pixels (first, last) and is small enough for the
    event loop (INLINE_COPY_MAX_BYTES), where it is cheaper than a trip to the pool."""
    size = sum(data.nbytes + valid.nbytes for data, valid, _ in layers)
    return METHODS[method].paste and size <= INLINE_COPY_MAX_BYTES


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


class _Arena:
    """Shared memory between the server and one compute worker slot, lent to one job at a time.

    Why: a tile's or chunk's arrays went through the worker's pipe both ways (a 1024² chunk
    mosaic: ~4 MB in, ~4 MB out), each buffer a write, a kernel copy and a zeroed read buffer
    on the far side; the pool cost 2-3x the job itself (bench/sdk: mosaic 0.14 s through the
    pool vs 0.05 s inline for 16 chunks). Here the server copies a job's buffers into the slot's
    arena, the worker's arrays are views of it (no copy), the worker writes its result's
    buffers after the job's (or names them in place when a result is a view of an input), and
    the server copies them out before the slot's next job. Only the pickle's small frame goes
    through the pipe, which still carries every message (so a death is still an EOF there).

    The server creates it (`multiprocessing.shared_memory`, whose resource tracker unlinks it
    if the server dies) with its pages reserved (`posix_fallocate`: a full /dev/shm, Docker's
    64 MB default, fails here instead of a SIGBUS on first touch); a worker maps the same file
    directly (attaching through `SharedMemory` would register it with the tracker a second
    time, on Python < 3.13). Buffers that do not fit go through the pipe as before."""

    ALIGN = 64

    def __init__(self, name: str, size: int, owner: Any = None, mapping: Any = None) -> None:
        self.name, self.size = name, size
        self._owner, self._mapping = owner, mapping  # SharedMemory (server) or mmap (worker)
        self.array = np.frombuffer(owner.buf if owner is not None else mapping, dtype=np.uint8)
        self.base = self.array.ctypes.data

    @classmethod
    def create(cls, size: int) -> _Arena | None:
        """A new arena of `size` bytes, or None when shared memory is unavailable or full."""
        if size <= 0 or not os.path.isdir("/dev/shm"):
            return None
        from multiprocessing import shared_memory

        try:
            shm = shared_memory.SharedMemory(create=True, size=size)
        except OSError as exc:
            log.warning("no shared memory for the compute pool (%s): arrays go by pipe", exc)
            return None
        try:
            fd = os.open(f"/dev/shm/{shm.name.lstrip('/')}", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning(
                "shared memory for the compute pool: %d MB not available (%s; Docker: raise "
                "--shm-size or lower TERRAZZO_COMPUTE_ARENA_MB): arrays go by pipe",
                size >> 20,
                exc,
            )
            shm.close()
            shm.unlink()
            return None
        arena = cls(shm.name, size, owner=shm)
        # unlinked at exit when no one closed the pool (a script that never called
        # Engine.close): else the resource tracker warns of a leak and unlinks it itself
        weakref.finalize(arena, _unlink, shm)
        return arena

    @classmethod
    def attach(cls, name: str, size: int) -> _Arena:
        """The server's arena `name`, mapped in a worker."""
        import mmap

        fd = os.open(f"/dev/shm/{name.lstrip('/')}", os.O_RDWR)
        try:
            return cls(name, size, mapping=mmap.mmap(fd, size))
        finally:
            os.close(fd)

    def offset_of(self, raw: memoryview) -> int | None:
        """Where `raw` lies in this arena (a result that is a view of a job's input), if it does."""
        address = np.frombuffer(raw, dtype=np.uint8).ctypes.data
        offset = address - self.base
        return offset if offset >= 0 and offset + raw.nbytes <= self.size else None

    def put(self, raw: memoryview, start: int) -> int | None:
        """Copy `raw` in at the first aligned offset from `start`; None when it does not fit."""
        offset = -(-start // self.ALIGN) * self.ALIGN
        if offset + raw.nbytes > self.size:
            return None
        np.copyto(self.array[offset : offset + raw.nbytes], np.frombuffer(raw, dtype=np.uint8))
        return offset

    def close(self, unlink: bool = False) -> None:
        self.array = None  # type: ignore[assignment]  # the view must go before the mapping
        with contextlib.suppress(BufferError, OSError, FileNotFoundError):
            if self._owner is not None:
                self._owner.close()
                if unlink:
                    self._owner.unlink()
            elif self._mapping is not None:
                self._mapping.close()


def _unlink(shm: Any) -> None:
    with contextlib.suppress(OSError, FileNotFoundError):
        shm.unlink()


_PIPE, _SHARED = 0, 1  # where a buffer of a message travels


@dataclass(frozen=True)
class _Message:
    """A pickle whose large buffers (the numpy arrays' memory) travel out of band (pickle
    protocol 5, PEP 574): in the slot's arena when there is room (see `_Arena`), else written
    to the pipe as they are and read into writable memory of their own, instead of being
    copied into the pickle and out of it again on each side."""

    head: bytes  # the frame: per buffer (where, offset, size), then the pickle without them
    buffers: list[memoryview]  # the buffers that go through the pipe, after the head


def _pack(obj: Any, arena: _Arena | None = None, start: int = 0) -> _Message:
    """Frame `obj`; its buffers go into `arena` from offset `start` while they fit."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    entries: list[int] = []
    piped: list[memoryview] = []
    for buffer in buffers:
        raw = buffer.raw()
        offset = None
        if arena is not None and raw.nbytes:
            offset = arena.offset_of(raw)
            if offset is None:
                offset = arena.put(raw, start)
                if offset is not None:
                    start = offset + raw.nbytes
        if offset is None:
            entries += (_PIPE, 0, raw.nbytes)
            piped.append(raw)
        else:
            entries += (_SHARED, offset, raw.nbytes)
    head = struct.pack(f"<I{len(entries)}Q", len(buffers), *entries)
    return _Message(head + data, piped)


def _send(conn: multiprocessing.connection.Connection, message: _Message) -> None:
    conn.send_bytes(message.head)
    for raw in message.buffers:
        conn.send_bytes(raw)


def _recv(
    conn: multiprocessing.connection.Connection, arena: _Arena | None = None, *, copy: bool = True
) -> tuple[Any, int]:
    """Read one message: the object, and the end of its buffers in the arena. The server reads
    with `copy` (the arena is the slot's next job's); a worker's arrays are views of the arena."""
    head = conn.recv_bytes()
    (count,) = struct.unpack_from("<I", head)
    entries = struct.unpack_from(f"<{3 * count}Q", head, 4)
    buffers: list[Any] = []
    end = 0
    for i in range(count):
        where, offset, size = entries[3 * i : 3 * i + 3]
        if where == _SHARED:
            if arena is None or offset + size > arena.size:
                raise OSError("a message names shared memory this side does not have")
            view = arena.array[offset : offset + size]
            buffers.append(view.copy() if copy else view)
            end = max(end, offset + size)
        else:
            buffer = bytearray(size)
            conn.recv_bytes_into(buffer)
            buffers.append(buffer)
    return pickle.loads(memoryview(head)[4 + 24 * count :], buffers=buffers), end


def _worker_main(
    conn: multiprocessing.connection.Connection,
    modules: tuple[str, ...],
    arena: tuple[str, int] | None = None,
    malloc: tuple[int, int] = (0, 0),
) -> None:
    """A compute worker: read a job from its own pipe, run it, write the reply; until EOF.
    `arena` names its slot's shared memory (`_Arena`) and its size, if it has one; `malloc`
    its allocator's thresholds (`core.allocator`: a warp's arrays reuse freed memory).

    Workers run at a lower CPU priority: when cores are short, the event loop (and the fetches
    it drives) go first, so latency stays low and the loop never starves. SIGINT is ignored:
    a Ctrl-C reaches the whole process group, and the server decides when workers stop (their
    pipe closes, or the server kills them)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(10)
    keep_freed_memory(*malloc)
    injected = faults.ComputeFault.from_env()
    shared = _Arena.attach(*arena) if arena is not None else None
    _send(conn, _pack(_warm(modules)))  # ready: imports done
    while True:
        name = "?"
        try:
            job, end = _recv(conn, shared, copy=False)
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
            payload = _pack(reply, shared, end)  # after the job's own buffers
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
        self.arena: _Arena | None = None  # the slot's shared memory, lent to each process
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
            args=(
                child,
                self.pool._modules,
                (self.arena.name, self.arena.size) if self.arena is not None else None,
                self.pool.malloc,
            ),
            name=f"terrazzo-compute-{self.index}",
            daemon=True,
        )
        process.start()
        child.close()  # the process holds the only other end: its death is our EOF
        self.process, self.conn = process, parent
        if not multiprocessing.connection.wait([parent, process.sentinel], self.pool.start_timeout):
            raise _Died(f"did not start within {self.pool.start_timeout} s")
        try:
            self.pid, _ = _recv(parent)
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
        self.arena = _Arena.create(self.pool.arena_bytes)  # here: reserving it takes ms
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
        if self.arena is not None:
            self.arena.close(unlink=True)

    def idle_check(self) -> None:
        """Called while idle: a worker killed between jobs is replaced before the next job."""
        if self.process is None or self.process.exitcode is not None:
            log.warning("compute worker %d died while idle (%s)", self.index, self._exit_reason())
            self.pool.deaths += 1
            self._replace()

    def _run(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return  # cancelled while queued
        crashes = 0  # deaths while this job ran
        for attempt in (1, 2, 3):
            if self.process is None:
                job.future.set_exception(WorkerDied("compute pool closed"))
                return
            try:
                # packed for each attempt: a worker that died may have written into its
                # arrays, which are views of the arena
                payload = _pack((job.fn, job.args), self.arena)
            except Exception as exc:
                job.future.set_exception(exc)
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
                    return _recv(conn, self.arena)[0]
                except (EOFError, OSError) as exc:  # died mid-write: EOF inside the message
                    raise _Died(f"died ({self._exit_reason()})") from exc
            if ready:  # the sentinel alone: dead, nothing written
                raise _Died(f"died ({self._exit_reason()})")


# imported once, in the forkserver (core.lean_imports first: no xarray in the workers)
_PRELOAD = ("core.lean_imports", "core.compute", "rasterio.warp", "numpy")


def start_forkserver(modules: tuple[str, ...] = ()) -> None:
    """Start the compute pool's forkserver now, importing `modules` with its own preload, and
    return at once: its imports (~1.5 s) then overlap whatever the caller does next (the
    server's own imports: `terrazzo serve` reached /readyz that much later when the pool
    started it from the app's start-up). A pool made later in this process uses it."""
    import multiprocessing.forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload([*_PRELOAD, *modules])
    multiprocessing.forkserver.ensure_running()


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
        arena_mb: int = 64,
        malloc: tuple[int, int] = (0, 0),
    ) -> None:
        """`arena_mb`: shared memory per worker for the arrays of a job and its result (see
        `_Arena`; 0: every array goes through the worker's pipe). `malloc`: each worker's
        (trim, mmap) thresholds in MB (`core.allocator`; 0: glibc's default)."""
        self.workers = workers
        self.malloc = malloc
        self.arena_bytes = arena_mb << 20
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
