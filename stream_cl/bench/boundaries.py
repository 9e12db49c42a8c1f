"""`stream-cl bench boundaries`: every river drift detector side by side on streams with known tasks.

Streams, all sent without the `task` field, each ending with returns to earlier tasks so that
recurring-task matching is measured too:
- `permuted-mnist`: its 10 tasks, then tasks 0 and 5 again (their held-out samples);
- `split-mnist`: its 5 tasks, then tasks 0 and 2 again (held-out samples);
- `rbf`: river's `ConceptDriftStream` chaining `RandomRBF` concepts A B C A B, 2,000 samples
  each (abrupt drift at known positions; a concept's return keeps its centroids and draws fresh
  samples);
- any built-in stream with shapes (`split-mnist:gradual`, see `stream_cl.tools.streams.shapes`),
  as `stream-cl produce` sends it; `shapes` names one per shape on split-mnist (`SHAPE_STREAMS`).
  Unlabeled samples are predicted, not observed: positions count labeled samples only.

Each stream is learned once through the daemon's own `Learner` (test-then-train, boundaries
applied to the strategy) with the configured detector, recording every call the learner makes
to its boundary detector. Each other detector then replays that tape in a fresh
`BoundaryDetector`. The replay is exact when boundaries do not change what the strategy learns
(finetune with the default head policy); the configured detector's replay is checked against its
real run, and a mismatch is reported.

Scoring per stream and detector: a true boundary is found by the first event in
[boundary, boundary + max_delay) before the next boundary; delay = event sample - boundary;
every other event is a false alarm. Across a gradual transition, the boundary is where its new
task's first sample is sent (the transition's beginning). A return to an earlier task is recognised when its event is
`recurring` and maps to the task index that event opened for that earlier task.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from stream_cl.bench.options import comma_list
from stream_cl.config import Config

# Heavy imports (torch, river, the learner) live inside the functions: building the CLI parser
# imports this module for every `stream-cl` command.

HELP = "task-boundary detectors side by side: delay, false alarms, misses, recurring tasks"
ALL_STREAMS = ("permuted-mnist", "split-mnist", "rbf")
# `--streams shapes`: one stream per shape, on the same base stream and seed
SHAPE_STREAMS = tuple(
    f"split-mnist:{shape}" for shape in ("sharp", "gradual", "recurring", "imbalance", "label-free")
)
# river's sigmoid overflows for width 1 far from the drift point: 20 keeps the switch abrupt (the
# concepts mix only within ~20 samples of each known position) and finite.
DRIFT_WIDTH = 20
GOAL = {"stream": "permuted-mnist", "median_delay": 100, "false_alarms_per_10k": 1.0}


@dataclass
class LabeledStream:
    """A stream's samples in order with the truth: where tasks change and which task each segment is."""

    name: str
    xs: list[np.ndarray]
    ys: list[int | None]  # None: sent without its label
    shape: tuple[int, ...]
    starts: list[int]  # first labeled sample of each segment (starts[0] == 0), in labeled samples
    segment_tasks: list[int]  # true task of each segment
    base_segments: int  # segments of the benchmark itself; the ones after are revisits

    @property
    def n_labeled(self) -> int:
        return sum(y is not None for y in self.ys)


def _from_benchmark(name: str, seed: int, revisits: tuple[int, ...]) -> LabeledStream:
    from stream_cl.tools.datasets import load_stream

    stream = load_stream(name, seed=seed, send_task=False)
    parts = [(t.task_id, t.train_x, t.train_y) for t in stream.tasks]
    for k in revisits:  # held-out samples come sorted by class: shuffle them like a task's own
        task = stream.tasks[k]
        order = np.random.default_rng([seed, 3, k]).permutation(len(task.test_y))
        parts.append((task.task_id, task.test_x[order], task.test_y[order]))
    return _assemble(name, tuple(stream.input_shape), parts, len(stream.tasks))


