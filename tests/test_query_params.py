"""app.query: query parameters read in one pass give what FastAPI's own resolution gives, and
stay in the OpenAPI document and in the names a route accepts."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Query

from app.params import known_query_names, search_query
from app.query import DeclaredQueryRoute, query_parameters


async def _values(
    one: str | None = Query(None, description="a single value"),
    many: list[str] | None = Query(None, description="every value"),
    dashed: str | None = Query(None, alias="dashed-name", description="an alias"),
    fallback: str = Query("nearest", description="a default"),
) -> dict:
    return {"one": one, "many": many, "dashed": dashed, "fallback": fallback}


def _app() -> FastAPI:
    app = FastAPI()
    router = APIRouter(route_class=DeclaredQueryRoute)
    fast = query_parameters(_values)

    @router.get("/fastapi")
    async def by_fastapi(values: dict = Depends(_values)) -> dict:
        return values

    @router.get("/ours")
    async def by_us(values: dict = Depends(fast)) -> dict:
        return values

    app.include_router(router)
    return app


QUERIES = [
    "",
    "one=a",
    "one=a&one=b",  # FastAPI keeps the last
    "many=x&many=y,z",
    "many=",
    "one=",
    "dashed-name=d&dashed=ignored",
    "fallback=cubic",
    "one=%C3%A9t%C3%A9&many=%2C",
]


@pytest.mark.parametrize("query", QUERIES)
async def test_the_values_are_fastapis(query: str) -> None:
    transport = httpx.ASGITransport(app=_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        theirs = await client.get(f"/fastapi?{query}")
        ours = await client.get(f"/ours?{query}")
    assert theirs.status_code == ours.status_code == 200
    assert ours.json() == theirs.json()


def test_the_openapi_document_lists_them_as_declared() -> None:
    spec = _app().openapi()
    ours = {p["name"]: p for p in spec["paths"]["/ours"]["get"]["parameters"]}
    theirs = {p["name"]: p for p in spec["paths"]["/fastapi"]["get"]["parameters"]}
    assert ours.keys() == theirs.keys() == {"one", "many", "dashed-name", "fallback"}
    for name, param in ours.items():
        assert param["in"] == "query" and not param["required"]
        assert param["description"] == theirs[name]["description"]
    assert ours["many"]["schema"]["type"] == "array"
    assert ours["fallback"]["schema"]["default"] == "nearest"
    assert "request" not in ours


def test_a_route_accepts_the_declared_names() -> None:
    router = APIRouter(route_class=DeclaredQueryRoute)

    @router.get("/r")
    async def route(query: object = Depends(search_query)) -> None:
        return None

    names = known_query_names(router.routes[0])  # type: ignore[arg-type]
    assert {"datetime", "collections", "filter-lang", "skipcovered"} <= names


def test_a_parameter_it_cannot_read_is_refused_when_declared() -> None:
    async def typed(count: int | None = Query(None)) -> None:
        return None

    async def bare(name: str | None = None) -> None:
        return None

    with pytest.raises(TypeError, match="str or list"):
        query_parameters(typed)
    with pytest.raises(TypeError, match="Query"):
        query_parameters(bare)
