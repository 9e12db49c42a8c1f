"""The task router of `eidetic` and `interval`: which task answers a request that carries no task id.

A ridge (least-squares) classifier over fixed random features scores every (task, class) pair of a
sample. A request without a task id is answered by the pair with the best joint score
`log p_head(class | x, task) + router_weight · router score(task, class)`: the route is that pair's
task, and the reply's probabilities are the softmax of the joint scores over that task's classes.
Routing by the router's best pair alone and then asking the task's head loses the samples where the
two disagree: on split-mnist that cost 1.6–2.2 points against the oracle task id (seeds 0–2); the
joint score is within 0.5 points of it on seeds 0–2 at `router_weight` 30, and on seed 0 at 10,
30 and 1000 it is 0.4, 0.1 and 0.0 points behind (`stream-cl bench quality --strategies eidetic
--scenarios class,task`).
The router is learned from streaming statistics only:
every learned sample adds `φ(x)φ(x)ᵀ` to a Gram matrix and `φ(x)` to its target's column, so the
router never forgets a task, needs no stored samples, and its memory is fixed by the feature
dimension (D² + D·targets floats), whatever the stream's length. It is solved (Cholesky, float64)
at the boundary that ends a new task's visit and, between boundaries, when a new (task, class)
target appeared, when the current task's samples doubled since the last solve (while the task is
new), or `refresh` samples after it at most. A returning task is routed to already: its visit is
solved for on the `refresh` cadence alone, across its boundary too. Features
are folded into the Gram matrix in blocks of a few hundred samples (one large product is cheaper),
and into its lower triangle only (the Cholesky reads nothing else).

Its work runs off the learner's thread (`strategies/background.py`): the features and statistics
of a learned batch, and every solve (the boundary's too), are queued, and a predictor built
meanwhile routes with the newest finished solve. `settle()` (the stream went quiet, an explicit
publish) waits for everything queued, so the model published then routes on every sample learned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from stream_cl.strategies.background import BackgroundJobs
from stream_cl.strategies.base import check_int_options, check_number_options
from stream_cl.strategies.options import StrategyOptions
from stream_cl.strategies.routing import TaskSlots

_KERNEL = 5
_POOL = 4
_CACHED_MAP_BYTES = 2 * 1024 * 1024  # filter maps computed at once, at most: about a core's L2 cache
_FOLD = 256  # samples whose features are folded into the Gram matrix at once
# Rows of the Gram matrix's lower triangle folded by one product: the Cholesky reads that triangle
# alone, so the rest is never computed (the products cover ~55% of the square at 128 rows of a
# 1,025-wide matrix; smaller blocks multiply less efficiently).
_TRIANGLE_ROWS = 128
_MIN_REFRESH = 32  # fewest learned samples between two solves within a task


class RandomFeatures(nn.Module):
    """Fixed random features (about `dim` of them, ≥ 0) plus a constant 1 for the bias.

    Each random filter (or projection) `w` gives two features, `relu(w·x)` and `relu(−w·x)`, pooled
    for images, then square-rooted (power normalization: measured +0.5 points of routing on
    split-mnist).
    """

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
            map_bytes = 4 * channels * (h - _KERNEL + 1) * (w - _KERNEL + 1)  # one sample's, float32
            self.chunk = max(1, _CACHED_MAP_BYTES // map_bytes)
        else:
            d = math.prod(int(s) for s in input_shape)
            n = max(1, dim // 2)
            self.register_buffer("weight", torch.randn(d, n, generator=gen) / math.sqrt(d))
            self.dim = 2 * n + 1

    def _pool_both(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled relu of the filter maps `z`, and the pooled maps (`z` is overwritten)."""
        h, w = z.shape[-2:]
        if h % self.pool[0] == 0 and w % self.pool[1] == 0:  # plain pooling is faster than adaptive
            size = (h // self.pool[0], w // self.pool[1])
            # A channels-last map is pooled ~3.5x faster than a contiguous one (measured per op on
            # MNIST's maps), more than the copy costs; every sum is taken in the same order.
            z = z.contiguous(memory_format=torch.channels_last)
            mean = F.avg_pool2d(z, size, size)
            return F.avg_pool2d(z.relu_(), size, size), mean
        mean = F.adaptive_avg_pool2d(z, self.pool)
        return F.adaptive_avg_pool2d(z.relu_(), self.pool), mean

    def unbiased(self, x: torch.Tensor) -> torch.Tensor:
        """The features without the constant: [n, dim − 1]."""
        weight = self.weight
        assert isinstance(weight, torch.Tensor)
        if self.conv:
            # One sample's filter maps are ~70× its features (72 KB on MNIST): a large batch's
            # spill out of the core's cache and every op after the convolution streams them
            # through memory again; slices that stay in cache were ~3.5× faster per sample at
            # 1,000 samples. Each sample's features are computed alone: slicing changes no bit.
            if x.shape[0] > self.chunk:
                return torch.cat([self.unbiased(part) for part in x.split(self.chunk)])
            # Pooling the filters' and their negations' maps would pool twice the data: the
            # negation's pooled relu is the pooled relu minus the pooled map.
            pos, mean = self._pool_both(_convolve(x, weight))
            h = torch.cat([pos, (pos - mean).clamp_min(0.0)], dim=1).flatten(1)
        else:
            z = x.flatten(1) @ weight
            h = torch.cat([F.relu(z), F.relu(-z)], dim=1)
        return h.sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.unbiased(x)
        return torch.cat([h, h.new_ones((h.shape[0], 1))], dim=1)


# ATen's own im2col convolution (None where this torch lacks it), looked up once: it is on the
# predict path.
_IM2COL_CONV = getattr(torch.ops.aten, "thnn_conv2d", None)
# Fewest samples (of one slice) convolved by oneDNN, the default kernel; fewer go through im2col.
_ONEDNN_FROM = 8


def _convolve(x: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """`F.conv2d(x, filters)`, by whichever CPU kernel was faster for that many samples (one thread,
    torch 2.13, µs per sample, im2col against oneDNN): one 28×28 sample, the predict path's, 17
    against 37; 8 of them 13.0 against 10.6, 31 of them 12.7 against 7.4 (3×32×32: 52 against
    50, then 48 against 24 and 52 against 21). Only on 8×8 inputs was im2col faster for 8 to 31
    samples, by ~1 µs a sample."""
    if _IM2COL_CONV is not None and x.device.type == "cpu" and x.shape[0] < _ONEDNN_FROM:
        return _IM2COL_CONV(x, filters, list(filters.shape[-2:]))
    return F.conv2d(x, filters)


@dataclass(frozen=True)
class RouterOptions(StrategyOptions):
    """The task router's options, shared by every strategy that routes with it (`eidetic`, `interval`)."""

    # Random features of the task router (without a task hint it scores every (task, class) pair);
    # its memory is ~ router_features² floats, its cost ~ router_features² per sample.
    router_features: int = 1024
    # The router's ridge λ, in units of one sample's squared feature norm (a prior worth that many
    # samples, whatever the stream's length; relative to the whole Gram matrix it had grown with
    # every sample and held a 5-permutation stream's router 1 point lower).
    router_lam: float = 0.001
    # Without a task hint, the best (task, class) by log p_task + router_weight · router score answers.
    router_weight: float = 30.0
    # Most learned samples between two router solves (it is also solved at the boundary that ends
    # a new task's visit, and within a new task whenever its samples doubled since the last solve).
    router_refresh: int = 2000

    def validate(self) -> None:
        check_int_options(1, router_features=self.router_features, router_refresh=self.router_refresh)
        check_number_options(0.0, strict=True, router_lam=self.router_lam, router_weight=self.router_weight)

    def make_router(self, input_shape: Sequence[int], seed: int, device: torch.device) -> RidgeRouter:
        return RidgeRouter(
            input_shape, self.router_features, self.router_lam, self.router_refresh, seed, device
        )


@dataclass(frozen=True)
class RouterScores:
    """A solved router: ridge scores of (task, class) pairs, about 1 for the sample's own pair."""

    features: RandomFeatures
    weight: torch.Tensor  # [feature dim, targets]
    column: dict[tuple[int, int], int]  # (task, class) -> target column

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.weight

    def slot_weight(self, layout: TaskSlots) -> torch.Tensor:
        """The weights [feature dim, slots] scoring `layout`'s (task, class) slots; a zero column
        (no evidence) for a pair not solved yet."""
        cols = [self.column.get(pair, -1) for pair in layout.pairs()]
        picked = self.weight[:, [max(c, 0) for c in cols]]
        missing = torch.tensor([c < 0 for c in cols], dtype=torch.bool, device=picked.device)
        return picked.masked_fill(missing, 0.0)

    def by_slot(self, x: torch.Tensor, layout: TaskSlots) -> torch.Tensor:
        """Scores [n, slots] of `layout`'s (task, class) slots."""
        return self.features(x) @ self.slot_weight(layout)

    def on_grid(self, layout: TaskSlots, scale: float) -> GridScores:
        """`scale` × the scores of `layout`'s slots on its padded grid (`TaskSlots.padded`), as one
        product per request: what a snapshot builds once and serves with."""
        columns = layout.padded_rows(self.slot_weight(layout).T, 0.0).T * scale  # [feature dim, grid]
        return GridScores(self.features, columns[:-1].contiguous(), columns[-1].contiguous(), layout.grid)


@dataclass(frozen=True)
class GridScores:
    """A solved router's scores of one layout's slots, times the router weight, padded [n, tasks,
    most classes]: `unbiased features @ weight + bias` (the constant feature's row is the bias)."""

    features: RandomFeatures
    weight: torch.Tensor  # [feature dim − 1, tasks × most classes]
    bias: torch.Tensor  # [tasks × most classes]
    grid: tuple[int, int]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, self.features.unbiased(x), self.weight).view(-1, *self.grid)


@dataclass(frozen=True)
class RouterSolution:
    """A finished solve: the ridge weights for the first `targets` (task, class) targets."""

    weight: torch.Tensor  # [feature dim, targets] float32
    targets: int


class RidgeRouter:
    """Streaming ridge regression from random features to (task, class) targets; routes by task.

    Threads: `observe`, `request_solve`, `solve`, `settle` and the state methods are called by the
    learning thread; the statistics (`gram`, `xy`, the pending features) are written by the
    queued jobs alone, and read by the learning thread only after `jobs.wait()`.
    """

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
        self.solution: RouterSolution | None = None  # replaced by a finished solve, never mutated
        self.solved_targets = 0  # targets of the last solve asked for
        self.since_solve = 0
        self.task_samples = self.task_samples_at_solve = 0  # samples of the current task (at the last solve)
        self.returning = False  # the current task was solved for in an earlier visit
        self._pending: list[torch.Tensor] = []  # features not yet folded into the statistics
        self._pending_cols: list[torch.Tensor] = []
        self.jobs = BackgroundJobs()
        self._served: RouterSolution | None = None  # the solve scores_fn last gave out

    @property
    def weight(self) -> torch.Tensor | None:
        """The newest finished solve's weights [feature dim, targets solved] (None before one)."""
        solution = self.solution
        return None if solution is None else solution.weight

    def observe(self, x: torch.Tensor, y: torch.Tensor, task: int) -> None:
        """Queue a learned batch's statistics (`x` must not be written to afterwards)."""
        cols = torch.tensor([self._target(task, int(c)) for c in y.tolist()], device=self.device)
        self.since_solve += int(y.shape[0])
        self.task_samples += int(y.shape[0])
        self.jobs.submit(self._accumulate, x, cols, len(self.targets))

    def _accumulate(self, x: torch.Tensor, cols: torch.Tensor, targets: int) -> None:
        """(Background.) The batch's features, folded into the statistics every `_FOLD` samples."""
        with torch.no_grad():
            self._pending.append(self.features(x))
        self._pending_cols.append(cols)
        self.xy = self._xy(targets)
        if sum(len(c) for c in self._pending_cols) >= _FOLD:
            self._fold()

    def _fold(self) -> None:
        """Pending features into the statistics: large products, cheaper than one per batch. Only
        the Gram matrix's lower triangle (the diagonal included) is kept up to date: `_solve` and
        the diagonal read nothing else; `symmetric_gram()` fills in the rest where it is needed."""
        if not self._pending_cols:
            return
        with torch.no_grad():
            phi = torch.cat(self._pending)
            d = phi.shape[1]
            for start in range(0, d, _TRIANGLE_ROWS):
                stop = min(start + _TRIANGLE_ROWS, d)
                self.gram[start:stop, :stop] += (phi[:, start:stop].T @ phi[:, :stop]).double()
            self.xy.index_add_(1, torch.cat(self._pending_cols), phi.T.double())
        self._pending, self._pending_cols = [], []

    def symmetric_gram(self) -> torch.Tensor:
        """The whole Gram matrix, from its lower triangle (call after `jobs.wait()` and `_fold()`)."""
        return torch.tril(self.gram) + torch.tril(self.gram, -1).T

    def _xy(self, targets: int) -> torch.Tensor:
        """The statistics' target columns, zero-padded to `targets` (a target is registered on the
        learning thread before its first batch is folded in)."""
        missing = targets - self.xy.shape[1]
        return (
            self.xy
            if missing <= 0
            else torch.cat([self.xy, self.xy.new_zeros((self.xy.shape[0], missing))], 1)
        )

    def _target(self, task: int, cls: int) -> int:
        col = self._column.get((task, cls))
        if col is None:
            col = self._column[(task, cls)] = len(self.targets)
            self.targets.append((task, cls))
        return col

    def stale(self) -> bool:
        """New targets, or more learned samples since the last solve than the task had then (capped
        at `refresh`): solves at about 1×, 2×, 4×... a new task's first batches, then every
        `refresh`; a returning task's visit every `refresh` from its start."""
        due = (
            self.refresh
            if self.returning
            else min(self.refresh, max(_MIN_REFRESH, self.task_samples_at_solve))
        )
        return len(self.targets) != self.solved_targets or self.since_solve >= due

    def due_at_boundary(self) -> bool:
        """Whether the boundary ending the current visit solves: after a new task's samples, yes;
        after a returning task's, only when `stale()` (it is routed to already, and `refresh`
        bounds how long its samples wait: on a stream whose tasks recur, most boundaries end a
        returning visit, and each solve is a Cholesky as wide as the features: 1,025 by default)."""
        return self.stale() or (self.since_solve > 0 and not self.returning)

    def new_task(self, task: int) -> None:
        """A boundary: the doubling schedule of `stale` starts over for the next task, unless
        `task` returns (the router was solved on its targets before): it is routed to already, so
        its visit is solved for every `refresh` samples alone (`due_at_boundary`; new classes of
        it are solved for at once, as any new target)."""
        self.task_samples = self.task_samples_at_solve = 0
        self.returning = any(t == task for t, _ in self.targets[: self.solved_targets])

    def request_solve(self) -> None:
        """Queue a solve on everything observed so far (no-op before any target)."""
        if not self.targets:
            return
        self._mark_solved()
        self.jobs.submit(self._solve, len(self.targets))

    def solve(self) -> None:
        """Solve on everything observed so far, now (waits for the queued statistics)."""
        if not self.targets:
            return
        self.jobs.wait()
        self._mark_solved()
        self._solve(len(self.targets))

    def settle(self) -> bool:
        """Finish the queued work, solving once more if anything was learned since the last solve;
        True when `scores_fn` now gives a newer solve than it last gave."""
        if self.since_solve or self.stale():
            self.solve()
        self.jobs.wait()
        return self.solution is not self._served

    def _mark_solved(self) -> None:
        self.solved_targets, self.since_solve = len(self.targets), 0
        self.task_samples_at_solve = self.task_samples

    def _solve(self, targets: int) -> None:
        """(Background, or after `jobs.wait()`.) The ridge system on the statistics folded so far."""
        self._fold()
        xy = self._xy(targets)[:, :targets]
        # λ in units of one sample's squared feature norm (the last feature is the constant 1, so
        # gram[-1, -1] counts the samples): a prior worth `lam` samples, whatever the stream's length.
        samples = float(self.gram[-1, -1]) or 1.0
        scale = float(self.gram.diagonal().sum()) / samples or 1.0
        ridge = self.lam * scale
        # λ added to a copy's diagonal: an identity matrix as wide as the features (8 MB at the
        # default 1,025) would be built, added and freed on every solve for the same bits.
        system = self.gram.clone()
        system.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(system)  # reads the lower triangle alone
        if int(info) == 0:
            w = torch.cholesky_solve(xy, chol)
        else:
            system = self.symmetric_gram()
            system.diagonal().add_(ridge)
            w = torch.linalg.lstsq(system, xy).solution
        self.solution = RouterSolution(w.float(), targets)

    def scores_fn(self) -> RouterScores | None:
        """The router as last solved, frozen (safe from other threads); None before the first solve."""
        solution = self._served = self.solution
        if solution is None:
            return None
        column = {t: i for i, t in enumerate(self.targets[: solution.targets])}
        return RouterScores(self.features, solution.weight, column)  # the features are fixed buffers: shared

    def state_dict(self) -> dict[str, Any]:
        self.jobs.wait()
        self._fold()
        solution, xy = self.solution, self._xy(len(self.targets))
        return {
            "gram": self.symmetric_gram().cpu(),
            "xy": xy.cpu().clone(),
            "targets": [list(t) for t in self.targets],
            "weight": None if solution is None else solution.weight.cpu().clone(),
            "solved_targets": self.solved_targets,
            "since_solve": self.since_solve,
            "task_samples": [self.task_samples, self.task_samples_at_solve],
            "returning": self.returning,
        }

    def __getstate__(self) -> dict[str, Any]:
        self.jobs.wait()  # before the statistics are copied
        return self.__dict__.copy()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.jobs.wait()
        self.gram = state["gram"].to(self.device)
        self.xy = state["xy"].to(self.device)
        self.targets = [(int(t), int(c)) for t, c in state["targets"]]
        self._column = {t: i for i, t in enumerate(self.targets)}
        weight = state["weight"]
        self.solution = (
            None if weight is None else RouterSolution(weight.to(self.device), int(weight.shape[1]))
        )
        self.solved_targets, self.since_solve = int(state["solved_targets"]), int(state["since_solve"])
        self.task_samples, self.task_samples_at_solve = (int(v) for v in state["task_samples"])
        self.returning = bool(state.get("returning", False))  # absent from earlier checkpoints
        self._pending, self._pending_cols = [], []
