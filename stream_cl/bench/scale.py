"""`stream-cl bench scale`: learned samples/s with 1 vs 2 daemons, predictions/s with 1 vs 2 replicas.

Everything is its own process, as in production: each daemon is a `stream-cl run`, each replica a
`stream-cl serve --follow`, and the prediction load comes from separate client processes. The
verb starts its own embedded broker and ends every process it started, even on failure.

Learners. 1 (and then 2) daemons join one consumer group on a `--partitions` (4) topic, with one
model per key (`models.per_key=true`) when this version has per-key models, else one model per
daemon. One probe sample per key (`--keys`, 4; key i on partition i mod partitions) shows when
every daemon holds its partitions; then `--samples` synthetic samples (10 Gaussian classes,
`--features` floats) are produced while they learn. The rate is read from each daemon's
`stream_cl_samples_total{outcome="learned"}` from the first backlog sample until 95% of it is
learned (at most `--duration` s); the producer's own rate is reported beside it.

Replicas. A learner learns a short stream and publishes its snapshots (`publish.topic`), then
stops; 1 (and then 2) `serve --follow` replicas load the final snapshot, and `--clients` client
processes (spread evenly over the replicas, as a TCP load balancer would) pipeline single-sample
`predict` requests (`--depth` in flight each) for `--duration` seconds. The rate counts replies.

Goal: 2 daemons >= 1.6x one daemon, 2 replicas >= 1.6x one replica, where the cores allow it:
each daemon wants about two cores (source + learner thread), each replica one or two, plus the
broker and the clients. The table prints the machine's core count with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

from stream_cl.config import Config

HELP = "learned samples/s with 1 vs 2 daemons and predictions/s with 1 vs 2 replicas, each its own process"
GOAL = 1.6
LEARNED = 'stream_cl_samples_total{outcome="learned"}'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--samples", type=int, help="samples produced for the learner half (default 60000; reduced 20000)"
    )
    p.add_argument(
        "--duration",
        type=float,
        help="seconds of prediction load per setup, and the most a learner measurement lasts (default 10; reduced 4)",
    )
    p.add_argument(
        "--reduced", action="store_true", help="a quick run: fewer samples, shorter load, smaller model"
    )
    p.add_argument(
        "--part", choices=["all", "daemons", "replicas"], default="all", help="what to measure (default: all)"
    )
    p.add_argument("--keys", type=int, default=4, help="message keys (one model each with models.per_key)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of the topic (default: 4)")
    p.add_argument("--features", type=int, default=784, help="features per synthetic sample (default: 784)")
    p.add_argument("--clients", type=int, help="load client processes (default 8; reduced 4)")
    p.add_argument("--depth", type=int, default=16, help="pipelined requests in flight per client")
    p.add_argument("--timeout", type=float, default=600.0, help="give up on a setup after this many seconds")


def cores() -> dict[str, int | None]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "sched_getaffinity": affinity}


def cpu_times(pids: list[int]) -> float | None:
    """User + system CPU seconds of these processes so far (Linux /proc), None where unreadable."""
    total = 0.0
    try:
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None
    return total


def machine_busy() -> tuple[float, float] | None:
    """(busy, total) jiffies of all cores since boot (Linux /proc/stat), None where unreadable."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


