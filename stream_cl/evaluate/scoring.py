"""Scoring a snapshot on labeled test sets, and the continual-learning metrics of an accuracy matrix.

The accuracy matrix `R` has one row per evaluation point (after learning task i) and one column
per task: `R[i][j]` is the accuracy on task j after task i, defined for j <= i. Rows may be
ragged (row i holding i + 1 entries) or padded with NaN; NaN entries are ignored everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stream_cl.serve.snapshot import Snapshot
from stream_cl.types import Label, TaskId


def label_targets(labels: Sequence[Label], ys: Sequence[Label]) -> np.ndarray:
    """Each label of `ys` as its index in `labels`, -1 for a label not (yet) there."""
    index = {label: i for i, label in enumerate(labels)}
    return np.fromiter((index.get(y, -1) for y in ys), dtype=np.int64, count=len(ys))


def accuracy(snapshot: Snapshot, xs: np.ndarray, ys: Sequence[Label], task: TaskId | None = None) -> float:
    """Fraction of `xs` whose predicted label equals `ys` (labels never seen count as wrong)."""
    if len(ys) == 0:
        return float("nan")
    if not snapshot.labels:
        return 0.0
    return float(np.mean(predicted_indices(snapshot, xs, task) == label_targets(snapshot.labels, ys)))


def predicted_indices(snapshot: Snapshot, xs: np.ndarray, task: TaskId | None = None) -> np.ndarray:
    """The predicted class of each row of `xs`, as an index into `snapshot.labels` (which is non-empty)."""
    return np.asarray(snapshot.predict(xs, task).proba.argmax(axis=1))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (floats to 4 places)."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


AccuracyMatrix = Sequence[Sequence[float]]


def _square(matrix: AccuracyMatrix) -> np.ndarray:
    """`matrix` as a float array [t, t] (t = rows), NaN where an entry is missing or j > i."""
    t = len(matrix)
    out = np.full((t, t), np.nan)
    for i, row in enumerate(matrix):
        n = min(len(row), i + 1)
        out[i, :n] = np.asarray(row[:n], dtype=float)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


def average_accuracy(matrix: AccuracyMatrix) -> float:
    """Mean accuracy over the tasks seen, at the last row: mean_j R[t][j], j <= t."""
    if not matrix:
        return math.nan
    return _nanmean(_square(matrix)[-1])


def task_forgetting(matrix: AccuracyMatrix) -> list[float]:
    """Max-based forgetting of each earlier task j < t: max_{j <= l < t} R[l][j] - R[t][j]."""
    r = _square(matrix)
    t = r.shape[0] - 1
    out = []
    for j in range(t):
        history = r[j:t, j]
        history = history[~np.isnan(history)]
        out.append(float(history.max() - r[t, j]) if history.size else math.nan)
    return out


def average_forgetting(matrix: AccuracyMatrix) -> float:
    """Mean max-based forgetting over the earlier tasks (NaN before a second task)."""
    return _nanmean(np.asarray(task_forgetting(matrix), dtype=float))


def backward_transfer(matrix: AccuracyMatrix) -> float:
    """BWT: mean over earlier tasks of R[t][j] - R[j][j] (negative = forgetting; NaN before a second task)."""
    r = _square(matrix)
    t = r.shape[0] - 1
    return _nanmean(np.array([r[t, j] - r[j, j] for j in range(t)], dtype=float))
