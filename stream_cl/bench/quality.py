"""`stream-cl bench quality`: strategies side by side on the same seeded streams, plus references.

The shared harness every strategy issue uses. For each stream × scenario, every contender learns
the same seeded stream through the daemon's own path (`Learner`: label mapping, boundaries,
batching, snapshots), in the order the stream sends it (any built-in stream, shapes included:
`split-mnist:recurring`); row R[i] of the accuracy matrix scores, on every task's test split seen
so far, the snapshot that ends visit i (a task's visit: one per task on a plain stream): the one
published at the boundary the next visit opens (after the strategy's boundary work, such as a
consolidation, as the daemon's evaluator finalizes it), or at the end of the stream for the last.
Scenarios:

- `class` (class-incremental): predict without a task hint;
- `task`  (task-incremental):  predict with the task hint (probability restricted to its classes).

Two references learn the same labeled samples outside the daemon, with the same model, in every
stream × scenario group:
- `joint`: offline, shuffled, several epochs over every task (the upper bound);
- `iid-online`: one shuffled pass (what the stream would give without its task order).
Every row also shows its average accuracy as a share of its group's `joint`.

Reported per row: final average accuracy, average (max-based) forgetting, BWT, route accuracy
(class scenario: test samples the final model routes to their own task; only strategies that pick
a task report one), learned samples/s (learning wall time only, evaluation excluded) and learned
samples per CPU-second of this process, which stays comparable across rows when other work shares
the machine. Later issues call `run_quality` with their strategy names (and per-contender config
overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stream_cl.bench.options import add_strategies_and_streams, comma_list, overrides_by_name
from stream_cl.config import Config, load_config

if TYPE_CHECKING:  # heavy imports stay inside functions: the CLI imports this module for --help
    from stream_cl.ingest.chunk import Record
    from stream_cl.learn.learner import Learner
    from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
    from stream_cl.strategies import Batch, StepResult, Strategy
    from stream_cl.tools.datasets import BenchmarkStream

SCENARIOS = ("class", "task")
REFERENCES = ("joint", "iid-online")
_CHUNK = 500  # records per `Learner.process` call, like one Kafka poll

StepHook = Callable[["Strategy", "Batch", "StepResult"], None]
BeforeStepHook = Callable[["Strategy", "Batch"], None]


@dataclass(frozen=True)
class Contender:
    """One row of the table: a label and the config overrides (`section.key=value`) that make it."""

    label: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def strategy(cls, name: str, *overrides: str, label: str | None = None) -> Contender:
        return cls(label or name, (f"strategy.name={name}", *overrides))


def with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """`config` with `section.key=value` overrides applied (typed and validated like `--set`).

    `section.key.sub=value` sets one entry of a table (e.g. `strategy.options.buffer_size=200`);
    `section.key={...}` replaces the whole table.
    """
    parsed = load_config(None, overrides, env={})
    for item in overrides:
        section, _, key = item.split("=", 1)[0].strip().partition(".")
        name, _, sub = key.partition(".")
        current = getattr(config, section)
        value = getattr(getattr(parsed, section), name)
        if sub:
            value = {**getattr(current, name), sub: value[sub]}
        config = dataclasses.replace(config, **{section: dataclasses.replace(current, **{name: value})})
    return config.validate()


@dataclass
class StreamRun:
    """A contender's pass over one stream: its accuracy matrix and learning time."""

    matrix: list[list[float]]
    learn_seconds: float  # wall time spent learning (evaluation excluded)
    learn_cpu_seconds: float  # this process's CPU time over the same spans
    samples: int
    learner: Learner
    # Class scenario: fraction of test samples the final model routed to their own task (mean over
    # tasks); NaN when the strategy reports no route (it does not pick a task by itself).
    route_accuracy: float = math.nan


