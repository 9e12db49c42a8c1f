"""`stream-cl bench latency`: socket and OIP v2 HTTP (JSON, binary) latency and throughput vs in-process forward."""

from __future__ import annotations

import argparse
from typing import Any

from stream_cl.config import Config

HELP = "socket and HTTP (JSON, binary) predict latency/throughput against in-process forward"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", default="split-mnist", help="stream the served model is trained on")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per throughput measurement")


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from stream_cl.bench.latency import format_latency_table, run_latency_bench
    from stream_cl.bench.trained import trained_snapshot

    snapshot, xs = trained_snapshot(config, args.stream)
    result = run_latency_bench(snapshot, xs, duration_s=args.duration)
    return result, format_latency_table(result)
