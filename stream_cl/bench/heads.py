"""`stream-cl bench heads`: head policies for new classes, side by side on the same streams.

Every policy (`random`, `class_mean`, `ls`) learns the same seeded class-incremental stream with
one protection strategy, through the daemon's `Learner` (`quality.learn_stream`). The protection
is `--strategy`, `replay` by default (`PROTECTION`): it keeps old classes without routing by task,
so what a head policy does to the new class and to the final accuracy shows. Under `finetune`
every task but the last is forgotten, so final accuracy measures the last task alone; under
`eidetic` a new class waits for the router to learn its task, so recovery is the router's.
For each class arrival (the first class of a stream excluded: alone in the head, its loss is 0):

- arrival loss: the class's mean loss in the step where it first appears. Its samples are scored
  before anything about the class is known, with the same random row under every policy, but on
  each policy's own model so far: it shows how strongly that model's old rows fire on a class
  they have never seen (class_mean under ce drives it to 30+), and is reported, not compared;
- spike: the peak, over the steps that follow, of the class's mean loss per step, until 50 of its
  samples have been scored. This is the loss spike a policy can change: `class_mean`/`ls` have
  written the class's row by then (after `min_samples`), `random` has taken gradient steps;
- recovery: stream samples from its arrival until its test accuracy (checked after every step,
  no task hint) first reaches 90% of its accuracy at the end of its task;
- old rows (`mse` only): the part of the spike that comes from the rows of earlier tasks' classes,
  the peak over the same steps of sum_j z_j^2 over those rows, on the same samples. Squared error
  is a sum over rows, and this task's rows are not in this part: it is what the spike would be,
  the rest of the model as it was, if they fitted their classes exactly (under `ce` the loss
  does not split by row, and it is not measured).

Plus the final average accuracy and average forgetting of the run (R matrix after each task).
Everything runs under each training loss (`ce`, `mse`): ridge rows are least-squares rows, so
the loss decides how well they fit the head they join. Goal, per stream and loss: `ls` cuts the
spike by >= 50% and recovers in <= half the samples against `random`, final accuracy no lower.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stream_cl.bench.options import comma_ints, comma_list, overrides_by_name
from stream_cl.bench.quality import Contender, learn_stream, with_overrides
from stream_cl.config import Config

if TYPE_CHECKING:
    from stream_cl.strategies import Batch, StepResult, Strategy
    from stream_cl.tools.datasets import BenchmarkStream

POLICIES = ("random", "class_mean", "ls")
PROTECTION = "replay"
SPIKE_SAMPLES = 50
RECOVERY_FRACTION = 0.9


@dataclass
class _ClassTrace:
    """What happened to one class after it arrived."""

    arrival_sample: int  # stream samples learned before its arrival step
    arrival_loss: float
    step_losses: list[float] = field(default_factory=list)  # its mean loss per later step
    old_rows: list[float] = field(default_factory=list)  # mse: earlier tasks' rows' part, same steps
    scored: int = 0  # its samples scored after the arrival step
    accuracy: list[tuple[int, float]] = field(default_factory=list)  # (samples since arrival, acc)


class ArrivalTracker:
    """A `learn_stream` step hook: per-class losses after arrival and test accuracy in its task."""

    def __init__(self, stream: BenchmarkStream) -> None:
        import numpy as np

        # The learner numbers labels in order of first appearance; the same order, from the stream.
        order: list[int] = []
        for sample in stream.samples():
            if sample.y is not None and sample.y not in order:
                order.append(sample.y)
        self.test = {
            index: np.concatenate([t.test_x[t.test_y == label] for t in stream.tasks])
            for index, label in enumerate(order)
        }
        self.input_shape = stream.input_shape
        self.samples = 0
        self.traces: dict[int, _ClassTrace] = {}
        self.old_rows: np.ndarray | None = None  # set by `before` for the coming step

    def before(self, strategy: Strategy, batch: Batch) -> None:
        """Under `mse`, the pre-update outputs of the earlier tasks' rows on the batch (a
        side-effect-free forward: eval mode, no grad)."""
        import numpy as np
        import torch

        self.old_rows = None
        if strategy.loss != "mse" or all(t.scored >= SPIKE_SAMPLES for t in self.traces.values()):
            return  # no class in its spike window (an arrival step itself is not part of a spike)
        old = [c for c in range(strategy.n_classes) if c not in strategy.task_classes[batch.task]]
        if not old:
            self.old_rows = np.zeros(batch.y.shape[0], dtype=np.float32)
            return
        model = strategy.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            z = model(batch.x.to(strategy.device))[:, old]
        model.train(was_training)
        self.old_rows = (z**2).sum(dim=1).cpu().numpy()

    def __call__(self, strategy: Strategy, batch: Batch, result: StepResult) -> None:
        y = batch.y.cpu().numpy()
        for c in sorted(set(y.tolist())):
            losses = result.sample_losses[y == c]
            trace = self.traces.get(c)
            if trace is None:
                if strategy.n_classes > 1:
                    self.traces[c] = _ClassTrace(self.samples, float(losses.mean()))
            elif trace.scored < SPIKE_SAMPLES:
                take = losses[: SPIKE_SAMPLES - trace.scored]
                trace.step_losses.append(float(take.mean()))
                if self.old_rows is not None:
                    trace.old_rows.append(float(self.old_rows[y == c][: len(take)].mean()))
                trace.scored += len(take)
        self.samples += len(y)
        for c in strategy.task_classes[batch.task]:
            if c in self.traces:
                self.traces[c].accuracy.append(
                    (self.samples - self.traces[c].arrival_sample, self._accuracy(strategy, c))
                )

    def _accuracy(self, strategy: Strategy, c: int) -> float:
        import torch

        x = torch.from_numpy(self.test[c]).reshape((-1, *self.input_shape)).to(strategy.device)
        proba, _ = strategy.predict_proba(x)
        return float((proba.argmax(1) == c).float().mean())

    def summary(self) -> dict[str, float]:
        import numpy as np

        spikes, arrivals, recoveries, old_rows = [], [], [], []
        for trace in self.traces.values():
            arrivals.append(trace.arrival_loss)
            if trace.step_losses:
                spikes.append(max(trace.step_losses))
            if trace.old_rows:
                old_rows.append(max(trace.old_rows))
            if trace.accuracy:
                final = trace.accuracy[-1][1]
                recoveries.append(next(n for n, acc in trace.accuracy if acc >= RECOVERY_FRACTION * final))
        return {
            "arrivals": len(self.traces),
            "arrival_loss": float(np.mean(arrivals)),
            "spike": float(np.mean(spikes)),
            "recovery_samples": float(np.mean(recoveries)),
            "old_rows_spike": float(np.mean(old_rows)) if old_rows else math.nan,
        }


def run_heads(
    config: Config,
    contenders: list[Contender],
    streams: tuple[str, ...] = ("split-mnist", "split-digits"),
    losses: tuple[str, ...] = ("ce", "mse"),
    seed: int = 0,
) -> dict[str, Any]:
    """Each head-policy contender on each stream (class-incremental) under each training loss."""
    from stream_cl.evaluate.scoring import average_accuracy, average_forgetting
    from stream_cl.tools.datasets import load_stream

    rows: list[dict[str, Any]] = []
    for stream_name in streams:
        stream = load_stream(stream_name, seed=seed, send_task=True)
        for loss in losses:
            for contender in contenders:
                cfg = with_overrides(config, [f"strategy.loss={loss}", *contender.overrides])
                tracker = ArrivalTracker(stream)
                run = learn_stream(cfg, stream, "class", on_step=tracker, before_step=tracker.before)
                rows.append(
                    {
                        "stream": stream_name,
                        "loss": loss,
                        "head": contender.label,
                        **tracker.summary(),
                        "average_accuracy": average_accuracy(run.matrix),
                        "average_forgetting": average_forgetting(run.matrix),
                    }
                )
    return {"seed": seed, "strategy": config.strategy.name, "rows": rows, "goals": _goals(rows)}


def _goals(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stream and loss: ls against random (spike <= 0.5x, recovery <= 0.5x, accuracy no lower)."""
    groups: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        groups[f"{r['stream']} {r['loss']}"][r["head"]] = r
    goals = {}
    for key, heads in groups.items():
        if "ls" not in heads or "random" not in heads:
            continue
        ls, rnd = heads["ls"], heads["random"]
        spike = ls["spike"] / rnd["spike"]
        recovery = ls["recovery_samples"] / rnd["recovery_samples"] if rnd["recovery_samples"] else math.nan
        goals[key] = {
            "spike_ratio": spike,
            # mse: the part of ls's spike from earlier tasks' rows, against random's whole spike
            "old_rows_ratio": ls["old_rows_spike"] / rnd["spike"],
            "recovery_ratio": recovery,
            "accuracy_delta": ls["average_accuracy"] - rnd["average_accuracy"],
            "met": spike <= 0.5 and recovery <= 0.5 and ls["average_accuracy"] >= rnd["average_accuracy"],
        }
    return goals


