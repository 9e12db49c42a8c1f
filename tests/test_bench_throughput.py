"""`stream-cl bench throughput`'s CPU accounting (the bench itself runs outside the suite)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

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
    assert "0.56x slower limit" in text and "0.60x slower limit" in text
    assert "learned samples/s >= 0.7 x slower limit: NOT met (0.51x)" in text
    learner = next(line for line in text.splitlines() if "stream-cl-learner" in line).split()
    assert learner[-2:] == ["80.0", "78.0"]
    fetcher = next(line for line in text.splitlines() if "fetcher" in line.split()).split()
    assert fetcher[-2:] == ["0.0", "25.0"]  # no fetcher process in the in-process run
    assert "raw train step 62.5 us, strategy replaying the daemon's calls 60.6 us" in text
    assert "learn-only step instead the daemon is at 0.55x" in text
    assert "the daemon (in-process fetch) learns 8100 samples/s, 0.51x the slower limit" in text


def test_the_train_limit_replays_the_daemons_own_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The train limit does the daemon's strategy work: the calls a learner made (here fed the
    stream in-process, held-out samples skipped) are recorded, batches copied into a store, and a
    fresh strategy replaying them makes the same calls and ends with the same weights."""
    import torch

    from stream_cl import strategies
    from stream_cl.bench.offline import stream_records
    from stream_cl.bench.throughput import BatchStore, record_calls, replay_rate
    from stream_cl.config import load_config
    from stream_cl.learn.learner import Learner
    from stream_cl.metrics import Metrics
    from stream_cl.serve.snapshot import SnapshotHolder
    from stream_cl.strategies import from_config
    from stream_cl.tools.datasets import load_stream

    cfg = load_config(
        None, ["strategy.name=finetune", "strategy.head=random", "checkpoint.enabled=false"], env={}
    )
    stream = load_stream("split-digits")
    shape = tuple(stream.input_shape)
    calls: list[Any] = []
    learner = Learner(cfg, SnapshotHolder(), Metrics())
    strategy = from_config(cfg, shape)
    store = BatchStore(stream.n_train, shape)
    record_calls(strategy, calls, store)
    learner.strategy, learner.input_shape = strategy, shape
    for chunk in stream_records(stream):
        learner.process(chunk)
    learner.flush()

    names = [name for name, _, _ in calls]
    n_tasks = len(stream.tasks)
    assert names.count("on_boundary") == n_tasks
    assert [args[0].task for name, args, _ in calls if name == "on_boundary"] == list(range(n_tasks))
    added = sorted(c for name, args, _ in calls if name == "add_classes" for c in args[0])
    assert added == sorted({int(y) for t in stream.tasks for y in t.train_y})
    learned = sum(len(args[0].y) for name, args, _ in calls if name == "learn")
    assert learned == learner.learned and 0 < learner.held_out < 0.2 * stream.n_train
    assert learned + learner.held_out == stream.n_train
    assert store.used == learned  # every batch was copied into the store, in order
    kept = [args[0].x for name, args, _ in calls if name == "learn"]
    assert all(x.untyped_storage().data_ptr() == store.block.untyped_storage().data_ptr() for x in kept)
    assert torch.equal(torch.cat(kept), store.block[:learned])

    replayed: list[Any] = []
    built: list[Any] = []

    def recording_from_config(config: Any, input_shape: Any) -> Any:
        fresh = from_config(config, input_shape)
        record_calls(fresh, replayed)
        built.append(fresh)
        return fresh

    monkeypatch.setattr(strategies, "from_config", recording_from_config)
    rate = replay_rate(cfg, shape, calls)
    assert rate > 0
    assert [(n, len(a)) for n, a, _ in replayed] == [(n, len(a)) for n, a, _ in calls]
    weights = zip(strategy.model.state_dict().values(), built[0].model.state_dict().values(), strict=True)
    for theirs, ours in weights:
        assert torch.equal(theirs, ours)  # the same seed and the same calls: the same weights


def test_a_batch_the_store_cannot_hold_is_kept_as_it_is() -> None:
    import torch

    from stream_cl.bench.throughput import BatchStore

    store = BatchStore(3, (2,))
    first = torch.ones(2, 2)
    kept = store.keep(first)
    assert torch.equal(kept, first) and kept.data_ptr() == store.block.data_ptr()
    too_many = torch.full((2, 2), 2.0)
    assert store.keep(too_many) is too_many  # 2 more rows do not fit in the 1 left
    other_shape = torch.zeros(1, 3)
    assert store.keep(other_shape) is other_shape
    assert store.keep(torch.full((1, 2), 3.0)).data_ptr() == store.block[2].data_ptr()
    assert store.used == 3


def test_the_throughput_bench_sets_its_own_tuning_unless_the_command_line_names_it() -> None:
    """The daemon's defaults leave pinning and the switch interval off; the bench turns both on
    for itself, and a `--set` of either key wins."""
    from stream_cl.bench.throughput_cmd import BENCH_TUNING, bench_tuning
    from stream_cl.config import Config, load_config

    tuned, shown = bench_tuning(Config(), [])
    assert shown == BENCH_TUNING
    assert tuned.learner.cpu_affinity == "auto" and tuned.learner.gil_switch_interval_us == 50
    told = ["learner.gil_switch_interval_us=0"]
    kept, shown = bench_tuning(load_config(None, told, env={}), told)
    assert kept.learner.gil_switch_interval_us == 0 and shown["learner.gil_switch_interval_us"] == 0
    assert kept.learner.cpu_affinity == "auto"


def test_compare_names_an_unknown_strategy_before_anything_runs() -> None:
    """`--compare NAME` with a strategy that does not exist is a config error naming strategy.name."""
    import argparse

    import pytest

    from stream_cl.bench.throughput_cmd import run
    from stream_cl.config import Config, ConfigError

    args = argparse.Namespace(rounds=1, set=[], compare="no-such-strategy", stream="split-mnist", repeats=1)
    with pytest.raises(ConfigError, match="strategy.name"):
        run(Config(), args)
