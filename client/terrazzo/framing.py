"""The chunk stream format of POST /chunks ("TZCH" frames), parsed with numpy alone.

A response body is a sequence of frames, each:

    b"TZCH" | header length: uint32 little-endian | header: UTF-8 JSON | payload bytes

The header says what the payload holds: `id`, `status` ("ok", "empty", "error"), `error`,
`dtype`, `shape` [time, band, y, x], `transform` (6 affine numbers), `crs`, `time` (labels),
`items`, `item_errors`, and `payload` = {"data": [offset, length], "mask": [offset, length]}.
Data is C-order little-endian; the mask is (time, y, x) booleans packed with numpy.packbits
(1 = data). The last frame has status "end" and the counts, so a cut stream is detected.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAGIC = b"TZCH"
MEDIA_TYPE = "application/x-terrazzo-chunks"
_PREFIX = struct.Struct("<4sI")


class FramingError(ValueError):
    """The stream is not a well-formed chunk stream (cut short, or not Terrazzo's)."""


@dataclass
class Chunk:
    """One chunk as the server sent it."""

    id: str | None
    status: str
    header: dict[str, Any]
    data: np.ndarray | None = None  # (time, band, y, x)
    mask: np.ndarray | None = None  # (time, y, x), True = data
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error(self) -> str | None:
        return self.header.get("error")

    @property
    def truncated(self) -> str | None:
        """Which search limit left matching items out of this chunk (None: none did)."""
        return self.header.get("truncated")

    def masked(self) -> np.ma.MaskedArray:
        """The data as a masked array (mask broadcast over bands)."""
        if self.data is None or self.mask is None:
            raise ValueError(f"chunk {self.id} has no data (status {self.status})")
        invalid = np.broadcast_to(~self.mask[:, None], self.data.shape)
        return np.ma.MaskedArray(self.data, mask=invalid)


def decode(header: dict[str, Any], payload: bytes) -> Chunk:
    chunk = Chunk(id=header.get("id"), status=header["status"], header=header)
    spans = header.get("payload") or {}
    if "data" in spans:
        offset, length = spans["data"]
        dtype = np.dtype(header["dtype"]).newbyteorder("<")
        chunk.data = np.frombuffer(
            payload, dtype=dtype, count=length // dtype.itemsize, offset=offset
        ).reshape(header["shape"])
    if "mask" in spans:
        offset, length = spans["mask"]
        t, _, h, w = header["shape"]
        bits = np.frombuffer(payload, dtype=np.uint8, count=length, offset=offset)
        chunk.mask = np.unpackbits(bits, count=t * h * w).astype(bool).reshape(t, h, w)
    return chunk


class _Parser:
    """Incremental frame parser shared by the sync and async iterators."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.ended = False

    def feed(self, piece: bytes) -> Iterator[Chunk]:
        self.buffer += piece
        while len(self.buffer) >= _PREFIX.size:
            magic, head_len = _PREFIX.unpack_from(self.buffer)
            if magic != MAGIC:
                raise FramingError("not a Terrazzo chunk stream (bad frame magic)")
            start = _PREFIX.size
            if len(self.buffer) < start + head_len:
                return
            header = json.loads(bytes(self.buffer[start : start + head_len]))
            end = start + head_len + int(header.get("payload_bytes", 0))
            if len(self.buffer) < end:
                return
            payload = bytes(self.buffer[start + head_len : end])
            del self.buffer[:end]
            chunk = decode(header, payload)
            self.ended = self.ended or chunk.status == "end"
            yield chunk

    def close(self) -> None:
        if self.buffer or not self.ended:
            raise FramingError("the chunk stream was cut short (no end frame)")


def iter_frames(chunks: Iterable[bytes]) -> Iterator[Chunk]:
    """Chunks from a byte stream (e.g. httpx's `iter_bytes()`), as soon as each is complete."""
    parser = _Parser()
    for piece in chunks:
        yield from parser.feed(piece)
    parser.close()


async def aiter_frames(chunks: Any) -> Any:
    """Like `iter_frames`, over an async byte stream (httpx's `aiter_bytes()`)."""
    parser = _Parser()
    async for piece in chunks:
        for chunk in parser.feed(piece):
            yield chunk
    parser.close()


def parse_frames(body: bytes) -> list[Chunk]:
    """Every frame of a complete body, the end frame last."""
    return list(iter_frames([body]))
