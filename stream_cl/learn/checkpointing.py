"""Background checkpoint writes for the learner (`checkpoint.background`).

Writing a checkpoint (torch.save of model, optimizer, evaluator reservoirs and trajectory, then
fsync and rename) takes ~60 ms for the default MLP on split-mnist, and with
`checkpoint.at_boundary` the learner writes one at every task boundary: on a stream with short
tasks that was a third of the learner thread's time. The learner captures the state on its own
thread (so it is exactly the state at that point), detaches it from anything the model can still
change, and a writer thread does the I/O while learning goes on; the learner applies the result
(bookkeeping, `checkpoint_written`, `on_checkpoint`) on its own thread once the write is done.
One write at a time; an explicit `Learner.checkpoint()` waits for it.

Even in the background a write is not free: pickling and torch.save's record writes hold the GIL
the learner needs, and the capture (about 14 MB for the default MLP on split-mnist: trajectory,
optimizer, reservoirs) runs on the learner thread. So scheduled writes come at most every
`checkpoint.min_interval_s`; a request inside the interval stays pending, and later boundaries
share its write. In `stream-cl bench throughput` (25 boundaries in 20,000 samples) a write per
boundary cost the learner about 10 us per sample.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stream_cl.config import Config
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


class CheckpointMixin:
    """`Learner`'s checkpoint scheduling and writing (in line, or one write at a time in the background)."""

    config: Config
    metrics: Metrics
    log: Any
    strategy: Any
    checkpoints: CheckpointStore | None
    on_checkpoint: Callable[[dict[int, int]], None]
    offsets: dict[int, int]
    learned: int
    _learned_at_checkpoint: int
    _offsets_at_checkpoint: dict[int, int]
    _last_checkpoint: float
    _last_checkpoint_attempt: float
    _checkpoint_requested: bool
    _background_checkpoints: bool
    _write: BackgroundWrite | None

    def _learn_pending(self) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def _checkpoint_due(self) -> bool:
        cfg = self.config.checkpoint
        if self.checkpoints is None or self.strategy is None:
            return False
        if self._write is not None:
            if not self._write.done():
                return False  # one write at a time
            self._finish_write()
        now = time.monotonic()
        if (
            now - self._last_checkpoint_attempt < 5.0
            and self._last_checkpoint_attempt > self._last_checkpoint
        ):
            return False  # the last attempt failed: retry at most every 5 s
        if now - self._last_checkpoint_attempt < cfg.min_interval_s:
            return False  # a request stays pending: boundaries closer than this share one write
        return (
            self._checkpoint_requested
            or (cfg.every_samples > 0 and self.learned - self._learned_at_checkpoint >= cfg.every_samples)
            or (
                cfg.every_s > 0
                and now - self._last_checkpoint >= cfg.every_s
                and self.learned > self._learned_at_checkpoint
            )
        )

    def checkpoint(self, wait: bool = True) -> bool:
        """Learn any partial batch, then write model + state + offsets atomically (learner thread).

        Returns False (and keeps serving) when the write fails, e.g. disk full or unwritable dir.
        `wait=False` captures the state here and writes it on a writer thread (True = queued); its
        outcome is applied by a later call on this thread. A waiting call first finishes any
        write in flight.
        """
        if self.checkpoints is None or self.strategy is None:
            return False
        if self._write is not None:
            self._finish_write()
        self._learn_pending()  # the offsets saved must cover exactly what the model has learned
        if self.learned == self._learned_at_checkpoint and self.offsets == self._offsets_at_checkpoint:
            return True  # nothing new since the last checkpoint
        self._last_checkpoint_attempt = time.monotonic()
        requested, self._checkpoint_requested = self._checkpoint_requested, False
        offsets, learned = dict(self.offsets), self.learned
        if not wait:  # a private copy: the model and the reservoirs change while it is written
            self._write = BackgroundWrite(self.checkpoints, detached(self.state_dict()), offsets, learned)
            return True
        try:
            path = self.checkpoints.save(self.state_dict())
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
        assert self.checkpoints is not None
        self._checkpoint_requested = self._checkpoint_requested or requested  # retried
        self.metrics.checkpoint_failures.inc()
        self.log.error("checkpoint_failed", error=str(error), dir=str(self.checkpoints.dir))
        return False

    def _written(self, path: Path, offsets: dict[int, int], learned: int) -> bool:
        self._learned_at_checkpoint = learned
        self._offsets_at_checkpoint = offsets
        self._last_checkpoint = time.monotonic()
        self.metrics.last_checkpoint.set(time.time())
        self.log.info("checkpoint_written", path=str(path), learned=learned, offsets=offsets)
        self.on_checkpoint(dict(offsets))
        return True
