"""Immutable, versioned model snapshots: what the prediction server reads.

The learner thread is the only writer of the live model. Every N steps, every T ms and at each
boundary it publishes a `Snapshot` holding a private eval-mode copy of what prediction needs;
readers take the current reference from `SnapshotHolder` (read-copy-update), so serving never
blocks on learning and never sees a half-updated model.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stream_cl.strategies.base import Strategy
from stream_cl.types import Label, TaskId

# Maps a float32 batch [n, *input_shape] and an optional task hint to
# (probabilities over the snapshot's labels [n, len(labels)], the task route taken per sample).
Predictor = Callable[[torch.Tensor, TaskId | None], tuple[torch.Tensor, Sequence[TaskId | None]]]


@dataclass(frozen=True)
class Prediction:
    proba: np.ndarray
    tasks: Sequence[TaskId | None]


@dataclass(frozen=True)
class Snapshot:
    version: int
    strategy: str
    labels: tuple[Label, ...]
    tasks: tuple[TaskId, ...]
    input_shape: tuple[int, ...]
    predictor: Predictor
    device: str = "cpu"
    created_at: float = field(default_factory=time.time)

    @property
    def input_size(self) -> int:
        return math.prod(self.input_shape) if self.input_shape else 0  # per request: math.prod is ~free

    def predict(self, xs: np.ndarray, task: TaskId | None = None) -> Prediction:
        """Predict a float32 batch shaped [n, input_size] (or [n, *input_shape])."""
        if task is not None and task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; known tasks: {list(self.tasks)}")
        x = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
        x = x.reshape((x.shape[0], *self.input_shape)).to(self.device)
        with torch.inference_mode():
            proba, routes = self.predictor(x, task)
        return Prediction(proba=proba.float().cpu().numpy(), tasks=list(routes))

    def info(self) -> dict[str, Any]:
        return {
            "model_version": self.version,
            "strategy": self.strategy,
            "classes": list(self.labels),
            "tasks": list(self.tasks),
            "input_shape": list(self.input_shape),
        }


class SnapshotHolder:
    """The one place the latest snapshot lives; swapping the reference is the publish."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._changed = threading.Condition()

    def publish(self, snapshot: Snapshot) -> None:
        with self._changed:
            self._snapshot = snapshot
            self._changed.notify_all()

    def get(self) -> Snapshot | None:
        return self._snapshot

    def wait_for(self, min_version: int, timeout: float) -> Snapshot | None:
        """Block until a snapshot with version >= `min_version` is published (or timeout)."""
        with self._changed:
            self._changed.wait_for(
                lambda: self._snapshot is not None and self._snapshot.version >= min_version, timeout
            )
            return self._snapshot


def build_snapshot(
    strategy: Strategy,
    version: int,
    labels: Sequence[Label],
    task_ids: Sequence[TaskId],
    input_shape: Sequence[int],
) -> Snapshot:
    """The immutable snapshot of `strategy` now: its frozen predictor, wrapped so that requests
    speak task ids while the strategy speaks task indices. The learner and the replicas build
    every snapshot here, so what a replica serves is what the learner served."""
    tasks: tuple[TaskId, ...] = tuple(task_ids)
    index_of = {tid: i for i, tid in enumerate(tasks)}
    inner = strategy.predictor()

    def predictor(x: torch.Tensor, task: TaskId | None) -> tuple[torch.Tensor, list[TaskId | None]]:
        proba, routes = inner(x, None if task is None else index_of[task])
        return proba, [None if r is None else tasks[r] for r in routes]

    return Snapshot(
        version=version,
        strategy=strategy.name,
        labels=tuple(labels),
        tasks=tasks,
        input_shape=tuple(input_shape),
        predictor=predictor,
        device=str(strategy.device),
    )
