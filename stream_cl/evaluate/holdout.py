"""Held-out samples: a bounded reservoir per task, and a budget shared by many evaluators."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import numpy as np

from stream_cl.types import Label


@dataclass
class Reservoir:
    """Uniform reservoir sample (Vitter's algorithm R) of one task's held-out samples.

    Inputs live in one preallocated array (rows [0, len) filled), so scoring a reservoir copies
    one block instead of stacking `capacity` arrays, which dominated the evaluator's time.
    A reader takes that array itself (`share`), copy-on-write: the next write copies it first, so
    an old task's reservoir, which no longer changes, is never copied for scoring.
    """

    capacity: int
    ys: list[Label] = field(default_factory=list)
    seen: int = 0
    _x: np.ndarray | None = None  # [capacity, features], allocated by the first add
    _shared: bool = False  # `_x` is held by a reader: copy it before the next write

    @property
    def xs(self) -> np.ndarray:
        """The held inputs, [len(ys), features] (a view: copy it before letting go of the lock)."""
        return self._x[: len(self.ys)] if self._x is not None else np.empty((0, 0), dtype=np.float32)

    def add(self, x: np.ndarray, y: Label, rng: random.Random) -> None:
        self.seen += 1
        if len(self.ys) < self.capacity:
            self._row(len(self.ys), x)
            self.ys.append(y)
            return
        k = rng.randrange(self.seen)
        if k < self.capacity:
            self._row(k, x)
            self.ys[k] = y

    def share(self) -> tuple[np.ndarray, list[Label]]:
        """The held inputs and labels as they are now, for a reader; they never change afterwards."""
        self._shared = True
        return self.xs, list(self.ys)

    def load(self, xs: np.ndarray, ys: list[Label]) -> None:
        """Hold exactly these inputs and labels (at most `capacity`)."""
        n = min(len(ys), self.capacity)
        self._x, self.ys, self._shared = None, list(ys[:n]), False
        if n:
            self._x = np.empty((self.capacity, xs[0].size), dtype=xs.dtype)
            self._x[:n] = xs[:n].reshape(n, -1)

    def _row(self, i: int, x: np.ndarray) -> None:
        flat = np.ravel(x)
        if self._x is None:
            self._x = np.empty((self.capacity, flat.size), dtype=flat.dtype)
        elif self._shared:
            self._x, self._shared = self._x.copy(), False
        self._x[i] = flat


class HoldoutBudget:
    """Held-out samples over many evaluators (per-key models): at most `max_samples` in total."""

    def __init__(self, max_samples: int) -> None:
        self.max_samples = max_samples
        self.held = 0
        self._lock = threading.Lock()

    def has_room(self) -> bool:
        return self.held < self.max_samples

    def take(self, n: int) -> None:
        with self._lock:
            self.held += n

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held = max(0, self.held - n)
