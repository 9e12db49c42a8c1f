"""Stream shapes over the built-in streams: each shape's property measured on the samples as sent,
determinism under a seed, the names that select them, and `stream-cl produce` of a shaped stream
into the real embedded broker."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_cl.cli import main
from stream_cl.ingest.codec import decode_sample
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.producer import consume_all
from stream_cl.tools.streams import BenchmarkStream, load_stream


def sent_labels(stream: BenchmarkStream) -> np.ndarray:
    """The dataset label of every sample as sent (labeled or not)."""
    order = stream.order
    return np.array([int(stream.tasks[t].train_y[r]) for t, r in zip(order.task, order.row, strict=True)])


@pytest.mark.parametrize(
    "name",
    [
        "split-digits:recurring",
        "split-digits:gradual",
        "split-digits:imbalance",
        "split-digits:label-free",
        "split-digits:long:tasks=21",
        "split-digits:recurring:gradual:width=100:label-free:fraction=0.3",
    ],
)
def test_a_shaped_stream_is_the_same_under_a_seed_and_another_under_another(name: str) -> None:
    """Name and seed fix every sample: its input, label, task and whether it is labeled."""

    def sent(seed: int) -> list[tuple[bytes, int | None, int]]:
        return [(s.x.tobytes(), s.y, s.task) for s in load_stream(name, seed=seed).samples()]

    assert sent(0) == sent(0)
    assert sent(0) != sent(1)


def test_recurring_visits_come_back_with_their_classes_and_task_id() -> None:
    """5 tasks then 3 returns (8 visits): never to the task just left, the same id and classes, each
    sample sent once."""
    stream = load_stream("split-mnist:recurring", seed=0)
    segments = stream.order.segments
    visits = [s.task for s in segments]
    assert len(visits) == 8 and visits[:5] == [0, 1, 2, 3, 4]
    assert all(a != b for a, b in zip(visits, visits[1:], strict=False))
    labels = sent_labels(stream)
    ends = [s.start for s in segments[1:]] + [stream.n_train]
    for segment, end in zip(segments, ends, strict=True):
        ids = {s.task_id for s in stream.samples() if segment.start <= s.index < end}
        assert ids == {stream.tasks[segment.task].task_id}
        assert set(labels[segment.start : end]) == set(stream.tasks[segment.task].classes)
    pairs = set(zip(stream.order.task.tolist(), stream.order.row.tolist(), strict=True))
    assert len(pairs) == stream.n_train == load_stream("split-mnist").n_train


@pytest.mark.parametrize("width", [100, 400])
def test_gradual_mixes_the_next_task_in_over_the_width_with_a_rising_share(width: int) -> None:
    stream = load_stream(f"split-mnist:gradual:width={width}", seed=0)
    tasks = stream.order.task
    for previous, segment in zip(stream.order.segments, stream.order.segments[1:], strict=False):
        new = np.flatnonzero(tasks == segment.task)
        old = np.flatnonzero(tasks == previous.task)
        # the mixing stays within the width around the boundary, and really mixes
        assert segment.start - width // 2 <= new.min() == segment.first < segment.start
        assert segment.start < old.max() < segment.start + width // 2
        window = tasks[segment.start - width // 2 : segment.start + width // 2] == segment.task
        quarter = width // 4
        assert window[:quarter].mean() < 0.3 and window[-quarter:].mean() > 0.7
        assert 0.35 < window.mean() < 0.65


def test_imbalance_spans_ten_times_within_and_across_tasks() -> None:
    stream = load_stream("split-mnist:imbalance", seed=0)
    labels, tasks = sent_labels(stream), stream.order.task
    sizes = np.bincount(tasks)
    assert 9 <= sizes.max() / sizes.min() <= 11
    for t in range(len(stream.tasks)):
        counts = np.unique(labels[tasks == t], return_counts=True)[1]
        assert 8 <= counts.max() / counts.min() <= 12
    assert load_stream("split-mnist:imbalance:ratio=1").n_train == load_stream("split-mnist").n_train


def test_label_free_stretches_hold_the_asked_fraction() -> None:
    """Unlabeled stretches of about `stretch` samples, `fraction` of the stream; labeled first."""
    for fraction in (0.3, 0.5):
        stream = load_stream(f"split-mnist:label-free:fraction={fraction}:stretch=100", seed=0)
        labeled = stream.order.labeled
        assert labeled[0] and abs((1 - labeled.mean()) - fraction) < 0.05
        starts = np.flatnonzero(np.diff(labeled.astype(int)) == -1) + 1
        ends = np.flatnonzero(np.diff(labeled.astype(int)) == 1) + 1
        runs = ends - starts[: len(ends)]
        assert runs.min() >= 75 and runs.max() <= 125
        assert {s.y for s in stream.samples() if not labeled[s.index]} == {None}


def test_long_gives_twenty_and_more_tasks_of_new_inputs() -> None:
    stream = load_stream("permuted-mnist:long:tasks=25:per_task=50", seed=0)
    assert len(stream.tasks) == 25 and len(stream.order.segments) == 25 and stream.n_train == 25 * 50
    # task 10 is task 0's data through the second cycle's permutation: other inputs, same digits
    first, again = stream.tasks[0], stream.tasks[10]
    assert not np.array_equal(first.train_x, again.train_x)
    assert np.array_equal(np.sort(first.train_x, axis=1), np.sort(again.train_x, axis=1))
    split = load_stream("split-digits:long", seed=0, scenario="class")
    assert (
        len(split.tasks) == 20 and split.tasks[5].classes == (10, 11) and split.tasks[19].classes == (38, 39)
    )
    assert load_stream("split-digits:long", scenario="domain").tasks[5].classes == (0, 1)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("split-mnist:wavy", "unknown shape 'wavy'"),
        ("split-mnist:gradual:height=3", "gradual takes width, not 'height'"),
        ("split-mnist:gradual:width=wide", "gradual:width expects int"),
        ("split-mnist:width=3", "before any shape"),
        ("split-mnist:gradual:recurring", "'recurring' must come before 'gradual'"),
        ("split-mnist:recurring:long", "long: must be the first shape"),
        ("split-mnist:label-free:long", "long: must be the first shape"),
        ("split-cifar:gradual", "unknown stream 'split-cifar'"),
    ],
)
def test_bad_stream_names_say_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_stream(name)


def test_produce_sends_a_shaped_stream_into_the_broker(
    broker: EmbeddedBroker, topic: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream-cl produce --stream NAME:SHAPES`: every sample in its order, unlabeled ones without `y`,
    each with its task id."""
    name = "split-digits:recurring:gradual:width=100:label-free"
    argv = ["produce", "--stream", name, "--topic", topic, "--bootstrap", broker.bootstrap_servers]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["produced"] == load_stream(name).n_train
    stream = load_stream(name)
    sent = [decode_sample(r.value) for r in consume_all(broker.bootstrap_servers, topic)]
    assert len(sent) == stream.n_train
    expected = list(stream.samples())
    assert [(s.y, s.task, s.id) for s in sent] == [(e.y, e.task_id, e.index) for e in expected]
    assert sum(s.y is None for s in sent) == stream.n_train - stream.n_labeled > 0
    np.testing.assert_array_equal(sent[-1].x, expected[-1].x)
