"""The learner: label mapping, batching, snapshots and exactly-once offsets, without Kafka."""

from __future__ import annotations

import numpy as np

from stream_cl.codec import Sample
from stream_cl.config import load_config
from stream_cl.datasets import load_stream
from stream_cl.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.offline import learn_offline, stream_records
from stream_cl.snapshot import SnapshotHolder
from stream_cl.source import Record


def _learner(*overrides: str) -> Learner:
    config = load_config(
        None,
        ["model.hidden=[32]", "checkpoint.enabled=false", "evaluation.holdout_fraction=0", *overrides],
        env={},
    )
    return Learner(config, SnapshotHolder(), Metrics())


def test_nothing_is_published_before_the_first_label() -> None:
    """A model without classes is never served: unlabeled samples alone publish no snapshot."""
    learner = _learner()
    learner.process([Record(0, i, Sample(x=np.zeros(4, np.float32)), b"") for i in range(3)])
    learner.flush()
    assert learner.holder.get() is None
    learner.process([Record(0, 3, Sample(x=np.zeros(4, np.float32), y="cat"), b"")])
    learner.flush()
    snap = learner.holder.get()
    assert snap is not None and snap.labels == ("cat",)


def test_records_already_processed_are_skipped() -> None:
    """Re-delivered records (offset below the processed mark) are not learned twice."""
    learner = _learner()
    records = [Record(0, i, Sample(x=np.full(4, i, np.float32), y=i % 2), b"") for i in range(64)]
    learner.process(records)
    learner.process(records[10:40])  # a rebalance re-delivers part of the partition
    learner.flush()
    assert learner.learned == 64
    assert learner.offsets == {0: 64}


def test_string_labels_and_a_wrong_length_sample() -> None:
    """String labels map to classes in order of arrival; a wrong-length sample is rejected, not learned."""
    learner = _learner()
    ok = [Record(0, i, Sample(x=np.ones(4, np.float32), y=["a", "b", "c"][i % 3]), b"") for i in range(30)]
    bad = Record(0, 30, Sample(x=np.ones(5, np.float32), y="a"), b"")
    learner.process([*ok, bad])
    learner.flush()
    assert learner.labels == ["a", "b", "c"]
    assert learner.learned == 30
    assert learner.metrics.sample_value("stream_cl_samples_total", {"outcome": "invalid"}) == 1
    assert learner.offsets == {0: 31}


def test_class_cap_rejects_labels_beyond_it() -> None:
    """Labels beyond model.max_classes are rejected instead of growing the head without bound."""
    learner = _learner("model.max_classes=3")
    recs = [Record(0, i, Sample(x=np.ones(4, np.float32), y=i), b"") for i in range(10)]
    learner.process(recs)
    learner.flush()
    assert learner.labels == [0, 1, 2]
    assert learner.learned == 3


def test_offline_learning_of_a_builtin_stream() -> None:
    """One pass of split-digits through the daemon's learner learns every sample and opens 5 tasks."""
    stream = load_stream("split-digits", seed=0)
    learner = learn_offline(
        load_config(None, ["model.hidden=[32]", "checkpoint.enabled=false"], env={}), stream, Metrics()
    )
    assert learner.learned == stream.n_train
    assert learner.detector.task_ids == [0, 1, 2, 3, 4]
    assert len(stream_records(stream, chunk=100)) == -(-stream.n_train // 100)
