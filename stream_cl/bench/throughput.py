"""`stream-cl bench throughput`: the daemon against its two limits, side by side in one run.

1. raw consume+decode: kafka-python in its fastest configuration (partitions assigned directly, no
   group, large fetches, C crc32c) reading every message and decoding it with `decode_sample`;
2. raw train step: the same strategy, model and batch size fed pre-built tensors in-process,
   learning only (every class known from the start, no boundary); and the same strategy making
   exactly the calls the configured daemon's learner made on it in the same round (recorded, then
   replayed: `replay_rate`): the same samples learned (the held-out ones skipped), in the same
   batches, classes added and `on_boundary` run at the same points (a consolidating strategy
   such as eidetic prunes and retrains there);
3. the daemon end to end: broker → source thread → learner thread, counting the samples it takes
   in (learned, or held out for evaluation: `evaluation.holdout_fraction`, 1 in 10 by default;
   the learned ones alone are printed too), as configured, then once more with the other
   `kafka.fetch_in_subprocess` setting (fetch and decode in a child process, off the learner's
   GIL), so both source modes are compared in one run.

Goal: the daemon's learned samples/s (as configured) ≥ 0.7 × min(raw consume, raw strategy
replaying the daemon's calls); the ratio for samples taken in (learned + held out) is printed
beside it. The train limit includes the strategy's boundary work: it is the strategy's own, and
the daemon has to do it too; the ratio against the learn-only step is printed beside it. For
finetune the two train rates agree within this machine's noise. Group-join time is excluded from (3): the clock starts at the
first sample taken in.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
import uuid
from typing import Any

from stream_cl.config import Config

# Heavy imports (torch, kafka, the daemon) live inside the functions: building the CLI parser
# imports this module for every `stream-cl` command.

MODES = ("in_process", "subprocess")  # by kafka.fetch_in_subprocess (False, True)


def raw_consume_rate(bootstrap: str, topic: str, n: int, timeout_s: float = 120.0) -> float:
    from kafka import KafkaConsumer, TopicPartition

    from stream_cl.ingest.codec import decode_sample

    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=32 * 1024 * 1024,
        max_poll_records=10_000,
        fetch_max_wait_ms=50,
    )
    partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or {0})]
    consumer.assign(partitions)
    consumer.seek_to_beginning()
    seen = 0
    t0: float | None = None
    deadline = time.monotonic() + timeout_s
    while seen < n and time.monotonic() < deadline:
        for messages in consumer.poll(timeout_ms=500).values():
            if t0 is None:
                t0 = time.perf_counter()
            for m in messages:
                decode_sample(m.value)
            seen += len(messages)
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    return seen / elapsed if elapsed > 0 else float("nan")


def raw_train_rate(config: Config, stream_name: str, n: int) -> float:
    import numpy as np
    import torch

    from stream_cl.runtime.tuning import flush_denormals
    from stream_cl.strategies import Batch, from_config
    from stream_cl.tools.datasets import load_stream

    stream = load_stream(stream_name)
    x_all = np.concatenate([t.train_x for t in stream.tasks])
    y_all = np.concatenate([t.train_y for t in stream.tasks])
    strategy = from_config(config, stream.input_shape)
    n_classes = int(y_all.max()) + 1
    strategy.add_classes(list(range(n_classes)), 0)
    bs = config.model.batch_size
    batches = []
    for i in range(0, len(x_all) - bs + 1, bs):
        x = torch.from_numpy(x_all[i : i + bs]).reshape((bs, *stream.input_shape)).to(strategy.device)
        batches.append(Batch(x=x, y=torch.from_numpy(y_all[i : i + bs]).long().to(strategy.device), task=0))
    with flush_denormals():  # as the daemon's learner thread trains
        for b in batches[:20]:  # warm-up
            strategy.learn(b)
        steps = max(1, n // bs)
        t0 = time.perf_counter()
        for s in range(steps):
            strategy.learn(batches[s % len(batches)])
        return steps * bs / (time.perf_counter() - t0)


STRATEGY_CALLS = ("learn", "on_boundary", "add_classes", "note_task")  # what the learner asks of it


class BatchStore:
    """Memory written in full up front that recorded batches are copied into (one row per sample).

    Keeping the learner's own batch tensors alive for the replay put every new batch on fresh
    pages: ~0.5 page faults per sample on the learner thread, which costs it ~1.5 µs of CPU per
    sample (64.4 against 62.8 µs, 5 of 5 interleaved runs slower) that an unrecorded daemon does
    not pay. Copying into pages already faulted in costs a memcpy of the batch instead, and the
    learner's batch memory is freed and reused as it is when nothing records it.
    """

    def __init__(self, samples: int, input_shape: tuple[int, ...]) -> None:
        import torch

        self.block = torch.empty((samples, *input_shape)).zero_()  # zero_: fault every page in now
        self.used = 0

    def keep(self, x: Any) -> Any:
        """`x` itself where it does not fit (another device, dtype or shape, or the store is full)."""
        n = len(x)
        block = self.block
        if x.device != block.device or x.dtype != block.dtype or x.shape[1:] != block.shape[1:]:
            return x
        if self.used + n > len(block):
            return x
        kept = block[self.used : self.used + n]
        kept.copy_(x)
        self.used += n
        return kept


def record_calls(
    strategy: Any, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]], store: BatchStore | None = None
) -> None:
    """Make `strategy` write down every learning call made on it (name, args, kwargs), in order;
    with `store`, each learned batch's inputs are kept as a copy in it instead of the batch's own."""

    def recorded(name: str, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            kept = args
            if store is not None and name == "learn":
                batch = args[0]
                kept = (dataclasses.replace(batch, x=store.keep(batch.x)), *args[1:])
            calls.append((name, kept, kwargs))
            return method(*args, **kwargs)

        return call

    for name in STRATEGY_CALLS:
        setattr(strategy, name, recorded(name, getattr(strategy, name)))


def replay_rate(
    config: Config, input_shape: tuple[int, ...], calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]
) -> float:
    """Learned samples/s of a fresh strategy making `calls` (a daemon run's own) in-process.

    The daemon's learner decides what its strategy sees: which samples are held out for evaluation
    (never learned), where batches end (at each boundary, before each new class, when the stream
    goes quiet), when classes are added and `on_boundary` runs. Replaying the calls it made (the
    same batch tensors) gives the strategy exactly the daemon's work, with nothing of the daemon
    around it. That matters for a strategy whose boundary work depends on what it learned: eidetic
    prunes and retrains until a task's buffer accuracy recovers, and how much it prunes changes
    every later consolidation (the same stream, learned with and without the held-out samples, took
    9,260 and 11,483 train steps). For finetune this is the raw train step.
    """
    from stream_cl.runtime.tuning import flush_denormals
    from stream_cl.strategies import from_config

    strategy = from_config(config, input_shape)
    learned = sum(len(args[0].y) for name, args, _ in calls if name == "learn")
    with flush_denormals():  # as the daemon's learner thread trains
        t0 = time.perf_counter()
        for name, args, kwargs in calls:
            getattr(strategy, name)(*args, **kwargs)
        return learned / (time.perf_counter() - t0)


class CpuMeter:
    """CPU seconds of this process's named threads and of other processes, between two reads.

    Linux only (`/proc`); elsewhere it measures nothing. Tells where a daemon run's time goes:
    the learner thread against the raw train step, and what shares the cores with it.
    """

    def __init__(self, threads: list[Any], processes: dict[str, int | None]) -> None:
        import os

        self._paths = {t.name: f"/proc/self/task/{t.native_id}/stat" for t in threads if t.native_id}
        self._paths |= {name: f"/proc/{pid}/stat" for name, pid in processes.items() if pid}
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        out = {}
        for name, path in self._paths.items():
            try:
                with open(path) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        return out

    def seconds(self) -> dict[str, float]:
        end = self._read()
        return {name: end[name] - self._start[name] for name in end if name in self._start}


def daemon_run(
    config: Config,
    bootstrap: str,
    topic: str,
    n: int,
    timeout_s: float = 300.0,
    broker_pid: int | None = None,
    record: tuple[tuple[int, ...], list[Any]] | None = None,
) -> dict[str, Any]:
    """Samples/s the daemon takes in (learned + held out), as configured, checkpoints to a temp dir,
    with the CPU µs per sample of each daemon thread alive when the clock starts (short-lived
    checkpoint writers are not counted), of the fetcher process and of the broker.

    `record` = (input shape, a list): the daemon's strategy is made up front for that shape (as its
    learner would at the first sample) and every learning call made on it goes into the list
    (`record_calls`, batches copied into a `BatchStore` sized for `n` samples), for `replay_rate`."""
    import tempfile
    import threading

    from stream_cl.runtime.daemon import Daemon
    from stream_cl.strategies import background

    with tempfile.TemporaryDirectory() as ckpt:
        cfg = dataclasses.replace(
            config,
            kafka=dataclasses.replace(
                config.kafka, bootstrap_servers=bootstrap, topic=topic, group_id=f"bench-{uuid.uuid4()}"
            ),
            serve=dataclasses.replace(config.serve, enabled=False),
            metrics=dataclasses.replace(config.metrics, enabled=False),
            checkpoint=dataclasses.replace(config.checkpoint, dir=ckpt),
        )
        daemon = Daemon(cfg)
        learner = daemon.learner
        assert learner is not None  # the bench runs one model
        if record is not None:
            from stream_cl.strategies import from_config

            shape, calls = record
            strategy = from_config(cfg, shape)
            # room for the chunk the learner may take in past `n` before the loop below sees it
            record_calls(strategy, calls, BatchStore(n + cfg.kafka.max_poll_records, shape))
            learner.strategy, learner.input_shape = strategy, shape

        def counts() -> tuple[int, int]:
            """(taken in, learned): the learner's own counters. Collecting the Prometheus registry
            every few ms (as this loop once did) cost the daemon ~8 µs of CPU and GIL per sample."""
            stats = learner.stats()
            return int(stats["learned"] + stats["held_out"]), int(stats["learned"])

        background.start()
        daemon.start()
        try:
            deadline = time.monotonic() + timeout_s
            t0: float | None = None
            first = first_learned = 0
            meter: CpuMeter | None = None
            while time.monotonic() < deadline:
                done, learned = counts()
                if t0 is None and done > 0:
                    t0, first, first_learned = time.perf_counter(), done, learned
                    threads = [t for t in threading.enumerate() if t.name.startswith("stream-cl-")]
                    meter = CpuMeter(
                        threads, {"fetcher": getattr(daemon.source, "pid", None), "broker": broker_pid}
                    )
                if done >= n:
                    assert t0 is not None and meter is not None
                    elapsed, samples = time.perf_counter() - t0, done - first
                    cpu = meter.seconds()
                    return {
                        "samples_per_s": samples / elapsed,
                        "learned_per_s": (learned - first_learned) / elapsed,
                        "cpu_us_per_sample": {k: 1e6 * v / samples for k, v in sorted(cpu.items()) if v > 0},
                        "cores_busy": sum(cpu.values()) / elapsed,
                    }
                time.sleep(0.005)
            raise TimeoutError(f"the daemon processed {counts()[0]}/{n} samples in {timeout_s}s")
        finally:
            daemon.stop()


def run_throughput(
    config: Config, stream_name: str = "split-mnist", repeats: int = 20, rounds: int = 3
) -> dict[str, Any]:
    """Every figure `rounds` times, interleaved (each round: both limits, then the daemon in both
    fetch modes), on one broker and topic. A round's ratios divide its own figures, so a slow
    spell on a shared machine moves a ratio's numerator and denominator together; the printed
    figures are medians over rounds (ratios: the median of the rounds' ratios)."""
    from stream_cl.tools.broker import EmbeddedBroker
    from stream_cl.tools.datasets import load_stream
    from stream_cl.tools.producer import produce_stream

    stream = load_stream(stream_name)
    n = stream.n_train * repeats
    configured = MODES[config.kafka.fetch_in_subprocess]
    other = dataclasses.replace(
        config,
        kafka=dataclasses.replace(config.kafka, fetch_in_subprocess=not config.kafka.fetch_in_subprocess),
    )
    per_round: list[dict[str, Any]] = []
    with EmbeddedBroker() as broker:
        topic = f"bench-throughput-{uuid.uuid4().hex[:8]}"
        broker.create_topic(topic)
        for _ in range(repeats):
            produce_stream(broker.bootstrap_servers, topic, stream)
        for _ in range(rounds):
            r: dict[str, Any] = {
                "consume": raw_consume_rate(broker.bootstrap_servers, topic, n),
                "train": raw_train_rate(config, stream_name, n),
            }
            calls: list[Any] = []  # the configured daemon's strategy calls, replayed for the limit
            shape = tuple(stream.input_shape)
            r[configured] = daemon_run(
                config, broker.bootstrap_servers, topic, n, broker_pid=broker.pid, record=(shape, calls)
            )
            r["stream"] = replay_rate(config, shape, calls)
            del calls
            r[MODES[other.kafka.fetch_in_subprocess]] = daemon_run(
                other, broker.bootstrap_servers, topic, n, broker_pid=broker.pid
            )
            limit = min(r["consume"], r["stream"])
            for m in MODES:
                r[f"{m}_vs_limit"] = r[m]["samples_per_s"] / limit
            r["learned_vs_limit"] = r[configured]["learned_per_s"] / limit
            r["vs_learn_only"] = r[configured]["samples_per_s"] / min(r["consume"], r["train"])
            per_round.append(r)

    def median(get: Any) -> float:
        return statistics.median(get(r) for r in per_round)

    consume, train, stream_run = (median(lambda r, k=k: r[k]) for k in ("consume", "train", "stream"))
    rate = {m: median(lambda r, m=m: r[m]["samples_per_s"]) for m in MODES}
    ratio = {m: median(lambda r, m=m: r[f"{m}_vs_limit"]) for m in MODES}
    cpu_names = {m: sorted({k for r in per_round for k in r[m]["cpu_us_per_sample"]}) for m in MODES}
    return {
        "stream": stream_name,
        "samples": n,
        "rounds": rounds,
        "strategy": config.strategy.name,
        "batch_size": config.model.batch_size,
        "hidden": config.model.hidden,
        "raw_consume_decode_samples_per_s": consume,
        "raw_train_samples_per_s": train,
        "raw_stream_samples_per_s": stream_run,
        "fetch_in_subprocess": config.kafka.fetch_in_subprocess,
        "daemon_samples_per_s": rate[configured],
        "daemon_vs_slower_limit": ratio[configured],
        "daemon_in_process_fetch_samples_per_s": rate["in_process"],
        "daemon_subprocess_fetch_samples_per_s": rate["subprocess"],
        "daemon_subprocess_fetch_vs_slower_limit": ratio["subprocess"],
        "daemon_in_process_fetch_vs_slower_limit": ratio["in_process"],
        "daemon_vs_learn_only_step": median(lambda r: r["vs_learn_only"]),
        # the same run counting learned samples only (`evaluation.holdout_fraction` is held out)
        "daemon_learned_samples_per_s": median(lambda r: r[configured]["learned_per_s"]),
        "daemon_learned_vs_slower_limit": median(lambda r: r["learned_vs_limit"]),
        "raw_train_us_per_sample": 1e6 / train,
        "raw_stream_us_per_sample": 1e6 / stream_run,
        "per_round_vs_slower_limit": {m: [r[f"{m}_vs_limit"] for r in per_round] for m in MODES},
        "cpu_us_per_sample": {
            f"{m}_fetch": {
                k: median(lambda r, m=m, k=k: r[m]["cpu_us_per_sample"].get(k, 0.0)) for k in cpu_names[m]
            }
            for m in MODES
        },
        "cores_busy": {f"{m}_fetch": median(lambda r, m=m: r[m]["cores_busy"]) for m in MODES},
        "goal_daemon_vs_slower_limit": 0.7,
        "goal_met": median(lambda r: r["learned_vs_limit"]) >= 0.7,  # the measure: learned
    }


def format_throughput(r: dict[str, Any]) -> str:
    from stream_cl.evaluate.scoring import format_table

    configured = "subprocess" if r["fetch_in_subprocess"] else "in-process"
    rows = [
        ["raw kafka-python consume + decode", r["raw_consume_decode_samples_per_s"], ""],
        ["raw train step, learn only (in-process)", r["raw_train_samples_per_s"], ""],
        ["raw strategy replaying the daemon's calls", r["raw_stream_samples_per_s"], ""],
    ]
    for mode in ("in-process", "subprocess"):
        key = "in_process" if mode == "in-process" else "subprocess"
        mark = " (configured)" if mode == configured else ""
        rows.append(
            [
                f"daemon end to end, {mode} fetch{mark}",
                r[f"daemon_{key}_fetch_samples_per_s"],
                f"{r[f'daemon_{key}_fetch_vs_slower_limit']:.2f}x slower limit",
            ]
        )
    table = format_table(["path", "samples/s", "ratio"], [[a, round(b), c] for a, b, c in rows])
    verdict = "met" if r["goal_met"] else "NOT met"
    learned = r["daemon_learned_vs_slower_limit"]
    rounds = r.get("per_round_vs_slower_limit", {})
    spread = "".join(
        f"\n  {mode.replace('_', '-')} fetch: " + ", ".join(f"{x:.2f}x" for x in rounds[mode])
        for mode in MODES
        if mode in rounds
    )
    out = (
        f"throughput on {r['stream']} x{r['samples']} samples, strategy {r['strategy']}, batch {r['batch_size']}, "
        f"median of {r.get('rounds', 1)} interleaved rounds\n"
        f"{table}\ngoal daemon ({configured} fetch, as configured), learned samples/s >= 0.7 x slower "
        f"limit: {verdict} ({learned:.2f}x)\n"
        + (f"each round's daemon vs its slower limit:{spread}\n" if spread else "")
        + "(train limit: a fresh strategy replaying the daemon's own learning calls, boundaries included; "
        + "against the learn-only step "
        + f"instead the daemon is at {r['daemon_vs_learn_only_step']:.2f}x)"
    )
    if "daemon_learned_samples_per_s" in r:
        out += (
            f"\n(samples taken in: learned and held out; learned alone, the daemon ({configured} fetch) "
            f"learns {r['daemon_learned_samples_per_s']:.0f} samples/s, "
            f"{r['daemon_learned_vs_slower_limit']:.2f}x the slower limit)"
        )
    cpu = r.get("cpu_us_per_sample", {})
    names = sorted({name for mode in cpu.values() for name in mode})
    if names:  # where the time goes (Linux): CPU per sample taken in, by thread and process
        breakdown = [[name, *(f"{cpu[f'{m}_fetch'].get(name, 0.0):.1f}" for m in MODES)] for name in names]
        breakdown.append(["cores busy (all above)", *(f"{r['cores_busy'][f'{m}_fetch']:.2f}" for m in MODES)])
        out += (
            f"\n\nCPU us per sample taken in (per learned sample: raw train step {r['raw_train_us_per_sample']:.1f} us, "
            f"strategy replaying the daemon's calls {r['raw_stream_us_per_sample']:.1f} us)\n"
            + format_table(["thread / process", "in-process fetch", "subprocess fetch"], breakdown)
        )
    return out
