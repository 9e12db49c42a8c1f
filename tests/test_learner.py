"""The learner: label mapping, batching, snapshots and exactly-once offsets, without Kafka."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stream_cl.bench.offline import learn_offline, stream_records
from stream_cl.config import load_config
from stream_cl.ingest.codec import Sample
from stream_cl.ingest.source import Record
from stream_cl.learn.learner import Learner
from stream_cl.learn.outputs import LearnerOutputs
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.strategies import Batch, StepResult
from stream_cl.tools.datasets import load_stream


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


def test_a_new_label_joins_the_batch_being_filled() -> None:
    """A label never seen grows the head at once but does not cut the mini-batch: the step that
    brings a class learns a full batch with it (before, a new label learned the batch so far on
    its own, and the first class of a task got a step of 1-3 samples, its `ls` row solved from
    those), and the class's row is written in that step."""
    learner = _learner("model.batch_size=8", "strategy.name=finetune", "strategy.head=ls")
    labels = [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]  # new labels at samples 3 and 10
    rng = np.random.default_rng(0)
    records = [Record(0, i, Sample(x=rng.random(4, np.float32), y=y), b"") for i, y in enumerate(labels)]
    learner.process(records[:1])
    strategy = learner.strategy
    assert strategy is not None
    steps: list[list[int]] = []
    learn = strategy.learn

    def recorded(batch: Batch) -> StepResult:
        steps.append(batch.y.tolist())
        return learn(batch)

    strategy.learn = recorded  # type: ignore[method-assign]
    learner.process(records[1:])
    assert steps == [[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 2, 2, 2, 2, 2, 2]]
    assert strategy.head_policy.pending == []  # every class's row written in the step that brought it


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


def test_snapshots_are_frozen_copies_independent_of_training() -> None:
    """A published snapshot keeps predicting exactly as at publish time while the model trains on."""
    learner = _learner("learner.snapshot_every_steps=1000", "learner.snapshot_every_ms=100000")
    rng = np.random.default_rng(0)
    recs = [Record(0, i, Sample(x=rng.random(4).astype(np.float32), y=i % 2), b"") for i in range(64)]
    learner.process(recs[:32])
    snap = learner.publish()
    assert snap is not None
    probe = rng.random((8, 4)).astype(np.float32)
    before = snap.predict(probe).proba.copy()
    learner.process(recs[32:])
    learner.flush()
    assert learner.steps >= 2
    assert np.array_equal(snap.predict(probe).proba, before)
    newer = learner.holder.get()
    assert newer is not None and newer.version > snap.version
    assert not np.array_equal(newer.predict(probe).proba, before)


def test_scheduled_snapshots_wait_for_the_floor_and_a_quiet_stream_publishes_at_once() -> None:
    """`snapshot_every_steps=1` publishes after every step, unless `snapshot_min_interval_ms` has not
    passed since the last snapshot; `flush` (the stream went quiet) publishes all the same."""
    rng = np.random.default_rng(0)
    recs = [Record(0, i, Sample(x=rng.random(4).astype(np.float32), y=i % 2), b"") for i in range(320)]
    versions = {}
    for floor in (0, 600_000):
        learner = _learner(
            "model.batch_size=32",
            "learner.snapshot_every_steps=1",
            f"learner.snapshot_min_interval_ms={floor}",
            "boundaries.new_class=false",
        )
        learner.process(recs)
        versions[floor] = learner.version
        assert learner.steps >= 9
        learner.flush()
        assert learner.holder.get() is not None and learner.holder.get().version == learner.version  # type: ignore[union-attr]
        assert learner._steps_since_publish == 0  # everything learned is served
    assert versions[0] >= 9  # one snapshot per step
    assert versions[600_000] <= 1  # at most the first task's boundary snapshot


