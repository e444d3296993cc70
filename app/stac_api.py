"""STAC API over the served catalog (issue 16): /search, /collections/{id}/items, full items."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["stac"])
