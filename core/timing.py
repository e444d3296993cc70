"""Stage clocks: how long each stage of one read was busy, for Server-Timing and metrics.

Items are fetched and warped concurrently, so summing per-item durations would report more
time than the request took. A stage's time here is the wall time during which at least one
operation of that stage was running: the stages of one request can overlap, but none of them
exceeds the request's own duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageClock:
    """Busy wall time per stage name (seconds), plus how many operations each stage ran."""

    def __init__(self) -> None:
        self.busy: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._since: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._active.get(name, 0) == 0:
            self._since[name] = time.perf_counter()
        self._active[name] = self._active.get(name, 0) + 1
        self.count[name] = self.count.get(name, 0) + 1
        try:
            yield
        finally:
            self._active[name] -= 1
            if self._active[name] == 0:
                elapsed = time.perf_counter() - self._since.pop(name)
                self.busy[name] = self.busy.get(name, 0.0) + elapsed

    def server_timing(self, extra: dict[str, float] | None = None) -> str:
        """The Server-Timing header value: `stage;dur=ms` entries."""
        stages = {**self.busy, **(extra or {})}
        return ", ".join(f"{k};dur={v * 1000:.1f}" for k, v in stages.items())
