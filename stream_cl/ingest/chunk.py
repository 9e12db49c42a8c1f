"""What the source hands the learner: one poll's messages as a `Chunk`, column by column.

A Chunk holds, per message and in stream order, one entry in each column (partition, offset,
key, ...), and two blocks shared by every message: `xs`, every decoded sample's x back to back
(float32, flat), and `raws`, every decoded message's original bytes back to back. Message i's x
is the view `xs[x_starts[i]:x_ends[i]]` and its bytes `raws[raw_starts[i]:raw_ends[i]]`.

A message the source dead-lettered is forwarded too (its `invalid` entry holds the reason, None
for a decoded one), so the learner still marks it processed in order; its sample columns hold
placeholders (an empty x and bytes range, None for y, task, id, ts and shape).

Nothing is built per message on the source thread but the column entries: a Record and a Sample
each (~2 µs and ~6 objects for the garbage collector per message, whose collections the source
then triggered) held the GIL the learner thread needs. The learner reads the columns with `zip`
and takes each `x` as a view of `xs` when it gets to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_cl.ingest.codec import Sample


@dataclass(slots=True)  # immutable by convention: a frozen dataclass cost ~1.5 µs more per sample to build
class Record:
    partition: int
    offset: int
    sample: Sample | None  # None: the message was invalid and is already dead-lettered
    raw: bytes | memoryview  # the original message value, for dead letters raised later by the learner
    key: bytes | None = None  # the Kafka message key (per-key models route by it)


# The column fields of a Chunk, in order: what a records frame carries (fetcher.py), one msgpack
# array each. Columns are lists, or tuples where they were unpacked from a frame.
COLUMNS = (
    "partitions",
    "offsets",
    "keys",
    "invalid",
    "x_starts",
    "x_ends",
    "raw_starts",
    "raw_ends",
    "ys",
    "tasks",
    "ids",
    "tss",
    "shapes",
)


@dataclass(slots=True)
class Chunk:
    """One poll's messages, in stream order, as columns over two shared blocks (see the module)."""

    partitions: Sequence[int]
    offsets: Sequence[int]
    keys: Sequence[bytes | None]  # the Kafka message keys
    invalid: Sequence[str | None]  # the dead-letter reason of a message the source dead-lettered
    x_starts: Sequence[int]
    x_ends: Sequence[int]
    raw_starts: Sequence[int]
    raw_ends: Sequence[int]
    ys: Sequence[Any]  # the decoded label (None: unlabeled)
    tasks: Sequence[Any]
    ids: Sequence[Any]
    tss: Sequence[float | None]
    shapes: Sequence[Sequence[int] | None]
    xs: np.ndarray  # float32, flat: every decoded sample's x back to back
    raws: bytes | memoryview  # every decoded message's original bytes back to back

    def __len__(self) -> int:
        return len(self.offsets)

    def columns(self) -> list[Sequence[Any]]:
        """The column fields' values, in `COLUMNS` order."""
        return [getattr(self, name) for name in COLUMNS]

    @classmethod
    def from_columns(
        cls, columns: Sequence[Sequence[Any]], xs: np.ndarray, raws: bytes | memoryview
    ) -> Chunk:
        """The chunk of `columns` (in `COLUMNS` order) over the blocks `xs` and `raws`."""
        return cls(**dict(zip(COLUMNS, columns, strict=True)), xs=xs, raws=raws)

    def raw(self, i: int) -> bytes | memoryview:
        """Message i's original bytes (b"" for a dead-lettered one)."""
        if self.invalid[i] is not None:
            return b""
        return self.raws[self.raw_starts[i] : self.raw_ends[i]]

    def sample(self, i: int) -> Sample:
        """Message i's decoded sample, its x a view of `xs` (not for a dead-lettered message)."""
        shape = self.shapes[i]
        return Sample(
            self.xs[self.x_starts[i] : self.x_ends[i]],
            self.ys[i],
            self.tasks[i],
            self.ids[i],
            self.tss[i],
            None if shape is None else tuple(shape),
        )

    def records(self) -> list[Record]:
        """One Record per message (what per-record code, such as per-key routing, works with)."""
        return [
            Record(p, o, None, b"", k) if reason is not None else Record(p, o, self.sample(i), self.raw(i), k)
            for i, (p, o, k, reason) in enumerate(
                zip(self.partitions, self.offsets, self.keys, self.invalid, strict=True)
            )
        ]

    def select(self, indices: Sequence[int]) -> Chunk:
        """The messages at `indices` (in the order given) over the same blocks."""
        columns = [[column[i] for i in indices] for column in self.columns()]
        return Chunk.from_columns(columns, self.xs, self.raws)

    @classmethod
    def of(cls, records: list[Record]) -> Chunk:
        """The chunk holding `records` (x and bytes copied into the blocks)."""
        builder = ChunkBuilder()
        for rec in records:
            if rec.sample is None:
                builder.add_invalid(rec.partition, rec.offset, rec.key, "")
            else:
                builder.add(rec.partition, rec.offset, rec.key, rec.sample, rec.raw)
        return builder.build()


