"""Statistics over an area: GET /statistics (bbox), POST /statistics (GeoJSON), issue 17."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.params import reject_unknown_query

router = APIRouter(tags=["analysis"], dependencies=[Depends(reject_unknown_query)])
