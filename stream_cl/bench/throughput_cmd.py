"""`stream-cl bench throughput`: the verb's options, its process tuning and the `--compare` runs
(the measurement itself is bench/throughput.py)."""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any

from stream_cl.bench.throughput import format_throughput, run_throughput
from stream_cl.config import Config, ConfigError

HELP = "daemon samples/s against raw consume and raw train rates"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stream", default="split-mnist", help="the built-in stream replayed (default: split-mnist)"
    )
    # 20 x split-mnist: 80,000 samples, ~5 s of the daemon at ~16,000/s. With 5 (~1.2 s), single
    # finetune rounds of one build ranged 0.54-0.79x; with 20, 0.70-0.80x.
    p.add_argument(
        "--repeats", type=int, default=20, help="times the stream is replayed into the topic (default 20)"
    )
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of every measurement (medians are printed)"
    )
    p.add_argument(
        "--compare",
        metavar="STRATEGY",
        help="also run this strategy (e.g. finetune), round by round interleaved with the configured one, "
        "and print the ratio of their learned samples/s",
    )


# The bench's own process tuning (runtime/tuning.py), applied unless `--set` names the key: the
# daemon's defaults leave both off, as they must be on a shared host; a throughput run wants the
# learner on a core of its own and the GIL back after each torch op.
BENCH_TUNING: dict[str, Any] = {"learner.cpu_affinity": "auto", "learner.gil_switch_interval_us": 50}


def bench_tuning(config: Config, overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """`config` with BENCH_TUNING applied where `overrides` (the --set list) does not name the key."""
    named = {item.split("=", 1)[0].strip() for item in overrides}
    learner = dataclasses.replace(
        config.learner,
        **{k.split(".")[1]: v for k, v in BENCH_TUNING.items() if k not in named},
    )
    tuned = dataclasses.replace(config, learner=learner)
    return tuned, {k: getattr(tuned.learner, k.split(".")[1]) for k in BENCH_TUNING}


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    if args.rounds < 1:
        raise ConfigError("--rounds", f"must be >= 1, got {args.rounds}")
    config, tuning = bench_tuning(config, args.set or [])
    tuning_line = "tuning: " + ", ".join(f"{k}={v}" for k, v in tuning.items())
    if not args.compare:
        result = run_throughput(config, args.stream, repeats=args.repeats, rounds=args.rounds)
        result["tuning"] = tuning
        return result, tuning_line + "\n" + format_throughput(result)
    from stream_cl.strategies import check_config

    other = dataclasses.replace(config, strategy=dataclasses.replace(config.strategy, name=args.compare))
    check_config(other)  # an unknown name is a ConfigError naming strategy.name, before any run
    mine: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for _ in range(args.rounds):  # round by round, so a slow spell of the machine hits both
        mine.append(run_throughput(config, args.stream, repeats=args.repeats, rounds=1))
        theirs.append(run_throughput(other, args.stream, repeats=args.repeats, rounds=1))
    ratios = [
        m["daemon_learned_samples_per_s"] / o["daemon_learned_samples_per_s"]
        for m, o in zip(mine, theirs, strict=True)
    ]
    result = {
        "tuning": tuning,
        "strategy": config.strategy.name,
        "compare": args.compare,
        "rounds": {"strategy": mine, "compare": theirs},
        "learned_ratio_per_round": ratios,
        "learned_ratio": statistics.median(ratios),
    }
    lines = [tuning_line, f"== {config.strategy.name} (last round)", format_throughput(mine[-1])]
    lines += [f"== {args.compare} (last round)", format_throughput(theirs[-1])]
    lines.append(
        f"{config.strategy.name} / {args.compare}, daemon learned samples/s: {result['learned_ratio']:.2f}x "
        f"(median of {args.rounds} interleaved rounds: " + ", ".join(f"{r:.2f}x" for r in ratios) + ")"
    )
    return result, "\n".join(lines)
