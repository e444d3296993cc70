"""A store wrapper that injects failures or latency at the store boundary (tests, benchmarks).

It wraps a real obstore store, so everything above the store — async-geotiff, the engine, the
service — runs unchanged; only the network is simulated.
"""

from __future__ import annotations

import asyncio
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
