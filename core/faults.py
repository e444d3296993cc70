"""Fault injection at the process's boundaries (tests, benchmarks).

`FaultyStore` wraps a real obstore store, so everything above the store — async-geotiff, the
engine, the service — runs unchanged; only the network is simulated. `ComputeFault` makes a
compute worker crash or hang at its job boundary (read from an environment variable, so a real
`terrazzo serve` can be started with it); everything around the worker is the real code.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import struct
import time
from dataclasses import dataclass
from typing import Any

import obstore


class FaultyStore:
    """Wraps a real obstore store: latency per request, the first N requests failing, every
    k-th request failing, or answers cut to half their length."""

    def __init__(
        self,
        inner: Any,
        *,
        fail_first: int = 0,
        fail_every: int = 0,
        delay: float = 0.0,
        truncate: bool = False,
        error: type[Exception] = ConnectionError,
    ) -> None:
        self.inner = inner
        self.fail_first = fail_first
        self.fail_every = fail_every
        self.delay = delay
        self.truncate = truncate
        self.error = error
        self.requests = 0

    async def _before(self) -> None:
        self.requests += 1
        n = self.requests
        if self.delay:
            await asyncio.sleep(self.delay)
        if n <= self.fail_first or (self.fail_every and n % self.fail_every == 0):
            raise self.error(f"injected fault {n}")

    def _cut(self, data: Any) -> Any:
        if not self.truncate:
            return data
        raw = bytes(data)
        return raw[: len(raw) // 2]

    async def get_range_async(
        self, path: str, *, start: int, end: int | None = None, length: int | None = None
    ) -> Any:
        await self._before()
        data = await obstore.get_range_async(self.inner, path, start=start, end=end, length=length)
        return self._cut(data)

    async def get_ranges_async(
        self, path: str, *, starts: Any, ends: Any = None, lengths: Any = None
    ) -> Any:
        await self._before()
        parts = await obstore.get_ranges_async(
            self.inner, path, starts=starts, ends=ends, lengths=lengths
        )
        return [self._cut(p) for p in parts]


# -- compute workers ---------------------------------------------------------------------------

COMPUTE_FAULT_ENV = "TERRAZZO_FAULT_COMPUTE"
COMPUTE_FAULTS = ("segv", "kill-mid-reply", "hang")


@dataclass(frozen=True)
class ComputeFault:
    """A crash injected inside a compute worker, at the worker's job boundary.

    Set `TERRAZZO_FAULT_COMPUTE=<action>:<job>[:<token file>]` (comma-separated for several)
    in the server's environment; compute workers inherit it. `job` is the job function's name
    (`warp_item`, `mosaic`, `encode`, or `*`). Actions:

    - `segv`: the worker reads address 0 before running the job (a real SIGSEGV, as a native
      library bug would give);
    - `kill-mid-reply`: the worker runs the job, writes its result's header and half of its
      bytes to the pipe, then SIGKILLs itself — the partial message that wedged
      ProcessPoolExecutor;
    - `hang`: the job never returns (a stuck native call), so only a deadline frees the worker.

    With a token file the fault fires once, in whichever worker deletes the file first (so
    "once" holds across worker processes and their replacements); without one it fires on
    every matching job.
    """

    action: str
    job: str
    token: str | None = None

    @classmethod
    def parse(cls, spec: str) -> list[ComputeFault]:
        faults = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            action, _, rest = part.partition(":")
            job, _, token = rest.partition(":")
            if action not in COMPUTE_FAULTS or not job:
                raise ValueError(
                    f"{COMPUTE_FAULT_ENV}: {part!r} is not <action>:<job>[:<token file>] "
                    f"with action one of {COMPUTE_FAULTS}"
                )
            faults.append(cls(action, job, token or None))
        return faults

    @classmethod
    def from_env(cls) -> list[ComputeFault]:
        return cls.parse(os.environ.get(COMPUTE_FAULT_ENV, ""))

    def fires(self, action: str, job: str) -> bool:
        """Whether this fault applies to `job` now (claiming its token if it has one)."""
        if action != self.action or self.job not in ("*", job):
            return False
        if self.token is None:
            return True
        try:
            os.unlink(self.token)  # atomic: one worker wins the token
        except FileNotFoundError:
            return False
        return True


def before_job(faults: list[ComputeFault], job: str) -> None:
    """Called by a compute worker before it runs `job`."""
    for fault in faults:
        if fault.fires("segv", job):
            ctypes.string_at(0)  # SIGSEGV: reading address 0
        if fault.fires("hang", job):
            time.sleep(3600)


def before_reply(faults: list[ComputeFault], job: str, fd: int, parts: list) -> None:
    """Called by a compute worker with its reply about to be written to pipe `fd`: `parts`
    are the messages it is written as (the pickle, then its out-of-band buffers)."""
    for fault in faults:
        if fault.fires("kill-mid-reply", job):
            # multiprocessing.Connection framing: a 4-byte big-endian length, then the bytes.
            # Write every message but the last, the last one's length and half its bytes (the
            # largest array when there is one), then die as a SIGKILL mid-write would.
            *whole, last = [memoryview(p).cast("B") for p in parts]
            frames = [struct.pack("!i", len(p)) + bytes(p) for p in whole]
            frames.append(struct.pack("!i", len(last)) + bytes(last[: len(last) // 2]))
            part = memoryview(b"".join(frames))
            while part:
                part = part[os.write(fd, part) :]
            os.kill(os.getpid(), signal.SIGKILL)
