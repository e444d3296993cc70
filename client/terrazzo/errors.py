"""Client errors: what the server refused, and reads interrupted with their partial results."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


class TerrazzoError(Exception):
    """Base of the client's errors."""


class ServerError(TerrazzoError):
    """The server answered with an error; `detail` is its message (what to fix, for a 4xx)."""

    def __init__(self, status: int, detail: str, body: Any = None) -> None:
        self.status = status
        self.detail = detail
        self.body = body
        super().__init__(f"HTTP {status}: {detail}")


class ChunkError(ServerError):
    """The server answered one chunk with an error that asking again will not fix (a `bidx`
    an item does not have, an unreadable COG...): never retried. `chunk` is its id; `failed`
    maps every such chunk's id to its error and `finished` holds the chunks that did arrive."""

    def __init__(
        self, chunk: str, detail: str, failed: dict[str, str], finished: dict[str, Any]
    ) -> None:
        super().__init__(200, detail)
        self.chunk = chunk
        self.failed = failed
        self.finished = finished
        more = f" (and {len(failed) - 1} more chunks)" if len(failed) > 1 else ""
        Exception.__init__(self, f"chunk {chunk}: {detail}{more}")


class ItemError(TerrazzoError):
    """Items the server could not read: their pixels are missing from the result.

    `errors` lists {"chunk", "item", "error"}; `result` is what was read without them (holes
    where only they had data), so nothing that did arrive is lost. Pass `errors="warn"` to get
    the result with a warning instead, `errors="ignore"` to get it silently."""

    def __init__(self, errors: list[dict[str, str]], result: Any = None) -> None:
        self.errors = errors
        self.result = result
        first = errors[0]
        items = sorted({e["item"] for e in errors})
        more = f"; {len(items) - 1} more items failed" if len(items) > 1 else ""
        super().__init__(
            f"item {first['item']} could not be read (chunk {first['chunk']}): {first['error']}"
            f"{more}. Its pixels are missing; errors='warn' returns the read with holes"
        )


class ItemErrorWarning(UserWarning):
    """`errors="warn"`: items failed and the result has holes where only they had data."""


class ReadTooLarge(TerrazzoError, ValueError):
    """An eager read whose array would not fit the memory it may use (`max_bytes`)."""


class NoItemsFound(TerrazzoError):
    """No STAC item matched the read's area, time and filters (nothing to read)."""


class TransientError(TerrazzoError):
    """A failure worth retrying (429/502/503/504, a dropped connection, a cut stream)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class ReadInterrupted(TerrazzoError):
    """A multi-chunk read that ran out of retries. Nothing finished is lost.

    `finished` maps chunk ids to the chunks received; `missing` lists the ids still to read.
    `resume()` (or `await resume_async()`) reads only the missing chunks and returns what the
    original call would have returned.
    """

    def __init__(
        self,
        cause: BaseException,
        finished: dict[str, Any],
        missing: list[str],
        continuation: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> None:
        self.cause = cause
        self.finished = finished
        self.missing = missing
        self._continuation = continuation
        self._runner: Callable[[Awaitable[Any]], Any] | None = None
        super().__init__(
            f"read interrupted after retries ({cause}); {len(finished)} chunks done, "
            f"{len(missing)} missing: call .resume() to finish"
        )

    async def resume_async(self) -> Any:
        return await self._continuation(self.finished)

    def resume(self) -> Any:
        """Finish the read: blocking from a sync Client or a script; inside a running event
        loop (an AsyncClient in a notebook) it returns the awaitable: `await exc.resume()`."""
        if self._runner is not None:
            return self._runner(self.resume_async())
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.resume_async())
        return self.resume_async()
