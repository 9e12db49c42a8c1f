"""`stream-cl bench spurious`: what a boundary detector's false alarms cost each strategy, paired
over model seeds.

A false boundary (`bench quality --spurious`'s: from a seeded point in the middle of a visit to its
end, the samples carry a task id the stream never sends, so the learner opens a new task with the
same classes) changes more than the strategy's boundary hooks: the learner learns the batch it
cuts short on its own, which shifts every later batch and random draw. That shift alone moves a
one-pass run by a point or more either way, as another model seed does, so one run with and one
without cannot tell a 1-point cost. Here each strategy learns each stream, for every stream seed
asked for (the class order and the false boundaries' places) and model seeds 0 … K−1
(`model.seed`: initialization and the strategy's own draws), once plainly and once with the
false boundaries; the cost is the mean of the paired differences, printed with its standard
error and the worst pair.

Goal: the mean cost ≤ 1 point (0.01 of average accuracy, class scenario) for every strategy and
stream.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from typing import Any

from stream_cl.bench.options import add_strategies_and_streams, comma_ints, comma_list
from stream_cl.config import Config, ConfigError

GOAL_POINTS = 1.0  # mean cost of the false boundaries, in points of average accuracy

HELP = "false boundaries' cost per strategy: paired runs over model seeds, mean and standard error"


def run_spurious(
    config: Config,
    strategies: Sequence[str],
    streams: Sequence[str],
    seeds: Sequence[int] = (0,),
    model_seeds: int = 5,
    spurious: int = 2,
) -> dict[str, Any]:
    """Per stream and strategy: average accuracy (class scenario) plain and with `spurious` false
    boundaries, for every stream seed in `seeds` and model seeds 0 … `model_seeds` − 1 (pairs in
    that order), and the paired costs."""
    from stream_cl.bench.quality import Contender, learn_stream, with_overrides
    from stream_cl.evaluate.scoring import average_accuracy
    from stream_cl.tools.datasets import load_stream

    if len(seeds) * model_seeds < 2:
        raise ValueError(
            f"expected 2 or more pairs (a standard error needs them), got {len(seeds) * model_seeds}"
        )
    if spurious < 1:
        raise ValueError(f"spurious: expected a count >= 1, got {spurious}")
    rows = []
    for stream_name in streams:
        loaded = [load_stream(stream_name, seed=seed, send_task=True) for seed in seeds]
        for name in strategies:
            contender = Contender.strategy(name)
            plain: list[float] = []
            with_false: list[float] = []
            for stream in loaded:
                for m in range(model_seeds):
                    seeded = with_overrides(config, [*contender.overrides, f"model.seed={m}"])
                    for false_alarms, out in ((0, plain), (spurious, with_false)):
                        run = learn_stream(seeded, stream, "class", spurious=false_alarms)
                        out.append(average_accuracy(run.matrix))
            costs = [100.0 * (a - b) for a, b in zip(plain, with_false, strict=True)]
            mean = statistics.fmean(costs)
            rows.append(
                {
                    "stream": stream_name,
                    "strategy": name,
                    "plain": plain,
                    "spurious": with_false,
                    "cost_points": costs,
                    "mean_cost_points": mean,
                    "standard_error_points": statistics.stdev(costs) / math.sqrt(len(costs)),
                    "goal_met": mean <= GOAL_POINTS,
                }
            )
    return {"seeds": list(seeds), "model_seeds": model_seeds, "spurious": spurious, "rows": rows}


def format_spurious(result: dict[str, Any]) -> str:
    from stream_cl.evaluate.scoring import format_table

    table = format_table(
        ["stream", "strategy", "plain acc", "with false", "mean cost", "± s.e.", "worst pair", "goal"],
        [
            [
                r["stream"],
                r["strategy"],
                f"{statistics.fmean(r['plain']):.4f}",
                f"{statistics.fmean(r['spurious']):.4f}",
                f"{r['mean_cost_points']:+.2f}",
                f"{r['standard_error_points']:.2f}",
                f"{max(r['cost_points']):+.2f}",
                "met" if r["goal_met"] else "NOT met",
            ]
            for r in result["rows"]
        ],
    )
    return (
        f"false boundaries (stream seeds {','.join(map(str, result['seeds']))} x model seeds "
        f"0-{result['model_seeds'] - 1}, each pair learned plainly and with {result['spurious']} false "
        f"boundaries; cost = plain - with, in points of average accuracy, class scenario; goal: mean "
        f"cost <= {GOAL_POINTS:g})\n{table}"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_strategies_and_streams(
        p, strategies="eidetic,replay,fip", streams="split-mnist,split-mnist:recurring"
    )
    p.add_argument("--seeds", default="0", help="comma-separated stream seeds (default: 0)")
    p.add_argument(
        "--model-seeds",
        type=int,
        default=5,
        help="paired runs per stream seed, strategy and stream (default: 5)",
    )
    p.add_argument("--spurious", type=int, default=2, help="false boundaries per run (default: 2)")


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    seeds = comma_ints(args.seeds, "--seeds")
    if args.model_seeds < 1 or len(seeds) * args.model_seeds < 2:
        raise ConfigError(
            "--model-seeds",
            "expected 2 or more pairs (stream seeds x model seeds): a standard error needs them",
        )
    if args.spurious < 1:
        raise ConfigError("--spurious", f"expected a count >= 1, got {args.spurious}")
    result = run_spurious(
        config,
        comma_list(args.strategies),
        comma_list(args.streams),
        seeds=seeds,
        model_seeds=args.model_seeds,
        spurious=args.spurious,
    )
    return result, format_spurious(result)
