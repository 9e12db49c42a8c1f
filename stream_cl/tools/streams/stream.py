"""What a built-in stream is: its tasks, and the order its samples are sent in.

A task (`TaskSpec`) holds its train and test splits. The order (`SampleOrder`) says, sample by
sample as sent, which task the sample belongs to, which row of that task's train split it is, and
whether it carries its label. Its segments (`Segment`) are the visits of tasks, in order: the truth
a boundary detector is scored against and the points a quality benchmark scores at. A plain stream
sends its tasks one after the other, each once, every sample labeled; shapes (`shapes.py`) build
other orders over the same tasks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

Scenario = Literal["class", "domain"]


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """One task of a benchmark stream.

    `classes` are the labels this task sends (after the scenario's relabelling);
    `source_classes` are the dataset's own classes behind them (the digits), for reports.
    `train_x` rows are in the order a plain stream sends them.
    """

    task_id: int
    classes: tuple[int, ...]
    source_classes: tuple[int, ...]
    train_x: np.ndarray  # [n, d] float32 in [0, 1]
    train_y: np.ndarray  # [n] int64
    test_x: np.ndarray
    test_y: np.ndarray


class TrainData(NamedTuple):
    """Training samples as arrays."""

    x: np.ndarray  # [n, d] float32
    y: np.ndarray  # [n] int64


class HeldOutData(NamedTuple):
    """All held-out samples of a stream, with the task each belongs to."""

    x: np.ndarray  # [n, d] float32
    y: np.ndarray  # [n] int64
    task: np.ndarray  # [n] int64


@dataclass(frozen=True)
class Segment:
    """One visit of a task in the order as sent.

    `start` is where the visit takes over: its first sample, or, across a gradual transition, the
    point where its task's share of the samples passes one half. `first` is where its task's first
    sample of this visit is sent (the transition's beginning; equal to `start` at a sharp boundary).
    """

    task: int  # index into `BenchmarkStream.tasks`
    start: int
    first: int


@dataclass(frozen=True, eq=False)
class SampleOrder:
    """The samples as sent: per sample, its task (index), its row in that task's train split, and
    whether it carries its label (an unlabeled sample is predicted by the daemon, not learned)."""

    task: np.ndarray  # [n] int64
    row: np.ndarray  # [n] int64
    labeled: np.ndarray  # [n] bool
    segments: tuple[Segment, ...]

    def __len__(self) -> int:
        return len(self.task)

    def is_task_by_task(self, tasks: list[TaskSpec]) -> bool:
        """Whether this is the plain order over `tasks`: each once, every row in order, all labeled."""
        plain = SampleOrder.task_by_task(tasks)
        return (
            self.segments == plain.segments
            and np.array_equal(self.task, plain.task)
            and np.array_equal(self.row, plain.row)
            and bool(self.labeled.all())
        )

    @classmethod
    def task_by_task(cls, tasks: list[TaskSpec]) -> SampleOrder:
        """Every task once, in order, every row, all labeled: the plain stream."""
        sizes = [len(t.train_y) for t in tasks]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int) if sizes else np.zeros(0, int)
        return cls(
            task=np.repeat(np.arange(len(tasks), dtype=np.int64), sizes),
            row=np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, int),
            labeled=np.ones(sum(sizes), dtype=bool),
            segments=tuple(Segment(k, int(s), int(s)) for k, s in enumerate(starts)),
        )

    def subset(self, keep: np.ndarray) -> SampleOrder:
        """The samples where `keep` (bool [n]) holds, in order; segments re-indexed, empty ones dropped."""
        kept_before = np.concatenate([[0], np.cumsum(keep)])
        segments = []
        ends = [s.first for s in self.segments[1:]] + [len(self)]
        for segment, end in zip(self.segments, ends, strict=True):
            if kept_before[end] > kept_before[segment.first]:
                segments.append(
                    Segment(segment.task, int(kept_before[segment.start]), int(kept_before[segment.first]))
                )
        return SampleOrder(self.task[keep], self.row[keep], self.labeled[keep], tuple(segments))


@dataclass(frozen=True)
class StreamSample:
    """One sample as a stream sends it."""

    x: np.ndarray
    y: int | None  # None: sent without its label
    task_id: int | None  # None when the stream does not send the task field
    index: int  # position in the order as sent
    task: int  # the task it belongs to (index into `BenchmarkStream.tasks`), sent or not


@dataclass(frozen=True, eq=False)
class BenchmarkStream:
    """A built-in stream: its tasks and the order they are sent in; build one with `load_stream`."""

    name: str  # as given to `load_stream`, shapes included
    input_shape: tuple[int, ...]
    tasks: list[TaskSpec]
    send_task: bool
    scenario: Scenario
    seed: int
    order: SampleOrder  # the samples as sent (`SampleOrder.task_by_task(tasks)` for a plain stream)

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def n_train(self) -> int:
        """Samples the stream sends, labeled or not."""
        return len(self.order)

    @property
    def n_labeled(self) -> int:
        return int(self.order.labeled.sum())

    @property
    def n_test(self) -> int:
        return sum(len(t.test_y) for t in self.tasks)

    @property
    def classes(self) -> tuple[int, ...]:
        """Every label the stream sends, sorted."""
        return tuple(sorted({c for t in self.tasks for c in t.classes}))

    def samples(self, limit: int | None = None) -> Iterator[StreamSample]:
        """The samples in the order as sent (at most `limit`)."""
        order = self.order
        n = len(order) if limit is None else min(limit, len(order))
        for index, task, row, labeled in zip(
            range(n), order.task.tolist(), order.row.tolist(), order.labeled.tolist(), strict=False
        ):
            spec = self.tasks[task]
            yield StreamSample(
                x=spec.train_x[row],
                y=int(spec.train_y[row]) if labeled else None,
                task_id=spec.task_id if self.send_task else None,
                index=index,
                task=task,
            )

    def iter_samples(self) -> Iterator[tuple[np.ndarray, int | None, int | None, int]]:
        """`samples()` as `(x, y, task_id, index)`; kept for the callers written before `samples`."""
        for s in self.samples():
            yield s.x, s.y, s.task_id, s.index

    def labeled_arrays(self) -> TrainData:
        """Every labeled sample as sent, as `x` [n, d] and `y` [n] (what a learner can train on)."""
        order = self.order
        keep = order.labeled
        xs = np.empty((int(keep.sum()), self.input_dim), dtype=np.float32)
        ys = np.empty(len(xs), dtype=np.int64)
        tasks, rows = order.task[keep], order.row[keep]
        for k, spec in enumerate(self.tasks):
            mine = tasks == k
            xs[mine] = spec.train_x[rows[mine]]
            ys[mine] = spec.train_y[rows[mine]]
        return TrainData(xs, ys)

    def all_test(self) -> HeldOutData:
        """Concatenate every task's test split (e.g. to score a model on all tasks at once)."""
        return HeldOutData(
            x=np.concatenate([t.test_x for t in self.tasks]),
            y=np.concatenate([t.test_y for t in self.tasks]),
            task=np.concatenate([np.full(len(t.test_y), t.task_id, dtype=np.int64) for t in self.tasks]),
        )
