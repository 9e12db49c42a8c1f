"""`stream-cl demo`: embedded broker + a built-in stream + the daemon, in one command.

Shows live progress (samples/s, current task, prequential accuracy, model version), then the
per-task accuracy of the final model on each task's held-out test split, then keeps serving
predictions until Ctrl-C (or exits 0 with `--exit-when-done`).

The broker lives only as long as the demo, so its checkpoints do too: they go to a temporary
directory (`checkpoint.dir` is set aside), removed at exit. A checkpoint from an earlier demo holds
offsets into a topic that no longer exists, and possibly another stream's model.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import threading
import time
from typing import Any

from stream_cl.config import Config
from stream_cl.evaluate.scoring import accuracy, format_table
from stream_cl.runtime.daemon import Daemon
from stream_cl.tools.broker import EmbeddedBroker
from stream_cl.tools.datasets import BenchmarkStream, load_stream
from stream_cl.tools.producer import produce_stream
from stream_cl.tools.report import write_report


def _for_demo(config: Config, bootstrap: str, checkpoint_dir: str) -> Config:
    """`config` on the demo's own broker, checkpointing into the demo's own directory."""
    return dataclasses.replace(
        config,
        kafka=dataclasses.replace(config.kafka, bootstrap_servers=bootstrap),
        checkpoint=dataclasses.replace(config.checkpoint, dir=checkpoint_dir),
    )


class _Progress:
    """One status line, redrawn in place on a terminal, printed every few seconds otherwise."""

    def __init__(self, out: Any = sys.stdout) -> None:
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self._last_print = 0.0

    def update(self, text: str, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            self.out.write("\r\x1b[2K" + text + ("\n" if final else ""))
            self.out.flush()
        elif final or now - self._last_print >= 2.0:
            self.out.write(text + "\n")
            self.out.flush()
            self._last_print = now


def run_demo(config: Config, args: argparse.Namespace) -> int:
    stream = load_stream(
        args.stream,
        seed=args.seed,
        class_order=[int(c) for c in args.class_order.split(",")] if args.class_order else None,
        send_task=not args.no_task,
    )
    total = stream.n_labeled  # what can be learned or held out: unlabeled samples are only predicted
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(
        f"stream-cl demo: {stream.name}, {len(stream.tasks)} tasks, {stream.n_train} samples ({total} labeled), "
        f"strategy {config.strategy.name}"
    )
    try:
        with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="stream-cl-demo-") as ckpt:
            config = _for_demo(config, broker.bootstrap_servers, ckpt)
            broker.create_topic(config.kafka.topic)
            daemon = Daemon(config)
            learner = daemon.learner
            assert learner is not None  # the demo runs one model
            daemon.start()
            print(
                f"broker {broker.bootstrap_servers} | predictions on {config.serve.host}:{daemon.serve_port}"
                f" | metrics on http://{config.metrics.host}:{daemon.metrics_port}/metrics"
            )
            producer_error: list[BaseException] = []

            def produce() -> None:
                try:
                    produce_stream(broker.bootstrap_servers, config.kafka.topic, stream, rate=args.rate)
                except BaseException as e:
                    producer_error.append(e)

            threading.Thread(target=produce, name="demo-producer", daemon=True).start()
            completed = _watch(daemon, total, stop, producer_error)
            if completed:
                print(_report(daemon, stream))
                if learner.evaluator is not None:
                    learner.evaluator.run_once()  # the final model on the held-out reservoirs
                    paths = write_report(learner.evaluator.summary(), "reports", source="stream-cl demo")
                    print("report (held-out accuracy matrix and accuracy over time):")
                    for name, path in paths.items():
                        print(f"  {name}: {path}")
            if completed and not args.exit_when_done and not stop.is_set():
                print(
                    f"serving predictions on {config.serve.host}:{daemon.serve_port} — try "
                    f"`stream-cl predict --port {daemon.serve_port} --stream {stream.name}`; Ctrl-C stops"
                )
                while not stop.wait(0.5) and not daemon.failed:
                    pass
            daemon.stop()
            if producer_error:
                print(f"producer failed: {producer_error[0]}", file=sys.stderr)
                return 1
            return 1 if daemon.failed else 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _watch(daemon: Daemon, total: int, stop: threading.Event, producer_error: list[BaseException]) -> bool:
    """Show progress until every sample is learned (True) or something stops the demo (False)."""
    progress = _Progress()
    t0 = time.monotonic()
    window: list[tuple[float, int]] = []
    while not stop.wait(0.25):
        stats = daemon.learning.stats()
        done = stats["learned"] + stats["held_out"] + daemon.source.dead_lettered
        now = time.monotonic()
        window = [(t, n) for t, n in window if now - t <= 3.0] + [(now, stats["learned"])]
        rate = (window[-1][1] - window[0][1]) / max(1e-9, window[-1][0] - window[0][0])
        progress.update(
            f"learned {stats['learned']:>6}/{total}  {rate:8.0f} samples/s  task {stats['current_task']!s:>4}"
            f"  prequential acc {stats['prequential_accuracy']:.3f}  model v{stats['model_version']}"
            f"  {now - t0:5.1f}s",
            final=done >= total,
        )
        if done >= total:
            daemon.wait_idle(timeout=10.0)
            return True
        if daemon.failed or producer_error:
            progress.update("stopped: a component failed (see the log)", final=True)
            return False
    progress.update("interrupted", final=True)
    return False


def _report(daemon: Daemon, stream: BenchmarkStream) -> str:
    snapshot = daemon.holder.get()
    if snapshot is None:
        return "no model was published"
    headers = ["task", "classes", "test samples", "accuracy (no task id)"]
    with_hint = stream.send_task
    if with_hint:
        headers.append("accuracy (task id given)")
    rows: list[list[object]] = []
    accuracies: list[float] = []
    for spec in stream.tasks:
        ys = [int(y) for y in spec.test_y]
        accuracies.append(accuracy(snapshot, spec.test_x, ys))
        row: list[object] = [spec.task_id, ",".join(map(str, spec.classes)), len(ys), accuracies[-1]]
        if with_hint:
            row.append(
                accuracy(snapshot, spec.test_x, ys, task=spec.task_id)
                if spec.task_id in snapshot.tasks
                else "-"
            )
        rows.append(row)
    mean = sum(accuracies) / len(accuracies)
    return (
        f"\nper-task accuracy of the final model (v{snapshot.version}, strategy {snapshot.strategy}):\n"
        + format_table(headers, rows)
        + f"\naverage accuracy over tasks: {mean:.4f}\n"
    )
