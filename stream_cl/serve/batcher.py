"""Micro-batching of prediction requests: every connection's predict jobs, stacked into forwards
on one worker thread (see server.py for why it is built this way).

Each job carries the `SnapshotHolder` of the model it asks for (one per model key), so a batch
groups jobs by (model, task hint): one `Snapshot.predict` per group, every reply of a group from
the same snapshot and carrying its version.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stream_cl.config import ServeConfig
from stream_cl.serve.frames import error_frame, pack_frame
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
from stream_cl.types import TaskId

# A lone client's requests are predicted on the loop thread itself when the last forward took less
# than this: the hand-off to the worker and back (two thread wake-ups) then costs about as much as
# the forward, and a stall this short is far below every timeout the loop keeps.
INLINE_FORWARD_MAX_S = 0.001


class ReplyChannel(Protocol):
    """Where a job's reply goes: a client connection, written once its replies are in order."""

    def flush(self) -> None:
        """Send the replies that are ready, in request order."""


class Slot:
    """One request's place in its connection's reply order; `frame` is set once answered.

    A raw job (`PredictJob.raw`, the HTTP front) gets its answer as `result` (the snapshot and its
    probabilities, no msgpack) with an empty `frame`; an error still comes as an error frame."""

    __slots__ = ("frame", "started", "samples", "result")

    def __init__(self, started: float = 0.0, samples: int = 0, frame: bytes | None = None) -> None:
        self.frame = frame
        self.started = started  # perf_counter() when the request was decoded
        self.samples = samples  # samples predicted if the reply is ok; 0 = not a prediction
        self.result: tuple[Snapshot, np.ndarray] | None = None


@dataclass(slots=True)
class PredictJob:
    conn: ReplyChannel
    slot: Slot
    rid: Any
    xs: np.ndarray  # [k, input_size] float32
    task: TaskId | None
    batch: bool  # reply shaped for predict_batch
    model: SnapshotHolder  # the model (key) the request routes to
    raw: bool = False  # answer in `slot.result` (snapshot, proba rows), not a msgpack frame


