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

from stream_cl.strategies.buffers import SampleStore


class ClassBalancedBuffer(SampleStore):
    """Class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020), bounded by `capacity`.

    While there is room every item is kept. When full, an item of class y:
    - if y is not among the largest classes held, replaces a random item of a largest class;
    - else replaces a random item of its own class with probability held_y / seen_y (algorithm R
      within the class), so each class's items stay a uniform sample of that class.
    """

    def __init__(self, capacity: int, input_shape: Sequence[int], device: torch.device) -> None:
        super().__init__(capacity, input_shape, device)
        self.seen: dict[int, int] = {}  # items offered per class
        self._held: dict[int, int] = {}  # items held per class, kept with every write

    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Offer a batch; items are copied, the caller's tensors are never kept or changed."""
        for i, label in enumerate(y.tolist()):
            self.seen[label] = self.seen.get(label, 0) + 1
            full = self.size == self.capacity
            slot = self._slot(label, generator)
            if slot is not None:
                if full:  # a replacement: the slot's old item leaves
                    self._held[int(self.y[slot])] -= 1
                self._held[label] = self._held.get(label, 0) + 1
                self.x[slot] = x[i]
                self.y[slot] = label

    def _slot(self, label: int, generator: torch.Generator) -> int | None:
        if self.size < self.capacity:
            self.size += 1
            return self.size - 1
        held = self._held
        largest = max(held.values())
        if held.get(label, 0) < largest:
            victims = sorted(c for c, n in held.items() if n == largest)
            victim = victims[int(torch.randint(len(victims), (1,), generator=generator))]
            return self._random_slot_of(victim, generator)
        if int(torch.randint(self.seen[label], (1,), generator=generator)) >= held[label]:
            return None
        return self._random_slot_of(label, generator)

    def _random_slot_of(self, label: int, generator: torch.Generator) -> int:
        slots = (self.y == label).nonzero().flatten()
        return int(slots[int(torch.randint(len(slots), (1,), generator=generator))])

    def _load_seen(self, seen: Any) -> None:
        held = torch.bincount(self.labels()).tolist() if self.size else []
        self._held = {c: int(k) for c, k in enumerate(held) if k}
        if isinstance(seen, int):  # a uniform reservoir's state (older checkpoints): counts held
            seen = dict(self._held)
        self.seen = {int(k): int(v) for k, v in seen.items()}
