"""`learner.cpu_affinity`: the learner thread on cores of its own, the rest of the daemon on the others.

The learner thread is the daemon's bottleneck: it trains as fast as the cores allow, while the
source thread, the fetcher process, the evaluator and the server threads need a fraction of a
core between them. Left to the scheduler, those often run on the learner's core (a thread woken by
the learner tends to start where the learner runs), and the learner waits or loses its caches.

    plan = cpu_plan("auto", torch_threads=1)    # on 2 cores: learner {1}, rest {0}
    with plan.starting_threads():                # threads and processes started here: rest
        ...start the source, evaluator, server, fetcher; the learner thread...
    # first thing on the learner thread:
    plan.pin_learner()

Threads inherit the cores of the thread that starts them (Linux), so components start inside
`starting_threads` without knowing about this module; a helper the learner thread starts (a
background checkpoint write) asks `helper_cpus()` for the cores to move to. torch's intra-op pool
(`model.torch_threads` > 1) belongs to whichever thread first ran a parallel op: `auto` gives the
learner as many cores as torch threads, which holds when the learner thread starts that pool.

Linux only (`os.sched_setaffinity`); elsewhere `auto` does nothing and a CPU list is a config error.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

KEY = "learner.cpu_affinity"
SUPPORTED = hasattr(os, "sched_setaffinity")

_local = threading.local()  # .helper_cpus on a pinned learner thread


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
    return frozenset(os.sched_getaffinity(0)) if SUPPORTED else frozenset()


@dataclass(frozen=True)
class CpuPlan:
    """The learner thread's cores and every other daemon thread's (and the fetcher process's)."""

    learner: frozenset[int]
    rest: frozenset[int]

    @contextlib.contextmanager
    def starting_threads(self) -> Iterator[None]:
        """Run the block on `rest`, so what it starts inherits `rest`; the caller's cores after."""
        saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.rest)  # 0: the calling thread (Linux)
        try:
            yield
        finally:
            os.sched_setaffinity(0, saved)

    def pin_learner(self) -> None:
        """Move the calling thread (the learner) to its cores; its helpers go to `rest`."""
        os.sched_setaffinity(0, self.learner)
        _local.helper_cpus = self.rest


def helper_cpus() -> frozenset[int] | None:
    """Where a helper thread started by the calling thread should run: off a pinned learner's
    cores; None when the caller is not a pinned learner (the helper inherits its cores)."""
    return getattr(_local, "helper_cpus", None)


def move_to(cpus: frozenset[int] | None) -> None:
    """Move the calling thread to `cpus` (None: leave it)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def cpu_plan(setting: str, torch_threads: int) -> tuple[CpuPlan | None, str]:
    """The plan for `learner.cpu_affinity` on this machine, or None with the reason.

    `auto`: the learner gets the last `torch_threads` of the cores this process may use (torch's
    own count when 0), the rest get the others; None when that leaves no core for the rest.
    A CPU list: the learner gets those cores, the rest get the others (all of them when none are
    left). `off`: None.
    """
    if setting == "off":
        return None, "off"
    if not SUPPORTED:
        return None, "not supported on this platform"
    allowed = available_cpus()
    if setting == "auto":
        if not torch_threads:
            import torch

            torch_threads = torch.get_num_threads()
        if len(allowed) <= torch_threads:
            return (
                None,
                f"{len(allowed)} cores available, {torch_threads} needed by the learner and 1 by the rest",
            )
        learner = frozenset(sorted(allowed)[-torch_threads:])
    else:
        learner = parse_cpus(setting)  # validated with the config: a subset of `allowed`
    return CpuPlan(learner, (allowed - learner) or allowed), "pinned"


def validate(setting: str) -> str | None:
    """Why `setting` is not a valid `learner.cpu_affinity` here, or None."""
    if setting in ("auto", "off"):
        return None
    try:
        cpus = parse_cpus(setting)
    except ValueError:
        return f"expected 'auto', 'off' or CPU ids like '3', '2,3' or '2-3', got {setting!r}"
    if not SUPPORTED:
        return "CPU affinity is not supported on this platform: use 'auto' or 'off'"
    missing = cpus - available_cpus()
    if missing:
        return (
            f"CPUs {sorted(missing)} are not available to this process "
            f"(available: {sorted(available_cpus())})"
        )
    return None
