"""Work a strategy moves off the learner's critical path, onto one background thread per process.

The learner thread is the daemon's bottleneck: every microsecond it spends per sample is a sample
per second lost. Work whose result is needed *later* (the task router's random features and
statistics, its periodic solves) is queued here instead and runs on a second core while the
learner goes on. One thread serves every strategy of the process (a hundred per-key models share
it), first in, first out, so a strategy's own jobs run in the order it queued them; torch releases
the GIL inside its ops, so the two threads mostly run side by side.

`BackgroundJobs` is a strategy's handle on its own queued jobs: `wait()` returns once all of them
ran (re-raising the first failure), after which the strategy may touch the state they write.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None


def _shared_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-cl-background")
        return _executor


def start() -> None:
    """Start the background thread now (it starts at the first job otherwise): a bench that meters
    the daemon's threads from its first sample on sees it."""
    _shared_executor().submit(lambda: None).result()


class BackgroundJobs:
    """The jobs one owner (a router) queued on the shared background thread, in order."""

    def __init__(self) -> None:
        self._queued: deque[Future[Any]] = deque()

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Queue `job(*args)`; a failure of an earlier job is raised here (or by `wait`)."""
        while self._queued and self._queued[0].done():
            self._queued.popleft().result()
        self._queued.append(_shared_executor().submit(job, *args))

    def wait(self) -> None:
        """Return once every queued job ran; re-raises the first one that failed."""
        while self._queued:
            self._queued.popleft().result()

    def __getstate__(self) -> dict[str, Any]:
        self.wait()
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._queued = deque()
