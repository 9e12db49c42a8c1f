"""`stream-cl bench throughput`'s CPU accounting (the bench itself runs outside the suite)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from stream_cl.bench.throughput import CpuMeter, format_throughput


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_meter_charges_a_busy_thread_and_not_an_idle_one() -> None:
    stop = threading.Event()

    def spin() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        stop.wait()

    busy = threading.Thread(target=spin, name="stream-cl-busy")
    idle = threading.Thread(target=stop.wait, name="stream-cl-idle")
    busy.start()
    idle.start()
    try:
        meter = CpuMeter([busy, idle], {"none": None})
        time.sleep(0.6)
        cpu = meter.seconds()
    finally:
        stop.set()
        busy.join()
        idle.join()
    assert set(cpu) == {"stream-cl-busy", "stream-cl-idle"}
    assert cpu["stream-cl-busy"] >= 0.1
    assert cpu["stream-cl-idle"] <= 0.02


def test_the_report_shows_both_fetch_modes_and_the_breakdown() -> None:
    r = {
        "stream": "split-mnist",
        "samples": 20000,
        "strategy": "finetune",
        "batch_size": 32,
        "raw_consume_decode_samples_per_s": 50000.0,
        "raw_train_samples_per_s": 16500.0,
        "raw_stream_samples_per_s": 16000.0,
        "fetch_in_subprocess": False,
        "daemon_in_process_fetch_samples_per_s": 9000.0,
        "daemon_subprocess_fetch_samples_per_s": 9600.0,
        "daemon_in_process_fetch_vs_slower_limit": 9000 / 16000,
        "daemon_subprocess_fetch_vs_slower_limit": 9600 / 16000,
        "daemon_vs_learn_only_step": 9000 / 16500,
        "daemon_learned_samples_per_s": 8100.0,
        "daemon_learned_vs_slower_limit": 8100 / 16000,
        "raw_train_us_per_sample": 62.5,
        "raw_stream_us_per_sample": 60.6,
        "cpu_us_per_sample": {
            "in_process_fetch": {"stream-cl-learner": 80.0, "stream-cl-source": 22.0},
            "subprocess_fetch": {"stream-cl-learner": 78.0, "fetcher": 25.0},
        },
        "cores_busy": {"in_process_fetch": 1.2, "subprocess_fetch": 1.4},
        "goal_met": False,
        "rounds": 3,
        "per_round_vs_slower_limit": {"in_process": [0.5, 0.56, 0.61], "subprocess": [0.6, 0.58, 0.66]},
    }
    text = format_throughput(r)
    assert "median of 3 interleaved rounds" in text
    assert "in-process fetch: 0.50x, 0.56x, 0.61x" in text and "subprocess fetch: 0.60x, 0.58x, 0.66x" in text
    assert "0.56x slower limit" in text and "0.60x slower limit" in text and "NOT met" in text
    learner = next(line for line in text.splitlines() if "stream-cl-learner" in line).split()
    assert learner[-2:] == ["80.0", "78.0"]
    fetcher = next(line for line in text.splitlines() if "fetcher" in line.split()).split()
    assert fetcher[-2:] == ["0.0", "25.0"]  # no fetcher process in the in-process run
    assert "raw train step 62.5 us, strategy on the stream 60.6 us" in text
    assert "learn-only step instead the daemon is at 0.55x" in text
    assert "the daemon (in-process fetch) learns 8100 samples/s, 0.51x the slower limit" in text


def test_the_stream_run_learns_every_sample_with_a_boundary_at_each_task_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The train limit does the daemon's strategy work: every task in order, each repeat, each class once."""
    from stream_cl.bench.throughput import raw_stream_rate
    from stream_cl.config import load_config
    from stream_cl.datasets import load_stream
    from stream_cl.strategies import Boundary, Strategy
    from stream_cl.strategies.base import Batch

    boundaries: list[Boundary] = []
    added: list[tuple[int, ...]] = []
    learned: list[int] = []
    on_boundary, add_classes, learn = Strategy.on_boundary, Strategy.add_classes, Strategy.learn

    def spy_boundary(self: Strategy, event: Boundary) -> None:
        boundaries.append(event)
        on_boundary(self, event)

    def spy_add(self: Strategy, class_ids: list[int], task: int) -> None:
        added.append(tuple(class_ids))
        add_classes(self, class_ids, task)

    monkeypatch.setattr(Strategy, "on_boundary", spy_boundary)
    monkeypatch.setattr(Strategy, "add_classes", spy_add)
    from stream_cl.strategies.finetune import Finetune

    def spy_learn(self: Finetune, batch: Batch) -> object:
        learned.append(len(batch.y))
        return learn(self, batch)

    monkeypatch.setattr(Finetune, "learn", spy_learn)
    cfg = load_config(None, ["strategy.name=finetune", "strategy.head=random"], env={})
    stream = load_stream("split-digits")
    rate = raw_stream_rate(cfg, "split-digits", repeats=2)
    n_tasks = len(stream.tasks)
    assert rate > 0
    assert [(b.previous_task, b.task, b.recurring) for b in boundaries] == [
        (None if i == 0 else (i - 1) % n_tasks, i % n_tasks, i >= n_tasks) for i in range(2 * n_tasks)
    ]
    assert sorted(c for group in added for c in group) == sorted(
        {int(y) for t in stream.tasks for y in t.train_y}
    )
    assert sum(learned) == 2 * stream.n_train
