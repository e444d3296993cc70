"""Keep rio-tiler's optional xarray (and with it pandas) out of the processes that never use it.

Why: rio-tiler imports xarray whenever it is installed, for its optional `XarrayReader`
(`rio_tiler.io.xarray` wraps the import in try/except ImportError). The compute workers use
rio-tiler for colormaps, rescaling and GDAL's render only, and every worker paid ~60 MB of RSS
and ~0.5 s of imports for xarray and pandas. A `None` in `sys.modules` makes that import fail
the way rio-tiler expects. Imported first by the compute forkserver (`core.compute._PRELOAD`),
so the workers forked from it inherit it, and by `terrazzo serve` for the server itself; never
in a process that may run a user's code (the library, the tests' in-process apps).
"""

from __future__ import annotations

import sys

UNUSED = ("xarray", "rioxarray")


def block() -> None:
    """Make `import xarray` / `import rioxarray` fail in this process (unless already done)."""
    for name in UNUSED:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


block()
