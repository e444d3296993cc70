"""A store wrapper that injects failures or latency at the store boundary (tests, benchmarks).

It wraps a real obstore store, so everything above the store — async-geotiff, the engine, the
service — runs unchanged; only the network is simulated.
"""

from __future__ import annotations

import asyncio
from typing import Any

import obstore


class FaultyStore:
    """Wraps a real obstore store; can fail the first N requests, or add latency to each."""

    def __init__(
        self,
        inner: Any,
        *,
        fail_first: int = 0,
        delay: float = 0.0,
        error: type[Exception] = ConnectionError,
    ) -> None:
        self.inner = inner
        self.fail_first = fail_first
        self.delay = delay
        self.error = error
        self.requests = 0

    async def _before(self) -> None:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.requests <= self.fail_first:
            raise self.error(f"injected fault {self.requests}")

    async def get_range_async(
        self, path: str, *, start: int, end: int | None = None, length: int | None = None
    ) -> Any:
        await self._before()
        return await obstore.get_range_async(self.inner, path, start=start, end=end, length=length)

    async def get_ranges_async(
        self, path: str, *, starts: Any, ends: Any = None, lengths: Any = None
    ) -> Any:
        await self._before()
        return await obstore.get_ranges_async(
            self.inner, path, starts=starts, ends=ends, lengths=lengths
        )
