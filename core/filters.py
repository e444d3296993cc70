"""CQL2 filters to DuckDB SQL: parsed, validated, values bound — never pasted into SQL.

`cql2` (the Rust parser) turns CQL2-text or CQL2-JSON into one JSON tree; this module walks
that tree. Property names must be columns of the catalog (they are quoted identifiers), every
literal becomes a `?` parameter, and operators come from a fixed table.

Why the bounds: the Rust parser recurses once per nesting level and overflows the thread's
stack (a SIGSEGV that takes the whole server down) at ~500 parentheses or ~5,000 unary signs —
a 4 KB query string. So the text is scanned (without recursion) before it reaches the parser,
and every tree — from text or JSON — is measured iteratively before anything walks it
recursively. The limits are far above any hand-written filter and far below the crash.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import cql2

_COMPARISON = {"=": "=", "<>": "<>", "!=": "<>", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_LOGICAL = {"and": " AND ", "or": " OR "}


MAX_FILTER_CHARS = 16_384  # a filter's text (CQL2-text or CQL2-JSON)
MAX_DEPTH = 32  # nesting: parentheses in text, levels of the JSON tree
MAX_NODES = 2_000  # operators, properties and literals in one filter
MAX_PREFIX_OPS = 64  # NOT keywords and +/- signs in text (each a parser recursion)


class FilterError(ValueError):
    """A filter that cannot be parsed or names something the catalog does not have."""


def _scan_text(text: str) -> None:
    """Refuse CQL2-text that would nest deeper than the parser can take, before parsing it.

    One pass outside quoted strings: parenthesis depth, and the count of prefix operators
    (NOT, unary signs), which the parser also recurses on.
    """
    depth = prefix = 0
    quoted = False
    upper = text.upper()
    for i, ch in enumerate(text):
        if quoted:
            quoted = ch != "'"  # '' inside a string closes and reopens: same result
            continue
        if ch == "'":
            quoted = True
        elif ch == "(":
            depth += 1
            if depth > MAX_DEPTH:
                raise FilterError(
                    f"filter: nested deeper than {MAX_DEPTH} parentheses; simplify the filter"
                )
        elif ch == ")":
            depth -= 1
        elif ch in "+-" or (
            upper.startswith("NOT", i)
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] in "_:."))
            and not (i + 3 < len(text) and (text[i + 3].isalnum() or text[i + 3] in "_:."))
        ):
            prefix += 1
            if prefix > MAX_PREFIX_OPS:
                raise FilterError(
                    f"filter: more than {MAX_PREFIX_OPS} NOT or +/- operators; simplify the filter"
                )


def _measure(tree: Any) -> None:
    """Refuse a JSON tree deeper than MAX_DEPTH or larger than MAX_NODES (iteratively: the
    tree may be exactly what would overflow a recursive walk)."""
    stack: list[tuple[Any, int]] = [(tree, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels; simplify the filter")
        if nodes > MAX_NODES:
            raise FilterError(f"filter: more than {MAX_NODES} terms; simplify the filter")
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        )
        stack.extend((child, depth + 1) for child in children)


def parse(filter_: str | dict[str, Any]) -> dict[str, Any]:
    """CQL2-text or CQL2-JSON → normalised CQL2-JSON (raises FilterError)."""
    if isinstance(filter_, dict):
        _measure(filter_)
        text = json.dumps(filter_)
    else:
        text = filter_.strip()
    if text.startswith("{"):
        if len(text) > MAX_FILTER_CHARS:
            raise FilterError(f"filter: longer than {MAX_FILTER_CHARS} characters")
        try:
            _measure(json.loads(text))
        except RecursionError as exc:
            raise FilterError(f"filter: nested deeper than {MAX_DEPTH} levels") from exc
        except ValueError as exc:
            raise FilterError(f"filter: not valid JSON ({exc})") from exc
    else:
        _scan_text(text)  # first: its message says what to fix
        if len(text) > MAX_FILTER_CHARS:
            raise FilterError(f"filter: longer than {MAX_FILTER_CHARS} characters")
    try:
        expr = cql2.parse_json(text) if text.startswith("{") else cql2.parse_text(text)
        tree = expr.to_json()
    except Exception as exc:  # cql2 raises its own ParseError/ValidationError/ValueError
        raise FilterError(f"filter: not valid CQL2 ({exc})") from exc
    _measure(tree)
    return tree


def to_sql(tree: dict[str, Any], columns: dict[str, str]) -> tuple[str, list[Any]]:
    """A WHERE fragment and its parameters for a CQL2-JSON tree (measured by `parse`)."""
    params: list[Any] = []
    return _node(tree, columns, params), params


def _column(node: dict[str, Any]) -> str:
    """The catalog column a CQL2 property node names (`properties.x` and `x` alike)."""
    return str(node["property"]).removeprefix("properties.")


def _column_kind(duck_type: str) -> str:
    """What a catalog column compares as: text, number, time, bool, or other (not comparable)."""
    t = duck_type.upper()
    if t.endswith("]") or t.startswith(("STRUCT", "MAP", "GEOMETRY", "BLOB", "UNION", '"NULL"')):
        return "other"
    if t in ("VARCHAR", "UUID") or t.startswith("ENUM"):
        return "text"
    if t == "BOOLEAN":
        return "bool"
    if t.startswith(("TIMESTAMP", "DATE", "TIME")):
        return "time"
    return "number"


def _kind(node: Any, columns: dict[str, str]) -> str | None:
    """The kind of a comparison operand, or None when it is not a plain property or literal."""
    if isinstance(node, dict):
        if "property" in node:
            name = _column(node)
            return _column_kind(columns[name]) if name in columns else None
        if "timestamp" in node or "date" in node:
            return "time"
        return None
    if isinstance(node, bool):
        return "bool"
    if isinstance(node, int | float):
        return "number"
    if isinstance(node, str):
        return "text"
    return None


def _check_operands(op: str, args: list[Any], columns: dict[str, str]) -> None:
    """Refuse comparisons DuckDB cannot make (`id > 5`, `bbox = 'x'`): a 400 that says which
    property and value disagree, instead of a binder error at query time."""
    values = args[1] if op == "in" and len(args) > 1 and isinstance(args[1], list) else []
    operands = [args[0], *values] if op == "in" else list(args)
    kinds = [_kind(a, columns) for a in operands]
    for arg, kind in zip(operands, kinds, strict=True):
        if kind == "other":
            name = _column(arg)
            raise FilterError(
                f"filter: {name!r} is a {columns[name]} column "
                "and cannot be compared (use bbox= and datetime= for space and time)"
            )
    if op == "like" and kinds[0] not in ("text", None):
        raise FilterError(f"filter: LIKE needs a text property, {args[0]!r} is {kinds[0]}")
    if "time" in kinds:
        for arg, kind in zip(operands, kinds, strict=True):
            if kind == "text" and not (isinstance(arg, str) and _is_time(arg)):
                raise FilterError(
                    f"filter: {json.dumps(arg)} is not a date or time "
                    "(e.g. TIMESTAMP('2024-06-01T00:00:00Z'))"
                )
    known = {k for k in kinds if k is not None}
    # a text literal may name a time (DuckDB casts '2024-06-01'); anything else must agree
    if len(known - ({"text"} if "time" in known else set())) > 1:
        shown = ", ".join(f"{json.dumps(a)} ({k})" for a, k in zip(operands, kinds, strict=True))
        raise FilterError(f"filter: {op} compares values of different types: {shown}")


def _is_time(text: str) -> bool:
    try:
        dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _node(node: Any, columns: dict[str, str], params: list[Any]) -> str:
    if isinstance(node, dict) and "property" in node:
        name = _column(node)
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
        if not isinstance(args, list) or not args:
            raise FilterError(f"filter: operator {op!r} needs arguments")
        if op in _LOGICAL:
            return "(" + _LOGICAL[op].join(_node(a, columns, params) for a in args) + ")"
        if op == "not":
            return f"(NOT {_node(args[0], columns, params)})"
        arity = {"like": 2, "between": 3, "in": 2, "isnull": 1, **dict.fromkeys(_COMPARISON, 2)}
        if op in arity and len(args) != arity[op]:
            raise FilterError(f"filter: {op} takes {arity[op]} arguments, got {len(args)}")
        if op in arity and op != "isnull":
            _check_operands(op, args, columns)
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
