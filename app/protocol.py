"""uvicorn's HTTP protocol with a deadline on each request's line and headers.

uvicorn times out idle keep-alive connections, but not a request head that arrives a byte at a
time: a slowloris client holds its connection (a file descriptor, parser state) for as long as
it keeps trickling. This protocol closes a connection whose request head is not complete within
`TERRAZZO_HEADER_TIMEOUT_S` of its first byte (or of the connection opening). Bodies have their
own deadline in app.guard, which reads them before the request counts as in flight.
"""

from __future__ import annotations

import asyncio
import os

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

ENV = "TERRAZZO_HEADER_TIMEOUT_S"


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """HttpToolsProtocol plus a timer armed while a request head is being received."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = float(os.environ.get(ENV, "10"))
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._arm()  # bytes of a new request head (the previous request is answered)
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
