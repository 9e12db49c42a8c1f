"""A task's input signature: the per-feature mean and variance of the raw inputs it was seen with.

Recurring-task matching (`boundaries.recurring = "inputs"` or `"both"`) compares a recent window's
mean input with each earlier task's signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

VARIANCE_FLOOR = 0.01  # × the mean per-feature variance: constant features (MNIST borders) stay finite


class TaskSignature:
    """Per-feature mean and variance of one task's raw inputs, as running sums (cheap, exact)."""

    def __init__(self, size: int) -> None:
        self.n = 0
        self.sum = np.zeros(size)
        self.sumsq = np.zeros(size)

    def add(self, x: np.ndarray) -> None:
        self.n += 1
        self.sum += x
        self.sumsq += x * x

    def add_many(self, xs: np.ndarray | Sequence[np.ndarray], scratch: np.ndarray | None = None) -> None:
        """`add` for each row of `xs` (an array [n, size] or a list of n inputs) in order, in one
        call, with bit-identical sums.

        The signature's sums go in as the first row of one reduction over rows: numpy reduces a
        C-contiguous array along axis 0 row after row (pairwise summation applies only along the
        contiguous axis), exactly the order of one `add` per row, so the rounding is the same
        (`tests/test_boundaries.py` checks it bit for bit). Summing `xs` first and adding that to
        the signature would round differently.

        The rows are reduced in `scratch` (float64, at least [n + 1, size]), which the caller keeps
        between calls: a fresh [n + 1, size] array per call costs more in page faults than the sums
        themselves.
        """
        n = len(xs)
        if n == 0:
            return
        if scratch is None or scratch.shape[0] < n + 1 or scratch.shape[1] != self.sum.size:
            scratch = np.empty((n + 1, self.sum.size))
        rows = scratch[: n + 1]
        if isinstance(xs, np.ndarray):
            rows[1:] = xs.reshape(n, self.sum.size)
        else:  # one copy of the list into the buffer, converted to float64 on the way
            np.concatenate([x.ravel() for x in xs], out=rows[1:].reshape(-1), casting="same_kind")
        self.n += n
        rows[0] = self.sum
        self.sum = np.add.reduce(rows, axis=0)
        np.square(rows[1:], out=rows[1:])
        rows[0] = self.sumsq
        self.sumsq = np.add.reduce(rows, axis=0)

    def distance(self, mean: np.ndarray) -> float:
        """How far a window's mean input lies from this task, in per-feature standard deviations."""
        mu = self.sum / self.n
        var = np.maximum(self.sumsq / self.n - mu * mu, 0.0)
        var = var + VARIANCE_FLOOR * float(var.mean()) + 1e-12
        return float(np.sqrt(np.mean((mean - mu) ** 2 / var)))

    def state_dict(self) -> dict[str, Any]:
        # Tensors, not lists: a list of floats per input feature is slow to convert, copy for the
        # background writer and pickle at every checkpoint.
        return {"n": self.n, "sum": torch.tensor(self.sum), "sumsq": torch.tensor(self.sumsq)}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TaskSignature:
        sig = cls(len(state["sum"]))
        sig.n = state["n"]
        sig.sum = np.asarray(state["sum"], dtype=np.float64)
        sig.sumsq = np.asarray(state["sumsq"], dtype=np.float64)
        return sig
