"""The benchmarks on shaped streams: `bench quality` prints both references in every group, and
boundary detection holds on gradual changes (one boundary per change, returns recognised)."""

from __future__ import annotations

from pathlib import Path

import pytest

from stream_cl.bench.boundaries import LabeledStream, run_boundaries_bench, score
from stream_cl.bench.boundaries import load_labeled as load_bench_stream
from stream_cl.cli import main
from stream_cl.config import load_config
from stream_cl.detect.boundaries import BoundaryDetector, BoundaryEvent


def test_bench_quality_prints_joint_and_iid_online_beside_every_strategy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    streams = ["split-digits:recurring", "split-digits:imbalance"]
    argv = ["bench", "quality", "--strategies", "finetune", "--streams", ",".join(streams)]
    argv += ["--scenarios", "class,task", "--joint-epochs", "1", "--set", "model.batch_size=32"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "/ joint" in next(line for line in lines if "strategy" in line)
    for stream in streams:
        for scenario in ("class", "task"):
            group = {line.split()[2] for line in lines if line.split()[:2] == [stream, scenario]}
            assert group == {"finetune", "joint", "iid-online"}, (stream, scenario, group)


def observe_labels_only(name: str, **overrides: object) -> tuple[list[BoundaryEvent], LabeledStream]:
    """A shaped stream's labels through the detector alone (class evidence; drift off), as sent."""
    stream = load_bench_stream(name, seed=0)
    overrides_ = [f"boundaries.{k}={v}" for k, v in overrides.items()]
    config = load_config(None, ["boundaries.drift=false", *overrides_], env={})
    detector = BoundaryDetector(config.boundaries)
    seen: set[int] = set()
    events = []
    for y in stream.ys:
        if y is None:
            continue
        if (event := detector.observe(None, y not in seen, label=y)) is not None:
            events.append(event)
        seen.add(y)
    return events, stream


@pytest.mark.parametrize("width", [200, 400])
def test_a_gradual_change_opens_one_boundary_and_returns_are_recognised(width: int) -> None:
    """Through gradual transitions (the old task's samples trickling on), every change opens one
    boundary, and every return maps back to its task."""
    events, stream = observe_labels_only(f"split-mnist:recurring:gradual:width={width}")
    figures = score(events, stream, max_delay=1000)
    assert figures["found"] == figures["boundaries"] == 7
    assert figures["false_alarms"] == 0
    assert figures["recurring_recognised"] == figures["returns"] == 3 and figures["recurring_wrong"] == 0


def test_a_sharp_return_to_the_task_just_left_opens_at_once() -> None:
    """The guard against a gradual change's trickle does not delay a sharp return."""
    detector = BoundaryDetector(load_config(None, ["boundaries.drift=false"], env={}).boundaries)
    labels = [0, 1] * 100 + [2, 3] * 100 + [0, 1] * 100
    seen: set[int] = set()
    events = []
    for y in labels:
        if (event := detector.observe(None, y not in seen, label=y)) is not None:
            events.append(event)
        seen.add(y)
    assert [(e.sample_index, e.task, e.recurring) for e in events] == [
        (0, 0, False),
        (200, 1, False),
        (400, 0, True),
    ]


def test_drift_on_a_learned_gradual_stream_keeps_false_alarms_bounded() -> None:
    """split-mnist1d with gradual changes, learned by fip: while the old task still sends
    samples, its rising loss opens no drift boundary."""
    config = load_config(None, ["strategy.name=fip"], env={})  # it forgets the old task's last samples
    results = run_boundaries_bench(config, ["split-mnist1d:gradual"], ["PageHinkley", "ADWIN", "KSWIN"])
    for detector, figures in results["streams"]["split-mnist1d:gradual"]["detectors"].items():
        assert figures["found"] == 4, detector
        assert figures["false_alarms_per_10k"] <= 2.5, (detector, figures["false_alarms_per_10k"])


def test_spurious_boundaries_open_new_tasks_inside_visits_and_the_bench_prints_both_rows() -> None:
    """`--spurious N`: each false boundary falls in the middle half of its own visit, carries an id
    no stream sends, and the learner opens one boundary more per false alarm."""
    from stream_cl.bench.offline import stream_records
    from stream_cl.bench.quality import (
        SPURIOUS_TASK_IDS,
        Contender,
        learn_stream,
        run_quality,
        with_spurious_boundaries,
    )
    from stream_cl.tools.datasets import load_stream

    stream = load_stream("split-digits", seed=0, send_task=True)
    (records,) = stream_records(stream, chunk=stream.n_train)
    changed = with_spurious_boundaries(records, stream, 2)
    moved = [
        i for i, (a, b) in enumerate(zip(records, changed, strict=True)) if a.sample.task != b.sample.task
    ]
    ends = [s.start for s in stream.order.segments[1:]] + [stream.n_train]
    runs: dict[int, list[int]] = {}
    for i in moved:
        k = next(k for k, end in enumerate(ends) if i < end)
        runs.setdefault(k, []).append(i)
        assert changed[i].sample.task >= SPURIOUS_TASK_IDS
    assert len(runs) == 2
    for k, indices in runs.items():
        start, end = stream.order.segments[k].start, ends[k]
        assert indices == list(range(indices[0], end)), "a false boundary holds to its visit's end"
        assert start + (end - start) // 4 <= indices[0] < start + 3 * (end - start) // 4
    with pytest.raises(ValueError, match="spurious"):
        with_spurious_boundaries(records, stream, len(stream.order.segments) + 1)

    config = load_config(None, ["model.batch_size=16"], env={})
    result = run_quality(
        config, [Contender.strategy("replay")], ["split-digits"], ["class"], references=False, spurious=2
    )
    rows = {r["strategy"]: r for r in result["rows"]}
    assert set(rows) == {"replay", "replay+spurious"}
    assert rows["replay+spurious"]["spurious_boundaries"] == 2
    assert len(rows["replay"]["accuracy_matrix"]) == len(rows["replay+spurious"]["accuracy_matrix"]) == 5
    plain, alarmed = (learn_stream(config, stream, "class", spurious=n).learner.boundaries for n in (0, 2))
    assert len(alarmed) == len(plain) + 2 == 5 + 2  # the first sample opens task 0
    assert sum(e.task_id >= SPURIOUS_TASK_IDS for e in alarmed) == 2


def test_bench_spurious_pairs_each_model_seed_plain_and_with_false_boundaries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bench spurious`: per model seed, the plain run is `bench quality`'s run with that seed, the
    other the same with the false boundaries, and the cost is their difference in points."""
    import json

    from stream_cl.bench.quality import Contender, run_quality

    out = tmp_path / "spurious.json"
    argv = ["bench", "spurious", "--strategies", "finetune", "--streams", "split-digits"]
    argv += ["--model-seeds", "2", "--set", "model.batch_size=16", "--json", str(out)]
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert len(row["plain"]) == len(row["spurious"]) == 2
    for m in range(2):
        config = load_config(None, ["model.batch_size=16", f"model.seed={m}"], env={})
        quality = run_quality(
            config,
            [Contender.strategy("finetune")],
            ["split-digits"],
            ["class"],
            references=False,
            spurious=2,
        )
        by_label = {r["strategy"]: r["average_accuracy"] for r in quality["rows"]}
        assert row["plain"][m] == by_label["finetune"]
        assert row["spurious"][m] == by_label["finetune+spurious"]
        assert row["cost_points"][m] == pytest.approx(100 * (row["plain"][m] - row["spurious"][m]))
    assert row["mean_cost_points"] == pytest.approx(sum(row["cost_points"]) / 2)
    assert main(["bench", "spurious", "--model-seeds", "1"]) == 2
    assert "--model-seeds" in capsys.readouterr().err
