"""Query-parameter dependencies read from the query string in one pass, documented as declared.

Why: FastAPI (0.16x) resolves each declared query parameter on every request with type
introspection and a pydantic validation of its own — measured on the tile route, 29 optional
string parameters: 297 µs of every tile's event-loop time (511 µs at a busier moment), for a
query string that usually holds one of them. Our parameters are all strings (or lists of
strings) that the dependency parses and checks itself, naming the parameter in a 400, so that
work bought nothing.

`query_parameters` turns such a dependency (its parameters declared with `Query(...)` as
FastAPI would see them: default, alias, description) into one that FastAPI calls with the
`Request`: the values are looked up by name in `request.query_params` (all values for a
`list[str]`, the last one otherwise, as FastAPI does). `DeclaredQueryRoute` puts the declared
parameters back into each route's OpenAPI document, and `names` into the set of query names
a route accepts (app.params.reject_unknown_query).
"""

# no `from __future__ import annotations`: FastAPI reads `__call__`'s annotation (Request)
# from the signature, and an instance has no module globals to resolve a string in
import inspect
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.params import Query
from fastapi.routing import APIRoute

T = TypeVar("T")


@dataclass(frozen=True)
class _Field:
    argument: str  # the Python parameter
    name: str  # the query parameter (its alias, e.g. filter-lang)
    many: bool  # list[str]: every occurrence
    default: Any
    description: str | None


def _fields(fn: Callable[..., Any]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(fn)
    fields = []
    for argument, parameter in inspect.signature(fn).parameters.items():
        info = parameter.default
        if not isinstance(info, Query):
            raise TypeError(f"{fn.__name__}({argument}): declare it with Query(...)")
        kinds = set(typing.get_args(hints[argument])) or {hints[argument]}
        many = list[str] in kinds
        if not kinds - {type(None)} <= {str, list[str]}:
            raise TypeError(f"{fn.__name__}({argument}): str or list[str], parsed by the function")
        fields.append(
            _Field(argument, info.alias or argument, many, info.default, info.description)
        )
    return tuple(fields)


class QueryParameters(Generic[T]):
    """A dependency reading `fn`'s declared query parameters straight from the request."""

    def __init__(self, fn: Callable[..., Awaitable[T]]) -> None:
        self.fn = fn
        self.fields = _fields(fn)
        self.names = frozenset(f.name for f in self.fields)
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    async def __call__(self, request: Request) -> T:
        query = request.query_params
        values = {}
        for field in self.fields:
            if field.many:
                values[field.argument] = query.getlist(field.name) or field.default
            else:
                values[field.argument] = query.get(field.name, field.default)
        return await self.fn(**values)

    def openapi(self) -> list[dict[str, Any]]:
        """The parameters as OpenAPI parameter objects (what FastAPI wrote for them)."""
        out = []
        for field in self.fields:
            schema: dict[str, Any] = {"type": "string"}
            if field.many:
                schema = {"type": "array", "items": {"type": "string"}}
            if field.default is not None:
                schema["default"] = field.default
            schema["title"] = field.argument.replace("_", " ").title()
            entry = {"name": field.name, "in": "query", "required": False, "schema": schema}
            if field.description:
                entry["description"] = field.description
            out.append(entry)
        return out


def query_parameters(fn: Callable[..., Awaitable[T]]) -> "QueryParameters[T]":
    """Decorator: `fn`'s Query(...) parameters read in one pass (see the module's docstring)."""
    return QueryParameters(fn)


def declared(dependant: Dependant) -> list[QueryParameters]:
    """Every QueryParameters dependency under `dependant`, once each, in declaration order."""
    found: list[QueryParameters] = []
    for sub in dependant.dependencies:
        if isinstance(sub.call, QueryParameters) and sub.call not in found:
            found.append(sub.call)
        found += [d for d in declared(sub) if d not in found]
    return found


class DeclaredQueryRoute(APIRoute):
    """An APIRoute whose OpenAPI operation lists its QueryParameters' parameters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parameters = [p for d in declared(self.dependant) for p in d.openapi()]
        if parameters:
            extra = dict(self.openapi_extra or {})
            extra["parameters"] = [*extra.get("parameters", []), *parameters]
            self.openapi_extra = extra
