"""`color_formula`: rio-color's operations on the rendered bands, as TiTiler applies them.

The syntax is rio-color's ("Gamma RGB 3.5 Saturation 1.7 Sigmoidal RGB 15 0.35"): each
operation's name, then for `gamma` and `sigmoidal` the bands it touches (letters r g b or
digits 1-3, e.g. `RGB`, `b`, `12`) and its numbers; `saturation` always works on bands 1-3.
The operations themselves are color-operations' (the fork of rio-color that rio-tiler depends
on and whose `ImageData.apply_color_formula` TiTiler's render calls; rio-color has no wheel for
this platform): each works on the bands scaled to 0..1 from their integer dtype's range, and
its result is scaled back to uint8, operation after operation, exactly as rio-tiler does.

This module only parses: rio-color's own parser accepts extra numbers silently, fails with an
IndexError on a lone name, and reads `gamma,rgb,2` as one word, so a formula is checked here
token by token (every mistake a 400 naming the fix) and handed on in a canonical spelling.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

MAX_CHARS = 500
MAX_OPERATIONS = 16
EXAMPLE = "e.g. 'Gamma RGB 3.5 Saturation 1.7 Sigmoidal RGB 15 0.35'"
# per operation: whether it names its bands, and its numbers
OPERATIONS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "gamma": (True, ("gamma",)),
    "sigmoidal": (True, ("contrast", "bias")),
    "saturation": (False, ("proportion",)),
}
_BANDS = {"r": 1, "g": 2, "b": 3, "1": 1, "2": 2, "3": 3}


class ColorFormulaError(ValueError):
    """A formula that cannot be applied; the message says what to change."""


@dataclass(frozen=True)
class ColorFormula:
    """A checked formula: its canonical text (what color-operations parses) and the highest
    band it uses (a tile with fewer bands is refused before it is read)."""

    text: str
    bands: int

    def apply(self, data: np.ndarray) -> np.ndarray:
        """rio-tiler's `ImageData.apply_color_formula` on (bands, h, w) integer data: negatives
        to 0, then per operation scaled to 0..1 by the dtype's maximum, applied, back to
        uint8. Masked pixels are computed too (the mask is kept apart), as in rio-tiler."""
        from color_operations import parse_operations, scale_dtype, to_math_type

        out = np.where(data < 0, 0, data).astype(data.dtype, copy=False)
        with np.errstate(all="ignore"):  # large contrasts overflow exp() to their limits
            for operation in parse_operations(self.text):
                out = scale_dtype(operation(to_math_type(out)), np.uint8)
        return out


def parse(text: str) -> ColorFormula:
    """Check a formula token by token (commas count as spaces, names and bands any case)."""
    if len(text) > MAX_CHARS:
        raise ColorFormulaError(f"color_formula: longer than {MAX_CHARS} characters")
    tokens = re.split(r"[\s,]+", text.strip())
    if tokens == [""]:
        raise ColorFormulaError(f"color_formula: empty; {EXAMPLE}")
    groups: list[list[str]] = []
    for token in tokens:
        if token.lower() in OPERATIONS:
            groups.append([token.lower()])
        elif not groups:
            raise ColorFormulaError(
                f"color_formula: {token!r} is not an operation; it starts with one of "
                f"{sorted(OPERATIONS)}, {EXAMPLE}"
            )
        else:
            groups[-1].append(token)
    if len(groups) > MAX_OPERATIONS:
        raise ColorFormulaError(f"color_formula: at most {MAX_OPERATIONS} operations")
    canonical, highest = [], 0
    for name, *rest in groups:
        takes_bands, numbers = OPERATIONS[name]
        bands = ""
        if takes_bands:
            if not rest or not rest[0] or any(c not in _BANDS for c in rest[0].lower()):
                got = repr(rest[0]) if rest else "nothing"
                raise ColorFormulaError(
                    f"color_formula: {name} needs its bands first (letters r, g, b or digits "
                    f"1-3, e.g. RGB), got {got}"
                )
            bands, rest = rest[0].lower(), rest[1:]
            highest = max(highest, *(_BANDS[c] for c in bands))
        else:
            highest = max(highest, 3)
        if len(rest) != len(numbers):
            usage = " ".join([name, *(["BANDS"] if takes_bands else []), *numbers])
            raise ColorFormulaError(
                f"color_formula: {name} takes {len(numbers)} number(s) ({usage}), got {rest}"
            )
        values = []
        for label, token in zip(numbers, rest, strict=True):
            try:
                value = float(token)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise ColorFormulaError(
                    f"color_formula: {name}'s {label} must be a finite number, got {token!r}"
                )
            values.append(value)
        if name == "gamma" and not values[0] > 0:
            raise ColorFormulaError(f"color_formula: gamma must be above 0, got {rest[0]}")
        if name == "sigmoidal" and not 0 <= values[1] <= 1:
            raise ColorFormulaError(
                f"color_formula: sigmoidal's bias is within 0..1 (the mid-tone), got {rest[1]}"
            )
        canonical.append(" ".join([name, *([bands] if bands else []), *map(repr, values)]))
    return ColorFormula(text=" ".join(canonical), bands=highest)