def format_heads(result: dict[str, Any]) -> str:
    from stream_cl.evaluate.scoring import format_table

    headers = [
        "stream",
        "loss",
        "head",
        "arrival loss",
        "spike",
        "old rows",
        "samples to 90%",
        "avg acc",
        "avg forgetting",
    ]
    table = format_table(
        headers,
        [
            [
                r["stream"],
                r["loss"],
                r["head"],
                f"{r['arrival_loss']:.3f}",
                f"{r['spike']:.3f}",
                "-" if math.isnan(r["old_rows_spike"]) else f"{r['old_rows_spike']:.3f}",
                f"{r['recovery_samples']:.1f}",
                f"{r['average_accuracy']:.4f}",
                f"{r['average_forgetting']:.4f}",
            ]
            for r in result["rows"]
        ],
    )
    lines = [
        f"heads (class-incremental, strategy {result['strategy']}, seed {result['seed']}; spike = peak "
        f"per-step loss of the new class over its next {SPIKE_SAMPLES} samples, mean over arrivals; "
        "old rows = the part of it from earlier tasks' rows, mse only)",
        table,
    ]
    for key, g in result["goals"].items():
        old_rows = "" if math.isnan(g["old_rows_ratio"]) else f" (old rows alone {g['old_rows_ratio']:.2f}x)"
        lines.append(
            f"{key}: ls/random spike {g['spike_ratio']:.2f}x{old_rows}, recovery {g['recovery_ratio']:.2f}x, "
            f"avg acc {g['accuracy_delta']:+.4f}; goal (<=0.5x, <=0.5x, >=0) {'met' if g['met'] else 'NOT met'}"
        )
    return "\n".join(lines)


