"""The task router of `eidetic`: which task's head answers a request that carries no task id.

A ridge (least-squares) classifier over fixed random features predicts the (task, class) pair of a
sample; the route is the task of the best pair. It is learned from streaming statistics only:
every learned sample adds `φ(x)φ(x)ᵀ` to a Gram matrix and `φ(x)` to its target's column, so the
router never forgets a task, needs no stored samples, and its memory is fixed by the feature
dimension (D² + D·targets floats), whatever the stream's length. It is solved (Cholesky, float64)
at every boundary and, between boundaries, when a new (task, class) target appeared, when the
current task's samples doubled since the last solve, or `refresh` samples after it at most. Features
are folded into the Gram matrix in blocks of a few hundred samples (one large product is cheaper).

The features are fixed at construction (seeded), so the statistics of the first task stay valid
forever: with an image input [C, H, W], `±ReLU` of random zero-mean 5×5 filters, average-pooled to
4×4 positions (random convolutional features); otherwise `±ReLU` of a random projection; then a
square root (power normalization). They read the raw input, not the backbone, whose free units
change with every task.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.models import Classifier
from stream_cl.strategies.base import Strategy

# (inputs, tasks allowed) -> the chosen task per sample
RouteFn = Callable[[torch.Tensor, list[int]], list[int]]
# task -> (its classes, stored head weight rows, stored head bias)
TaskHeads = Mapping[int, tuple[list[int], torch.Tensor, torch.Tensor]]

_KERNEL = 5
_POOL = 4
_FOLD = 256  # samples whose features are folded into the Gram matrix at once
_MIN_REFRESH = 32  # fewest learned samples between two solves within a task


class RandomFeatures(nn.Module):
    """Fixed random features (about `dim` of them, ≥ 0) plus a constant 1 for the bias."""

    def __init__(self, input_shape: Sequence[int], dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = len(input_shape) == 3 and min(input_shape[1:]) >= _KERNEL
        if self.conv:
            c_in, h, w = (int(d) for d in input_shape)
            self.pool = (min(_POOL, h - _KERNEL + 1), min(_POOL, w - _KERNEL + 1))
            channels = max(1, dim // (2 * self.pool[0] * self.pool[1]))
            filters = torch.randn(channels, c_in, _KERNEL, _KERNEL, generator=gen)
            filters -= filters.mean(dim=(1, 2, 3), keepdim=True)
            filters /= filters.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            self.register_buffer("weight", filters)
            self.dim = 2 * channels * self.pool[0] * self.pool[1] + 1
        else:
            d = math.prod(int(s) for s in input_shape)
            n = max(1, dim // 2)
            self.register_buffer("weight", torch.randn(d, n, generator=gen) / math.sqrt(d))
            self.dim = 2 * n + 1

    def _pool(self, z: torch.Tensor) -> torch.Tensor:
        h, w = z.shape[-2:]
        if h % self.pool[0] == 0 and w % self.pool[1] == 0:  # plain pooling is faster than adaptive
            size = (h // self.pool[0], w // self.pool[1])
            return F.avg_pool2d(z, size, size)
        return F.adaptive_avg_pool2d(z, self.pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        assert isinstance(weight, torch.Tensor)
        if self.conv:
            z = F.conv2d(x, weight)
            pos, mean = self._pool(F.relu(z)), self._pool(z)
            h = torch.cat([pos, (pos - mean).clamp_min(0.0)], dim=1).flatten(1)  # relu(-z) = relu(z) - z
        else:
            z = x.flatten(1) @ weight
            h = torch.cat([F.relu(z), F.relu(-z)], dim=1)
        h = h.sqrt()  # power normalization: measured +0.5 points of routing on split-mnist
        return torch.cat([h, h.new_ones((h.shape[0], 1))], dim=1)


class RidgeRouter:
    """Streaming ridge regression from random features to (task, class) targets; routes by task."""

    def __init__(
        self,
        input_shape: Sequence[int],
        dim: int,
        lam: float,
        refresh: int,
        seed: int,
        device: torch.device,
    ) -> None:
        self.features = RandomFeatures(input_shape, dim, seed).to(device)
        self.lam, self.refresh, self.device = lam, refresh, device
        d = self.features.dim
        self.gram = torch.zeros((d, d), dtype=torch.float64, device=device)
        self.xy = torch.zeros((d, 0), dtype=torch.float64, device=device)  # one column per target
        self.targets: list[tuple[int, int]] = []  # (task, class) of each column
        self._column: dict[tuple[int, int], int] = {}
        self.weight: torch.Tensor | None = None  # [d, targets solved] float32; replaced, never mutated
        self.solved_targets = 0
        self.since_solve = 0
        self.task_samples = self.task_samples_at_solve = 0  # samples of the current task (at the last solve)
        self._pending: list[torch.Tensor] = []  # features not yet folded into the statistics
        self._pending_cols: list[int] = []

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> None:
        """Add a learned batch's statistics (folded into the Gram matrix every `_FOLD` samples)."""
        with torch.no_grad():
            self._pending.append(self.features(x))
        self._pending_cols += [self._target(task, int(c)) for c in y.tolist()]
        self.since_solve += int(y.shape[0])
        self.task_samples += int(y.shape[0])
        if len(self._pending_cols) >= _FOLD:
            self._fold()

    def _fold(self) -> None:
        """Pending features into the statistics: one large product, cheaper than one per batch."""
        if not self._pending_cols:
            return
        with torch.no_grad():
            phi = torch.cat(self._pending)
            self.gram += (phi.T @ phi).double()
            cols = torch.tensor(self._pending_cols, device=self.device)
            self.xy.index_add_(1, cols, phi.T.double())
        self._pending, self._pending_cols = [], []

    def _target(self, task: int, cls: int) -> int:
        col = self._column.get((task, cls))
        if col is None:
            col = self._column[(task, cls)] = len(self.targets)
            self.targets.append((task, cls))
            self.xy = torch.cat([self.xy, self.xy.new_zeros((self.xy.shape[0], 1))], dim=1)
        return col

    def stale(self) -> bool:
        """New targets, or more learned samples since the last solve than the task had then (capped
        at `refresh`): solves at about 1×, 2×, 4×... a task's first batches, then every `refresh`."""
        due = min(self.refresh, max(_MIN_REFRESH, self.task_samples_at_solve))
        return len(self.targets) != self.solved_targets or self.since_solve >= due

    def new_task(self) -> None:
        """A boundary: the doubling schedule of `stale` starts over for the next task."""
        self.task_samples = self.task_samples_at_solve = 0

    def solve(self) -> None:
        """Solve the ridge system on everything observed so far (no-op before any target)."""
        if not self.targets:
            return
        self._fold()
        d = self.gram.shape[0]
        scale = float(self.gram.diagonal().mean()) or 1.0
        a = self.gram + (self.lam * scale) * torch.eye(d, dtype=self.gram.dtype, device=self.device)
        chol, info = torch.linalg.cholesky_ex(a)
        w = torch.cholesky_solve(self.xy, chol) if int(info) == 0 else torch.linalg.lstsq(a, self.xy).solution
        self.weight = w.float()
        self.solved_targets, self.since_solve = len(self.targets), 0
        self.task_samples_at_solve = self.task_samples

    def route_fn(self) -> RouteFn | None:
        """A frozen routing function (safe from other threads), or None before the first solve."""
        weight = self.weight
        if weight is None:
            return None
        features = self.features  # fixed buffers: sharing it is safe
        target_task = torch.tensor([t for t, _ in self.targets[: weight.shape[1]]], device=self.device)

        def route(x: torch.Tensor, known: list[int]) -> list[int]:
            scores = features(x) @ weight
            n_tasks = max([*known, int(target_task.max())]) + 1
            per_task = scores.new_full((x.shape[0], n_tasks), float("-inf"))
            per_task.scatter_reduce_(1, target_task.expand(x.shape[0], -1), scores, "amax")
            allowed = torch.full_like(per_task, float("-inf"))
            allowed[:, known] = 0.0
            return [int(r) for r in (per_task + allowed).argmax(1)]

        return route

    def state_dict(self) -> dict[str, Any]:
        self._fold()
        return {
            "gram": self.gram.cpu().clone(),
            "xy": self.xy.cpu().clone(),
            "targets": [list(t) for t in self.targets],
            "weight": None if self.weight is None else self.weight.cpu().clone(),
            "solved_targets": self.solved_targets,
            "since_solve": self.since_solve,
            "task_samples": [self.task_samples, self.task_samples_at_solve],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gram = state["gram"].to(self.device)
        self.xy = state["xy"].to(self.device)
        self.targets = [(int(t), int(c)) for t, c in state["targets"]]
        self._column = {t: i for i, t in enumerate(self.targets)}
        self.weight = None if state["weight"] is None else state["weight"].to(self.device)
        self.solved_targets, self.since_solve = int(state["solved_targets"]), int(state["since_solve"])
        self.task_samples, self.task_samples_at_solve = (int(v) for v in state["task_samples"])
        self._pending, self._pending_cols = [], []


def route_and_predict(
    model: Classifier,
    route: RouteFn | None,
    task_classes: list[list[int]],
    task_heads: TaskHeads,
    x: torch.Tensor,
    task: int | None,
) -> tuple[torch.Tensor, list[int | None]]:
    """Class probabilities through a task's head: the hinted task, else the router's choice per sample.

    A consolidated task predicts with its stored head (bit-identical forever); the current task
    with the live head restricted to its classes. Before the router was first solved, or with one
    task, requests without a hint go to the latest task.
    """
    n = x.shape[0]
    known = [t for t, c in enumerate(task_classes) if c]
    if task is None and not known:
        return Strategy._predict_with(model, task_classes, x, None)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        features = model.features(x)
        live = model.head(features)
        if task is not None:
            routes: list[int] = [task] * n
        elif len(known) == 1 or route is None:
            routes = [known[-1]] * n
        else:
            routes = route(x, known)
    model.train(was_training)
    if live.shape[1] == 0:
        return live.new_zeros((n, 0)), list(routes)
    out = torch.full_like(live, float("-inf"))
    for t in sorted(set(routes)):
        rows = torch.tensor([i for i, r in enumerate(routes) if r == t], device=live.device)
        if t >= len(task_classes) or not task_classes[t]:
            out[rows] = live[rows]
            continue
        stored = task_heads.get(t)
        if stored is not None and stored[0] == task_classes[t]:
            classes, w, b = stored
            out[rows.view(-1, 1), torch.tensor(classes, device=live.device)] = F.linear(features[rows], w, b)
        else:
            idx = torch.tensor(task_classes[t], device=live.device)
            out[rows.view(-1, 1), idx] = live[rows.view(-1, 1), idx]
    return torch.softmax(out, dim=1), list(routes)