def learn_stream(
    config: Config,
    stream: BenchmarkStream,
    scenario: str,
    on_step: StepHook | None = None,
    before_step: BeforeStepHook | None = None,
    spurious: int = 0,
) -> StreamRun:
    """Learn `stream` in its order through the daemon's `Learner`, scoring after each task's visit.

    `on_step(strategy, batch, result)` (optional) sees every learn step as the learner makes it,
    and `before_step(strategy, batch)` (optional, with `on_step`) the model just before it;
    it needs `model.batch_size` > 1, since it is attached after the first sample created the model.
    The daemon's held-out evaluator is switched off: the harness scores the stream's own test
    splits, so every training sample is learned, as by the references. `spurious` > 0 adds that
    many false boundaries (`with_spurious_boundaries`).
    """
    from stream_cl.bench.offline import stream_records
    from stream_cl.evaluate.scoring import accuracy
    from stream_cl.learn.learner import Learner
    from stream_cl.metrics import Metrics
    from stream_cl.serve.snapshot import SnapshotHolder

    holder = SnapshotHolder()
    learner = Learner(with_overrides(config, ["evaluation.holdout_fraction=0"]), holder, Metrics())
    (records,) = stream_records(stream, chunk=stream.n_train)  # offsets run on across tasks
    if spurious:
        records = with_spurious_boundaries(records, stream, spurious)
    segments = stream.order.segments
    firsts = [s.task for k, s in enumerate(segments) if s.task not in {p.task for p in segments[:k]}]
    if firsts != sorted(firsts):
        raise ValueError(f"{stream.name}: tasks must first appear in their index order to score R[i][j]")
    ends: list[Snapshot] = []  # per segment (a task's visit), the model its row R[i] is scored on
    seconds = cpu_seconds = 0.0
    bounds = [s.start for s in segments] + [stream.n_train]
    for k in range(len(segments)):
        start_index, end = bounds[k], bounds[k + 1]
        chunks = [records[j : min(j + _CHUNK, end)] for j in range(start_index, end, _CHUNK)]
        start, cpu_start = time.perf_counter(), time.process_time()
        for c, chunk in enumerate(chunks):
            if on_step is not None and learner.strategy is None:
                learner.process(chunk[:1])
                _attach(learner, on_step, before_step)
                chunk = chunk[1:]
            if c == 0 and ends:
                # This visit's first record opens the boundary that ends the previous one. Like the
                # daemon's evaluator, row R[i - 1] is finalized with the model published there: after
                # the strategy's boundary work (a consolidation, say), before any sample of task i.
                before = len(learner.boundaries)
                ended = _published_during(holder, functools.partial(learner.process, chunk[:1]))
                if ended and len(learner.boundaries) > before:
                    ends[-1] = ended[0]
                chunk = chunk[1:]
            learner.process(chunk)
        if k == len(segments) - 1:
            # Only the stream's end flushes: a task's partial last batch is learned when the next
            # task's first sample opens the boundary, as in the daemon (issue 29: flushing here
            # hid that the daemon learned that tail as the next task's).
            learner.flush()
        snapshot = learner.publish()
        seconds += time.perf_counter() - start
        cpu_seconds += time.process_time() - cpu_start
        assert snapshot is not None
        ends.append(snapshot)
    hint = scenario == "task"
    # Row i scores every task seen by the end of visit i (tasks first appear in index order).
    seen = [max(s.task for s in segments[: i + 1]) + 1 for i in range(len(segments))]
    matrix = [
        [
            accuracy(s, t.test_x, t.test_y.tolist(), t.task_id if hint else None)
            for t in stream.tasks[: seen[i]]
        ]
        for i, s in enumerate(ends)
    ]
    routed = math.nan if hint else route_accuracy(ends[-1], stream)
    return StreamRun(matrix, seconds, cpu_seconds, stream.n_labeled, learner, routed)


SPURIOUS_TASK_IDS = 1_000_000  # the task ids of false boundaries start here; no stream sends one


