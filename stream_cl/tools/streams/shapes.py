"""Stream shapes: the orders a deployment meets, built over a base stream's tasks.

A stream is named `BASE[:SHAPE[:KEY=VALUE...]]...`, e.g. `split-mnist:gradual`,
`split-mnist:gradual:width=200`, `permuted-mnist:long:tasks=30` or
`split-mnist:recurring:gradual:label-free:fraction=0.3`. Shapes apply left to right, each seeded by
the stream's seed and its place in the chain, so a name and a seed always give the same samples.

| shape        | parameters (default)              | what it sends                                          |
|--------------|-----------------------------------|--------------------------------------------------------|
| `sharp`      | -                                 | the base stream: each task once, switching at once     |
| `recurring`  | `returns` (3)                     | every task once, then `returns` visits to earlier tasks (never the task just left), each with its same classes and task id; a task's samples are shared among its visits |
| `gradual`    | `width` (400)                     | around each boundary, `width` samples over which the next task's share rises linearly from 0 to 1 |
| `imbalance`  | `ratio` (10)                      | within each task the classes' frequencies, and across tasks their sizes, span `ratio` (geometric steps, seeded order) |
| `long`       | `tasks` (20), `per_task` (0: all) | `tasks` tasks: the base tasks, then again with a fresh pixel permutation per cycle (class scenario: new labels per cycle). First in a chain |
| `label-free` | `fraction` (0.5), `stretch` (200) | stretches of unlabeled samples (mean length `stretch`) between labeled ones, `fraction` of all samples |

Why shapes rather than more base streams: the data stays the shipped datasets, and each property a
deployment meets (a task that comes back, a change that creeps in, rare classes, many tasks,
labels that stop coming) can be measured alone or combined, on any base stream.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from stream_cl.tools.streams.stream import BenchmarkStream, SampleOrder, Segment, TaskSpec


class Shape(Protocol):
    """A frozen dataclass whose fields are the shape's parameters (int or float, with defaults)."""

    name: ClassVar[str]
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream: ...


def _with_order(stream: BenchmarkStream, order: SampleOrder) -> BenchmarkStream:
    return dataclasses.replace(stream, order=order)


def _require_sharp(stream: BenchmarkStream, shape: str) -> None:
    if any(s.start != s.first for s in stream.order.segments):
        raise ValueError(f"shape {shape!r} must come before 'gradual' in a stream name")


@dataclass(frozen=True)
class Sharp:
    name: ClassVar[str] = "sharp"

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream:
        return stream


@dataclass(frozen=True)
class Recurring:
    name: ClassVar[str] = "recurring"
    returns: int = 3

    def __post_init__(self) -> None:
        if self.returns < 0:
            raise ValueError(f"recurring: returns must be >= 0, got {self.returns}")

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream:
        _require_sharp(stream, self.name)
        order = stream.order
        visited = [s.task for s in order.segments]
        if len(set(visited)) != len(visited):
            raise ValueError("recurring: the stream already visits a task twice")
        n = len(visited)
        if n < 2 and self.returns:
            raise ValueError("recurring: needs at least two tasks")
        for _ in range(self.returns):
            visited.append(int(rng.choice([t for t in visited[:n] if t != visited[-1]])))
        # Each task's samples, in the order they were sent, shared out among its visits.
        chunks = {t: np.array_split(np.flatnonzero(order.task == t), visited.count(t)) for t in set(visited)}
        taken = dict.fromkeys(chunks, 0)
        index, segments, at = [], [], 0
        for t in visited:
            chunk = chunks[t][taken[t]]
            taken[t] += 1
            segments.append(Segment(t, at, at))
            index.append(chunk)
            at += len(chunk)
        idx = np.concatenate(index)
        return _with_order(
            stream, SampleOrder(order.task[idx], order.row[idx], order.labeled[idx], tuple(segments))
        )