def test_processed_offsets_are_reported_once_per_partition_and_step() -> None:
    """Marks are coalesced per step (one call per partition), yet cover exactly what was processed."""
    calls: list[tuple[int, int]] = []
    config = load_config(
        None, ["model.hidden=[8]", "checkpoint.enabled=false", "evaluation.holdout_fraction=0"], env={}
    )
    learner = Learner(
        config, SnapshotHolder(), Metrics(), LearnerOutputs(processed=lambda p, o: calls.append((p, o)))
    )
    recs = [Record(i % 2, i // 2, Sample(x=np.ones(4, np.float32), y=0), b"") for i in range(64)]
    recs.insert(10, Record(2, 0, None, b""))  # dead-lettered by the source, in between
    learner.process(recs)
    learner.flush()
    assert learner.learned == 64
    assert learner.offsets == {0: 32, 1: 32, 2: 1}
    assert len(calls) <= 3 * learner.steps
    assert {p: max(o for q, o in calls if q == p) for p, _ in calls} == {0: 31, 1: 31, 2: 0}


def test_background_checkpoints_hold_the_state_at_capture_and_commit_after_the_write(tmp_path: Path) -> None:
    """Scheduled checkpoints are written on a writer thread: each file holds exactly the state when
    it was captured (learning went on meanwhile), and `on_checkpoint` follows the finished write."""
    from stream_cl.store.checkpoints import CheckpointStore, read_checkpoint

    stream = load_stream("split-digits", seed=0)
    config = load_config(
        None,
        [
            "model.hidden=[32]",
            "evaluation.holdout_fraction=0",
            "checkpoint.every_s=0",
            "checkpoint.keep=100",
            "checkpoint.min_interval_s=0",
        ],
        env={},
    )
    assert config.checkpoint.background and config.checkpoint.at_boundary
    store = CheckpointStore(tmp_path, keep=100)
    committed: list[dict[int, int]] = []
    learner = Learner(
        config, SnapshotHolder(), Metrics(), LearnerOutputs(checkpointed=committed.append), checkpoints=store
    )
    for chunk in stream_records(stream, chunk=50):
        learner.process(chunk)
    assert learner.checkpoint()  # waits for the write in flight, then writes the rest in line
    files = sorted(tmp_path.glob("ckpt-*"))
    states = [read_checkpoint(f) for f in files]
    learned = [s["learned"] for s in states]
    # Boundary checkpoints were written in the background while learning went on (one write at a
    # time: boundaries that come while one is in flight share the next), then the final one.
    assert len(files) >= 2 and learned[0] < stream.n_train
    assert learned == sorted(learned) and learned[-1] == learner.learned == stream.n_train
    for s in states:  # each is consistent: its offsets cover exactly what it had learned
        assert s["offsets"] == {0: s["learned"]}
    assert committed == [s["offsets"] for s in states]


def test_boundaries_closer_than_min_interval_share_one_checkpoint_written_when_the_stream_goes_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`checkpoint.min_interval_s` bounds scheduled writes: boundaries that come faster are
    coalesced into one later write, and a request still pending when the stream goes quiet is
    written by `flush` without waiting for another record."""
    import time

    from stream_cl.store.checkpoints import CheckpointStore, read_checkpoint

    stream = load_stream("split-digits", seed=0)  # 5 tasks: 4 boundaries that ask for a checkpoint

    def run(min_interval_s: float) -> tuple[Learner, list[Path]]:
        store = CheckpointStore(tmp_path / str(min_interval_s), keep=100)
        config = load_config(
            None,
            [
                "model.hidden=[32]",
                "strategy.name=finetune",
                "strategy.head=random",
                "evaluation.holdout_fraction=0",
                "checkpoint.every_s=0",
                "checkpoint.every_samples=0",
                "checkpoint.background=false",
                f"checkpoint.min_interval_s={min_interval_s}",
            ],
            env={},
        )
        learner = Learner(config, SnapshotHolder(), Metrics(), checkpoints=store)
        for chunk in stream_records(stream, chunk=50):
            learner.process(chunk)
        return learner, sorted(store.dir.glob("ckpt-*"))

    _, every = run(0)
    assert len(every) == 4  # no floor: one per boundary
    with monkeypatch.context() as m:
        m.setattr(time, "monotonic", lambda: 5.0)  # a machine booted 5 s ago: the first write still goes
        learner, files = run(3600)
        assert len(files) == 1  # the first boundary's; the other three wait for the interval
        learner.flush()
        assert len(sorted(learner.checkpoints.dir.glob("ckpt-*"))) == 1  # still inside the interval

    learner, files = run(1.0)
    written = len(files)
    assert 1 <= written < 4  # the stream takes well under 3 s here
    time.sleep(1.1)
    learner.flush()  # quiet stream: the pending boundary request is written now
    files = sorted(learner.checkpoints.dir.glob("ckpt-*"))
    assert len(files) == written + 1
    assert read_checkpoint(files[-1])["learned"] == learner.learned == stream.n_train


def test_a_failed_background_write_is_counted_and_retried(tmp_path: Path) -> None:
    """A background write that fails is counted, logged and retried; learning goes on."""
    from stream_cl.store.checkpoints import CheckpointStore

    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    config = load_config(
        None,
        [
            "model.hidden=[8]",
            "evaluation.holdout_fraction=0",
            "checkpoint.every_s=0",
            "checkpoint.every_samples=32",
        ],
        env={},
    )
    learner = Learner(config, SnapshotHolder(), Metrics(), checkpoints=CheckpointStore(blocked / "sub"))
    recs = [Record(0, i, Sample(x=np.ones(4, np.float32), y=i % 2), b"") for i in range(200)]
    for i in range(0, 200, 40):
        learner.process(recs[i : i + 40])
    learner.flush()
    assert not learner.checkpoint()
    assert learner.learned == 200
    assert learner.metrics.sample_value("stream_cl_checkpoint_failures_total") >= 2


def _fields(rec: Record) -> tuple[object, ...]:
    s = rec.sample
    sample = None if s is None else (s.x.tolist(), s.y, s.task, s.id, s.ts, s.shape)
    return (rec.partition, rec.offset, rec.key, bytes(rec.raw) if s is not None else b"", sample)


def test_a_chunk_holds_its_records_and_a_selection_shares_its_blocks() -> None:
    """What the source hands the learner: columns over one x block and one bytes block; the records
    come back out field for field (dead-lettered ones without a sample), in any selection."""
    from stream_cl.ingest.chunk import Chunk

    records = [
        Record(0, 5, Sample(np.arange(4, dtype=np.float32), 1, "t", 7, 1.5, (2, 2)), b"raw-a", b"k1"),
        Record(1, 9, None, b"", b"k2"),  # dead-lettered by the source
        Record(0, 6, Sample(np.full(3, 0.5, np.float32), "cat"), b"raw-bb"),
        Record(2, 0, Sample(np.ones(4, np.float32)), memoryview(b"raw-ccc"), None),
    ]
    chunk = Chunk.of(records)
    assert len(chunk) == 4 and chunk.xs.dtype == np.float32 and chunk.xs.size == 11
    assert [_fields(r) for r in chunk.records()] == [_fields(r) for r in records]
    picked = chunk.select([3, 0])
    assert picked.xs is chunk.xs
    assert [_fields(r) for r in picked.records()] == [_fields(records[3]), _fields(records[0])]


def test_the_pending_tail_of_a_task_is_learned_as_that_task() -> None:
    """A sample of the next task opens its boundary before the old task's partial batch is learned;
    that batch is still the old task's (it was learned as the new task's, and `interval` then
    switched slots inside `learn` and never froze the ending task: issue 29)."""
    learner = _learner("model.batch_size=8", "strategy.name=finetune")
    rng = np.random.default_rng(0)
    tasks = [0] * 11 + [1] * 5  # task 0 ends with 3 samples pending
    records = [
        Record(0, i, Sample(x=rng.random(4, np.float32), y=2 * t + i % 2, task=t), b"")
        for i, t in enumerate(tasks)
    ]
    learner.process(records[:1])
    strategy = learner.strategy
    assert strategy is not None
    steps: list[tuple[int, int]] = []
    learn = strategy.learn

    def recorded(batch: Batch) -> StepResult:
        steps.append((batch.task, len(batch.y)))
        return learn(batch)

    strategy.learn = recorded  # type: ignore[method-assign]
    learner.process(records[1:])
    learner.flush()
    assert steps == [(0, 8), (0, 3), (1, 5)]
