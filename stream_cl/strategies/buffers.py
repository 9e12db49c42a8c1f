"""Bounded sample memories shared by strategies and head policies."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol

import torch


class _Reservoir(Protocol):
    capacity: int
    size: int
    seen: int


def reservoir_slots(buffer: _Reservoir, n: int, generator: torch.Generator) -> dict[int, int]:
    """Vitter's algorithm R over `n` newly offered items: {slot: item index} for the items kept.

    An item replaces slot k < capacity when its draw k from [0, items seen) lands there. Several
    items of one batch can land on one slot: only the last is held then, as if they had been
    written one after another. The draws for a batch are made at once (one torch op, not one per
    item). Updates `buffer.size` and `buffer.seen`; the caller writes the items (`write_rows`).
    """
    writes: dict[int, int] = {}
    draws: list[float] | None = None
    for i in range(n):
        buffer.seen += 1
        if buffer.size < buffer.capacity:
            slot = buffer.size
            buffer.size += 1
        else:
            if draws is None:
                draws = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
            slot = int(draws[i] * buffer.seen)
            if slot >= buffer.capacity:
                continue
        writes[slot] = i
    return writes


def write_rows(writes: dict[int, int], pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """For each (store, source) pair: `store[slot] = source[item]` for every {slot: item} of
    `writes`, as one indexed copy per pair."""
    if not writes:
        return
    device = pairs[0][0].device  # one buffer's stores share a device
    slots = torch.tensor(list(writes), device=device)
    items = torch.tensor(list(writes.values()), device=device)
    for store, source in pairs:
        store[slots] = source.to(device)[items]


class SampleStore:
    """Fixed storage for up to `capacity` labeled items, allocated once, so memory stays bounded
    whatever the stream's length; subclasses decide which items to keep (`add`) and what `seen`
    (their count of items offered) holds."""

    seen: Any

    def __init__(self, capacity: int, input_shape: Sequence[int], device: torch.device) -> None:
        if capacity <= 0:
            raise ValueError(f"a buffer needs a positive capacity, got {capacity}")
        self.size = 0  # slots filled
        self._allocate(capacity, tuple(input_shape), device)

    def _allocate(self, capacity: int, input_shape: tuple[int, ...], device: torch.device) -> None:
        self.capacity = capacity
        self.x = torch.zeros((capacity, *input_shape), device=device)
        self.y = torch.zeros(capacity, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return self.size

    def inputs(self) -> torch.Tensor:
        """Every held input (a view; do not modify)."""
        return self.x[: self.size]

    def labels(self) -> torch.Tensor:
        """Every held label (a view; do not modify)."""
        return self.y[: self.size]

    def state_dict(self) -> dict[str, Any]:
        return {
            "x": self.x[: self.size].detach().cpu().clone(),
            "y": self.y[: self.size].detach().cpu().clone(),
            "seen": copy.copy(self.seen),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["x"].shape[0])
        if n > self.capacity:
            raise ValueError(f"checkpoint holds {n} items, more than this buffer's capacity {self.capacity}")
        self.x.zero_()
        self.y.zero_()
        self.x[:n] = state["x"].to(self.x.device)
        self.y[:n] = state["y"].to(self.y.device)
        self.size = n
        self._load_seen(state["seen"])

    def _load_seen(self, seen: Any) -> None:
        raise NotImplementedError


class ReservoirBuffer(SampleStore):
    """A uniform sample of every (x, y) offered so far, never more than `capacity` items.

    Vitter's algorithm R: the i-th item offered replaces a random slot with probability
    capacity / i, so at any time each item seen is held with the same probability.
    """

    def __init__(self, capacity: int, input_shape: Sequence[int], device: torch.device) -> None:
        super().__init__(capacity, input_shape, device)
        self.seen = 0  # items offered

    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Offer a batch; items are copied, the caller's tensors are never kept or changed."""
        write_rows(reservoir_slots(self, x.shape[0], generator), [(self.x, x), (self.y, y)])

    def sample(self, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `k` distinct held items, drawn uniformly."""
        idx = torch.randperm(self.size, generator=generator)[:k].to(self.x.device)
        return self.x[idx], self.y[idx]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A checkpoint of a larger reservoir (its capacity was lowered since) keeps a uniform
        subset of its items, drawn with a fixed seed (a restore is repeatable): a uniform sample of
        a uniform sample is one too, and `seen` goes on counting every item offered."""
        n = int(state["x"].shape[0])
        if n > self.capacity:
            keep = uniform_subset(n, self.capacity, torch.Generator().manual_seed(0))
            state = {**state, "x": state["x"][keep], "y": state["y"][keep]}
        super().load_state_dict(state)

    def _load_seen(self, seen: Any) -> None:
        self.seen = int(seen)

    def resize(self, capacity: int, generator: torch.Generator) -> None:
        """Hold at most `capacity` items from now on. Shrinking keeps a uniform subset of the items
        held (still a uniform sample of every item offered); growing leaves the new slots to the
        items that follow, so the reservoir then favours them."""
        if capacity <= 0:
            raise ValueError(f"a buffer needs a positive capacity, got {capacity}")
        keep = uniform_subset(self.size, capacity, generator).to(self.x.device)
        x, y = self.x[keep], self.y[keep]
        self._allocate(capacity, tuple(self.x.shape[1:]), self.x.device)
        self.size = len(keep)
        self.x[: self.size], self.y[: self.size] = x, y


def uniform_subset(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a uniform subset of `k` of `n` items, in order (all of them when `k` >= `n`)."""
    if k >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:k].sort().values


class TaskBuffers:
    """Per task, a reservoir of the samples learned since the task's last consolidation; all of
    them together hold at most `capacity` samples.

    What `eidetic` and `interval` consolidate on. A task's buffer is dropped once it is
    consolidated; a visit too short to consolidate keeps it for the task's next boundary, and
    `keep_only` keeps the current and the previous task's (no others are held). Buffers held at
    once (the two tasks of a gradual transition) share the capacity: when one opens, those held
    keep a uniform subset of their samples (a seeded draw, so a run is repeatable); a buffer left
    alone again grows back, its new room going to the samples that follow.
    """

    def __init__(self, capacity: int, input_shape: Sequence[int], device: torch.device) -> None:
        self.capacity, self.input_shape, self.device = capacity, tuple(input_shape), device
        self.by_task: dict[int, ReservoirBuffer] = {}
        self._generator = torch.Generator().manual_seed(0)

    def of(self, task: int) -> ReservoirBuffer:
        """`task`'s buffer, created empty when it has none."""
        buffer = self.by_task.get(task)
        if buffer is None:
            share = self._share(len(self.by_task) + 1)
            buffer = self.by_task[task] = ReservoirBuffer(share, self.input_shape, self.device)
            self._rebalance()
        return buffer

    def get(self, task: int) -> ReservoirBuffer | None:
        return self.by_task.get(task)

    def drop(self, task: int) -> None:
        self.by_task.pop(task, None)
        self._rebalance()

    def keep_only(self, *tasks: int) -> None:
        self.by_task = {t: b for t, b in self.by_task.items() if t in tasks}
        self._rebalance()

    def held(self) -> int:
        """Samples held over every task."""
        return sum(len(b) for b in self.by_task.values())

    def _share(self, buffers: int) -> int:
        return max(1, self.capacity // max(1, buffers))

    def _rebalance(self) -> None:
        share = self._share(len(self.by_task))
        for buffer in self.by_task.values():
            if buffer.capacity != share:
                buffer.resize(share, self._generator)

    def state_dict(self) -> dict[int, dict[str, Any]]:
        return {t: b.state_dict() for t, b in self.by_task.items()}

    def load_state_dict(self, state: dict[Any, dict[str, Any] | None]) -> None:
        self.by_task = {}
        held = {int(task): buffer for task, buffer in state.items() if buffer is not None}
        for task in held:  # every buffer first, at its share, then their samples
            self.of(task)
        for task, buffer in held.items():
            self.by_task[task].load_state_dict(buffer)