@dataclass(frozen=True)
class Gradual:
    name: ClassVar[str] = "gradual"
    width: int = 400

    def __post_init__(self) -> None:
        if self.width < 2:
            raise ValueError(f"gradual: width must be >= 2 samples, got {self.width}")

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream:
        _require_sharp(stream, self.name)
        order = stream.order
        segments = order.segments
        perm = np.arange(len(order))
        new_segments = [segments[0]] if segments else []
        ends = [s.start for s in segments[1:]] + [len(order)]
        for k in range(1, len(segments)):
            boundary = segments[k].start
            before = boundary - segments[k - 1].start
            after = ends[k] - boundary
            # Half the width on each side, or less where a visit is too short to give it: a visit
            # never mixes with more than its two neighbours.
            half = min(self.width // 2, before // 2, after // 2)
            old = perm[boundary - half : boundary]
            new = perm[boundary : boundary + half]
            mixed, first = self._mix(old, new, rng)
            perm[boundary - half : boundary + half] = mixed
            new_segments.append(Segment(segments[k].task, boundary, boundary - half + first))
        return _with_order(
            stream,
            SampleOrder(order.task[perm], order.row[perm], order.labeled[perm], tuple(new_segments)),
        )

    @staticmethod
    def _mix(old: np.ndarray, new: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Interleave two runs of positions, each kept in order, the new run's share rising linearly.

        Returns the mixed positions and where the new run's first one landed.
        """
        total = len(old) + len(new)
        draws = rng.random(total)
        out = np.empty(total, dtype=old.dtype)
        i = j = 0
        first = total
        for k in range(total):
            take_new = j < len(new) and (i >= len(old) or draws[k] < (k + 0.5) / total)
            if take_new:
                out[k] = new[j]
                j += 1
                first = min(first, k)
            else:
                out[k] = old[i]
                i += 1
        return out, first


def _ladder(n: int, ratio: float) -> np.ndarray:
    """n factors from 1 down to 1 / ratio in equal geometric steps."""
    return ratio ** (-np.arange(n) / (n - 1)) if n > 1 else np.ones(n)


@dataclass(frozen=True)
class Imbalance:
    name: ClassVar[str] = "imbalance"
    ratio: float = 10.0

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"imbalance: ratio must be >= 1, got {self.ratio}")

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream:
        order = stream.order
        keep = np.zeros(len(order), dtype=bool)
        task_scale = rng.permutation(_ladder(len(stream.tasks), self.ratio))
        for t, spec in enumerate(stream.tasks):
            mine = np.flatnonzero(order.task == t)
            labels = spec.train_y[order.row[mine]]
            classes = np.unique(labels)
            weight = dict(
                zip(classes.tolist(), rng.permutation(_ladder(len(classes), self.ratio)), strict=True)
            )
            for c in classes.tolist():
                of_class = mine[labels == c]
                quota = max(1, round(len(of_class) * task_scale[t] * weight[c]))
                keep[of_class[:quota]] = (
                    True  # the first ones sent: the class thins out, it does not end early
                )
        return _with_order(stream, order.subset(keep))


@dataclass(frozen=True)
class Long:
    name: ClassVar[str] = "long"
    tasks: int = 20
    per_task: int = 0

    def __post_init__(self) -> None:
        if self.tasks < 1 or self.per_task < 0:
            raise ValueError(
                f"long: expected tasks >= 1 and per_task >= 0, got {self.tasks}, {self.per_task}"
            )

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream:
        base = stream.tasks
        if not stream.order.is_task_by_task(base):
            raise ValueError("long: must be the first shape in a stream name")
        label_span = max(c for t in base for c in t.classes) + 1
        # Cycle 0 is the base stream as it is; every later cycle sees all its tasks through one more
        # fixed pixel permutation, so each cycle's tasks are new inputs.
        cycles = -(-self.tasks // len(base))
        pixels = [np.arange(stream.input_dim)] + [rng.permutation(stream.input_dim) for _ in range(1, cycles)]
        tasks = []
        for k in range(self.tasks):
            cycle, position = divmod(k, len(base))
            source, p = base[position], pixels[cycle]
            offset = cycle * label_span if stream.scenario == "class" else 0
            n = len(source.train_y) if self.per_task == 0 else min(self.per_task, len(source.train_y))
            tasks.append(
                TaskSpec(
                    task_id=k,
                    classes=tuple(c + offset for c in source.classes),
                    source_classes=source.source_classes,
                    train_x=source.train_x[:n][:, p],
                    train_y=source.train_y[:n] + offset,
                    test_x=source.test_x[:, p],
                    test_y=source.test_y + offset,
                )
            )
        return dataclasses.replace(stream, tasks=tasks, order=SampleOrder.task_by_task(tasks))


@dataclass(frozen=True)
class LabelFree:
    name: ClassVar[str] = "label-free"
    fraction: float = 0.5
    stretch: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1 or self.stretch < 1:
            raise ValueError(
                f"label-free: expected 0 < fraction < 1 and stretch >= 1, got {self.fraction}, {self.stretch}"
            )

    def apply(self, stream: BenchmarkStream, rng: np.random.Generator) -> BenchmarkStream:
        order = stream.order
        n = len(order)
        labeled_stretch = self.stretch * (1 - self.fraction) / self.fraction
        labeled = order.labeled.copy()
        at, is_labeled = 0, True  # a labeled stretch first: the daemon needs a class before it predicts
        while at < n:
            mean = labeled_stretch if is_labeled else self.stretch
            length = max(1, round(mean * rng.uniform(0.75, 1.25)))
            if not is_labeled:
                labeled[at : at + length] = False
            at += length
            is_labeled = not is_labeled
        return _with_order(stream, SampleOrder(order.task, order.row, labeled, order.segments))


SHAPES: dict[str, type[Shape]] = {s.name: s for s in (Sharp, Recurring, Gradual, Imbalance, Long, LabelFree)}
_TYPES = {"int": int, "float": float}


def parse_shapes(name: str) -> tuple[str, list[Shape]]:
    """Split a stream name into its base stream and its shapes (ValueError naming what is wrong)."""
    base, *parts = name.split(":")
    specs: list[tuple[str, dict[str, str]]] = []
    for part in parts:
        key, eq, value = part.partition("=")
        if eq:
            if not specs:
                raise ValueError(f"stream {name!r}: parameter {part!r} before any shape")
            specs[-1][1][key] = value
        elif part in SHAPES:
            specs.append((part, {}))
        else:
            raise ValueError(f"stream {name!r}: unknown shape {part!r}; valid: {', '.join(SHAPES)}")
    return base, [_build(name, shape, params) for shape, params in specs]


def _build(stream: str, shape: str, params: dict[str, str]) -> Shape:
    cls = SHAPES[shape]
    fields = {f.name: _TYPES[str(f.type)] for f in dataclasses.fields(cls)}
    values: dict[str, int | float] = {}
    for key, text in params.items():
        if key not in fields:
            raise ValueError(
                f"stream {stream!r}: {shape} takes {', '.join(fields) or 'no parameters'}, not {key!r}"
            )
        try:
            values[key] = fields[key](text)
        except ValueError:
            raise ValueError(
                f"stream {stream!r}: {shape}:{key} expects {fields[key].__name__}, got {text!r}"
            ) from None
    shape_obj: Shape = cls(**values)
    return shape_obj


def apply_shapes(stream: BenchmarkStream, shapes: list[Shape]) -> BenchmarkStream:
    """The shapes applied in order, each with a generator seeded by the stream's seed and its place."""
    for place, shape in enumerate(shapes):
        stream = shape.apply(stream, np.random.default_rng([stream.seed, 5, place]))
    return stream
