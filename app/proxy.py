"""A path prefix added by a reverse proxy, honoured in every URL the service generates.

A proxy that serves Terrazzo under `/maps/` and strips that prefix before forwarding sends
`X-Forwarded-Prefix: /maps` (Traefik, nginx configs, Kubernetes ingresses do). The prefix is
put where ASGI keeps a mount point: `root_path`, and in front of `path` (the ASGI spec has
`path` include `root_path`; Starlette strips it again to match routes). Every URL built from
the request — TileJSON and WMTS templates, landing links, the docs pages, STAC links — then
carries it, as `terrazzo serve --root-path /maps` does for every request (uvicorn puts the
root path in front of `path` the same way).
Like `X-Forwarded-Host`, the header is the proxy's to set (it should drop a client's own).
"""

from __future__ import annotations

import re
from typing import Any

HEADER = b"x-forwarded-prefix"
_PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+")


def forwarded_prefix(scope: dict) -> str:
    """The first prefix of the header, '' when absent or not a plain absolute path."""
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            prefix = value.decode("latin-1").split(",")[0].strip().rstrip("/")
            return prefix if _PREFIX.fullmatch(prefix) and ".." not in prefix else ""
    return ""


class ForwardedPrefix:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        prefix = forwarded_prefix(scope) if scope["type"] == "http" else ""
        if prefix:  # `path` already holds any --root-path: the prefix goes in front of both
            root = prefix + scope.get("root_path", "")
            scope = {**scope, "root_path": root, "path": prefix + scope["path"]}
        await self.app(scope, receive, send)
