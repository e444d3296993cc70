"""The observer middleware: a request id, an access-log line and metrics for every request.

Pure ASGI (no BaseHTTPMiddleware), so streamed responses such as POST /chunks pass through
untouched; the duration is measured to the last byte sent.

Metrics are labelled by the route template a request matched, also when the router never saw it
(the guard rejected it, CORS answered its preflight) or saw a copy of its scope (HEAD is served
as GET on a copy): the template is then looked up in the app's own route table, the way the
router would match it. What the guard rejected a request for reaches the observer through a
`Note` it finds in the scope. A path that matches no route is `unmatched`, whatever it was, so
label values stay as few as the routes: never a raw path.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.routing import Mount, compile_path

from app.logs import request_id
from app.metrics import Metrics

log = logging.getLogger("terrazzo.access")

UNMATCHED = "unmatched"  # one label for every path no route matches (404s, scanners)
NOTE = "terrazzo.note"  # the scope key of the request's Note
# methods labelled as they are; anything else a client sends is "other" (h11 accepts any token)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@dataclass
class Note:
    """What inner layers tell the observer about a request. Shared by reference, so it survives
    middleware that pass a copy of the scope on."""

    rejected: str = ""  # why the guard refused it: "auth", "overload", "too_large", ...


def reject(scope: dict, reason: str) -> None:
    """Record on the request's Note (if an observer is outside) why it was refused."""
    note = scope.get(NOTE)
    if isinstance(note, Note):
        note.rejected = reason


class RouteTemplates:
    """The route template of a request, bounded to the app's own routes.

    Built once per app from FastAPI's flattened route table (included routers' prefixes
    applied): the route object the router put in the scope is looked up by identity (the hot
    path), else the request's path is matched against each route's pattern, plain routes
    before mounts (as the router tries them), a method mismatch (a 405, a preflight) still
    naming its route.
    """

    def __init__(self) -> None:
        self._app: Any = None
        self._by_route: dict[int, str] = {}
        self._patterns: list[tuple[re.Pattern[str], frozenset[str] | None, str]] = []

    def _build(self, app: Any) -> None:
        try:
            from fastapi.routing import iter_route_contexts

            contexts: list[Any] = list(iter_route_contexts(app.routes))
        except (ImportError, AttributeError):  # an older FastAPI, or a plain Starlette app
            contexts = list(getattr(app, "routes", ()))
        by_route: dict[int, str] = {}
        seen: set[int] = set()
        plain, mounts = [], []
        for context in contexts:
            template, path = getattr(context, "path_format", None), getattr(context, "path", None)
            if not template or path is None:
                continue
            original = getattr(context, "original_route", context)
            mount = isinstance(original, Mount)
            regex, _, _ = compile_path(path.rstrip("/") + "/{path:path}" if mount else path)
            methods = getattr(context, "methods", None)
            (mounts if mount else plain).append(
                (regex, frozenset(methods) if methods else None, template)
            )
            key = id(original)
            if key in seen:  # one route included twice: its template depends on the path
                by_route.pop(key, None)
            else:
                by_route[key] = template
            seen.add(key)
        self._by_route, self._patterns, self._app = by_route, plain + mounts, app

    def __call__(self, scope: dict, path: str) -> str:
        """The template for `scope` after the app ran, `path` being its route path as it came
        in (a mount moves the scope's root path on)."""
        app = scope.get("app")
        if app is not None and app is not self._app:
            self._build(app)
        route = scope.get("route")
        if route is not None and (known := self._by_route.get(id(route))) is not None:
            return known
        partial = None
        for regex, methods, template in self._patterns:
            if regex.match(path):
                if methods is None or scope.get("method") in methods:
                    return template
                partial = partial or template
        return partial or UNMATCHED


def route_path(scope: dict) -> str:
    """The path the router matches: the request's path under the app's root path (as
    starlette's get_route_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :]
    return path


class Observer:
    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.templates = RouteTemplates()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        rid = given if given.isprintable() and given else uuid.uuid4().hex
        token = request_id.set(rid)
        note = scope[NOTE] = Note()
        path = route_path(scope)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            template = self.templates(scope, path)
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(template, method, str(status), note.rejected).inc()
            self.metrics.latency.labels(template, note.rejected).observe(elapsed)
            extra = {
                "method": scope["method"],
                "path": scope["path"],
                "route": template,
                "status": status,
                "duration_ms": round(elapsed * 1000, 1),
            }
            if note.rejected:
                extra["rejected"] = note.rejected
            log.info("%s %s %s", scope["method"], scope["path"], status, extra=extra)
            request_id.reset(token)