def with_spurious_boundaries(records: list[Record], stream: BenchmarkStream, count: int) -> list[Record]:
    """`records` with `count` false boundaries: what a boundary detector's false alarm does.

    Each one falls inside a different visit (the longest ones, ties in a seeded order), at a seeded
    point of the middle half of the visit's samples; from there to the visit's end, that task's
    samples carry a task id no stream sends, so the learner opens a new task with the same classes
    and the stream's next visit closes it as usual. Scoring is unchanged: every test split is still
    scored by the task it belongs to, without a hint (class scenario).
    """
    import numpy as np

    order, segments = stream.order, stream.order.segments
    ends = [s.start for s in segments[1:]] + [len(order)]
    spans = [
        np.flatnonzero((order.task[s.start : end] == s.task) & order.labeled[s.start : end]) + s.start
        for s, end in zip(segments, ends, strict=True)
    ]
    rng = np.random.default_rng([stream.seed, 7])
    ranked = sorted(range(len(spans)), key=lambda k: (-len(spans[k]), rng.random()))
    if count > len(spans) or any(len(spans[k]) < 8 for k in ranked[:count]):
        raise ValueError(
            f"{stream.name}: {count} spurious boundaries need {count} visits of 8 samples or more"
        )
    records = list(records)
    for n, k in enumerate(sorted(ranked[:count])):
        span = spans[k]
        cut = int(rng.integers(len(span) // 4, 3 * len(span) // 4))
        for i in span[cut:].tolist():
            r = records[i]
            assert r.sample is not None
            records[i] = dataclasses.replace(
                r, sample=dataclasses.replace(r.sample, task=SPURIOUS_TASK_IDS + n)
            )
    return records


def _published_during(holder: SnapshotHolder, call: Callable[[], object]) -> list[Snapshot]:
    """The snapshots `call` published into `holder`, in order."""
    published: list[Snapshot] = []
    publish = holder.publish

    def recording(snapshot: Snapshot) -> None:
        publish(snapshot)
        published.append(snapshot)

    holder.publish = recording  # type: ignore[method-assign]
    try:
        call()
    finally:
        del holder.publish  # the class's method again
    return published


def route_accuracy(snapshot: Snapshot, stream: BenchmarkStream) -> float:
    """Mean over tasks of the fraction of test samples routed (no task hint) to their own task.

    NaN when the snapshot reports no route (strategies that do not pick a task by themselves).
    """
    import numpy as np

    per_task = []
    for t in stream.tasks:
        routes = snapshot.predict(t.test_x).tasks
        if all(r is None for r in routes):
            return math.nan
        per_task.append(float(np.mean([r == t.task_id for r in routes])))
    return float(np.mean(per_task))


def _attach(learner: Learner, on_step: StepHook, before_step: BeforeStepHook | None = None) -> None:
    strategy = learner.strategy
    assert strategy is not None
    if learner.steps:
        raise ValueError("observing learn steps needs model.batch_size > 1")
    learn = strategy.learn

    def observed(batch: Batch) -> StepResult:
        if before_step is not None:
            before_step(strategy, batch)
        result = learn(batch)
        on_step(strategy, batch, result)
        return result

    # An instance attribute shadows the method: the learner's own calls go through the observer.
    strategy.learn = observed  # type: ignore[method-assign]


def reference_run(config: Config, stream: BenchmarkStream, scenario: str, epochs: int) -> dict[str, float]:
    """Plain shuffled training on every labeled sample at once (`finetune`, random head); final accuracies only."""
    import numpy as np
    import torch

    from stream_cl.strategies import Batch, from_config

    cfg = with_overrides(config, ["strategy.name=finetune", "strategy.head=random"])
    cfg = dataclasses.replace(cfg, strategy=dataclasses.replace(cfg.strategy, head_options={}, options={}))
    strategy = from_config(cfg, stream.input_shape)
    index: dict[int, int] = {}
    for t, task in enumerate(stream.tasks):
        new = [c for c in task.classes if c not in index]
        index.update({c: len(index) + k for k, c in enumerate(new)})
        if new:
            strategy.add_classes([index[c] for c in new], t)
        strategy.note_task(t, [index[c] for c in task.classes])
    train = stream.labeled_arrays()  # what the stream labels, as sent: a shape may thin or hide samples
    x = torch.from_numpy(train.x).reshape((-1, *stream.input_shape)).to(strategy.device)
    y = torch.tensor([index[int(c)] for c in train.y], device=strategy.device)
    bs = cfg.model.batch_size
    rng = np.random.default_rng([stream.seed, 3])
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(y))).to(strategy.device)
        for i in range(0, len(y), bs):
            idx = order[i : i + bs]
            strategy.learn(Batch(x=x[idx], y=y[idx], task=0))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    accs = []
    for t, task in enumerate(stream.tasks):
        tx = torch.from_numpy(task.test_x).reshape((-1, *stream.input_shape)).to(strategy.device)
        ty = torch.tensor([index[int(c)] for c in task.test_y], device=strategy.device)
        proba, _ = strategy.predict_proba(tx, t if scenario == "task" else None)
        accs.append(float((proba.argmax(1) == ty).float().mean()))
    return {
        "average_accuracy": float(np.mean(accs)),
        "samples_per_s": epochs * len(y) / seconds,
        "samples_per_cpu_s": epochs * len(y) / cpu_seconds,
    }


