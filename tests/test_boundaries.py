"""Task-boundary detection: golden drift indices per detector, explicit/new-class reasons, recurring
tasks mapped back, guard rails, state round-trips without pickles, config errors, and the learner
delivering each event once to the strategy, the log and the metrics."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

import stream_cl.learn.learner as learner_module
from stream_cl.bench.boundaries import LabeledStream, score
from stream_cl.cli import main
from stream_cl.config import BoundariesConfig, Config, ConfigError, load_config
from stream_cl.detect.boundaries import BoundaryDetector, BoundaryEvent
from stream_cl.detect.drift import DETECTORS
from stream_cl.ingest.codec import Sample
from stream_cl.ingest.source import Record
from stream_cl.learn.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.strategies import Boundary
from stream_cl.strategies.finetune import Finetune

BATCH = 32


@dataclass
class Outcomes:
    """A seeded stream as the detector sees it: per-sample labels, inputs, pre-update loss and correctness."""

    labels: list[int]
    xs: np.ndarray
    losses: np.ndarray
    correct: np.ndarray


def learning_stream(seed: int, starts: list[int], n: int, means: list[float], dim: int = 8) -> Outcomes:
    """Each segment (from `starts[k]`) is a task the model learns from scratch: error 0.9 decaying to 0.1."""
    rng = np.random.default_rng(seed)
    since = np.arange(n) - np.asarray(starts)[np.searchsorted(starts, np.arange(n), side="right") - 1]
    p_error = 0.1 + 0.8 * np.exp(-since / 150)
    correct = rng.random(n) > p_error
    losses = np.where(correct, rng.exponential(0.2, n), 0.7 + rng.exponential(1.5, n)).astype(np.float32)
    segment = np.searchsorted(starts, np.arange(n), side="right") - 1
    xs = (np.asarray(means)[segment][:, None] + 0.1 * rng.standard_normal((n, dim))).astype(np.float32)
    return Outcomes([0] * n, xs, losses, correct)


def run(
    detector: BoundaryDetector, data: Outcomes, start: int = 0, stop: int | None = None
) -> list[BoundaryEvent]:
    """Drive the detector like the learner does: observe each sample, report outcomes per full batch."""
    events: list[BoundaryEvent] = []
    stop = len(data.labels) if stop is None else stop
    pending: list[int] = []
    seen: set[int] = set()
    for i in range(start, stop):
        event = detector.observe(None, data.labels[i] not in seen, 0, i, label=data.labels[i], x=data.xs[i])
        seen.add(data.labels[i])
        if event is not None:
            events.append(event)
        pending.append(i)
        if len(pending) == BATCH:
            event = detector.observe_outcome(data.losses[pending], data.correct[pending], 0, pending[-1])
            pending = []
            if event is not None:
                events.append(event)
    return events


def observe_labels(det: BoundaryDetector, labels: list[int]) -> list[BoundaryEvent]:
    """Observe labels only (no outcomes): class evidence alone."""
    seen: set[int] = set()
    events = []
    for y in labels:
        if (event := det.observe(None, y not in seen, label=y)) is not None:
            events.append(event)
        seen.add(y)
    return events


def boundaries(events: list[BoundaryEvent]) -> list[int]:
    return [e.sample_index for e in events if e.previous_task is not None]


def detector(**overrides: object) -> BoundaryDetector:
    return BoundaryDetector(
        load_config(None, [f"boundaries.{k}={v}" for k, v in overrides.items()], env={}).boundaries
    )


# Golden: the stream changes task at samples 1000 and 2000 (new input distributions each time).
# Entries are (boundary sample, task index). Every detector finds both changes shortly after; EDDM
# also fires twice during task 0's learning curve (its error-distance test is noisy there, as the
# bench shows too), and its second false alarm maps back to task 0 by input signature.
GOLDEN = {
    "ADWIN": [(1056, 1), (2080, 2)],
    "DDM": [(1056, 1), (2048, 2)],
    "EDDM": [(320, 1), (736, 0), (1024, 2), (2048, 3)],
    "FHDDM": [(1024, 1), (2048, 2)],
    "HDDMA": [(1024, 1), (2016, 2)],
    "HDDMW": [(1024, 1), (2016, 2)],
    "KSWIN": [(1056, 1), (2048, 2)],
    "PageHinkley": [(1056, 1), (2048, 2)],
}


def test_golden_covers_every_detector() -> None:
    """Every registered river detector has a golden test."""
    assert set(GOLDEN) == set(DETECTORS)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_drift_indices(name: str) -> None:
    """A seeded stream with task changes at 1000 and 2000 gives the exact boundary indices expected."""
    events = run(detector(drift_detector=name), learning_stream(7, [0, 1000, 2000], 3000, [0.2, 0.5, 0.8]))
    assert [(e.sample_index, e.task) for e in events[1:]] == GOLDEN[name]
    assert all(e.reason == "drift" and e.evidence["detector"] == name for e in events[1:])


def test_explicit_task_ids_give_explicit_boundaries_and_recur_by_id() -> None:
    """A changing `task` field opens explicit boundaries; an id seen before maps back to its index."""
    det = detector()
    fields = ["a"] * 10 + ["b"] * 10 + ["a"] * 10
    events = [
        e for i, f in enumerate(fields) if (e := det.observe(f, i == 0, 0, 100 + i, label=0)) is not None
    ]
    assert [(e.sample_index, e.reason, e.task, e.task_id, e.recurring) for e in events] == [
        (0, "explicit", 0, "a", False),
        (10, "explicit", 1, "b", False),
        (20, "explicit", 0, "a", True),
    ]
    assert events[1].offset == 110 and events[1].evidence == {"task_field": "b"}
    assert det.task_ids == ["a", "b"]


def test_drift_is_ignored_while_samples_carry_a_trusted_task_field() -> None:
    """With explicit ids in the stream, a loss jump opens no drift boundary."""
    det = detector()
    data = learning_stream(7, [0, 1000], 2000, [0.2, 0.5])
    for i in range(2000):
        det.observe("t", i == 0, x=data.xs[i], label=0)
        if i % BATCH == BATCH - 1:
            assert det.observe_outcome(data.losses[i - 31 : i + 1], data.correct[i - 31 : i + 1]) is None
    assert det.task_ids == ["t"]


def test_new_labels_open_new_class_boundaries_after_min_task_length() -> None:
    """Labels new within the first min_task_length samples join the task; later ones open a task."""
    det = detector(min_task_length=20, drift="false")
    events = observe_labels(det, [0, 1] * 10 + [2] + [2, 3] * 5 + [4] + [2, 3] * 5)  # 4: task 1's 12th
    assert [(e.sample_index, e.reason, e.task) for e in events] == [(0, "new_class", 0), (20, "new_class", 1)]
    assert events[1].evidence == {"label": 2, "samples_in_task": 20}
    assert det.task_labels == [{0, 1}, {2, 3, 4}]


def test_returning_classes_map_back_to_their_task() -> None:
    """Class-incremental: labels of an earlier, disjoint task reopen that task (reason new_class)."""
    det = detector(drift="false")
    events = observe_labels(det, [0, 1] * 50 + [2, 3] * 50 + [0, 1] * 50)
    assert [(e.sample_index, e.reason, e.task, e.recurring) for e in events] == [
        (0, "new_class", 0, False),
        (100, "new_class", 1, False),
        (200, "new_class", 0, True),
    ]
    assert events[2].evidence["returning_to"] == 0


def test_domain_incremental_labels_do_not_count_as_returning() -> None:
    """Where tasks share labels, a label that is merely late in a task opens no boundary."""
    det = detector(drift="false", min_task_length=5)
    labels = [0, 1, 2] * 10 + [3, 0, 1] * 20 + [2] * 5  # task 1 shares 0 and 1 with task 0; 2 comes late
    events = observe_labels(det, labels)
    assert [(e.sample_index, e.reason, e.task) for e in events] == [(0, "new_class", 0), (30, "new_class", 1)]


def test_drift_to_a_known_input_distribution_maps_back_to_its_task() -> None:
    """Inputs like task 0's after a drift reopen task 0; unlike any earlier task, a new task opens."""
    data = learning_stream(3, [0, 1000, 2000, 3000], 4000, [0.2, 0.5, 0.2, 0.8])
    events = run(detector(), data)
    assert [(e.task, e.recurring) for e in events] == [(0, False), (1, False), (0, True), (2, False)]
    match = events[2].evidence["match"]
    assert match["nearest_task"] == 0 and match["distance"] <= 0.3


