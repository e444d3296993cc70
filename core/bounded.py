"""Bounded fan-out that streams its task source and yields results as they finish.

Like `run_bounded` in ../shared/seeds: at most `limit` tasks run at once, and the next input is
pulled from the iterator only when a slot frees, so a million-chunk request never holds a
million plans. Closing or cancelling the consumer cancels what is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


async def run_bounded(
    source: Iterable[T], fn: Callable[[T], Awaitable[R]], limit: int
) -> AsyncIterator[R]:
    """Yield `fn(x)` for each x in `source`, in completion order, with ≤ `limit` in flight.

    `fn` should turn its own failures into results; an exception it raises ends the stream
    (after cancelling the other tasks) and propagates to the consumer, a CancelledError as a
    RuntimeError (the consumer was not cancelled).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    inputs = iter(source)
    running: set[asyncio.Task[R]] = set()
    exhausted = False
    try:
        while True:
            while not exhausted and len(running) < limit:
                try:
                    item = next(inputs)
                except StopIteration:
                    exhausted = True
                    break
                running.add(asyncio.ensure_future(fn(item)))
            if not running:
                return
            done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    # nothing here cancels a task before the finally: its own code raised
                    # CancelledError, which re-raised as it is would pass for the consumer's
                    # own cancellation (in POST /chunks: a stream cut with no error logged)
                    raise RuntimeError("run_bounded: a task ended cancelled; nothing cancelled it")
                yield task.result()
    finally:
        for task in running:
            task.cancel()
