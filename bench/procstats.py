"""Process figures from /proc for the benchmarks: CPU seconds and resident memory."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _status(pid: int, key: str) -> float:
    """A VmXXX line of /proc/PID/status, in MB (0 when the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


def rss_mb(pids: list[int]) -> float:
    return sum(_status(pid, "VmRSS") for pid in pids)


def peak_rss_mb(pids: list[int]) -> float:
    return sum(_status(pid, "VmHWM") for pid in pids)


def reset_peak(pids: list[int]) -> None:
    """Restart the peak-RSS count (VmHWM) of these processes, so the next peak_rss_mb
    measures one run only (Linux: writing 5 to /proc/PID/clear_refs)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def children(pid: int) -> list[int]:
    """The process and its descendants (a server and its compute workers). Every thread's
    children: the compute pool's forkserver is started from a thread, and
    /proc/PID/task/PID/children lists only the main thread's."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    kids: list[str] = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            kids += (task / "children").read_text().split()
    return [pid] + [p for kid in dict.fromkeys(kids) for p in children(int(kid))]


def pss_mb(pids: list[int]) -> float:
    """Proportional set size of these processes (shared pages split between them, so a
    forked worker's copy-on-write pages are not counted twice as RSS sums do)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
    return total


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, IndexError):
            continue
    return total / os.sysconf("SC_CLK_TCK")
