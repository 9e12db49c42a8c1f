"""`stream-cl bench soak`: stream many samples through the daemon and watch its memory.

A continual learner runs for weeks; anything that grows per sample (a list of losses, per-sample
log context, an unbounded reservoir) turns into an OOM long after every test passed. This verb
streams `--samples` synthetic samples (default 1,000,000) through a real daemon on the embedded
broker and reads this process's resident memory from /proc/self/status at 10% and at 100% of the
samples: VmHWM (peak RSS) and VmRSS (current). Goal: peak growth = hwm_100 / hwm_10 - 1 <= 10%.
Measuring from 10% rather than from 0 leaves out one-time costs (torch, model, optimizer, the
first buffers filling), so what is left is growth with the sample count.

The producer runs in a background thread of the same process and stays at most `--round` samples
ahead of the daemon: the embedded broker keeps everything in memory, and a producer racing ahead
would measure the client's buffers rather than the daemon. Messages are drawn from a small pool of
pre-encoded samples (10 Gaussian classes), so producing costs no per-sample allocation that lives.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from stream_cl.config import Config

# Heavy imports (numpy, kafka, torch via the daemon) live inside run(): the CLI parser imports this
# module for every `stream-cl` command.

HELP = "stream N samples through the daemon; peak RSS at 10%% and 100%% (goal: growth <= 10%%)"
GOAL = 0.10


def memory_kib() -> dict[str, int]:
    """VmRSS (current) and VmHWM (peak) of this process in KiB, from /proc/self/status (Linux)."""
    out: dict[str, int] = {}
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    if "VmHWM" not in out:  # not Linux: getrusage gives the peak (KiB on Linux, bytes on macOS)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["VmHWM"] = peak // 1024 if sys.platform == "darwin" else peak
        out.setdefault("VmRSS", out["VmHWM"])
    return out


def _producer(
    bootstrap: str, topic: str, total: int, ahead: int, progress: Any, stop: threading.Event, features: int
) -> None:
    """Produce `total` samples, never more than `ahead` beyond what the daemon has processed."""
    import numpy as np
    from kafka import KafkaProducer

    from stream_cl.ingest.codec import encode_sample

    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(10, features)).astype(np.float32)
    pool = [
        encode_sample(centers[i % 10] + rng.normal(size=features).astype(np.float32), y=i % 10)
        for i in range(1000)
    ]
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    try:
        sent = 0
        while sent < total and not stop.is_set():
            if sent - progress() >= ahead:
                time.sleep(0.01)
                continue
            chunk = min(ahead // 2 or 1, total - sent)
            for i in range(sent, sent + chunk):
                producer.send(topic, pool[i % len(pool)])
            producer.flush()
            sent += chunk
    finally:
        producer.close()


def run_soak(config: Config, samples: int, round_size: int = 50_000, features: int = 32) -> dict[str, Any]:
    """Run the soak; returns the figures (RSS in MiB at 10% and 100%, growth, rate)."""
    import tempfile

    from stream_cl.runtime.daemon import Daemon
    from stream_cl.tools.broker import EmbeddedBroker

    topic = f"soak-{uuid.uuid4().hex[:8]}"
    marks: dict[str, dict[str, Any]] = {}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as ckpt:
        broker.create_topic(topic)
        cfg = dataclasses.replace(
            config,
            kafka=dataclasses.replace(
                config.kafka,
                bootstrap_servers=broker.bootstrap_servers,
                topic=topic,
                dead_letter_topic=f"{topic}.dlq",
                group_id=f"soak-{topic}",
            ),
            serve=dataclasses.replace(config.serve, port=0),
            metrics=dataclasses.replace(config.metrics, port=0),
            checkpoint=dataclasses.replace(config.checkpoint, dir=ckpt),
        )
        daemon = Daemon(cfg)

        def processed() -> int:
            stats = daemon.learning.stats()
            return int(stats["learned"] + stats["held_out"])

        stop = threading.Event()
        producer = threading.Thread(
            target=_producer,
            args=(broker.bootstrap_servers, topic, samples, round_size, processed, stop, features),
            name="soak-producer",
            daemon=True,
        )
        daemon.start()
        t0 = time.perf_counter()
        producer.start()
        try:
            for label, target in (("10%", max(1, samples // 10)), ("100%", samples)):
                while (done := processed()) < target:
                    if daemon.failed is not None:
                        raise RuntimeError(f"the daemon failed during the soak: {daemon.failed!r}")
                    time.sleep(0.05)
                mem = memory_kib()
                marks[label] = {
                    "samples": done,
                    "seconds": round(time.perf_counter() - t0, 2),
                    "rss_mib": round(mem["VmRSS"] / 1024, 1),
                    "peak_rss_mib": round(mem["VmHWM"] / 1024, 1),
                }
        finally:
            stop.set()
            producer.join(30)
            daemon.stop()
    first, last = marks["10%"], marks["100%"]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"] - 1
    elapsed = last["seconds"] - first["seconds"]
    return {
        "samples": samples,
        "features": features,
        "strategy": config.strategy.name,
        "marks": marks,
        "peak_growth": round(growth, 4),
        "rss_growth": round(last["rss_mib"] / first["rss_mib"] - 1, 4),
        "goal": GOAL,
        "meets_goal": growth <= GOAL,
        "samples_per_s": round((last["samples"] - first["samples"]) / elapsed, 1) if elapsed > 0 else None,
    }


def format_soak(r: dict[str, Any]) -> str:
    rows = [f"{'at':>5} {'samples':>10} {'seconds':>9} {'rss MiB':>9} {'peak MiB':>9}"]
    for label, m in r["marks"].items():
        rows.append(
            f"{label:>5} {m['samples']:>10} {m['seconds']:>9.1f} {m['rss_mib']:>9.1f} {m['peak_rss_mib']:>9.1f}"
        )
    verdict = "meets" if r["meets_goal"] else "MISSES"
    rows.append(
        f"peak RSS growth 10%->100%: {r['peak_growth']:+.1%} ({verdict} the goal <= {r['goal']:.0%}); "
        f"current RSS growth {r['rss_growth']:+.1%}; {r['samples_per_s']} samples/s "
        f"({r['strategy']}, {r['features']} features)"
    )
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--samples", type=int, default=1_000_000, help="samples to stream (default 1,000,000)")
    p.add_argument(
        "--round", type=int, default=50_000, help="most samples the producer runs ahead of the daemon"
    )
    p.add_argument("--features", type=int, default=32, help="features per synthetic sample")


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if args.samples < 10:
        raise SystemExit("stream-cl bench soak: --samples must be >= 10")
    result = run_soak(config, args.samples, args.round, args.features)
    return result, format_soak(result)