def _rbf(seed: int, segment: int = 2000, concepts: tuple[int, ...] = (0, 1, 2, 0, 1)) -> LabeledStream:
    from river.datasets import synth

    def concept(k: int, visit: int) -> Any:
        return synth.RandomRBF(seed_model=seed * 10 + k, seed_sample=seed * 100 + visit, n_centroids=5)

    chain = concept(concepts[-1], len(concepts) - 1)
    for visit in range(len(concepts) - 2, -1, -1):
        chain = synth.ConceptDriftStream(
            concept(concepts[visit], visit), chain, position=segment, width=DRIFT_WIDTH, seed=seed
        )
    xs: list[np.ndarray] = []
    ys: list[int | None] = []
    for x, y in chain.take(segment * len(concepts)):
        xs.append(np.fromiter(x.values(), dtype=np.float32))
        ys.append(int(y))
    starts = [i * segment for i in range(len(concepts))]
    return LabeledStream("rbf", xs, ys, (len(xs[0]),), starts, list(concepts), len(concepts))


def _assemble(
    name: str, shape: tuple[int, ...], parts: list[tuple[int, np.ndarray, np.ndarray]], base: int
) -> LabeledStream:
    xs: list[np.ndarray] = []
    ys: list[int | None] = []
    starts, tasks = [], []
    for task, x, y in parts:
        starts.append(len(xs))
        tasks.append(task)
        xs.extend(x)
        ys.extend(int(v) for v in y)
    return LabeledStream(name, xs, ys, shape, starts, tasks, base)


def _shaped(name: str, seed: int) -> LabeledStream:
    """A built-in stream with shapes, as sent without the task field, and where its visits begin."""
    from stream_cl.tools.streams import load_stream

    stream = load_stream(name, seed=seed, send_task=False)
    samples = list(stream.samples())
    labeled_before = np.concatenate([[0], np.cumsum(stream.order.labeled)])
    segments = stream.order.segments
    starts = [int(labeled_before[s.first]) for s in segments]
    first_visits = len({s.task for s in segments})
    xs = [s.x for s in samples]
    ys = [s.y for s in samples]
    return LabeledStream(
        name, xs, ys, tuple(stream.input_shape), starts, [s.task for s in segments], first_visits
    )


def load_labeled(name: str, seed: int) -> LabeledStream:
    if ":" in name:
        return _shaped(name, seed)
    if name == "permuted-mnist":
        return _from_benchmark(name, seed, (0, 5))
    if name == "split-mnist":
        return _from_benchmark(name, seed, (0, 2))
    if name == "rbf":
        return _rbf(seed)
    raise ValueError(
        f"unknown stream {name!r}; valid: {', '.join(ALL_STREAMS)}, or a built-in stream with shapes"
    )


# -- running ----------------------------------------------------------------------------------------
Tape = list[tuple[str, tuple[Any, ...], dict[str, Any]]]


def learn_with_tape(config: Config, stream: LabeledStream) -> tuple[list[Any], Tape]:
    """Learn `stream` through the daemon's `Learner`; returns its boundary events and detector calls."""
    from stream_cl.detect.boundaries import BoundaryDetector, BoundaryEvent
    from stream_cl.ingest.chunk import Record
    from stream_cl.ingest.codec import Sample
    from stream_cl.learn.learner import Learner
    from stream_cl.metrics import Metrics
    from stream_cl.serve.snapshot import SnapshotHolder

    tape: Tape = []

    class TapedDetector(BoundaryDetector):
        def observe(self, *args: Any, **kwargs: Any) -> BoundaryEvent | None:
            tape.append(("observe", args, kwargs))
            return super().observe(*args, **kwargs)

        def observe_outcome(self, *args: Any, **kwargs: Any) -> BoundaryEvent | None:
            tape.append(("observe_outcome", args, kwargs))
            return super().observe_outcome(*args, **kwargs)

    learner = Learner(config, SnapshotHolder(), Metrics())
    learner.detector = TapedDetector(config.boundaries)
    records = [
        Record(0, i, Sample(x=x, y=y, id=i, shape=stream.shape), b"")
        for i, (x, y) in enumerate(zip(stream.xs, stream.ys, strict=True))
    ]
    for start in range(0, len(records), 500):
        learner.process(records[start : start + 500])
    learner.flush()
    return learner.boundaries, tape


def replay(config: Config, tape: Tape) -> list[Any]:
    """The events a fresh detector with `config.boundaries` returns for the same calls."""
    from stream_cl.detect.boundaries import BoundaryDetector

    detector = BoundaryDetector(config.boundaries)
    events = []
    for method, args, kwargs in tape:
        event = getattr(detector, method)(*args, **kwargs)
        if event is not None:
            events.append(event)
    return events


