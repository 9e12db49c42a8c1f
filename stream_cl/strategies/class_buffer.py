"""A bounded sample memory that keeps every class equally represented (class-balanced reservoir).

The `ls` head policy refreshes its class statistics from it: a uniform reservoir holds a class in
proportion to how often it was seen, so a class that arrived a few samples ago (the other class
of a task that has just begun) is barely in it, and a solve would treat it as if it did not
exist. Here a class that arrives takes its slots from the largest class, so the buffer always
holds every class seen with about `capacity / classes` items, each a uniform sample of its class.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from stream_cl.strategies.buffers import SampleStore, write_rows


class ClassBalancedBuffer(SampleStore):
    """Class-balanced reservoir sampling (Chrysakis & Moens, ICML 2020), bounded by `capacity`.

    While there is room every item is kept. When full, an item of class y:
    - if y is not among the largest classes held, replaces a random item of a largest class;
    - else replaces a random item of its own class with probability held_y / seen_y (algorithm R
      within the class), so each class's items stay a uniform sample of that class.

    It runs once per learned batch, so one batch costs a fixed handful of torch ops: the random
    numbers are drawn at once, the slots are chosen in Python from a mirror of the held labels,
    and the kept items are written with one indexed copy (per item, the draws, reads and writes
    would be about ten small torch ops a sample, each releasing and retaking the GIL).
    """

    def __init__(self, capacity: int, input_shape: Sequence[int], device: torch.device) -> None:
        super().__init__(capacity, input_shape, device)
        self.seen: dict[int, int] = {}  # items offered per class
        self._label_at: list[int] = []  # the label in each filled slot (mirrors `y[:size]`)
        self._slots_of: dict[int, list[int]] = {}  # each class's slots, ascending

    @property
    def _held(self) -> dict[int, int]:
        """Items held per class."""
        return {label: len(slots) for label, slots in self._slots_of.items()}

    def add(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> None:
        """Offer a batch; items are copied, the caller's tensors are never kept or changed."""
        labels = y.tolist()
        # at most two draws an item: which class gives up a slot (or whether to keep it), which slot
        draws = iter(torch.rand(2 * len(labels), generator=generator, dtype=torch.float64).tolist())
        writes: dict[int, int] = {}  # slot -> the batch item written there (the last one wins)
        for i, label in enumerate(labels):
            self.seen[label] = self.seen.get(label, 0) + 1
            slot = self._slot(label, draws)
            if slot is None:
                continue
            if slot < len(self._label_at):  # a replacement: the slot's old item leaves
                self._slots_of[self._label_at[slot]].remove(slot)
                self._label_at[slot] = label
            else:
                self._label_at.append(label)
            bisect.insort(self._slots_of.setdefault(label, []), slot)
            writes[slot] = i
        write_rows(writes, [(self.x, x), (self.y, y)])

    def _slot(self, label: int, draws: Iterator[float]) -> int | None:
        if self.size < self.capacity:
            self.size += 1
            return self.size - 1
        slots_of = self._slots_of
        largest = max(map(len, slots_of.values()))
        held = len(slots_of.get(label, ()))
        if held < largest:
            victims = sorted(c for c, slots in slots_of.items() if len(slots) == largest)
            victim = victims[int(next(draws) * len(victims))]
            return self._random_slot_of(victim, next(draws))
        if int(next(draws) * self.seen[label]) >= held:
            return None
        return self._random_slot_of(label, next(draws))

    def _random_slot_of(self, label: int, draw: float) -> int:
        slots = self._slots_of[label]
        return slots[int(draw * len(slots))]

    def _load_seen(self, seen: Any) -> None:
        self._label_at = self.labels().tolist()
        self._slots_of = {}
        for slot, label in enumerate(self._label_at):
            self._slots_of.setdefault(label, []).append(slot)
        if isinstance(seen, int):  # a uniform reservoir's state (older checkpoints): counts held
            seen = dict(self._held)
        self.seen = {int(k): int(v) for k, v in seen.items()}
