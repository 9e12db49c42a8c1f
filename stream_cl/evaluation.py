"""Scoring a snapshot on labeled test sets (built-in streams' held-out splits)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream_cl.snapshot import Label, Snapshot, TaskId


def accuracy(snapshot: Snapshot, xs: np.ndarray, ys: Sequence[Label], task: TaskId | None = None) -> float:
    """Fraction of `xs` whose predicted label equals `ys` (labels never seen count as wrong)."""
    if len(ys) == 0:
        return float("nan")
    if not snapshot.labels:
        return 0.0
    proba = snapshot.predict(xs, task).proba
    predicted = np.asarray(snapshot.labels, dtype=object)[proba.argmax(axis=1)]
    return float(np.mean([p == y for p, y in zip(predicted, ys, strict=True)]))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (floats to 4 places)."""
    cells = [[f"{c:.4f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)