class Batcher:
    """Stacks predict jobs from all connections into forwards on one worker thread.

    Callback-driven on the loop (no task, no executor future): a lone request is handed to the
    worker within the same loop callback that decoded it, which keeps single-client latency low.
    With a single client connected, and forwards shorter than `INLINE_FORWARD_MAX_S`, its requests
    are predicted on the loop thread instead, in the loop's next round (so the frames it pipelined
    in one read still share a forward): no other client can be kept waiting, and the two thread
    hand-offs are saved.
    """

    def __init__(
        self,
        config: ServeConfig,
        anyone_could_send: Callable[[], bool],
        lone_client: Callable[[], bool],
        log: Any,
    ) -> None:
        """`anyone_could_send`: whether some client is between requests (waiting could grow a batch);
        `lone_client`: whether one client is connected, and it awaits its replies."""
        self._config = config
        self._anyone_could_send = anyone_could_send
        self._lone_client = lone_client
        self._last_forward_s = float("inf")  # how long the last batch took (none yet: unknown)
        self._inline_scheduled = False
        self.log = log
        self._queue: deque[PredictJob] = deque()
        self._queued_samples = 0
        self._running = False  # a batch is on the worker
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox: queue.SimpleQueue[list[PredictJob] | None] = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="stream_cl-predict", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._worker.start()

    def shutdown(self) -> None:
        if self._worker.is_alive():
            self._inbox.put(None)
            self._worker.join()

    @property
    def queued_samples(self) -> int:
        """Samples read and waiting for the worker."""
        return self._queued_samples

    def submit(self, job: PredictJob) -> None:
        self._queue.append(job)
        self._queued_samples += len(job.xs)
        self.poke()

    def poke(self) -> None:
        """Dispatch now if the worker is free and waiting cannot grow the batch; else wait a little.

        Waiting pays off only while some client is between requests; it lasts at most
        `serve.batch_wait_ms` from the first queued request.
        """
        if self._running or not self._queue:
            return
        if self._last_forward_s < INLINE_FORWARD_MAX_S and self._loop is not None and self._lone_client():
            if not self._inline_scheduled:
                self._inline_scheduled = True
                self._loop.call_soon(self._run_inline)
            return
        config = self._config
        if self._queued_samples >= config.max_batch or not self._anyone_could_send():
            self._dispatch()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(config.batch_wait_ms / 1000.0, self._dispatch)

    def _dispatch(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._running or not self._queue:
            return
        self._running = True
        self._inbox.put(self._take(self._config.max_batch))

    def _run_inline(self) -> None:
        """(Loop thread.) The queued jobs predicted here and now, as the worker would."""
        self._inline_scheduled = False
        if self._running or not self._queue:
            return
        self._running = True
        jobs = self._take(self._config.max_batch)
        self._done(jobs, self._predict(jobs))

    def _work(self) -> None:
        """Worker thread: run each batch, hand the reply frames back to the loop."""
        while (jobs := self._inbox.get()) is not None:
            frames = self._predict(jobs)
            assert self._loop is not None  # set by start(), before the first batch can exist
            try:
                self._loop.call_soon_threadsafe(self._done, jobs, frames)
            except RuntimeError:  # the loop has closed: the server stopped mid-batch
                return

    def _done(self, jobs: list[PredictJob], frames: list[tuple[bytes, bool]]) -> None:
        self._running = False
        answered: dict[ReplyChannel, None] = {}
        for job, (frame, ok) in zip(jobs, frames, strict=True):
            job.slot.frame = frame
            if not ok:
                job.slot.samples = 0
            answered[job.conn] = None
        for conn in answered:
            conn.flush()
        self.poke()

    def _take(self, max_batch: int) -> list[PredictJob]:
        jobs: list[PredictJob] = []
        n = 0
        while self._queue and (not jobs or n + len(self._queue[0].xs) <= max_batch):
            job = self._queue.popleft()
            jobs.append(job)
            n += len(job.xs)
        self._queued_samples -= n
        return jobs

    def _predict(self, jobs: list[PredictJob]) -> list[tuple[bytes, bool]]:
        """Worker thread (or the loop's, for a lone client): one `Snapshot.predict` per (model, task
        hint); (reply frame, ok) per job."""
        started = time.perf_counter()
        groups: dict[tuple[int, TaskId | None], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.model), job.task), []).append(i)
        out: list[tuple[bytes, bool]] = [(b"", False)] * len(jobs)
        for (_, task), idx in groups.items():
            group = [jobs[i] for i in idx]
            try:
                frames = predict_group(group[0].model.get(), task, group)
            except Exception:  # the predictor's fault; this worker must live on to answer others
                self.log.exception("serve_predict_failed", task=task, requests=len(group))
                frames = [(error_frame(j.rid, "internal", "prediction failed"), False) for j in group]
            for i, frame in zip(idx, frames, strict=True):
                out[i] = frame
        self._last_forward_s = time.perf_counter() - started
        return out


def predict_group(
    snapshot: Snapshot | None, task: TaskId | None, jobs: list[PredictJob]
) -> list[tuple[bytes, bool]]:
    """Answer jobs sharing a task hint with one forward of this batch's snapshot."""
    if snapshot is None:
        return [(error_frame(j.rid, "not_ready", "no model snapshot published yet"), False) for j in jobs]
    if (task is not None and task not in snapshot.tasks) or any(
        j.xs.shape[1] != snapshot.input_size for j in jobs
    ):  # a snapshot published since these requests were read changed the input size or tasks
        msg = "the model changed (input size or tasks) after this request was read; check info"
        return [(error_frame(j.rid, "bad_request", msg), False) for j in jobs]
    prediction = snapshot.predict(np.concatenate([j.xs for j in jobs]), task)
    labels = snapshot.labels
    if prediction.proba.shape != (sum(len(j.xs) for j in jobs), len(labels)):
        raise RuntimeError(f"predictor returned proba of shape {prediction.proba.shape}")
    out = []
    start = 0
    for job in jobs:
        end = start + len(job.xs)
        if job.raw:
            job.slot.result = (snapshot, prediction.proba[start:end])
            out.append((b"", True))
            start = end
            continue
        proba, routes = prediction.proba[start:end], prediction.tasks[start:end]
        top = proba.argmax(axis=1).tolist()
        mine = [
            {"label": labels[top[i]], "proba": dict(zip(labels, row, strict=True)), "task": route}
            for i, (row, route) in enumerate(zip(proba.tolist(), routes, strict=True))
        ]
        start = end
        reply = {"id": job.rid, "ok": True, **({"results": mine} if job.batch else mine[0])}
        reply["model_version"] = snapshot.version
        out.append((pack_frame(reply), True))
    return out
