"""The compute pool's shared-memory transport (core.compute._Arena) gives what the pipe gave.

Real worker processes; the jobs are module-level functions of this file (a worker imports
it). Each case runs with the arena (64 MiB), with one too small for the arrays (every buffer
falls back to the pipe) and with none (`arena_mb=0`), and must give the same results.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from core.compute import ComputePool


def echo(*arrays: np.ndarray) -> tuple:
    """The inputs back, and a view of the first (a result that lies in the arena)."""
    return (*arrays, arrays[0][:, 1:3])


def scale_in_place(data: np.ndarray, by: int) -> np.ndarray:
    data *= by  # writes into the worker's copy, never the server's array
    return data.sum(axis=0)


def die_once(flag: str, data: np.ndarray) -> float:
    """Dies (SIGKILL) the first time, after scribbling over its input; then sums it."""
    if not os.path.exists(flag):
        Path(flag).write_text("died")
        data[...] = 0
        os.kill(os.getpid(), signal.SIGKILL)
    return float(data.sum())


@pytest.fixture(scope="module", params=[64, 1, 0], ids=["arena", "too-small", "pipe"])
def pool(request: pytest.FixtureRequest):
    pool = ComputePool(1, arena_mb=request.param)
    yield pool, request.param
    pool.close()


def test_results_and_views_come_back_whole(pool) -> None:
    pool, mb = pool
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 255, (3, 700, 700), dtype=np.uint8),  # 1.4 MB: over a 1 MiB arena
        rng.random((2, 300, 200)).astype(np.float32),
        rng.random((50, 40)) > 0.5,
        np.zeros((0, 5), dtype=np.int16),  # empty
    ]
    *back, view = pool.submit(echo, *arrays).result(60)
    for got, sent in zip(back, arrays, strict=True):
        assert got.dtype == sent.dtype and got.shape == sent.shape
        assert np.array_equal(got, sent)
        assert got.flags.writeable
    assert np.array_equal(view, arrays[0][:, 1:3])
    # the next job overwrites the arena: what came back is the server's own memory
    pool.submit(echo, np.full((3, 700, 700), 7, dtype=np.uint8)).result(60)
    assert np.array_equal(back[0], arrays[0])
    arena = pool._workers[0].arena
    assert (arena is not None) == (mb > 0)


def test_a_job_writing_into_its_input_never_touches_the_servers_array(pool) -> None:
    pool, _ = pool
    data = np.arange(2 * 64 * 64, dtype=np.int64).reshape(2, 64, 64)
    before = data.copy()
    total = pool.submit(scale_in_place, data, 3).result(60)
    assert np.array_equal(total, (before * 3).sum(axis=0))
    assert np.array_equal(data, before)


def test_a_retry_after_a_death_gets_its_inputs_intact(pool, tmp_path: Path) -> None:
    pool, _ = pool
    data = np.ones((4, 256, 256), dtype=np.float64)
    flag = str(tmp_path / "died")
    # the dying worker zeroed its (shared) input: the retry must be sent the real pixels
    assert pool.submit(die_once, flag, data).result(120) == data.size
    assert Path(flag).exists()
