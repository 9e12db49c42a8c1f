"""CPU sets as `taskset -c` writes them, and what makes a `learner.cpu_affinity` value valid here:
shared by config validation and the runtime's pinning (runtime/affinity.py)."""

from __future__ import annotations

import os

CPU_AFFINITY_SUPPORTED = hasattr(os, "sched_setaffinity")


def parse_cpus(text: str) -> frozenset[int]:
    """CPU ids as `taskset -c` writes them: "3", "2,3", "0-3,6"; ValueError when malformed."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        first, last = int(low), int(high) if dash else int(low)
        if first < 0 or last < first:
            raise ValueError(part)
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def available_cpus() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0)) if CPU_AFFINITY_SUPPORTED else frozenset()


def cpu_affinity_problem(setting: str) -> str | None:
    """Why `setting` is not a valid `learner.cpu_affinity` here, or None."""
    if setting in ("auto", "off"):
        return None
    try:
        cpus = parse_cpus(setting)
    except ValueError:
        return f"expected 'auto', 'off' or CPU ids like '3', '2,3' or '2-3', got {setting!r}"
    if not CPU_AFFINITY_SUPPORTED:
        return "CPU affinity is not supported on this platform: use 'auto' or 'off'"
    available = available_cpus()
    missing = cpus - available
    if missing:
        return f"CPUs {sorted(missing)} are not available to this process (available: {sorted(available)})"
    return None
