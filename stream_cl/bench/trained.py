"""Models trained for benchmarks, through the daemon's own learning path."""

from __future__ import annotations

import numpy as np

from stream_cl.bench.offline import learn_offline
from stream_cl.config import Config
from stream_cl.serve.snapshot import Snapshot
from stream_cl.tools.datasets import load_stream


def trained_snapshot(config: Config, stream_name: str) -> tuple[Snapshot, np.ndarray]:
    """One pass of `stream_name` through the configured strategy; returns (snapshot, test inputs)."""
    stream = load_stream(stream_name)
    learner = learn_offline(config, stream)
    snapshot = learner.holder.get()
    assert snapshot is not None
    return snapshot, np.concatenate([t.test_x for t in stream.tasks])
