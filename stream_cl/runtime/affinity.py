"""`learner.cpu_affinity`: the learner thread on cores of its own, the rest of the daemon on the others.

The learner thread is the daemon's bottleneck: it trains as fast as the cores allow, while the
source thread, the fetcher process, the evaluator and the server threads need a fraction of a
core between them. Left to the scheduler, those often run on the learner's core (a thread woken by
the learner tends to start where the learner runs), and the learner waits or loses its caches.

    plan, why = cpu_plan("auto", torch_threads=1)  # on 2 cores: learner {1}, rest {0}
    with plan.starting_threads():                  # threads and processes started here: rest
        ...start the source, evaluator, server, fetcher; the learner thread...
    # first thing on the learner thread:
    plan.pin_learner()
    # at stop: the learner's cores for the next daemon's `auto`
    plan.release()

`auto` claims the learner's cores with a lock file each (in the daemon's checkpoint directory): a
second daemon sharing that directory takes the next free cores, or none, instead of the same last
one. Off by default: pinning is for a host the daemon has to itself (and for benchmarks).

Threads inherit the cores of the thread that starts them (Linux), so components start inside
`starting_threads` without knowing about this module; a helper the learner thread starts (a
background checkpoint write) is moved to the others by the runtime (`tuning.ProcessTuning`). torch's intra-op pool
(`model.torch_threads` > 1) belongs to whichever thread first ran a parallel op: `auto` gives the
learner as many cores as torch threads, which holds when the learner thread starts that pool.

Linux only (`os.sched_setaffinity`); elsewhere `auto` does nothing and a CPU list is a config error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stream_cl.cpus import CPU_AFFINITY_SUPPORTED as SUPPORTED
from stream_cl.cpus import available_cpus, parse_cpus

__all__ = ["SUPPORTED", "CpuPlan", "available_cpus", "cpu_plan", "parse_cpus"]


@dataclass(frozen=True)
class CpuPlan:
    """The learner thread's cores and every other daemon thread's (and the fetcher process's).

    With `auto`, `claims` holds the learner's cores against other daemons' `auto` until `release`.
    """

    learner: frozenset[int]
    rest: frozenset[int]
    claims: tuple[int, ...] = ()  # open lock files, one per claimed core

    def release(self) -> None:
        """Give the claimed cores back (the daemon stopped); closing a lock file unlocks it."""
        for fd in self.claims:
            os.close(fd)

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
        """Move the calling thread (the learner) to its cores."""
        os.sched_setaffinity(0, self.learner)


def move_to(cpus: frozenset[int] | None) -> None:
    """Move the calling thread to `cpus` (None: leave it)."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def cpu_plan(setting: str, torch_threads: int, claims_dir: Path) -> tuple[CpuPlan | None, str]:
    """The plan for `learner.cpu_affinity` on this machine, or None with the reason.

    `auto`: the learner gets the last `torch_threads` of the cores this process may use (torch's
    own count when 0) that no other daemon's learner holds, the rest get the others; None when
    that leaves no core for the rest, or when a cgroup CPU quota says the visible cores are shared
    (a container limited by quota, not by a cpuset: the cores other containers see too).
    A CPU list: the learner gets those cores, the rest get the others (all of them when none are
    left). `off`: None.
    """
    if setting == "off":
        return None, "off"
    if not SUPPORTED:
        return None, "not supported on this platform"
    allowed = available_cpus()
    if setting == "auto":
        quota = cpu_quota()
        if quota is not None and quota < len(allowed):
            # a container with a CPU limit but no cpuset: the visible cores are shared with others,
            # whose learners would be pinned to the same last core
            return None, f"a CPU quota of {quota:g} cores on {len(allowed)} visible cores: they are shared"
        if not torch_threads:
            import torch

            torch_threads = torch.get_num_threads()
        return _claim_last(allowed, torch_threads, claims_dir)
    learner = parse_cpus(setting)  # validated with the config: a subset of `allowed`
    return CpuPlan(learner, (allowed - learner) or allowed), "pinned"


def _claim_last(allowed: frozenset[int], count: int, claims_dir: Path) -> tuple[CpuPlan | None, str]:
    """`auto`: the last `count` cores no other daemon's learner holds (a lock file per core, so
    daemons on one machine, or in one process, do not all take the same last core), leaving at
    least one core for the rest; the rest also keep off the other learners' cores where they can."""
    claims: dict[int, int] = {}  # core -> its lock file
    taken: set[int] = set()  # cores other learners hold
    try:
        for cpu in sorted(allowed, reverse=True):
            if len(claims) == count or len(allowed) - len(taken) - len(claims) <= 1:
                break  # enough, or the next claim would leave the rest no core of its own
            fd = _try_lock(cpu, claims_dir)
            if fd is None:
                taken.add(cpu)
            else:
                claims[cpu] = fd
    except OSError as e:  # no lock file (a read-only directory, ...): pin nothing
        why = f"cannot claim cores: {e}"
    else:
        held = "held by other daemons' learners" if taken else "none left over for the rest"
        why = f"{len(allowed)} cores available, {count} needed by the learner ({len(taken)} {held})"
    if len(claims) < count:
        for fd in claims.values():
            os.close(fd)
        return None, why
    learner = frozenset(claims)
    rest = (allowed - learner - taken) or (allowed - learner)
    return CpuPlan(learner, rest, tuple(claims.values())), "pinned"


def _try_lock(cpu: int, claims_dir: Path) -> int | None:
    """An open file holding an exclusive lock on `cpu` for this daemon, or None if another holds it."""
    import fcntl  # Unix only, as is pinning

    claims_dir.mkdir(parents=True, exist_ok=True)
    path = claims_dir / f"learner-cpu{cpu}.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """This process's cgroup CPU limit in cores (cgroup v2 `cpu.max`, or v1's CFS quota), if any."""
    try:
        quota, period = Path(root, "cpu.max").read_text().split()[:2]  # v2: "max 100000", "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = Path(root, "cpu", "cpu.cfs_quota_us").read_text().strip()  # v1: -1 = no limit
        period = Path(root, "cpu", "cpu.cfs_period_us").read_text().strip()
        return None if int(quota) <= 0 else int(quota) / int(period)
    except (OSError, ValueError):
        return None
