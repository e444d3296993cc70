"""CQL2 filters to DuckDB SQL: parsed, validated, values bound — never pasted into SQL.

`cql2` (the Rust parser) turns CQL2-text or CQL2-JSON into one JSON tree; this module walks
that tree. Property names must be columns of the catalog (they are quoted identifiers), every
literal becomes a `?` parameter, and operators come from a fixed table.
"""

from __future__ import annotations

import json
from typing import Any

import cql2

_COMPARISON = {"=": "=", "<>": "<>", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_LOGICAL = {"and": " AND ", "or": " OR "}


class FilterError(ValueError):
    """A filter that cannot be parsed or names something the catalog does not have."""


def parse(filter_: str | dict[str, Any]) -> dict[str, Any]:
    """CQL2-text or CQL2-JSON → normalised CQL2-JSON (raises FilterError)."""
    try:
        if isinstance(filter_, dict):
            expr = cql2.parse_json(json.dumps(filter_))
        else:
            text = filter_.strip()
            expr = cql2.parse_json(text) if text.startswith("{") else cql2.parse_text(text)
        return expr.to_json()
    except Exception as exc:  # cql2 raises its own ParseError/ValidationError/ValueError
        raise FilterError(f"filter: not valid CQL2 ({exc})") from exc


def to_sql(tree: dict[str, Any], columns: dict[str, str]) -> tuple[str, list[Any]]:
    """A WHERE fragment and its parameters for a CQL2-JSON tree."""
    params: list[Any] = []
    return _node(tree, columns, params), params


def _node(node: Any, columns: dict[str, str], params: list[Any]) -> str:
    if isinstance(node, dict) and "property" in node:
        name = str(node["property"]).removeprefix("properties.")
        if name not in columns:
            raise FilterError(
                f"filter: unknown property {name!r}; this catalog has {sorted(columns)}"
            )
        return '"' + name.replace('"', '""') + '"'
    if isinstance(node, dict) and "timestamp" in node:
        params.append(node["timestamp"])
        return "CAST(? AS TIMESTAMPTZ)"
    if isinstance(node, dict) and "date" in node:
        params.append(node["date"])
        return "CAST(? AS DATE)"
    if isinstance(node, dict) and "op" in node:
        op = str(node["op"]).lower()
        args = node.get("args", [])
        if op in _LOGICAL:
            return "(" + _LOGICAL[op].join(_node(a, columns, params) for a in args) + ")"
        if op == "not":
            return f"(NOT {_node(args[0], columns, params)})"
        if op in _COMPARISON:
            left, right = (_node(a, columns, params) for a in args)
            return f"({left} {_COMPARISON[op]} {right})"
        if op == "like":
            left, right = (_node(a, columns, params) for a in args)
            return f"({left} LIKE {right})"
        if op == "between":
            value, low, high = (_node(a, columns, params) for a in args)
            return f"({value} BETWEEN {low} AND {high})"
        if op == "in":
            value = _node(args[0], columns, params)
            items = args[1] if isinstance(args[1], list) else [args[1]]
            holders = ", ".join(_node(i, columns, params) for i in items)
            return f"({value} IN ({holders}))"
        if op == "isnull":
            return f"({_node(args[0], columns, params)} IS NULL)"
        raise FilterError(
            f"filter: operator {op!r} is not supported here; use comparisons, like, between, "
            "in, isNull, and/or/not (spatial and temporal filters: use bbox and datetime)"
        )
    if isinstance(node, bool | int | float | str) or node is None:
        params.append(node)
        return "?"
    raise FilterError(f"filter: cannot use {node!r} here")
