"""How much of the machine other processes used while a benchmark case ran.

Why: on a 2-core machine torch's two intra-op threads share the cores with whatever else runs.
Another busy process does not slow a case evenly: ops that synchronise their threads often
(softmax, many small kernels) lose far more than one big matmul. Measured here (2026-12-04,
2048 tokens, batch 1, same pytest-benchmark cases): idle, the window-attention floor took
1.4-2.0 ms and the compiled snapkv op 3.1-3.7 ms; with two busy Python loops beside them, 24 ms
and 224 ms (16x and 65x). A timed run taken while a test job or a ``pip install`` ran therefore
shows ratios that mean nothing (the "floor slower than the ops containing it" of an earlier
run), and nothing in the figures says so. Each timed case now records the share of the
machine's CPU time that went to *other* processes (and to other guests of the hypervisor,
"steal") during its timing, and the report flags the cases above :data:`BUSY_SHARE`.

Linux only (``/proc/stat``); elsewhere nothing is recorded and nothing is flagged. Work of our
own process's unwaited children (inductor's compile workers) would count as "other": the cases
compile before they are timed, so none runs then.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: above this share of the machine's CPU time going to other processes, a case's figure is flagged
BUSY_SHARE = 0.10

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuSnapshot:
    busy_ticks: int  # all CPUs, user + nice + system + irq + softirq + steal (clock ticks)
    total_ticks: int  # the same plus idle and iowait
    own_seconds: float  # this process (all its threads) and its waited children, user + system


def parse_proc_stat(text: str) -> tuple[int, int]:
    """``(busy, total)`` clock ticks of the aggregate ``cpu`` line of ``/proc/stat``."""
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
            busy = user + nice + system + irq + softirq + steal  # guest time is already in user
            return busy, busy + idle + iowait
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def snapshot() -> CpuSnapshot | None:
    """The machine's and this process's CPU time now, or None where ``/proc/stat`` is missing."""
    try:
        busy, total = parse_proc_stat(PROC_STAT.read_text())
    except (OSError, ValueError):
        return None
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    return CpuSnapshot(busy, total, own)


def others_share(before: CpuSnapshot, after: CpuSnapshot, ticks_per_second: float) -> float | None:
    """The share (0-1) of the machine's CPU time between two snapshots that other processes used.

    The machine's busy time minus our own, over its total time (all CPUs). Clamped at 0: tick
    counters and ``os.times`` round differently, so an idle machine reads a little below zero."""
    total = after.total_ticks - before.total_ticks
    if total <= 0:
        return None
    others = (after.busy_ticks - before.busy_ticks) - (after.own_seconds - before.own_seconds) * ticks_per_second
    return max(0.0, others / total)


def ticks_per_second() -> float:
    return float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0


def busy_note(share: float | None) -> str | None:
    """The report's flag for a case timed while the machine was busy, else None."""
    if share is None or share <= BUSY_SHARE:
        return None
    return f"machine busy: {share:.0%} of the CPU to other processes"
