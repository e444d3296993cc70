"""Terrazzo client: tiles and bulk chunk reads from a Terrazzo server."""

from terrazzo.framing import Chunk, FramingError, iter_frames, parse_frames

__all__ = ["Chunk", "FramingError", "iter_frames", "parse_frames"]
