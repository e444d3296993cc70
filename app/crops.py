"""Crops (issue 17): GET /bbox/{minx},{miny},{maxx},{maxy}[/{w}x{h}].{format}, POST /feature."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.params import reject_unknown_query

router = APIRouter(tags=["crops"], dependencies=[Depends(reject_unknown_query)])