def run_quality(
    config: Config,
    contenders: Sequence[Contender],
    streams: Sequence[str] = ("split-mnist",),
    scenarios: Sequence[str] = SCENARIOS,
    seed: int = 0,
    joint_epochs: int = 5,
    references: bool = True,
    spurious: int = 0,
) -> dict[str, Any]:
    """Every contender (and the references) on every stream × scenario; rows for the table.

    `spurious` > 0: in the class scenario every contender also learns the stream with that many
    false boundaries (`with_spurious_boundaries`), in a row labelled `NAME+spurious`.
    """
    from stream_cl.evaluate.scoring import average_accuracy, average_forgetting, backward_transfer
    from stream_cl.tools.datasets import load_stream

    if spurious < 0:
        raise ValueError(f"spurious: expected a count >= 0, got {spurious}")
    rows: list[dict[str, Any]] = []
    for stream_name in streams:
        stream = load_stream(stream_name, seed=seed, send_task=True)
        for scenario in scenarios:
            if scenario not in SCENARIOS:
                raise ValueError(f"unknown scenario {scenario!r} (valid: {', '.join(SCENARIOS)})")
            base = {"stream": stream_name, "scenario": scenario}
            # False boundaries only make sense without a hint: the hint names the stream's own task.
            variants = [(c, 0) for c in contenders]
            if spurious and scenario == "class":
                variants = [(c, n) for c in contenders for n in (0, spurious)]
            for contender, false_alarms in variants:
                run = learn_stream(
                    with_overrides(config, contender.overrides), stream, scenario, spurious=false_alarms
                )
                rows.append(
                    {
                        **base,
                        "strategy": contender.label + ("+spurious" if false_alarms else ""),
                        "spurious_boundaries": false_alarms,
                        "average_accuracy": average_accuracy(run.matrix),
                        "average_forgetting": average_forgetting(run.matrix),
                        "backward_transfer": backward_transfer(run.matrix),
                        "route_accuracy": run.route_accuracy,
                        "samples_per_s": run.samples / run.learn_seconds,
                        "samples_per_cpu_s": run.samples / run.learn_cpu_seconds,
                        "accuracy_matrix": run.matrix,
                    }
                    | _interval_figures(run.learner.strategy)
                )
            if references:
                for label, epochs in zip(REFERENCES, (joint_epochs, 1), strict=True):
                    ref = reference_run(config, stream, scenario, epochs)
                    rows.append(
                        {
                            **base,
                            "strategy": label,
                            "average_forgetting": math.nan,
                            "backward_transfer": math.nan,
                            "route_accuracy": math.nan,
                        }
                        | ref
                    )
    return {"seed": seed, "joint_epochs": joint_epochs, "spurious": spurious, "rows": rows}


def _interval_figures(strategy: Strategy | None) -> dict[str, float]:
    """`interval` only: the mean half-width of its tasks' weight boxes. (Its `routing` answers the
    `class` scenario's rows, its tasks' own networks the `task` scenario's.)"""
    radius = None if strategy is None else strategy.weight_radius()
    return {} if radius is None else {"weight_half_width": float(radius)}


def format_quality(result: dict[str, Any]) -> str:
    from stream_cl.evaluate.scoring import format_table

    def cell(value: float, digits: int = 4) -> str:
        return "-" if math.isnan(value) else f"{value:.{digits}f}"

    # each row's average accuracy beside its group's upper bound
    joint = {
        (r["stream"], r["scenario"]): r["average_accuracy"] or math.nan
        for r in result["rows"]
        if r["strategy"] == "joint"
    }

    headers = [
        "stream",
        "scenario",
        "strategy",
        "avg acc",
        "/ joint",
        "avg forgetting",
        "BWT",
        "route acc",
        "samples/s",
        "samples/cpu-s",
    ]
    table = format_table(
        headers,
        [
            [
                r["stream"],
                r["scenario"],
                r["strategy"],
                cell(r["average_accuracy"]),
                cell(r["average_accuracy"] / joint.get((r["stream"], r["scenario"]), math.nan), 2),
                cell(r["average_forgetting"]),
                cell(r["backward_transfer"]),
                cell(r.get("route_accuracy", math.nan)),
                cell(r["samples_per_s"], 0),
                cell(r["samples_per_cpu_s"], 0),
            ]
            for r in result["rows"]
        ],
    )
    return (
        f"quality (seed {result['seed']}; joint = {result['joint_epochs']} shuffled epochs, "
        f"iid-online = 1 shuffled pass; / joint = avg acc as a share of joint's; forgetting is "
        f"max-based; route acc = test samples routed to their own task without a hint)\n{table}"
    ) + "".join(
        f"\n{r['stream']} {r['scenario']} {r['strategy']}: mean weight-box half-width {r['weight_half_width']:.3g}"
        for r in result["rows"]
        if "weight_half_width" in r
    )


HELP = "strategies side by side: final accuracy, forgetting, BWT, samples/s (+ joint, iid-online)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_strategies_and_streams(p, strategies="finetune,replay", streams="split-mnist")
    p.add_argument("--scenarios", default="class,task", help="class and/or task (comma-separated)")
    p.add_argument("--seed", type=int, default=0, help="the stream's seed (default: 0)")
    p.add_argument("--joint-epochs", type=int, default=5, help="epochs of the joint reference (default: 5)")
    p.add_argument("--no-references", action="store_true", help="skip the joint and iid-online rows")
    p.add_argument(
        "--spurious",
        type=int,
        default=0,
        help="class scenario: also learn with this many false boundaries, rows NAME+spurious (default: 0)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE",
        help="a config override for one strategy, e.g. replay:strategy.options.buffer_size=200",
    )


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    names = comma_list(args.strategies)
    per_name = overrides_by_name(args.override, names, "NAME")
    result = run_quality(
        config,
        [Contender.strategy(n, *per_name[n]) for n in names],
        streams=comma_list(args.streams),
        scenarios=comma_list(args.scenarios),
        seed=args.seed,
        joint_epochs=args.joint_epochs,
        references=not args.no_references,
        spurious=args.spurious,
    )
    return result, format_quality(result)
