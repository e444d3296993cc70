"""Processes on the read path: the steps between the warped pixels and the output bands.

Each process is a small picklable object that declares what it makes of its input
(`layout`: band names and dtype in, band names and dtype out — how a lazy client or TileJSON
learns the output without reading) and does it (`apply`, in the compute pool). Two places
run them, as rio-tiler and TiTiler do:

- per item, before the mosaic (`ReadParams.item_steps`): band selection (`bidx`, the first
  entry) and band math (`expression`), so `mean` of an NDVI is the mean of each item's NDVI,
  as TiTiler-pgstac's per-item expression gives;
- after the mosaic: algorithms over the mosaicked bands (none yet).

Expressions use TiTiler's syntax: `;` separates output bands, each an arithmetic expression of
the input bands named `b1`, `b2`… (in stacked order across the assets), `{asset}_b{n}` (band n
of that asset, TiTiler's multi-asset names) and, for a one-band asset, the asset's own name.
They are parsed with Python's `ast` into an allow-list (numbers, band names, + - * / ** %,
comparisons, & | ~, `where` and numpy functions from `FUNCTIONS`) and only then handed to
numexpr (well kept, multi-threaded, no temporaries); nothing else is ever evaluated.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

MAX_EXPRESSION_CHARS = 2000
MAX_BLOCKS = 32
MAX_NODES = 500
# numexpr's functions a block may call (its whole set minus the complex-number ones)
FUNCTIONS = frozenset(
    {
        "where",
        "sin",
        "cos",
        "tan",
        "arcsin",
        "arccos",
        "arctan",
        "arctan2",
        "sinh",
        "cosh",
        "tanh",
        "arcsinh",
        "arccosh",
        "arctanh",
        "log",
        "log10",
        "log1p",
        "exp",
        "expm1",
        "sqrt",
        "abs",
        "floor",
        "ceil",
    }
)
_OPERATORS = (
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.Pow,
    ast.Mod,
    ast.BitAnd,
    ast.BitOr,
    ast.Invert,
    ast.USub,
    ast.UAdd,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Eq,
    ast.NotEq,
)
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.Call, ast.Name, ast.Load)


class ProcessError(ValueError):
    """A process that cannot run on this input; the message says what to change."""


class Process(Protocol):
    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        """The output band names and dtype for these input bands (raises ProcessError)."""
        ...

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bands, h, w) data and (h, w) validity in, the same out."""
        ...


def identifier(name: str) -> str:
    """An asset name as an expression variable: what is not a letter, digit or _ becomes _."""
    text = re.sub(r"\W", "_", name)
    return text if text[:1].isalpha() or text[:1] == "_" else f"_{text}"


def band_variables(assets: Sequence[tuple[str, int]]) -> list[tuple[str, ...]]:
    """For each stacked band (assets in order, each with its band count), the names an
    expression may call it by."""
    out: list[tuple[str, ...]] = []
    for asset, count in assets:
        var = identifier(asset)
        for n in range(1, count + 1):
            names = [f"b{len(out) + 1}", f"{var}_b{n}"] + ([var] if count == 1 else [])
            out.append(tuple(names))
    return out


@dataclass(frozen=True)
class Bands:
    """`bidx`: 1-based bands of the stacked input, in the order asked. `assets` (those read,
    in order) only name what was read when a band is missing: the message is this step's."""

    bidx: tuple[int, ...]
    assets: tuple[str, ...] = ()

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        if self.bidx and max(self.bidx) > len(names):
            read = f"assets {', '.join(self.assets)} have" if self.assets else "the input has"
            raise ProcessError(
                f"bidx: band {max(self.bidx)} does not exist; {read} {len(names)} band(s)"
            )
        return [names[b - 1] for b in self.bidx], np.dtype(dtype)

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return data[[b - 1 for b in self.bidx]], valid