def test_recurring_off_always_opens_a_new_task() -> None:
    """With `recurring = "off"` the same stream gets a fresh task id at every drift."""
    data = learning_stream(3, [0, 1000, 2000, 3000], 4000, [0.2, 0.5, 0.2, 0.8])
    events = run(detector(recurring="off"), data)
    assert [e.task for e in events] == [0, 1, 2, 3]
    assert not any(e.recurring for e in events)


def gradual_change(seed: int, n: int = 2400, at: int = 1000, width: int = 300) -> Outcomes:
    """One change whose error ramps up over `width` samples, then a learning curve."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    ramp = 0.1 + 0.8 * (i - at) / width
    after = 0.1 + 0.8 * np.exp(-(i - at - width) / 150)
    p_error = np.where(i < at, 0.1 + 0.8 * np.exp(-i / 150), np.where(i < at + width, ramp, after))
    correct = rng.random(n) > p_error
    losses = np.where(correct, rng.exponential(0.2, n), 0.7 + rng.exponential(1.5, n)).astype(np.float32)
    return Outcomes([0] * n, np.zeros((n, 4), np.float32), losses, correct)


def test_cooldown_reports_one_change_once() -> None:
    """A gradual change fires EDDM three times without guard rails, once with the default cool-down."""
    bare = detector(drift_detector="EDDM", drift_cooldown=0, drift_warmup=0, min_task_length=0)
    assert boundaries(run(bare, gradual_change(1))) == [1216, 1280, 1344]
    assert boundaries(run(detector(drift_detector="EDDM"), gradual_change(1))) == [1184]


def test_warmup_and_min_task_length_hold_back_early_firings() -> None:
    """A detector that fires before its warm-up or the task's minimum length opens nothing."""
    data = learning_stream(7, [0, 1000, 2000], 3000, [0.2, 0.5, 0.8])
    assert boundaries(run(detector(drift_warmup=5000), data)) == []
    assert boundaries(run(detector(min_task_length=5000), data)) == []


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_state_round_trip_resumes_identically(name: str) -> None:
    """Saved mid-stream (plain values through torch's safe loader), a fresh detector continues identically."""
    data = learning_stream(5, [0, 1000, 2000, 3000], 4000, [0.2, 0.5, 0.2, 0.8])
    original = detector(drift_detector=name)
    run(original, data, stop=1824)
    buf = io.BytesIO()
    torch.save(original.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    restored = detector(drift_detector=name)
    restored.load_state_dict(state)
    after = [e.__dict__ | {"time": 0} for e in run(original, data, start=1824)]
    assert after and after == [e.__dict__ | {"time": 0} for e in run(restored, data, start=1824)]


def test_state_from_other_detector_parameters_restarts_the_detector() -> None:
    """A checkpoint of another detector configuration keeps the tasks but starts drift detection fresh."""
    data = learning_stream(5, [0, 1000], 1500, [0.2, 0.5])
    old = detector(drift_params="{threshold = 60.0}")
    run(old, data)
    new = detector()
    new.load_state_dict(old.state_dict())
    assert new.task_ids == old.task_ids
    assert new.monitor is not None and new.monitor.fed == 0 and not new.monitor.history


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["boundaries.drift_detector=CUSUM"], "boundaries.drift_detector"),
        (["boundaries.drift_params={nope = 1}"], "boundaries.drift_params.nope"),
        (
            ["boundaries.drift_detector=ADWIN", "boundaries.drift_params={delta = 2.0}"],
            "boundaries.drift_params.delta",
        ),
        (["boundaries.drift_params={threshold = 'high'}"], "boundaries.drift_params.threshold"),
        (
            ["boundaries.drift_detector=KSWIN", "boundaries.drift_params={stat_size = 200}"],
            "boundaries.drift_params",
        ),
        (["boundaries.drift_detector=DDM", "boundaries.drift_signal=loss"], "boundaries.drift_signal"),
        (["boundaries.recurring=sometimes"], "boundaries.recurring"),
        (["boundaries.drift_cooldown=-1"], "boundaries.drift_cooldown"),
    ],
)
def test_bad_boundaries_config_names_the_key(overrides: list[str], key: str) -> None:
    """A bad detector name, parameter or value is a ConfigError naming the key, before any sample."""
    with pytest.raises(ConfigError) as err:
        BoundaryDetector(load_config(None, overrides, env={}).boundaries)
    assert err.value.key == key


