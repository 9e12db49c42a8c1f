"""When the learner writes checkpoints, and background writes (`checkpoint.background`).

Writing a checkpoint (torch.save of model, optimizer, evaluator reservoirs and trajectory, then
fsync and rename) takes tens of milliseconds, and with `checkpoint.at_boundary` the learner writes
one at every task boundary: on a stream with short tasks that is a large share of the learner
thread's time. The learner captures the state on its own
thread (so it is exactly the state at that point), detaches it from anything the model can still
change, and a writer thread does the I/O while learning goes on; the learner applies the result
(bookkeeping, `checkpoint_written`, `on_checkpoint`) on its own thread once the write is done.
One write at a time; an explicit `Learner.checkpoint()` waits for it.

Even in the background a write is not free: pickling and torch.save's record writes hold the GIL
the learner needs, and the capture (about 14 MB for the default MLP on split-mnist: trajectory,
optimizer, reservoirs) runs on the learner thread. So scheduled writes come at most every
`checkpoint.min_interval_s`; a request inside the interval stays pending, and later boundaries
share its write.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_cl.config import CheckpointConfig
from stream_cl.metrics import Metrics
from stream_cl.store.checkpoints import CheckpointStore

_helper_threads = threading.local()  # .setup: what a helper thread started by this thread runs first


def place_helper_threads(setup: Callable[[], None] | None) -> None:
    """Helper threads the calling thread starts from now on (background checkpoint writes) run
    `setup` first. The runtime uses it to keep them off a pinned learner thread's cores."""
    _helper_threads.setup = setup


def detached(obj: Any) -> Any:
    """A copy of a state dict sharing no tensor, array or container with the live objects."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, dict):
        return {k: detached(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [detached(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(detached(v) for v in obj)
    if isinstance(obj, set):
        return set(obj)
    return obj  # numbers, strings, None, ...: immutable


class BackgroundWrite:
    """One checkpoint write on its own thread; `result()` waits and gives (path, error)."""

    def __init__(self, store: CheckpointStore, state: dict[str, Any], offsets: dict[int, int], learned: int):
        self.offsets = offsets
        self.learned = learned
        self._store = store
        self._state: dict[str, Any] | None = state
        self._path: Path | None = None
        self._error: OSError | None = None
        self._setup: Callable[[], None] | None = getattr(_helper_threads, "setup", None)
        self._thread = threading.Thread(target=self._run, name="stream-cl-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._setup is not None:
            self._setup()
        try:
            assert self._state is not None
            self._path = self._store.save(self._state)
        except OSError as e:
            self._error = e
        finally:
            self._state = None  # free the copy as soon as it is on disk

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[Path | None, OSError | None]:
        self._thread.join()
        return self._path, self._error


class CheckpointScheduler:
    """When the learner writes a checkpoint, and the writing (in line, or one write at a time in
    the background). All calls come from the learner thread.

    The learner says what a checkpoint holds (`capture`: its state dict, learned count and
    offsets at that point); the scheduler decides whether one is due, writes it, retries a failed
    write, and reports a written one through `on_written(offsets)`.
    """

    def __init__(
        self,
        store: CheckpointStore,
        config: CheckpointConfig,
        metrics: Metrics,
        log: Any,
        on_written: Callable[[dict[int, int]], None],
        background: bool,
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.log = log
        self.on_written = on_written
        self.background = background  # scheduled writes on a writer thread (explicit ones wait)
        self.requested = False  # a boundary asked for one (`checkpoint.at_boundary`)
        self._learned_at_last = 0
        self._offsets_at_last: dict[int, int] = {}
        self._evaluated_at_last = 0  # the evaluator's revision the last checkpoint holds
        self._last = time.monotonic()
        self._last_attempt = -math.inf  # none yet (monotonic time can be near 0 after boot)
        self._write: BackgroundWrite | None = None

    def restored(self, learned: int, offsets: dict[int, int]) -> None:
        """The learner resumed from a checkpoint holding exactly this."""
        self._learned_at_last = learned
        self._offsets_at_last = dict(offsets)

    def due(self, learned: int) -> bool:
        """Whether a scheduled checkpoint should be written now (applies a finished background write)."""
        cfg = self.config
        if self._write is not None:
            if not self._write.done():
                return False  # one write at a time
            self._finish_write()
        now = time.monotonic()
        if now - self._last_attempt < 5.0 and self._last_attempt > self._last:
            return False  # the last attempt failed: retry at most every 5 s
        if now - self._last_attempt < cfg.min_interval_s:
            return False  # a request stays pending: boundaries closer than this share one write
        return (
            self.requested
            or (cfg.every_samples > 0 and learned - self._learned_at_last >= cfg.every_samples)
            or (cfg.every_s > 0 and now - self._last >= cfg.every_s and learned > self._learned_at_last)
        )

    def finish_pending(self) -> None:
        """Wait for a background write in flight and apply its outcome."""
        if self._write is not None:
            self._finish_write()

    def unchanged(self, learned: int, offsets: dict[int, int], evaluated: int = 0) -> bool:
        """Nothing learned, processed or evaluated (the evaluator's `revision`) since the last checkpoint."""
        return (
            learned == self._learned_at_last
            and offsets == self._offsets_at_last
            and evaluated == self._evaluated_at_last
        )

    def write(
        self,
        state: Callable[[], dict[str, Any]],
        offsets: dict[int, int],
        learned: int,
        wait: bool,
        evaluated: int = 0,
    ) -> bool:
        """Write `state()` (model + state + offsets) atomically. False (and keep serving) when the
        write fails, e.g. disk full or an unwritable directory. `wait=False` captures the state now
        and writes a private copy on a writer thread (True = queued); a later `due` or
        `finish_pending` applies its outcome."""
        self.finish_pending()
        self._evaluated_at_last = evaluated
        self._last_attempt = time.monotonic()
        requested, self.requested = self.requested, False
        offsets = dict(offsets)
        if not wait:  # a private copy: the model and the reservoirs change while it is written
            self._write = BackgroundWrite(self.store, detached(state()), offsets, learned)
            return True
        try:
            path = self.store.save(state())
        except OSError as e:
            return self._write_failed(e, requested)
        return self._written(path, offsets, learned)

    def _finish_write(self) -> bool:
        write, self._write = self._write, None
        assert write is not None
        path, error = write.result()
        if error is not None:
            return self._write_failed(error, True)
        assert path is not None
        return self._written(path, write.offsets, write.learned)

    def _write_failed(self, error: OSError, requested: bool) -> bool:
        self.requested = self.requested or requested  # retried
        self.metrics.checkpoint_failures.inc()
        self.log.error("checkpoint_failed", error=str(error), dir=str(self.store.dir))
        return False

    def _written(self, path: Path, offsets: dict[int, int], learned: int) -> bool:
        self._learned_at_last = learned
        self._offsets_at_last = offsets
        self._last = time.monotonic()
        self.metrics.last_checkpoint.set(time.time())
        self.log.info("checkpoint_written", path=str(path), learned=learned, offsets=offsets)
        self.on_written(dict(offsets))
        return True
