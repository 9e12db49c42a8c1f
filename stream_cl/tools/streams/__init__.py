"""The built-in streams: base streams over the shipped datasets (`base.py`), and shapes over them
(`shapes.py`) for the orders a deployment meets. `load_stream` builds either from its name."""

from __future__ import annotations

from collections.abc import Sequence

from stream_cl.tools.streams.base import STREAMS, TRAIN_FRACTION, StreamInfo, load_base, pixel_permutation
from stream_cl.tools.streams.shapes import SHAPES, apply_shapes, parse_shapes
from stream_cl.tools.streams.stream import (
    BenchmarkStream,
    HeldOutData,
    SampleOrder,
    Scenario,
    Segment,
    StreamSample,
    TaskSpec,
    TrainData,
)

__all__ = [
    "SHAPES",
    "STREAMS",
    "TRAIN_FRACTION",
    "BenchmarkStream",
    "HeldOutData",
    "SampleOrder",
    "Scenario",
    "Segment",
    "StreamInfo",
    "StreamSample",
    "TaskSpec",
    "TrainData",
    "load_stream",
    "pixel_permutation",
]


def load_stream(
    name: str,
    seed: int = 0,
    class_order: Sequence[int] | None = None,
    send_task: bool = True,
    scenario: Scenario | None = None,
) -> BenchmarkStream:
    """Build a built-in stream by name: a base stream (`split-mnist`, ...) with optional shapes
    (`split-mnist:gradual:width=200`, see `shapes.py`).

    `seed` drives the train/test split, the permutations, the order within each task and every
    shape; the same name and seed always give the same stream. `class_order` (split streams only)
    is a permutation of all class ids; consecutive pairs of it form the tasks. `scenario` defaults
    to the base stream's own.
    """
    base_name, shapes = parse_shapes(name)
    stream = load_base(base_name, seed, class_order, send_task, scenario)
    if not shapes:
        return stream
    import dataclasses

    return apply_shapes(dataclasses.replace(stream, name=name), shapes)
