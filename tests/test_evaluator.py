"""Live evaluation: held-out reservoirs, the accuracy matrix, forgetting, BWT and the stability gap."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from stream_cl.bench.offline import stream_records
from stream_cl.config import EvaluationConfig, load_config
from stream_cl.evaluate.evaluator import Evaluator
from stream_cl.evaluate.holdout import Reservoir
from stream_cl.learn.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.tools.datasets import load_stream


def test_reservoir_is_bounded_and_uniform() -> None:
    """A reservoir never exceeds its capacity and keeps early and late items alike."""
    rng = random.Random(0)
    counts = np.zeros(1000)
    for _ in range(300):
        r = Reservoir(capacity=50)
        for i in range(1000):
            r.add(np.array([i], np.float32), i, rng)
        assert len(r.xs) == 50 and r.seen == 1000
        assert r.xs[:, 0].tolist() == [float(y) for y in r.ys]  # each input stays with its label
        counts[[int(y) for y in r.ys]] += 1
    first, last = counts[:500].sum(), counts[500:].sum()
    assert abs(first - last) / (first + last) < 0.05


def test_a_shared_reservoir_is_copied_on_its_next_write_and_never_before() -> None:
    """`share` hands a reader the reservoir's own array; a later `add` must not change what the
    reader holds, and a reservoir that is not written again is never copied."""
    rng = random.Random(0)
    r = Reservoir(capacity=4)
    for i in range(4):
        r.add(np.full(3, i, np.float32), i, rng)
    xs, ys = r.share()
    again, _ = r.share()
    assert np.shares_memory(xs, again)  # no write in between: no copy
    held = xs.copy()
    for i in range(4, 40):
        r.add(np.full(3, i, np.float32), i, rng)
    assert np.array_equal(xs, held) and ys == [0, 1, 2, 3]  # the reader's view never changed
    assert not np.shares_memory(xs, r.xs) and r.ys != ys  # the reservoir moved on in its own copy
    assert r.xs[:, 0].tolist() == [float(y) for y in r.ys]


def _evaluator() -> Evaluator:
    return Evaluator(EvaluationConfig(), SnapshotHolder(), Metrics(), task_id_of=lambda i: f"t{i}")


def test_forgetting_and_bwt_follow_their_definitions() -> None:
    """Max-based and first-vs-last forgetting, averages and BWT match hand-computed values on a known R."""
    ev = _evaluator()
    ev.final_rows = {0: {0: 0.9}, 1: {0: 0.7, 1: 0.8}}
    ev.current = {0: 0.5, 1: 0.6, 2: 0.95}
    ev.current_task = 2
    f = ev.figures()
    assert f["forgetting"] == pytest.approx({0: 0.9 - 0.5, 1: 0.8 - 0.6})
    assert f["forgetting_first_last"] == pytest.approx({0: 0.9 - 0.5, 1: 0.8 - 0.6})
    assert f["average_accuracy"] == pytest.approx((0.5 + 0.6 + 0.95) / 3)
    assert f["average_forgetting"] == pytest.approx((0.4 + 0.2) / 2)
    assert f["backward_transfer"] == pytest.approx(((0.5 - 0.9) + (0.6 - 0.8)) / 2)
    ev.final_rows = {0: {0: 0.6}, 1: {0: 0.9, 1: 0.8}}  # task 0 improved during task 1, then dropped
    f = ev.figures()
    assert f["forgetting"][0] == pytest.approx(0.9 - 0.5)  # max-based sees the best earlier value
    assert f["forgetting_first_last"][0] == pytest.approx(0.6 - 0.5)


@pytest.fixture(scope="module")
def forced_forgetting() -> Learner:
    """finetune on class-incremental split-mnist with 20% held out, evaluated as the daemon would."""
    config = load_config(
        None,
        [
            "strategy.name=finetune",
            "strategy.head=random",
            "model.hidden=[64]",
            "checkpoint.enabled=false",
            "evaluation.holdout_fraction=0.2",
            "evaluation.every_samples=0",
        ],
        env={},
    )
    learner = Learner(config, SnapshotHolder(), Metrics())
    assert learner.evaluator is not None
    for chunk in stream_records(load_stream("split-mnist", seed=0), chunk=200):
        learner.process(chunk)
        learner.flush()
        learner.evaluator.run_once()
    return learner


def test_held_out_samples_are_never_learned(forced_forgetting: Learner) -> None:
    """learned + held_out equals the stream; held-out ones sit in bounded per-task reservoirs."""
    m = forced_forgetting.metrics
    learned = m.sample_value("stream_cl_samples_total", {"outcome": "learned"})
    held = m.sample_value("stream_cl_samples_total", {"outcome": "held_out"})
    assert learned == forced_forgetting.learned
    assert held is not None and 0.12 * 4000 < held < 0.28 * 4000
    assert learned + held == 4000
    usage = forced_forgetting.evaluator.memory_usage()  # type: ignore[union-attr]
    assert len(usage) == 5 and all(n <= cap for n, cap in usage.values())


def test_finetune_forgetting_rises_on_split_mnist(forced_forgetting: Learner) -> None:
    """Class-incremental finetune forgets: old tasks' forgetting gauges are high, the last task's accuracy is high."""
    m = forced_forgetting.metrics
    assert m.sample_value("stream_cl_task_accuracy", {"task": "4"}) > 0.8  # type: ignore[operator]
    assert m.sample_value("stream_cl_task_forgetting", {"task": "0"}) > 0.5  # type: ignore[operator]
    assert m.sample_value("stream_cl_average_forgetting") > 0.5  # type: ignore[operator]
    assert m.sample_value("stream_cl_backward_transfer") < -0.5  # type: ignore[operator]
    assert m.sample_value("stream_cl_stability_gap") > 0.3  # type: ignore[operator]
    assert m.sample_value("stream_cl_accuracy_matrix", {"after_task": "0", "task": "0"}) > 0.9  # type: ignore[operator]
    summary = forced_forgetting.evaluator.summary()  # type: ignore[union-attr]
    assert summary["tasks"] == [0, 1, 2, 3, 4]
    assert all(summary["matrix"][i][i] is not None for i in range(5))
    assert [b["task"] for b in summary["boundaries"]] == [0, 1, 2, 3, 4]


def test_evaluator_state_round_trips(forced_forgetting: Learner) -> None:
    """Reservoirs, R and the RNG survive a checkpoint: the restored evaluator scores identically."""
    ev = forced_forgetting.evaluator
    assert ev is not None
    fresh = Evaluator(ev.config, forced_forgetting.holder, Metrics(), task_id_of=ev.task_id_of)
    fresh.load_state_dict(ev.state_dict())
    assert fresh.evaluate() == ev.evaluate()
    assert fresh.figures() == ev.figures()
    assert [fresh.hold_out() for _ in range(50)] == [ev.hold_out() for _ in range(50)]


@pytest.mark.parametrize("task_hint", [False, True], ids=["no-hint", "task-hint"])
def test_batched_scoring_equals_scoring_each_reservoir_alone(
    forced_forgetting: Learner, task_hint: bool
) -> None:
    """The evaluator scores all reservoirs in one forward pass and compares label indices; each
    task's figure must equal `accuracy` on that reservoir alone, also on an older snapshot whose
    label map lacks later classes (those samples count as wrong), and after a reservoir changes."""
    import dataclasses

    from stream_cl.evaluate.scoring import accuracy

    ev = forced_forgetting.evaluator
    assert ev is not None
    config = dataclasses.replace(ev.config, task_hint=task_hint)
    fresh = Evaluator(config, forced_forgetting.holder, Metrics(), task_id_of=ev.task_id_of)
    fresh.load_state_dict(ev.state_dict())
    latest = forced_forgetting.holder.get()
    assert latest is not None
    older = dataclasses.replace(latest, version=-1, labels=latest.labels[:4], tasks=latest.tasks[:2])

    def direct(snapshot: object) -> dict[int, float]:
        out = {}
        for t, r in fresh.reservoirs.items():
            hint = ev.task_id_of(t) if task_hint and ev.task_id_of(t) in snapshot.tasks else None  # type: ignore[attr-defined]
            out[t] = accuracy(snapshot, r.xs.copy(), list(r.ys), task=hint)  # type: ignore[arg-type]
        return out

    for snapshot in (latest, older, latest):
        assert fresh.evaluate(snapshot) == direct(snapshot)
    assert direct(older)[4] == 0.0 < direct(latest)[4]  # its labels are not in the older map
    fresh.add(
        4, fresh.reservoirs[0].xs[0].copy(), fresh.reservoirs[0].ys[0]
    )  # task 4 now holds a task-0 sample
    assert fresh.evaluate(latest) == direct(latest)


def test_stability_gap_is_seen_with_the_evaluator_thread_and_defaults() -> None:
    """With default cadences and the evaluator on its own thread, finetune's post-boundary drop is measured.

    Regression: snapshots were republished only every 640 samples, so every evaluation inside the
    500-sample window scored the boundary model itself and the gap read 0.
    """
    import time

    config = load_config(
        None,
        ["strategy.name=finetune", "strategy.head=random", "checkpoint.enabled=false", "log.level=warning"],
        env={},
    )
    learner = Learner(config, SnapshotHolder(), Metrics())
    assert learner.evaluator is not None
    learner.evaluator.start()
    try:
        for chunk in stream_records(load_stream("split-mnist", seed=0), chunk=2000):
            learner.process(chunk)
        learner.flush()
        deadline = time.monotonic() + 30
        while learner.evaluator.stability_gap == 0.0 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        learner.evaluator.stop()
    assert learner.evaluator.stability_gap > 0.2


def test_the_cpu_budget_spaces_scorings_and_boundary_rows(
    forced_forgetting: Learner,
) -> None:
    """With `max_cpu_share`, requests for a scoring that come while the evaluator rests are served
    by one later scoring of the latest snapshot. A boundary's row waits too, on its own snapshot; a
    later end of the same task supersedes it; past `MAX_WAITING_ROWS` the oldest is scored at once,
    and `stop` scores the rest."""
    import dataclasses
    import time

    from stream_cl.evaluate.evaluator import MAX_WAITING_ROWS

    ev = forced_forgetting.evaluator
    assert ev is not None
    snapshot = forced_forgetting.holder.get()
    assert snapshot is not None
    blank = dataclasses.replace(snapshot, version=snapshot.version + 1, labels=())  # scores 0.0
    assert all(a == 0.0 for a in ev.evaluate(blank).values())
    assert any(a > 0.5 for a in ev.evaluate(snapshot).values())

    def evaluator(share: float) -> Evaluator:
        config = dataclasses.replace(ev.config, max_cpu_share=share, every_samples=1, every_s=0.0)
        # tasks 100+ stand for a stream of new tasks: their ids are their indices
        task_id_of = lambda i: ev.task_id_of(i) if i < 100 else i  # noqa: E731
        fresh = Evaluator(config, forced_forgetting.holder, Metrics(), task_id_of=task_id_of)
        fresh.load_state_dict(ev.state_dict())
        fresh.start()
        return fresh

    def wait_for(condition: Any, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    unlimited = evaluator(0.0)
    try:
        for i in range(1, 6):  # each request is served before the next: five scorings
            unlimited.on_learned(i)
            assert wait_for(lambda i=i: unlimited.evaluations == i)
        del unlimited.final_rows[3]
        unlimited.on_boundary(3, 4, snapshot, "explicit")  # no budget: the row is scored at once
        assert wait_for(lambda: 3 in unlimited.final_rows)
    finally:
        unlimited.stop()

    # A share so small that the rest after one scoring (its CPU time x 1e6) outlasts the test
    limited = evaluator(1e-6)
    try:
        limited.on_learned(1)
        assert wait_for(lambda: limited.evaluations == 1)
        assert limited._resume_at > time.monotonic() + 60
        for i in range(2, 6):
            limited.on_learned(i)
        del limited.final_rows[3]
        limited.on_boundary(3, 4, blank, "explicit")  # a task ends while the evaluator rests
        time.sleep(0.2)
        assert 3 not in limited.final_rows and limited.evaluations == 1  # the row and requests wait
        limited.on_boundary(3, 4, snapshot, "explicit")  # the same task ends again: supersedes it
        for task in range(100, 100 + MAX_WAITING_ROWS - 1):  # as many waiting rows as allowed
            limited.on_boundary(task, task + 1, blank, "explicit")
        time.sleep(0.2)
        assert 3 not in limited.final_rows  # one row for task 3 waits, not two
        # one more than allowed: the oldest (task 3's, on `snapshot`) is scored at once
        limited.on_boundary(99 + MAX_WAITING_ROWS, 100 + MAX_WAITING_ROWS, blank, "explicit")
        assert wait_for(lambda: 3 in limited.final_rows)
        assert limited.final_rows[3] == limited.evaluate(snapshot)
        time.sleep(0.2)
        assert not any(t in limited.final_rows for t in range(100, 100 + MAX_WAITING_ROWS))  # wait
        limited._resume_at = time.monotonic()  # the rest is over: every row, then one scoring
        limited._wake.set()
        assert wait_for(lambda: limited.evaluations == 2)
        assert all(t in limited.final_rows for t in range(100, 100 + MAX_WAITING_ROWS))
        time.sleep(0.2)
        assert limited.evaluations == 2
        limited._resume_at = time.monotonic() + 3600  # resting again: `stop` scores what waits
        limited.on_boundary(200, 201, blank, "explicit")
        time.sleep(0.1)
        assert 200 not in limited.final_rows
    finally:
        limited.stop()
    assert 200 in limited.final_rows
