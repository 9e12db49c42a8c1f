"""`stream-cl bench VERB`: each verb prints a table and, with `--json PATH`, writes its figures.

A verb is a module in `stream_cl.bench` listed in `VERBS`, defining:
- `HELP: str`
- `add_arguments(parser)`            (its own options; `--json` and `--config/--set` are added here)
- `run(config, args) -> (figures: dict, table: str)`
Modules are imported only when their verb runs, so one verb's heavy imports never slow another.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path
from typing import Any

from stream_cl.config import Config

# verb -> (module, help); help is duplicated here so `--help` needs no heavy imports.
VERBS: dict[str, tuple[str, str]] = {
    "throughput": (
        "stream_cl.bench.throughput_cmd",
        "daemon samples/s against raw consume and raw train rates",
    ),
    "latency": (
        "stream_cl.bench.latency_cmd",
        "socket predict latency/throughput against in-process forward",
    ),
    "quality": (
        "stream_cl.bench.quality",
        "strategies side by side: final accuracy, forgetting, BWT, samples/s (+ joint, iid-online)",
    ),
    "heads": (
        "stream_cl.bench.heads",
        "head policies for new classes: loss spike, recovery, final accuracy and forgetting",
    ),
    "boundaries": (
        "stream_cl.bench.boundaries",
        "task-boundary detectors side by side: delay, false alarms, misses, recurring tasks",
    ),
    "spurious": (
        "stream_cl.bench.spurious",
        "false boundaries' cost per strategy: paired runs over model seeds, mean and standard error",
    ),
    "transfer": (
        "stream_cl.bench.transfer",
        "transferred vs naive vs fresh initialization: accuracy before training, samples to the source's",
    ),
    "scale": (
        "stream_cl.bench.scale",
        "learned samples/s with 1 vs 2 daemons, predictions/s with 1 vs 2 replicas (separate processes)",
    ),
    "soak": (
        "stream_cl.bench.soak",
        "stream N samples through the daemon; peak RSS at 10%% and 100%% (goal: growth <= 10%%)",
    ),
}


def add_bench_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """The `bench` verb and its sub-verbs (the CLI loads this through the `stream_cl.commands` entry point)."""
    bench = sub.add_parser("bench", help="benchmarks: print a table, --json PATH writes the figures")
    verbs = bench.add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in VERBS.items():
        p = verbs.add_parser(name, parents=[common], help=help_text)
        p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
        p.set_defaults(bench_module=module)
        _arguments_of(module, p)
    bench.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from stream_cl.cli import config_from_args
    from stream_cl.log import configure_logging
    from stream_cl.runtime.tuning import set_torch_threads

    config = config_from_args(args, extra=["log.level=warning"])
    configure_logging(config.log.level, config.log.format)
    set_torch_threads(config)  # in-process models run as the daemon's do
    return run_bench(args.bench, config, args)


def _arguments_of(module: str, parser: argparse.ArgumentParser) -> None:
    # Options are declared by the module; importing it only for --help would be slow for torch-heavy
    # verbs, so modules keep their top-level imports light (heavy ones inside run()).
    importlib.import_module(module).add_arguments(parser)


def run_bench(name: str, config: Config, args: argparse.Namespace) -> int:
    module = importlib.import_module(VERBS[name][0])
    figures, table = module.run(config, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        print(f"figures written to {args.json}")
    return 0