def score(events: list[Any], stream: LabeledStream, max_delay: int) -> dict[str, Any]:
    """Delays, false alarms, misses and recurring tasks recognised, against the stream's truth."""
    n = stream.n_labeled
    starts = stream.starts
    ends = starts[1:] + [n]
    found: dict[int, Any] = {}  # segment -> detecting event
    false_alarms = 0
    opened_for: dict[int, int] = {}  # detected task index -> true task of the segment it opened in
    for event in events:
        segment = int(np.searchsorted(starts, event.sample_index, side="right")) - 1
        if event.previous_task is None:
            opened_for[event.task] = stream.segment_tasks[segment]
            continue
        delay = event.sample_index - starts[segment]
        if segment > 0 and segment not in found and delay < min(max_delay, ends[segment] - starts[segment]):
            found[segment] = event
        else:
            false_alarms += 1
        opened_for.setdefault(event.task, stream.segment_tasks[segment])
    delays = [found[s].sample_index - starts[s] for s in sorted(found)]
    base = [found[s].sample_index - starts[s] for s in sorted(found) if s < stream.base_segments]
    returns = [s for s in range(1, len(starts)) if stream.segment_tasks[s] in stream.segment_tasks[:s]]
    recognised = sum(
        1
        for s in returns
        if s in found and found[s].recurring and opened_for.get(found[s].task) == stream.segment_tasks[s]
    )
    wrong = sum(
        1
        for e in events
        if e.recurring
        and e.previous_task is not None
        and opened_for.get(e.task)
        != stream.segment_tasks[int(np.searchsorted(starts, e.sample_index, side="right")) - 1]
    )
    return {
        "boundaries": len(starts) - 1,
        "found": len(found),
        "missed": len(starts) - 1 - len(found),
        "median_delay": float(np.median(delays)) if delays else None,
        "p90_delay": float(np.percentile(delays, 90)) if delays else None,
        "false_alarms": false_alarms,
        "false_alarms_per_10k": false_alarms / n * 10_000,
        "returns": len(returns),
        "recurring_recognised": recognised,
        "recurring_wrong": wrong,
        "samples": n,
        "base_boundaries": stream.base_segments - 1,
        "base_found": len(base),
        "base_median_delay": float(np.median(base)) if base else None,
    }


def _with_detector(config: Config, name: str) -> Config:
    b = config.boundaries
    params = b.drift_params if name.lower() == b.drift_detector.lower() else {}
    boundaries = dataclasses.replace(
        b, drift=True, drift_detector=name, drift_params=params, drift_signal="auto"
    )
    return dataclasses.replace(config, boundaries=boundaries)


def _event_key(e: Any) -> tuple[Any, ...]:
    return (e.sample_index, e.reason, e.task, e.recurring)


def run_boundaries_bench(
    config: Config, streams: list[str], detectors: list[str], seed: int = 0, max_delay: int = 1000
) -> dict[str, Any]:
    from stream_cl.detect.drift import canonical_name

    detectors = [canonical_name(d) for d in detectors]
    real_config = _with_detector(config, canonical_name(config.boundaries.drift_detector))
    real_name = real_config.boundaries.drift_detector
    results: dict[str, Any] = {
        "strategy": config.strategy.name,
        "seed": seed,
        "max_delay": max_delay,
        "streams": {},
    }
    for name in streams:
        stream = load_labeled(name, seed)
        t0 = time.perf_counter()
        real_events, tape = learn_with_tape(real_config, stream)
        learn_s = time.perf_counter() - t0
        replay_matches = [_event_key(e) for e in replay(real_config, tape)] == [
            _event_key(e) for e in real_events
        ]
        rows = {}
        for detector in detectors:
            cfg = real_config if detector == real_name else _with_detector(config, detector)
            events = real_events if detector == real_name else replay(cfg, tape)
            rows[detector] = score(events, stream, max_delay)
            rows[detector]["params"] = _params_of(cfg)
        results["streams"][name] = {
            "samples": stream.n_labeled,  # labeled: the samples a detector sees
            "segments": len(stream.starts),
            "learn_seconds": learn_s,
            "real_detector": real_name,
            "replay_matches_real_run": replay_matches,
            "detectors": rows,
        }
    goal = results["streams"].get(GOAL["stream"])
    if goal is not None:
        rows = goal["detectors"]
        results["goal"] = {
            **GOAL,
            "boundaries": next(iter(rows.values()))["base_boundaries"] if rows else 0,
            "met_by": [d for d, r in rows.items() if _meets_goal(r)],
        }
    return results


