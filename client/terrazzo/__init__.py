"""Terrazzo client: web map tiles and bulk array reads from a Terrazzo server.

from terrazzo import Client
client = Client("http://127.0.0.1:8000")
da = client.read(bbox, crs="EPSG:32632", resolution=30, assets=["visual"])
"""

from terrazzo.client import AsyncClient, Client, Config
from terrazzo.errors import (
    ChunkError,
    ItemError,
    ItemErrorWarning,
    NoItemsFound,
    ReadInterrupted,
    ReadTooLarge,
    ServerError,
    TerrazzoError,
    TransientError,
)
from terrazzo.framing import Chunk, FramingError, iter_frames, parse_frames

__all__ = [
    "AsyncClient",
    "Chunk",
    "ChunkError",
    "Client",
    "Config",
    "FramingError",
    "ItemError",
    "ItemErrorWarning",
    "NoItemsFound",
    "ReadInterrupted",
    "ReadTooLarge",
    "ServerError",
    "TerrazzoError",
    "TransientError",
    "iter_frames",
    "parse_frames",
]
