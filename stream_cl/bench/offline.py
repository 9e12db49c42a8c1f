"""Feed a built-in stream through the daemon's own `Learner`, without Kafka.

Benchmarks and tests use this to exercise exactly the daemon's learning path (label mapping,
boundary detection, batching, snapshots) at in-process speed.
"""

from __future__ import annotations

import dataclasses

from stream_cl.config import Config
from stream_cl.ingest.chunk import Record
from stream_cl.ingest.codec import Sample
from stream_cl.learn.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.tools.datasets import BenchmarkStream


def stream_records(stream: BenchmarkStream, chunk: int = 500) -> list[list[Record]]:
    """The stream's samples as the source would hand them over, in chunks (unlabeled ones without `y`)."""
    shape = tuple(stream.input_shape)
    records = [
        Record(0, s.index, Sample(x=s.x, y=s.y, task=s.task_id, id=s.index, shape=shape), b"")
        for s in stream.samples()
    ]
    return [records[i : i + chunk] for i in range(0, len(records), chunk)]


def learn_offline(config: Config, stream: BenchmarkStream, metrics: Metrics | None = None) -> Learner:
    """Learn the whole stream once, in order; returns the learner (its snapshot is published).

    Held-out sampling is off: built-in streams come with their own test splits.
    """
    config = dataclasses.replace(
        config, evaluation=dataclasses.replace(config.evaluation, holdout_fraction=0.0)
    )
    learner = Learner(config, SnapshotHolder(), metrics or Metrics())
    for chunk in stream_records(stream):
        learner.process(chunk)
    learner.flush()
    learner.publish()
    return learner