class ChunkBuilder:
    """The columns and the pieces of the two blocks, message by message (the source's decode loop)."""

    def __init__(self) -> None:
        self.partitions: list[int] = []
        self.offsets: list[int] = []
        self.keys: list[bytes | None] = []
        self.invalid: list[str | None] = []
        self.x_starts: list[int] = []
        self.x_ends: list[int] = []
        self.raw_starts: list[int] = []
        self.raw_ends: list[int] = []
        self.ys: list[Any] = []
        self.tasks: list[Any] = []
        self.ids: list[Any] = []
        self.tss: list[float | None] = []
        self.shapes: list[list[int] | None] = []
        self.xs: list[np.ndarray] = []
        self.raws: list[bytes | memoryview] = []
        self.x_size = self._raw_at = 0

    def __len__(self) -> int:
        return len(self.offsets)

    def add(
        self, partition: int, offset: int, key: bytes | None, sample: Sample, raw: bytes | memoryview
    ) -> None:
        x = sample.x
        x_at, raw_at = self.x_size, self._raw_at
        self.x_size, self._raw_at = x_at + x.size, raw_at + len(raw)
        self.xs.append(x)
        self.raws.append(raw)
        self._message(partition, offset, key, None, x_at, self.x_size, raw_at, self._raw_at)
        self.ys.append(sample.y)
        self.tasks.append(sample.task)
        self.ids.append(sample.id)
        self.tss.append(sample.ts)
        self.shapes.append(None if sample.shape is None else list(sample.shape))

    def add_invalid(self, partition: int, offset: int, key: bytes | None, reason: str) -> None:
        x_at, raw_at = self.x_size, self._raw_at
        self._message(partition, offset, key, reason, x_at, x_at, raw_at, raw_at)
        self.ys.append(None)
        self.tasks.append(None)
        self.ids.append(None)
        self.tss.append(None)
        self.shapes.append(None)

    def _message(
        self,
        partition: int,
        offset: int,
        key: bytes | None,
        reason: str | None,
        x0: int,
        x1: int,
        r0: int,
        r1: int,
    ) -> None:
        self.partitions.append(partition)
        self.offsets.append(offset)
        self.keys.append(key)
        self.invalid.append(reason)
        self.x_starts.append(x0)
        self.x_ends.append(x1)
        self.raw_starts.append(r0)
        self.raw_ends.append(r1)

    def columns(self) -> list[list[Any]]:
        """The columns, in `COLUMNS` order."""
        return [getattr(self, name) for name in COLUMNS]

    def x_block(self) -> np.ndarray:
        return np.concatenate(self.xs).astype("<f4", copy=False) if self.xs else np.empty(0, "<f4")

    def build(self) -> Chunk:
        return Chunk.from_columns(self.columns(), self.x_block(), b"".join(self.raws))
