"""A bounded sample memory that keeps every class equally represented (class-balanced reservoir).

The `ls` head policy refreshes its class statistics from it: a uniform reservoir holds a class in
proportion to how often it was seen, so a class that arrived a few samples ago (the other class
of a task that has just begun) is barely in it, and a solve would treat it as if it did not
exist. Here a class that arrives takes its slots from the largest class, so the buffer always
holds every class seen with about `capacity / classes` items, each a uniform sample of its class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class ClassBalancedBuffer:
    """Class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020), bounded by `capacity`.

    While there is room every item is kept. When full, an item of class y:
    - if y is not among the largest classes held, replaces a random item of a largest class;
    - else replaces a random item of its own class with probability held_y / seen_y (algorithm R
      within the class), so each class's items stay a uniform sample of that class.
    """

    def __init__(self, capacity: int, input_shape: Sequence[int], device: torch.device) -> None:
        if capacity <= 0:
            raise ValueError(f"a buffer needs a positive capacity, got {capacity}")
        self.capacity = capacity
        self.x = torch.zeros((capacity, *input_shape), device=device)
        self.y = torch.zeros(capacity, dtype=torch.long, device=device)
        self.size = 0
        self.seen: dict[int, int] = {}  # items offered per class

    def __len__(self) -> int:
        return self.size

    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Offer a batch; items are copied, the caller's tensors are never kept or changed."""
        for i, label in enumerate(y.tolist()):
            self.seen[label] = self.seen.get(label, 0) + 1
            slot = self._slot(label, generator)
            if slot is not None:
                self.x[slot] = x[i]
                self.y[slot] = label

    def _slot(self, label: int, generator: torch.Generator) -> int | None:
        if self.size < self.capacity:
            self.size += 1
            return self.size - 1
        held = torch.bincount(self.y, minlength=label + 1)
        largest = int(held.max())
        if int(held[label]) < largest:
            victims = (held == largest).nonzero().flatten()
            victim = int(victims[int(torch.randint(len(victims), (1,), generator=generator))])
            return self._random_slot_of(victim, generator)
        if int(torch.randint(self.seen[label], (1,), generator=generator)) >= int(held[label]):
            return None
        return self._random_slot_of(label, generator)

    def _random_slot_of(self, label: int, generator: torch.Generator) -> int:
        slots = (self.y == label).nonzero().flatten()
        return int(slots[int(torch.randint(len(slots), (1,), generator=generator))])

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
            "seen": dict(self.seen),
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
        seen = state["seen"]
        if isinstance(seen, int):  # a uniform reservoir's state (older checkpoints): counts held
            seen = {int(c): int(k) for c, k in enumerate(torch.bincount(self.y[:n]).tolist()) if k}
        self.seen = {int(k): int(v) for k, v in seen.items()}