def _params_of(config: Config) -> dict[str, Any]:
    from stream_cl.detect.boundaries import build_monitor

    monitor = build_monitor(config.boundaries)
    assert monitor is not None
    return {"signal": monitor.signal, **monitor.params}


def _meets_goal(r: dict[str, Any]) -> bool:
    """The issue's goal, on the benchmark's own boundaries (revisits are extra, reported apart)."""
    return (
        r["base_found"] == r["base_boundaries"]
        and r["base_median_delay"] is not None
        and r["base_median_delay"] <= GOAL["median_delay"]
        and r["false_alarms_per_10k"] <= GOAL["false_alarms_per_10k"]
    )


def format_boundaries(results: dict[str, Any]) -> str:
    from stream_cl.evaluate.scoring import format_table

    rows = []
    notes = []
    for name, s in results["streams"].items():
        for detector, r in s["detectors"].items():
            rows.append(
                [
                    name,
                    detector,
                    r["params"]["signal"],
                    f"{r['found']}/{r['boundaries']}",
                    f"{r['base_found']}/{r['base_boundaries']}",
                    "-" if r["median_delay"] is None else f"{r['median_delay']:.0f}",
                    "-" if r["p90_delay"] is None else f"{r['p90_delay']:.0f}",
                    f"{r['false_alarms_per_10k']:.2f}",
                    r["missed"],
                    f"{r['recurring_recognised']}/{r['returns']}",
                    r["recurring_wrong"],
                ]
            )
        check = "matches" if s["replay_matches_real_run"] else "DOES NOT match"
        notes.append(
            f"{name}: {s['samples']} samples, {s['segments']} segments; learned once with "
            f"{s['real_detector']} ({s['learn_seconds']:.0f}s), replay {check} the real run"
        )
    headers = [
        "stream",
        "detector",
        "signal",
        "found",
        "own found",
        "delay p50",
        "delay p90",
        "FA/10k",
        "missed",
        "recurring",
        "wrong rec.",
    ]
    out = [
        f"task-boundary detection, strategy {results['strategy']}, seed {results['seed']}, "
        f"max delay {results['max_delay']} samples (delays in samples)",
        "found: every boundary, revisits included; own found: the benchmark's own boundaries; "
        "recurring: returns recognised / returns; wrong rec.: events mapped to the wrong earlier task",
        format_table(headers, rows),
        *notes,
    ]
    if "goal" in results:
        g = results["goal"]
        met = ", ".join(g["met_by"]) or "none"
        out.append(
            f"goal on {g['stream']}'s own {g['boundaries']} boundaries (every one found, median delay "
            f"<= {g['median_delay']}; <= {g['false_alarms_per_10k']:g} false alarm per 10k samples "
            f"over the whole stream): met by {met}"
        )
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--streams",
        default=",".join(ALL_STREAMS),
        help="comma-separated: " + ", ".join(ALL_STREAMS) + ", built-in streams with shapes "
        "(split-mnist:gradual), or 'shapes' for " + ", ".join(SHAPE_STREAMS),
    )
    p.add_argument("--detectors", default="all", help="comma-separated detector names, or 'all'")
    p.add_argument("--seed", type=int, default=0, help="the stream's seed (default: 0)")
    p.add_argument("--max-delay", type=int, default=1000, help="an event later than this is a false alarm")


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from stream_cl.detect.drift import DETECTORS

    detectors = list(DETECTORS) if args.detectors == "all" else comma_list(args.detectors)
    streams = [name for s in comma_list(args.streams) for name in (SHAPE_STREAMS if s == "shapes" else [s])]
    results = run_boundaries_bench(config, streams, detectors, seed=args.seed, max_delay=args.max_delay)
    return results, format_boundaries(results)
