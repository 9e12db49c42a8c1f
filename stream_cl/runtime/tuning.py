"""Process tuning the daemon applies to the process it runs in, and undoes when it stops.

Every knob here is process-wide or thread-wide state, so only the runtime sets it (never a
library call such as building a strategy), each one from its config key:

- `model.torch_threads`: torch's intra-op thread count (process-wide).
- `learner.gil_switch_interval_us`: how soon the learner thread gets the GIL back from the source
  and serving threads (`sys.setswitchinterval`, process-wide; several daemons in one process, as
  in the tests, hand it back in order).
- the cyclic garbage collector: objects alive after start-up are frozen (`gc.freeze`), so a full
  collection, which stops every thread, does not scan the model and torch's own objects while the
  stream is learned; `stop` unfreezes.
- denormal flushing on the learner thread: after many steps Adam's moments and the gradients of a
  well-fit model go subnormal, and CPU arithmetic on subnormals is many times slower.
- `learner.cpu_affinity` (off by default): the learner thread on cores of its own (runtime/affinity.py).

Each of these is harmless on a shared host: none reaches beyond this process except CPU pinning,
which is opt-in and keeps its core claims in the daemon's checkpoint directory.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from stream_cl.config import Config
from stream_cl.learn.checkpointing import place_helper_threads
from stream_cl.log import get_logger
from stream_cl.runtime.affinity import CpuPlan, cpu_plan, move_to


def flushes_denormals() -> bool:
    """Whether this thread flushes subnormal floats to zero (1e-40 is subnormal in float32)."""
    return (torch.tensor([1e-30]) * 1e-10).item() == 0.0


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero on this thread (and threads it starts) while training.

    The mode is processor state of the thread, so it is scoped: other code on the thread
    (hypothesis, for one, refuses to run with it) gets the previous mode back.
    """
    before = flushes_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def set_torch_threads(config: Config) -> None:
    """`model.torch_threads` for this process (0 = torch's own default): every composition root
    that runs a model (the daemon, a replica, a benchmark) calls it once, before its first forward."""
    if config.model.torch_threads:
        torch.set_num_threads(config.model.torch_threads)


def freeze_heap(collect: bool = False) -> None:
    """Take every object alive now out of the cyclic garbage collector's reach (`gc.freeze`).

    Frozen objects are still freed by reference counting, but never scanned; cycles among them
    wait for `gc.unfreeze`. The daemon freezes at start, after one full collection (`collect`),
    and once more after its first records are learned, without collecting: what the model and the
    first optimizer step created is frozen too.
    """
    if collect:
        gc.collect()
    gc.freeze()


class SwitchInterval:
    """`sys.setswitchinterval` while daemons run in this process: the value of the daemon that
    started last among those still running, Python's own after the last one stops."""

    lock = threading.Lock()
    held: list[float] = []  # one entry per running daemon, in start order
    saved = 0.005

    @classmethod
    def hold(cls, seconds: float) -> None:
        with cls.lock:
            if not cls.held:
                cls.saved = sys.getswitchinterval()
            cls.held.append(seconds)
            sys.setswitchinterval(seconds)

    @classmethod
    def release(cls, seconds: float) -> None:
        with cls.lock:
            cls.held.remove(seconds)
            sys.setswitchinterval(cls.held[-1] if cls.held else cls.saved)


def cpu_claims_dir(config: Config) -> Path:
    """Where `learner.cpu_affinity = "auto"` keeps its per-core lock files: inside the daemon's
    own checkpoint directory, shared by the daemons that share `checkpoint.dir`."""
    return Path(config.checkpoint.dir, ".cpu-claims")


class ProcessTuning:
    """The tuning of one daemon: `apply()` at start, `learner_thread()` around the learner's loop,
    `after_first_records()` once, and `undo()` at stop (in reverse order of what was applied)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = get_logger("stream_cl.runtime.tuning")
        self.cpus: CpuPlan | None = None
        self._undo: list[Callable[[], None]] = []
        self._frozen_after_records = False

    def plan_cpus(self) -> CpuPlan | None:
        """Decide `learner.cpu_affinity` (before any thread starts: they inherit the plan's cores)."""
        cfg = self.config
        self.cpus, why = cpu_plan(cfg.learner.cpu_affinity, cfg.model.torch_threads, cpu_claims_dir(cfg))
        if self.cpus is not None:
            self.log.info("cpu_affinity", learner=sorted(self.cpus.learner), rest=sorted(self.cpus.rest))
            plan = self.cpus
            self._undo.append(plan.release)  # the learner's cores, for the next daemon's `auto`
        else:
            self.log.info("cpu_affinity_off", setting=cfg.learner.cpu_affinity, reason=why)
        return self.cpus

    def starting_threads(self) -> contextlib.AbstractContextManager[None]:
        """Threads and processes started inside run off the learner's cores (when pinned)."""
        return self.cpus.starting_threads() if self.cpus is not None else contextlib.nullcontext()

    def apply(self) -> None:
        """The process-wide settings, once the components exist."""
        cfg = self.config
        set_torch_threads(cfg)
        freeze_heap(collect=True)
        self._undo.append(gc.unfreeze)
        if cfg.learner.gil_switch_interval_us:
            seconds = cfg.learner.gil_switch_interval_us / 1e6
            SwitchInterval.hold(seconds)
            self._undo.append(lambda: SwitchInterval.release(seconds))

    @contextlib.contextmanager
    def learner_thread(self) -> Iterator[None]:
        """Around the learner thread's loop: its cores (when pinned) and denormal flushing."""
        if self.cpus is not None:
            rest = self.cpus.rest
            try:
                self.cpus.pin_learner()
                place_helper_threads(lambda: move_to(rest))  # checkpoint writes off its cores
            except OSError as e:  # the cores went away since start (a changed cpuset): run anywhere
                self.log.warning("cpu_affinity_failed", error=str(e))
        with flush_denormals():
            yield

    def after_first_records(self) -> None:
        """Once the first records are learned (learner thread): freeze what the first steps made."""
        if not self._frozen_after_records:
            self._frozen_after_records = True
            freeze_heap()

    def undo(self) -> None:
        """Hand back everything `apply` and `plan_cpus` took, last first."""
        while self._undo:
            self._undo.pop()()