def test_detector_names_are_case_insensitive() -> None:
    """`adwin` selects river's ADWIN."""
    det = BoundaryDetector(BoundariesConfig(drift_detector="adwin"))
    assert det.monitor is not None and det.monitor.name == "ADWIN"


class RecordingFinetune(Finetune):
    """Finetune that records every boundary it is told about (this test's own strategy)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.events: list[Boundary] = []

    def on_boundary(self, event: Boundary) -> None:
        self.events.append(event)
        super().on_boundary(event)


def test_learner_delivers_each_event_once_to_strategy_log_and_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New-class and drift boundaries reach on_boundary, the log and the metrics exactly once each."""
    overrides = ["model.hidden=[16]", "model.lr=0.02", "evaluation.holdout_fraction=0"]
    config: Config = load_config(None, overrides, env={})
    monkeypatch.setattr(
        learner_module, "from_config", lambda cfg, shape: RecordingFinetune.build(shape, model=cfg.model)
    )
    rng = np.random.default_rng(0)
    x = rng.random((3000, 4)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(int)
    y[1200:2400] = 1 - y[1200:2400]  # labels flip: the model is confidently wrong, loss jumps
    y[2400:] = 2 + (x[2400:, 1] > 0.5)  # two new classes
    records = [Record(0, i, Sample(x=x[i], y=int(y[i])), b"") for i in range(3000)]
    metrics = Metrics()
    learner = Learner(config, SnapshotHolder(), metrics)
    with capture_logs() as logs:
        for start in range(0, 3000, 500):
            learner.process(records[start : start + 500])
        learner.flush()
    events = learner.boundaries
    assert [(e.reason, e.task) for e in events] == [("new_class", 0), ("drift", 1), ("new_class", 2)]
    assert 1200 <= events[1].sample_index <= 1300 and events[2].sample_index == 2400
    assert isinstance(learner.strategy, RecordingFinetune)
    assert [(b.previous_task, b.task, b.reason) for b in learner.strategy.events] == [
        (e.previous_task, e.task, e.reason) for e in events
    ]
    logged = [entry for entry in logs if entry["event"] == "task_boundary"]
    assert [(entry["reason"], entry["task_index"]) for entry in logged] == [
        (e.reason, e.task) for e in events
    ]
    assert metrics.sample_value("stream_cl_task_boundaries_total", {"reason": "drift"}) == 1
    assert metrics.sample_value("stream_cl_task_boundaries_total", {"reason": "new_class"}) == 1
    assert metrics.sample_value("stream_cl_current_task") == 2
    assert metrics.sample_value("stream_cl_tasks_seen") == 3


def test_bench_scoring_counts_delays_false_alarms_and_recurring_tasks() -> None:
    """The bench's scorer matches events to the truth: delays, false alarms, returns, wrong mappings."""
    stream = LabeledStream("toy", [], [0] * 400, (1,), [0, 100, 200, 300], [0, 1, 0, 2], base_segments=3)

    def event(at: int, task: int, previous: int | None, recurring: bool = False) -> BoundaryEvent:
        return BoundaryEvent("drift", previous, task, task, recurring, sample_index=at)

    events = [
        event(0, 0, None),
        event(110, 1, 0),
        event(150, 2, 1),
        event(230, 0, 2, True),
        event(330, 1, 0, True),
    ]
    r = score(events, stream, max_delay=1000)
    assert (r["found"], r["missed"], r["false_alarms"]) == (3, 0, 1)
    assert (r["median_delay"], r["base_found"], r["base_median_delay"]) == (30.0, 2, 20.0)
    assert (r["returns"], r["recurring_recognised"], r["recurring_wrong"]) == (1, 1, 1)


def test_bench_boundaries_verb_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream-cl bench boundaries` runs end to end on the river stream and writes its figures."""
    out = tmp_path / "b.json"
    argv = ["bench", "boundaries", "--streams", "rbf", "--detectors", "PageHinkley,HDDMA", "--json", str(out)]
    assert main([*argv, "--set", "model.hidden=[32]"]) == 0
    assert "rbf" in capsys.readouterr().out
    figures = json.loads(out.read_text())["streams"]["rbf"]
    assert figures["replay_matches_real_run"] is True
    assert set(figures["detectors"]) == {"PageHinkley", "HDDMA"}
    assert figures["detectors"]["PageHinkley"]["boundaries"] == 4


def test_batched_signature_sums_are_bit_identical_to_one_add_per_sample() -> None:
    """Input signatures are folded in per batch (`add_many`); the sums must round exactly as one
    `add` per sample did, whatever the batch split, or recurring matching could change."""
    from stream_cl.detect.boundaries import TaskSignature

    rng = np.random.default_rng(0)
    for scale in (1.0, 1e-3, 1e3, 1e7):
        xs = (rng.random((300, 50)) * scale).astype(np.float32)
        one, many = TaskSignature(50), TaskSignature(50)
        for x in xs:
            one.add(np.asarray(x, dtype=np.float64))
        for chunk in np.array_split(xs, [1, 7, 40, 41, 256]):
            many.add_many(chunk)
        assert one.n == many.n == 300
        assert np.array_equal(one.sum, many.sum) and np.array_equal(one.sumsq, many.sumsq)
        assert one.distance(xs[:32].mean(0)) == many.distance(xs[:32].mean(0))


def test_deferred_inputs_reach_the_signature_before_anything_reads_it() -> None:
    """The detector buffers inputs; its state and a later task's match see every input observed."""
    from stream_cl.detect.boundaries import TaskSignature

    cfg = load_config(None, ["boundaries.recurring=inputs"], env={}).boundaries
    det = BoundaryDetector(cfg)
    rng = np.random.default_rng(1)
    xs = rng.random((70, 6)).astype(np.float32)
    for i, x in enumerate(xs):
        det.observe(None, i == 0, 0, i, label=0, x=x)
    want = TaskSignature(6)
    for x in xs:
        want.add(np.asarray(x, dtype=np.float64))
    state = det.state_dict()["signatures"][0]
    assert state["n"] == 70
    assert np.array_equal(state["sum"].numpy(), want.sum)
    assert np.array_equal(state["sumsq"].numpy(), want.sumsq)


def test_a_named_task_sums_one_input_in_eight_and_an_unnamed_one_every_input() -> None:
    """While the stream names its tasks (trusted `task` field), its id finds a task again: the
    signature keeps every 8th input of each visit (the first included); without the field, every
    input. The recent window takes the same inputs."""
    from stream_cl.detect.boundaries import EXPLICIT_INPUT_EVERY, TaskSignature

    cfg = load_config(None, ["boundaries.recurring=both"], env={}).boundaries
    xs = np.random.default_rng(2).random((70, 6)).astype(np.float32)
    named, unnamed = BoundaryDetector(cfg), BoundaryDetector(cfg)
    for i, x in enumerate(xs):
        named.observe("a", i == 0, 0, i, label=0, x=x)
        unnamed.observe(None, i == 0, 0, i, label=0, x=x)
    kept = xs[::EXPLICIT_INPUT_EVERY]
    assert len(kept) == 9
    for det, inputs in ((named, kept), (unnamed, xs)):
        want = TaskSignature(6)
        for x in inputs:
            want.add(np.asarray(x, dtype=np.float64))
        state = det.state_dict()["signatures"][0]
        assert state["n"] == len(inputs)
        assert np.array_equal(state["sum"].numpy(), want.sum)
        assert np.array_equal(state["sumsq"].numpy(), want.sumsq)
        assert np.array_equal(np.stack(det.recent_x), inputs[-cfg.recurring_window :])


def test_detector_state_saved_as_float_lists_still_loads() -> None:
    """Checkpoints written before the state held tensors stored signatures and the recent window as
    float lists; they restore to the same detector."""
    import torch

    cfg = load_config(None, ["boundaries.recurring=inputs"], env={}).boundaries
    det = BoundaryDetector(cfg)
    for i, x in enumerate(np.random.default_rng(0).random((70, 6)).astype(np.float32)):
        det.observe(None, i == 0, 0, i, label=0, x=x)
    state = det.state_dict()
    assert isinstance(state["recent_x"], torch.Tensor) and isinstance(
        state["signatures"][0]["sum"], torch.Tensor
    )
    lists = dict(
        state,
        recent_x=[x.tolist() for x in state["recent_x"]],
        signatures=[
            {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state["signatures"][0].items()}
        ],
    )
    fresh, legacy = BoundaryDetector(cfg), BoundaryDetector(cfg)
    fresh.load_state_dict(state)
    legacy.load_state_dict(lists)
    assert len(legacy.recent_x) == len(fresh.recent_x) == 32
    assert all(np.array_equal(a, b) for a, b in zip(fresh.recent_x, legacy.recent_x, strict=True))
    for name in ("n", "sum", "sumsq"):
        assert np.array_equal(getattr(fresh.signatures[0], name), getattr(legacy.signatures[0], name))


class _Threshold:
    """A drift detector that is not river's: fires while the value is above `limit`."""

    def __init__(self, limit: float = 0.5) -> None:
        self.limit = limit
        self.drift_detected = False

    def update(self, x: float) -> None:
        self.drift_detected = x > self.limit


def test_a_registered_non_river_detector_is_built_from_config_and_fires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The detector registry takes any class with river's interface; parameters are checked by name."""
    from stream_cl.detect.drift import DetectorSpec, DriftMonitor, canonical_name, detector_params

    monkeypatch.setitem(
        DETECTORS,
        "Threshold",
        DetectorSpec(__name__, binary=False, defaults={"limit": 2.0}, class_name="_Threshold"),
    )
    name = canonical_name("threshold")
    assert detector_params(name, {}) == {"limit": 2.0}
    monitor = DriftMonitor(name, detector_params(name, {"limit": 3.0}), "loss")
    assert [monitor.update(x) for x in (1.0, 2.5, 3.5)] == [False, False, True]
    with pytest.raises(ConfigError, match=r"boundaries\.drift_params\.window_size"):
        detector_params(name, {"window_size": 4})
