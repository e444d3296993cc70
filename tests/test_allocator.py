"""core.allocator: the array memory a tile frees is reused, not faulted in again, in the
server process and in its compute workers (real worker processes)."""

from __future__ import annotations

import platform
import resource
import subprocess
import sys

import pytest

from core.compute import ComputePool

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc's malloc thresholds (other C libraries are left alone)",
)


def faults_per_warp(count: int = 100) -> float:
    """Minor page faults per nearest warp of a 256² web tile from a UTM read window (the
    sampling index and the sample: what a compute worker does for most tiles)."""
    import numpy as np
    from affine import Affine

    from core.warp import warp_part

    src = Affine(30, 0, 600000, 0, -30, 5010000)
    data = np.ones((3, 700, 700), dtype=np.uint8)
    valid = np.ones((700, 700), dtype=bool)

    def warp(i: int) -> None:
        dst = Affine(76.437, 0, 1000000 + 10 * i, 0, -76.437, 5600000)
        warp_part(data, valid, src, "EPSG:32632", dst, "EPSG:3857", (256, 256), None, "nearest")

    for i in range(5):
        warp(i)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(count):
        warp(i)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / count


def _in_fresh_process(call: str) -> float:
    code = f"import tests.test_allocator as t\n{call}\nprint(t.faults_per_warp())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_thresholds_stop_the_refaulting() -> None:
    """With glibc's defaults a tile's warp faults its arrays' pages in on every call (mmap
    and munmap, or a trimmed heap: ~430 faults); with the thresholds, next to none."""
    default = _in_fresh_process("pass")
    kept = _in_fresh_process("from core.allocator import keep_freed_memory as k; assert k(64, 16)")
    assert default >= 100
    assert kept < 5


def test_the_compute_workers_set_them() -> None:
    """The pool passes the thresholds to each worker (a forkserver's child does not inherit
    the server's mallopt): with them the worker's arrays stop faulting, without them not."""
    for malloc, expect_kept in (((64, 16), True), ((0, 0), False)):
        pool = ComputePool(1, arena_mb=0, malloc=malloc)
        try:
            faults = pool.submit(faults_per_warp).result(timeout=60)
        finally:
            pool.close()
        assert (faults < 5) if expect_kept else (faults >= 100), (malloc, faults)
