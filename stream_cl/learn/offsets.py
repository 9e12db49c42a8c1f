"""Exactly once over re-deliveries: per partition, the next offset not yet taken in.

Kafka re-delivers after a rebalance, a seek or a restore; what was taken in once must not be
taken in again. Offsets only grow within a partition, so one number per partition says it all:
an offset below it was taken in already.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping


class OffsetTracker:
    """Per partition, the next offset not yet taken in (lower ones are dropped: exactly once)."""

    __slots__ = ("_next",)

    def __init__(self, offsets: Mapping[int, int] | None = None) -> None:
        self._next: dict[int, int] = dict(offsets) if offsets else {}

    def take(self, partition: int, offset: int) -> bool:
        """True, and `offset` counts as taken in, unless it was taken in already (a re-delivery)."""
        next_offsets = self._next
        if offset < next_offsets.get(partition, 0):
            return False
        next_offsets[partition] = offset + 1
        return True

    def next_offset(self, partition: int) -> int:
        """The next offset of `partition` not yet taken in (0 for a partition never seen)."""
        return self._next.get(partition, 0)

    def next_offsets(self) -> dict[int, int]:
        """A copy: partition -> the next offset not yet taken in."""
        return dict(self._next)

    def reset(self, offsets: Mapping[int, int]) -> None:
        """Forget everything; resume each partition in `offsets` at its offset (a restore)."""
        self._next = dict(offsets)

    def resume(self, partition: int, offset: int) -> None:
        """Take `partition` in from `offset` on (a takeover), whatever was taken in before."""
        self._next[partition] = offset

    def forget(self, partition: int) -> None:
        """Drop `partition` (given up): it starts over as never seen."""
        self._next.pop(partition, None)

    def __contains__(self, partition: object) -> bool:
        return partition in self._next

    def __iter__(self) -> Iterator[int]:
        """The partitions seen."""
        return iter(self._next)

    def partitions(self) -> set[int]:
        return set(self._next)
