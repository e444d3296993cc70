"""One ASGI middleware in front of the data routes: API key, request size limits, overload.

Pure ASGI (no BaseHTTPMiddleware) so streamed chunk responses and client disconnects pass
through untouched. Health and readiness routes are never guarded: they must stay fast and
answer under load.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import urllib.parse
from typing import Any

import numpy as np

from app.observe import reject
from core.settings import Settings

# Exact paths (never prefixes: `/docs/tilejson.json` must not pass as `/docs`). The viewer's
# page and scripts carry no data (the page sends the key with its data requests).
OPEN_PATHS = frozenset(
    {
        "/",
        "/conformance",
        "/healthz",
        "/readyz",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/redoc",
        "/map",
    }
)
OPEN_PREFIXES = ("/static/",)  # a mounted StaticFiles app: it serves files, never data routes
# Keyed like data routes but outside the in-flight cap: a scrape must answer during the very
# overload it is there to show (it only reads counters).
UNCAPPED_PATHS = frozenset({"/metrics"})
MAX_JSON_DEPTH = 64  # nesting of a JSON body; Python's parser itself gives up near 1,000
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # unrolled: linear, no backtracking


def json_depth(body: bytes) -> int:
    """The deepest nesting of `[`/`{` in a JSON text, without parsing it (no recursion, linear:
    strings are cut out by one regex, brackets counted by numpy)."""
    text = np.frombuffer(_JSON_STRING.sub(b"", body), dtype=np.uint8)
    if not text.size:
        return 0
    step = (np.isin(text, (ord("["), ord("{")))).astype(np.int32)
    step -= np.isin(text, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


async def _reply(
    scope: dict,
    send: Any,
    reason: str,
    status: int,
    detail: str,
    headers: dict[str, str] | None = None,
) -> None:
    """Refuse the request; `reason` (one of a few fixed words) labels it in the metrics."""
    reject(scope, reason)
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Refuses, before any work: a missing/wrong API key (401), a query string or body over
    the limit (414/413), a body that does not arrive in time (408), a POST that is not JSON
    (415) or nests too deep (400), and requests beyond `max_inflight` at once (503 +
    Retry-After).

    A body is read whole (it is bounded) *before* the request counts as in flight: clients
    trickling bytes must not hold the slots that real work needs. Each refusal names its
    reason on the request's observer note (`rejected` in the metrics); /metrics is keyed but
    never counted in flight.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.inflight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        # the path as routes see it: without a --root-path or X-Forwarded-Prefix in front
        path, root = scope.get("path", ""), scope.get("root_path", "")
        path = path[len(root) :] if root and path.startswith(root + "/") else path
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        s = self.settings
        if scope["method"] == "OPTIONS":  # CORS preflight: the CORS middleware answers
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if s.api_key and not _key_matches(headers, s.api_key, scope.get("query_string", b"")):
            await _reply(
                scope,
                send,
                "auth",
                401,
                "missing or wrong API key: send it as X-API-Key (or ?access_token=)",
                {"WWW-Authenticate": "Bearer"},
            )
            return
        if len(scope.get("query_string", b"")) > s.max_query_bytes:
            await _reply(
                scope,
                send,
                "query_too_long",
                414,
                f"query string over {s.max_query_bytes} bytes "
                "(TERRAZZO_MAX_QUERY_BYTES); send fewer parameters or use POST /chunks",
            )
            return
        if scope["method"] in ("POST", "PUT", "PATCH"):
            refusal, receive = await self._read_body(headers, receive)
            if refusal is not None:
                await _reply(scope, send, *refusal)
                return
        if path in UNCAPPED_PATHS:
            await self.app(scope, receive, send)
            return
        if self.inflight >= s.max_inflight:
            await _reply(
                scope,
                send,
                "overload",
                503,
                f"busy: {self.inflight} requests in progress "
                f"(TERRAZZO_MAX_INFLIGHT); retry shortly",
                {"Retry-After": "1"},
            )
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _read_body(self, headers: dict[bytes, bytes], receive: Any) -> tuple[Any, Any]:
        """Read the whole body within `body_timeout_s` and the size limit; check it is JSON of
        bounded depth. Returns (refusal as (reason, status, detail) or None, a receive that
        replays the body)."""
        s = self.settings
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media != b"application/json":
            shown = media.decode("latin-1") or "none"
            return (
                "media_type",
                415,
                f"send the body as JSON with Content-Type: application/json (got {shown})",
            ), receive
        too_large = (
            "too_large",
            413,
            f"request body over {s.max_body_bytes} bytes (TERRAZZO_MAX_BODY_BYTES); "
            "split the request",
        )
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return ("bad_length", 400, "Content-Length is not a number"), receive
        if int(length) > s.max_body_bytes:
            return too_large, receive
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(s.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return (
                            "client_gone",
                            400,
                            "the client went away before sending the body",
                        ), receive
                    parts.append(message.get("body", b""))
                    size += len(parts[-1])
                    if size > s.max_body_bytes:
                        return too_large, receive
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            return (
                "body_timeout",
                408,
                f"the request body did not arrive within {s.body_timeout_s} s "
                "(TERRAZZO_BODY_TIMEOUT_S)",
            ), receive
        body = b"".join(parts)
        if json_depth(body) > MAX_JSON_DEPTH:
            return (
                "too_deep",
                400,
                f"JSON body nested deeper than {MAX_JSON_DEPTH} levels; flatten it",
            ), receive
        return None, _replay(body, receive)


TOKEN_PARAMETER = "access_token"  # the query-string key, as TiTiler deployments name it


def _key_matches(headers: dict[bytes, bytes], key: str, query: bytes = b"") -> bool:
    """The key from X-API-Key, a Bearer token, or `?access_token=` (what <img>-based map
    clients — Leaflet, OpenLayers' XYZ — can send; the request log records paths only, so the
    token stays out of it). Compared as bytes: non-UTF-8 bytes are just a wrong key."""
    given = headers.get(b"x-api-key", b"")
    bearer = headers.get(b"authorization", b"")
    if not given and bearer[:7].lower() == b"bearer ":
        given = bearer[7:]
    if not given and query:
        values = urllib.parse.parse_qs(query.decode("latin-1")).get(TOKEN_PARAMETER)
        given = values[0].encode("latin-1") if values else b""
    return hmac.compare_digest(given, key.encode())


def _replay(body: bytes, receive: Any) -> Any:
    """A receive that hands the app the body already read, then whatever comes next (e.g. the
    client's disconnect, which streamed responses watch for)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