HELP = "head policies for new classes: loss spike, recovery, final accuracy and forgetting"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--heads", default=",".join(POLICIES), help="comma-separated head policies")
    p.add_argument(
        "--strategy",
        default=PROTECTION,
        help=f"protection every head policy runs under (default {PROTECTION}; see the module docstring)",
    )
    p.add_argument("--streams", default="split-mnist,split-digits", help="comma-separated built-in streams")
    p.add_argument("--losses", default="ce,mse", help="training losses to compare under (ce, mse)")
    p.add_argument(
        "--seed",
        default="0",
        help="stream seed, or a comma-separated list (e.g. 0,1,2,3,4,5): one run per seed, then how "
        "many seeds meet the goal and the mean ratios",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="HEAD:KEY=VALUE",
        help="a config override for one head, e.g. ls:strategy.head_options.min_samples=4",
    )


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    heads = comma_list(args.heads)
    per_head = overrides_by_name(args.override, heads, "HEAD")
    # Options of one policy are not valid for another: each head starts from no options, plus its
    # own `strategy.head_options.KEY=VALUE` overrides, folded into one table.
    contenders = [Contender(h, (f"strategy.head={h}", *_head_options_table(per_head[h]))) for h in heads]
    seeds = comma_ints(args.seed, "--seed")
    protected = with_overrides(config, [f"strategy.name={args.strategy}"])
    streams, losses = tuple(comma_list(args.streams)), tuple(comma_list(args.losses))
    results = [run_heads(protected, contenders, streams=streams, losses=losses, seed=seed) for seed in seeds]
    if len(results) == 1:
        return results[0], format_heads(results[0])
    result = {
        "strategy": results[0]["strategy"],
        "seeds": seeds,
        "runs": results,
        "summary": summarize(results),
    }
    return result, "\n\n".join([*map(format_heads, results), format_summary(result)])


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per stream and loss over the seeds' runs: on how many the goal is met, and the mean ratios."""
    from statistics import fmean

    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        for key, goal in result["goals"].items():
            by_key[key].append(goal)
    return {
        key: {
            "seeds": len(goals),
            "met": sum(g["met"] for g in goals),
            "spike_ratio_mean": fmean(g["spike_ratio"] for g in goals),
            "old_rows_ratio_mean": fmean(g["old_rows_ratio"] for g in goals),
            "recovery_ratio_mean": fmean(g["recovery_ratio"] for g in goals),
            "accuracy_delta_mean": fmean(g["accuracy_delta"] for g in goals),
        }
        for key, goals in by_key.items()
    }


def format_summary(result: dict[str, Any]) -> str:
    seeds = ",".join(map(str, result["seeds"]))
    lines = [
        f"over seeds {seeds} (ls against random; goal per seed: spike <=0.5x, recovery <=0.5x, avg acc >=0)"
    ]
    for key, s in result["summary"].items():
        old_rows = s["old_rows_ratio_mean"]
        old_rows_text = "" if math.isnan(old_rows) else f" (old rows alone {old_rows:.2f}x)"
        lines.append(
            f"{key}: goal met on {s['met']} of {s['seeds']} seeds; mean spike {s['spike_ratio_mean']:.2f}x"
            f"{old_rows_text}, recovery {s['recovery_ratio_mean']:.2f}x, avg acc {s['accuracy_delta_mean']:+.4f}"
        )
    return "\n".join(lines)


def _head_options_table(overrides: list[str]) -> list[str]:
    """`strategy.head_options={k = v, ...}` from a head's `strategy.head_options.k=v` overrides,
    then its other overrides (a `strategy.head_options.k` entry cannot follow a table value)."""
    prefix = "strategy.head_options."
    entries = []
    rest = []
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip().startswith(prefix):
            entries.append(f"{key.strip()[len(prefix) :]} = {value.strip()}")
        else:
            rest.append(item)
    return [f"strategy.head_options={{{', '.join(entries)}}}", *rest]