class CpuWindow:
    """CPU use over a measurement window: the measured processes' CPU seconds and how busy the
    machine's cores were, so a ratio capped by the cores can be told from one capped by the design."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu0, self.busy0 = cpu_times(pids), machine_busy()

    def close(self, work: float) -> dict[str, float | None]:
        cpu, busy = cpu_times(self.pids), machine_busy()
        used = cpu - self.cpu0 if cpu is not None and self.cpu0 is not None else None
        load = None
        if busy is not None and self.busy0 is not None and busy[1] > self.busy0[1]:
            load = (busy[0] - self.busy0[0]) / (busy[1] - self.busy0[1])
        return {
            "cpu_seconds": used,
            "per_cpu_second": work / used if used else None,  # work per CPU-second of these processes
            "machine_busy": load,  # fraction of all cores busy over the window (everything running)
        }


def per_key_available(config: Config) -> bool:
    models = getattr(config, "models", None)
    return models is not None and hasattr(models, "per_key")


# -- producing ------------------------------------------------------------------------------------
def _produce(bootstrap: str, topic: str, total: int, keys: int, partitions: int, features: int) -> float:
    """`total` samples, key i mod keys on partition (key index mod partitions); returns seconds taken."""
    import numpy as np
    from kafka import KafkaProducer

    from stream_cl.ingest.codec import encode_sample

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(10, features)).astype(np.float32)
    pool = [
        encode_sample(centers[i % 10] + rng.normal(size=features).astype(np.float32), y=i % 10)
        for i in range(1000)
    ]
    started = time.monotonic()
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024)
    try:
        for i in range(total):
            k = i % keys
            producer.send(topic, pool[i % len(pool)], key=f"key-{k}".encode(), partition=k % partitions)
        producer.flush()
    finally:
        producer.close()
    return time.monotonic() - started


# -- learners -------------------------------------------------------------------------------------
def _learners(
    n: int, broker: Any, fleet_dir: Path, base: list[str], settings: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    import threading

    from stream_cl.tools.fleet import Fleet, free_port, kafka_overrides, scrape, stream_cl_argv, wait_for

    topic = f"scale-{uuid.uuid4().hex[:8]}-{n}"
    broker.create_topic(topic, args.partitions)
    samples = settings["samples"]
    ports = [free_port() for _ in range(n)]
    workdir = fleet_dir / f"learners-{n}"
    workdir.mkdir()
    overrides = [
        *kafka_overrides(broker.bootstrap_servers, topic),
        "serve.port=0",
        "evaluation.holdout_fraction=0",
        f"checkpoint.dir={workdir / 'checkpoints'}",  # shared by the group: the per-key store
        "log.level=warning",
        *settings["learner_overrides"],
    ]
    with Fleet(workdir) as fleet:
        daemons = [
            fleet.spawn(f"daemon-{i}", stream_cl_argv(["run"], base, [*overrides, f"metrics.port={port}"]))
            for i, port in enumerate(ports)
        ]

        def learned() -> list[float]:
            for d in daemons:
                d.check()
            return [scrape(port).get(LEARNED, 0.0) for port in ports]

        # Daemons start at different times (imports, group joins): a backlog there from the start
        # would be learned by the first one alone. So first one probe sample per key; once every
        # probe is learned and every daemon learned one, each holds its partitions and waits.
        probe = _produce(
            broker.bootstrap_servers, topic, args.keys, args.keys, args.partitions, args.features
        )

        def settled() -> bool:
            counts = learned()
            return sum(counts) >= args.keys and all(c > 0 for c in counts)

        wait_for(settled, args.timeout, f"all {n} daemons to hold partitions", 0.1)
        # Then the backlog, produced while they learn (a producer thread, faster than the learners
        # when it has a core of its own); the window runs until 95% of it is learned.
        produced: dict[str, float] = {}
        producer = threading.Thread(
            target=lambda: produced.setdefault(
                "s",
                _produce(broker.bootstrap_servers, topic, samples, args.keys, args.partitions, args.features),
            ),
            daemon=True,
        )
        first = learned()
        window = CpuWindow([d.proc.pid for d in daemons])
        t0 = time.monotonic()
        producer.start()
        target = sum(first) + 0.95 * samples
        t_last, last = t0, first
        while t_last < t0 + settings["learn_window_s"] and sum(last) < target:
            time.sleep(0.05)
            t_last, last = time.monotonic(), learned()
        elapsed = t_last - t0
        cpu = window.close(sum(last) - sum(first))
        rate = (sum(last) - sum(first)) / elapsed if elapsed > 0 else 0.0
        producer.join(args.timeout)
        fleet.stop_all()
    produce_s = produced.get("s", float("nan"))
    return {
        "daemons": n,
        "samples_per_s": rate,
        "window_s": elapsed,
        "learned_in_window": sum(last) - sum(first),
        "learned_per_daemon": last,
        "probe_s": probe,
        **cpu,
        "producer_samples_per_s": samples / produce_s if produce_s > 0 else None,
    }


# -- replicas -------------------------------------------------------------------------------------
def _publish_model(
    broker: Any, fleet_dir: Path, base: list[str], settings: dict[str, Any], args: argparse.Namespace
) -> tuple[str, int]:
    """A learner learns a short stream and publishes; returns (snapshot topic, final version)."""
    from stream_cl.tools.fleet import Fleet, free_port, kafka_overrides, scrape, stream_cl_argv, wait_for

    topic = f"scale-{uuid.uuid4().hex[:8]}-model"
    broker.create_topic(topic, 1)
    snapshots = f"{topic}.snapshots"
    total = settings["replica_samples"]
    _produce(broker.bootstrap_servers, topic, total, 1, 1, args.features)
    workdir = fleet_dir / "publisher"
    workdir.mkdir()
    port = free_port()
    overrides = [
        *kafka_overrides(broker.bootstrap_servers, topic),
        "serve.port=0",
        f"metrics.port={port}",
        "evaluation.holdout_fraction=0",
        "checkpoint.enabled=false",
        f"publish.topic={snapshots}",
        "log.level=warning",
        *settings["model_overrides"],
    ]
    with Fleet(workdir) as fleet:
        learner = fleet.spawn("learner", stream_cl_argv(["run"], base, overrides))

        def done() -> float:
            learner.check()
            return scrape(port).get(LEARNED, 0.0) >= total

        wait_for(done, args.timeout, "the publishing learner to learn its stream")
        time.sleep(1.0)  # the last publish
        version = int(scrape(port).get("stream_cl_model_version", 0))
        code = learner.stop()
        if code != 0:
            raise RuntimeError(f"the publishing learner exited {code}:\n{learner.log_tail()}")
    return snapshots, version


def _replicas(
    n: int,
    broker: Any,
    snapshots: str,
    version: int,
    fleet_dir: Path,
    base: list[str],
    settings: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from stream_cl.serve.client import PredictionClient, PredictionError
    from stream_cl.tools.fleet import Fleet, free_port, stream_cl_argv, wait_for

    workdir = fleet_dir / f"replicas-{n}"
    workdir.mkdir()
    ports = [free_port() for _ in range(n)]
    with Fleet(workdir) as fleet:
        replicas = [
            fleet.spawn(
                f"replica-{i}",
                stream_cl_argv(
                    ["serve", "--follow", snapshots],
                    base,
                    [
                        f"kafka.bootstrap_servers={broker.bootstrap_servers}",
                        f"serve.port={port}",
                        "metrics.port=0",
                        "log.level=warning",
                    ],
                ),
            )
            for i, port in enumerate(ports)
        ]

        def serving(i: int) -> bool:
            replicas[i].check()
            try:
                with PredictionClient("127.0.0.1", ports[i], timeout=5) as client:
                    return int(client.info()["model_version"]) == version
            except (OSError, PredictionError):
                return False

        for i in range(n):
            wait_for(partial(serving, i), args.timeout, f"replica {i} to serve version {version}", 0.25)
        duration = settings["duration"]
        start_at = time.time() + 2.0  # every client connected and waiting
        clients = [
            fleet.spawn(
                f"client-{j}",
                [
                    sys.executable,
                    "-m",
                    "stream_cl.bench.scale_client",
                    "127.0.0.1",
                    str(ports[j % n]),
                    str(start_at),
                    str(duration),
                    str(args.depth),
                    str(args.features),
                ],
            )
            for j in range(settings["clients"])
        ]
        time.sleep(max(0.0, start_at - time.time()))
        window = CpuWindow([r.proc.pid for r in replicas])
        replies = errors = 0
        for client in clients:
            client.proc.wait(duration + 60)
            lines = client.log_tail().strip().splitlines()
            if client.proc.returncode != 0 or not lines:
                raise RuntimeError(f"{client.name} failed:\n{client.log_tail()}")
            result = json.loads(lines[-1])
            replies += result["replies"]
            errors += result["errors"]
        cpu = window.close(replies)
        fleet.stop_all()
    return {
        "replicas": n,
        "predictions_per_s": replies / duration,
        "replies": replies,
        "errors": errors,
        "clients": settings["clients"],
        "duration_s": duration,
        **cpu,
    }


# -- the verb -------------------------------------------------------------------------------------
def _settings(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    reduced = args.reduced
    per_key = per_key_available(config)
    learner_overrides = ["models.per_key=true"] if per_key else []
    model_overrides: list[str] = []
    if reduced:
        learner_overrides.append("model.hidden=[64]")
        model_overrides.append("model.hidden=[64]")
    return {
        "samples": args.samples or (20000 if reduced else 60000),
        "duration": args.duration or (4.0 if reduced else 10.0),
        "learn_window_s": args.duration or (20.0 if reduced else 60.0),
        "clients": args.clients or (4 if reduced else 8),
        "replica_samples": 1000 if reduced else 3000,
        "per_key": per_key,
        "learner_overrides": learner_overrides,
        "model_overrides": model_overrides,
    }


def _base_argv(args: argparse.Namespace) -> list[str]:
    """The bench's own --config and --set, handed to every child (the bench's overrides follow them)."""
    base = ["--config", args.config] if args.config else []
    for item in args.set or []:
        if not item.startswith("log."):
            base += ["--set", item]
    return base


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from stream_cl.tools.broker import EmbeddedBroker

    settings = _settings(config, args)
    base = _base_argv(args)
    figures: dict[str, Any] = {
        "cores": cores(),
        "goal": GOAL,
        "per_key_models": settings["per_key"],
        "keys": args.keys,
        "partitions": args.partitions,
        "features": args.features,
        "reduced": bool(args.reduced),
    }
    fleet_dir = Path(tempfile.mkdtemp(prefix="stream_cl-scale-"))
    try:
        with EmbeddedBroker() as broker:
            if args.part in ("all", "daemons"):
                figures["learners"] = [_learners(n, broker, fleet_dir, base, settings, args) for n in (1, 2)]
            if args.part in ("all", "replicas"):
                snapshots, version = _publish_model(broker, fleet_dir, base, settings, args)
                figures["model_version"] = version
                figures["replicas"] = [
                    _replicas(n, broker, snapshots, version, fleet_dir, base, settings, args) for n in (1, 2)
                ]
    finally:
        shutil.rmtree(fleet_dir, ignore_errors=True)
    if "learners" in figures:
        figures["learners_ratio"] = _ratio(figures["learners"], "samples_per_s")
    if "replicas" in figures:
        figures["replicas_ratio"] = _ratio(figures["replicas"], "predictions_per_s")
    return figures, table(figures)


def _ratio(rows: list[dict[str, Any]], key: str) -> float | None:
    if len(rows) < 2 or not rows[0][key]:
        return None
    return float(rows[1][key] / rows[0][key])


def table(figures: dict[str, Any]) -> str:
    c = figures["cores"]
    lines = [
        f"cores: os.cpu_count()={c['cpu_count']}, os.sched_getaffinity={c['sched_getaffinity']}",
        *[
            f"note: the producer sent {row['producer_samples_per_s']:,.0f} samples/s to {row['daemons']} daemon(s): "
            "the learners may have waited for it"
            for row in figures.get("learners") or []
            if row.get("producer_samples_per_s")
            and row["producer_samples_per_s"] < 1.2 * row["samples_per_s"]
        ],
        f"learners: {figures['keys']} keys on {figures['partitions']} partitions, "
        + (
            "one model per key (models.per_key=true)" if figures["per_key_models"] else "one model per daemon"
        ),
        "",
        "| setup | processes | throughput | vs one | per CPU-second of them | cores busy | goal |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, rows, key, unit, count in (
        ("learners", figures.get("learners"), "samples_per_s", "learned samples/s", "daemons"),
        ("replicas", figures.get("replicas"), "predictions_per_s", "predictions/s", "replicas"),
    ):
        if not rows:
            continue
        ratio = _ratio(rows, key)
        for row in rows:
            vs = row[key] / rows[0][key] if rows[0][key] else float("nan")
            goal = ""
            if row is rows[-1] and ratio is not None:
                goal = f"≥ {GOAL}x: {'met' if ratio >= GOAL else 'not met'}"
            per_cpu = f"{row['per_cpu_second']:,.0f}" if row.get("per_cpu_second") else "-"
            busy = f"{row['machine_busy']:.0%}" if row.get("machine_busy") is not None else "-"
            lines.append(
                f"| {name} | {row[count]} | {row[key]:,.0f} {unit} | {vs:.2f}x | {per_cpu} | {busy} | {goal} |"
            )
    lines += [
        "",
        "per CPU-second: work done per CPU-second the measured daemons (replicas) used over the window;",
        "equal for 1 and 2 means no coordination overhead. cores busy: all cores, every process (broker,",
        "producer and load clients included); near 100% means the ratio is capped by the cores.",
    ]
    return "\n".join(lines)
