"""`stream-cl bench VERB`: each verb prints a table and, with `--json PATH`, writes its figures."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stream_cl.config import Config


def _throughput(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from stream_cl.bench.throughput import format_throughput, run_throughput

    result = run_throughput(config, args.stream, repeats=args.repeats)
    return result, format_throughput(result)


def _latency(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from stream_cl.bench.latency import format_latency_table, run_latency_bench

    from stream_cl.bench.models import trained_snapshot

    snapshot, xs = trained_snapshot(config, args.stream)
    result = run_latency_bench(snapshot, xs, duration_s=args.duration)
    return result, format_latency_table(result)


BENCHES: dict[str, tuple[str, Callable[[Config, argparse.Namespace], tuple[dict[str, Any], str]]]] = {
    "throughput": ("daemon samples/s against raw consume and raw train rates", _throughput),
    "latency": ("socket predict latency and throughput against in-process forward", _latency),
}


def add_bench_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser("bench", help="benchmarks: print a table, --json PATH writes the figures")
    verbs = bench.add_subparsers(dest="bench", required=True)
    for name, (help_text, _) in BENCHES.items():
        p = verbs.add_parser(name, parents=[common], help=help_text)
        p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
        p.add_argument("--stream", default="split-mnist")
        if name == "throughput":
            p.add_argument(
                "--repeats", type=int, default=5, help="times the stream is replayed into the topic"
            )
        if name == "latency":
            p.add_argument("--duration", type=float, default=3.0, help="seconds per throughput measurement")


def run_bench(name: str, config: Config, args: argparse.Namespace) -> int:
    _, fn = BENCHES[name]
    result, table = fn(config, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
        print(f"figures written to {args.json}")
    return 0
