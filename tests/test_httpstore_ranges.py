"""Range coalescing in the HTTP store: ranges of one call closer than MERGE_GAP (1 MiB, as
object_store coalesces) travel as one request, farther ones apart, and every caller gets
exactly its bytes. Against bench/cogserver.py, a real range server that counts requests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx

from bench.remote import cog_server
from core.httpstore import MERGE_GAP, HTTPRangeStore


def test_near_ranges_are_one_request_far_ones_are_not(tmp_path: Path) -> None:
    blob = os.urandom(4 * MERGE_GAP)
    (tmp_path / "blob.bin").write_bytes(blob)
    near = [(1000, 9000), (9000 + MERGE_GAP - 1, 9000 + MERGE_GAP + 500), (200, 300)]
    far = [(0, 100), (3 * MERGE_GAP, 3 * MERGE_GAP + 100)]
    with cog_server(tmp_path, 0) as (url, _):
        store = HTTPRangeStore(url, allow_internal=True)

        async def read(spans: list[tuple[int, int]]) -> list[bytes]:
            try:
                return await store.get_ranges_async(
                    "blob.bin", starts=[a for a, _ in spans], ends=[b for _, b in spans]
                )
            finally:
                await store.aclose()

        def requests() -> int:
            return httpx.get(url + "/_requests").json()["requests"]

        before = requests()
        got = asyncio.run(read(near))
        assert requests() - before == 1, "ranges within MERGE_GAP: one request"
        assert got == [blob[a:b] for a, b in near]
        before = requests()
        got = asyncio.run(read(far))
        assert requests() - before == 2, "ranges farther apart than MERGE_GAP: one each"
        assert got == [blob[a:b] for a, b in far]
