"""What every read route (tiles, crops, statistics) says of a read: in its headers, and as a
204 when there is nothing to show. One place, so each route reports failed items and search
truncation the same way."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Response

from core.engine import Mosaic

MAX_ERRORS_HEADER = 2000  # characters of X-Terrazzo-Errors (ASCII, one line)


def read_headers(mosaics: Sequence[Mosaic | None]) -> dict[str, str]:
    """X-Terrazzo-Items (items read), X-Terrazzo-Errors (items that failed; the result is
    served from the others) and X-Terrazzo-Truncated (which search limit left items out)."""
    done = [m for m in mosaics if m is not None]
    headers = {"X-Terrazzo-Items": str(sum(len(m.plan.items) for m in done))}
    errors = [e for m in done for e in m.errors]
    if errors:
        text = " ".join("; ".join(f"{i}: {e}" for i, e in errors).split())
        headers["X-Terrazzo-Errors"] = text.encode("ascii", "replace").decode()[:MAX_ERRORS_HEADER]
    truncated = next((m.plan.truncated_why for m in done if m.plan.truncated), "")
    if truncated:
        headers["X-Terrazzo-Truncated"] = truncated
    return headers


def final(mosaics: Sequence[Mosaic | None]) -> bool:
    """Whether a cache may keep the result: no item failed and no search was cut."""
    return not any(m is not None and (m.errors or m.plan.truncated) for m in mosaics)


def nothing(mosaic: Mosaic | None) -> Response | None:
    """The 204 of a read with nothing to show, None when there is something: no item has
    data there (`no-cache`), or a search limit left items out (`no-store`, and says which)."""
    if mosaic is None:
        return Response(status_code=204, headers={"Cache-Control": "no-cache"})
    if not mosaic.valid.any():
        why = mosaic.plan.truncated_why
        return Response(
            status_code=204, headers={"Cache-Control": "no-store", "X-Terrazzo-Truncated": why}
        )
    return None
