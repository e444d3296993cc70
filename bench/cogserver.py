"""A range-capable static file server for benchmarks, with a fixed delay per request.

    python bench/cogserver.py DIR PORT DELAY_MS

Serves DIR on 127.0.0.1:PORT (Starlette's StaticFiles answers Range requests); every request
waits DELAY_MS first, like a remote object store. GET /_requests returns how many it served;
GET /_log the last 10,000 (seconds since the server started, path, Range header), to see a
read's critical path: which requests wait on which.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time

import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles


def build(directory: str, delay_ms: float) -> object:
    count = {"requests": 0}
    log: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=10_000)
    start = time.monotonic()

    async def requests(_request: object) -> JSONResponse:
        return JSONResponse(count)

    async def logged(_request: object) -> JSONResponse:
        return JSONResponse(list(log))

    app = Starlette(
        routes=[
            Route("/_requests", requests),
            Route("/_log", logged),
            Mount("/", StaticFiles(directory=directory)),
        ]
    )

    async def delayed(scope, receive, send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/_"):
            count["requests"] += 1
            headers = dict(scope.get("headers") or [])
            log.append(
                (time.monotonic() - start, scope["path"], headers.get(b"range", b"").decode())
            )
            await asyncio.sleep(delay_ms / 1000)
        await app(scope, receive, send)

    return delayed


if __name__ == "__main__":
    directory, port, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    uvicorn.run(build(directory, delay), host="127.0.0.1", port=port, log_level="error")