@dataclass(frozen=True)
class Expression:
    """Band math in TiTiler's syntax; float32 out (evaluated in float64, like numpy on
    float64 inputs), one band per `;`-separated block, named by the block's text."""

    text: str
    variables: tuple[tuple[str, ...], ...] = ()  # per input band, its names (band_variables)

    @property
    def blocks(self) -> list[str]:
        return [b.strip() for b in self.text.split(";") if b.strip()]

    def check(self) -> None:
        """Refuse, naming the part, anything but the allow-listed syntax and known bands."""
        if len(self.text) > MAX_EXPRESSION_CHARS:
            raise ProcessError(f"expression: longer than {MAX_EXPRESSION_CHARS} characters")
        blocks = self.blocks
        if not blocks:
            raise ProcessError("expression: empty; e.g. (b2-b1)/(b2+b1)")
        if len(blocks) > MAX_BLOCKS:
            raise ProcessError(f"expression: at most {MAX_BLOCKS} ';'-separated bands")
        known = {name for names in self.variables for name in names}
        for block in blocks:
            _check_block(block, known, self.variables)
        try:  # arity and types, on one pixel: numexpr's own errors, as a 400 now
            self.apply(np.ones((len(self.variables), 1, 1)), np.ones((1, 1), dtype=bool))
        except Exception as exc:
            raise ProcessError(f"expression: {self.text!r} does not evaluate ({exc})") from exc

    def layout(self, names: list[str], dtype: np.dtype) -> tuple[list[str], np.dtype]:
        self.check()
        return self.blocks, np.dtype("float32")

    def apply(self, data: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import numexpr

        values = data.astype(np.float64, copy=False)
        scope = {name: values[i] for i, names in enumerate(self.variables) for name in names}
        out = np.empty((len(self.blocks), *data.shape[1:]), dtype=np.float32)
        for i, block in enumerate(self.blocks):
            with np.errstate(all="ignore"):
                result = numexpr.evaluate(block, local_dict=scope, global_dict={})
            out[i] = np.broadcast_to(result, data.shape[1:])  # a constant block fills the band
        return out, valid


def _check_block(block: str, known: set[str], variables: Sequence[tuple[str, ...]]) -> None:
    try:
        tree = ast.parse(block, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ProcessError(f"expression: cannot parse {block!r} ({exc})") from exc
    nodes = list(ast.walk(tree))
    called = {id(n.func) for n in nodes if isinstance(n, ast.Call)}
    if len(nodes) > MAX_NODES:
        raise ProcessError(f"expression: {block!r} has more than {MAX_NODES} terms")
    for node in nodes:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int | float):
                raise ProcessError(f"expression: only numbers are constants, not {node.value!r}")
        elif isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
                raise ProcessError(
                    f"expression: unknown function in {block!r}; allowed: {sorted(FUNCTIONS)}"
                )
            if node.keywords:
                raise ProcessError("expression: functions take positional arguments only")
        elif isinstance(node, ast.Name):
            if node.id in FUNCTIONS and id(node) not in called:
                raise ProcessError(f"expression: {node.id} is a function; call it, {node.id}(…)")
            if node.id not in known and node.id not in FUNCTIONS:
                example = ", ".join(names[-1] for names in variables[:4])
                raise ProcessError(
                    f"expression: unknown band {node.id!r}; the bands are b1..b{len(variables)}"
                    f" or by asset, e.g. {example}"
                )
        elif not isinstance(node, _NODES + _OPERATORS):
            raise ProcessError(
                f"expression: {type(node).__name__.lower()} is not allowed in {block!r}; "
                "use arithmetic, comparisons, & | ~ and where()"
            )


def item_layout(
    steps: Sequence[Process], names: list[str], dtype: np.dtype
) -> tuple[list[str], np.dtype]:
    """Names and dtype after each step in turn."""
    for step in steps:
        names, dtype = step.layout(names, dtype)
    return names, dtype


def run(
    steps: Sequence[Process], data: np.ndarray, valid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    for step in steps:
        data, valid = step.apply(data, valid)
    return data, valid
