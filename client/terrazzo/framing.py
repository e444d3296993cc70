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


def decode(header: dict[str, Any], payload: bytes | bytearray) -> Chunk:
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
        chunk.mask = np.unpackbits(bits, count=t * h * w).view(bool).reshape(t, h, w)
    return chunk


class _Parser:
    """Incremental frame parser shared by the sync and async iterators.

    Why it is shaped so: a frame's payload is megabytes arriving in ~64 KB pieces. Only the
    prefix and JSON header are gathered in a growing buffer; once the header says how long
    the payload is, each piece is copied once, straight into a buffer of that size, which
    the chunk's arrays then view (no join, no slice copies, no memmove of what is left).
    """

    def __init__(self) -> None:
        self.buffer = bytearray()  # the prefix and header being gathered
        self.ended = False
        self._header: dict[str, Any] | None = None
        self._payload = bytearray()
        self._filled = 0

    def feed(self, piece: bytes) -> Iterator[Chunk]:
        view = memoryview(piece).cast("B")
        while True:
            if self._header is None:
                view = self._gather_header(view)
                if self._header is None:
                    return
            take = min(len(view), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled < len(self._payload):
                return
            chunk = decode(self._header, self._payload)
            self._header, self._payload, self._filled = None, bytearray(), 0
            self.ended = self.ended or chunk.status == "end"
            yield chunk

    def _gather_header(self, view: memoryview) -> memoryview:
        """Move bytes of `view` into the header buffer until the header is whole (then parse
        it and size the payload buffer); what is left of `view` after the header."""
        need = _PREFIX.size - len(self.buffer)
        if need > 0:
            self.buffer += view[:need]
            view = view[need:]
            if len(self.buffer) < _PREFIX.size:
                return view
        magic, head_len = _PREFIX.unpack_from(self.buffer)
        if magic != MAGIC:
            raise FramingError("not a Terrazzo chunk stream (bad frame magic)")
        need = _PREFIX.size + head_len - len(self.buffer)
        self.buffer += view[:need]
        view = view[need:]
        if len(self.buffer) < _PREFIX.size + head_len:
            return view
        header = json.loads(bytes(self.buffer[_PREFIX.size :]))
        self.buffer = bytearray()
        self._header = header
        self._payload = bytearray(int(header.get("payload_bytes", 0)))
        return view

    def close(self) -> None:
        if self.buffer or self._header is not None or not self.ended:
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
