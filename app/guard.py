"""One ASGI middleware in front of the data routes: API key, request size limits, overload.

Pure ASGI (no BaseHTTPMiddleware) so streamed chunk responses and client disconnects pass
through untouched. Health and readiness routes are never guarded: they must stay fast and
answer under load.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from core.settings import Settings

# The viewer's page and scripts carry no data (the page sends the key with its data requests)
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/openapi.json", "/redoc", "/map", "/static/")


async def _reply(send: Any, status: int, detail: str, headers: dict[str, str] | None = None):
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Refuses, before any work: a missing/wrong API key (401), a query string or body over
    the limit (414/413), and requests beyond `max_inflight` at once (503 + Retry-After)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.inflight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith(OPEN_PATHS):
            await self.app(scope, receive, send)
            return
        s = self.settings
        if scope["method"] == "OPTIONS":  # CORS preflight: the CORS middleware answers
            await self.app(scope, receive, send)
            return
        if s.api_key:
            headers = dict(scope["headers"])
            given = headers.get(b"x-api-key", b"").decode()
            bearer = headers.get(b"authorization", b"").decode()
            if bearer.lower().startswith("bearer "):
                given = given or bearer[7:]
            if not hmac.compare_digest(given.encode(), s.api_key.encode()):
                await _reply(
                    send,
                    401,
                    "missing or wrong API key: send it as X-API-Key",
                    {"WWW-Authenticate": "Bearer"},
                )
                return
        if len(scope.get("query_string", b"")) > s.max_query_bytes:
            await _reply(
                send,
                414,
                f"query string over {s.max_query_bytes} bytes "
                "(TERRAZZO_MAX_QUERY_BYTES); send fewer parameters or use POST /chunks",
            )
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and int(length) > s.max_body_bytes:
            await _reply(
                send,
                413,
                f"request body over {s.max_body_bytes} bytes "
                "(TERRAZZO_MAX_BODY_BYTES); split the request",
            )
            return
        if self.inflight >= s.max_inflight:
            await _reply(
                send,
                503,
                f"busy: {self.inflight} requests in progress "
                f"(TERRAZZO_MAX_INFLIGHT); retry shortly",
                {"Retry-After": "1"},
            )
            return
        self.inflight += 1
        try:
            await self.app(scope, self._limited(receive, s.max_body_bytes), send)
        finally:
            self.inflight -= 1

    @staticmethod
    def _limited(receive: Any, limit: int) -> Any:
        """Stop a chunked body (no content-length) at the limit too."""
        seen = 0

        async def wrapped() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return wrapped


class BodyTooLarge(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes (TERRAZZO_MAX_BODY_BYTES)")
