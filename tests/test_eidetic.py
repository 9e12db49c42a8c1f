"""Mask freezing (`eidetic`): the no-forgetting guarantee, frozen parameters, norm layers, capacity, routing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from stream_cl.config import ModelConfig
from stream_cl.metrics import Metrics
from stream_cl.strategies import Batch, Boundary
from stream_cl.strategies.eidetic.consolidation import fit_ridge_head
from stream_cl.strategies.eidetic.strategy import Eidetic, protected_layers

SHAPE = (1, 8, 8)
OPTIMIZERS = {
    "adam+decay": {"optimizer": "adam", "lr": 0.01, "weight_decay": 0.01},
    "sgd+momentum": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}


def _strategy(backbone: str, optimizer: str, seed: int = 0, **options: Any) -> Eidetic:
    model = ModelConfig(
        backbone=backbone, hidden=[16, 12], seed=seed, device="cpu", batch_size=8, **OPTIMIZERS[optimizer]
    )
    opts = {
        "task_buffer": 32,
        "recovery_steps": 3,
        "max_attempts": 4,
        "router_features": 64,
        **options,
    }
    return Eidetic.build(SHAPE, model=model, device="cpu", **opts)


def _batch(task: int, classes: list[int], rng: np.random.Generator) -> Batch:
    """Task-specific inputs: a per-class prototype of the task plus noise."""
    y = rng.choice(classes, size=8)
    protos = np.stack([np.random.default_rng([task, int(c)]).random(int(np.prod(SHAPE))) for c in y])
    x = (protos + 0.2 * rng.standard_normal(protos.shape)).astype(np.float32).reshape(8, *SHAPE)
    return Batch(x=torch.from_numpy(x), y=torch.from_numpy(y.astype(np.int64)), task=task)


def _learn_task(s: Eidetic, task: int, rng: np.random.Generator, steps: int = 12) -> None:
    """What the learner does for one task: a boundary, its two new classes, then online steps."""
    s.on_boundary(Boundary(previous_task=task - 1 if task else None, task=task, reason="explicit"))
    classes = [2 * task, 2 * task + 1]
    s.add_classes(classes, task)
    for _ in range(steps):
        s.learn(_batch(task, classes, rng))


def _random_inputs(seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((16, *SHAPE)).astype(np.float32))


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
@pytest.mark.parametrize("seed", [0])
def test_earlier_task_heads_are_bit_identical_after_later_tasks(
    backbone: str, optimizer: str, seed: int
) -> None:
    """Every consolidated task's outputs (eval mode, task hint) on random inputs never change, to the bit."""
    s = _strategy(backbone, optimizer, seed=seed)
    rng = np.random.default_rng(seed)
    x = _random_inputs(seed + 100)
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for task in range(4):
        _learn_task(s, task, rng)
        for old, (logits, proba) in recorded.items():
            assert torch.equal(_head_logits(s, x, old), logits), (
                f"task {old}'s head moved while learning {task}"
            )
            served = s.predictor()(x, old)[0][:, s.task_classes[old]]
            assert torch.equal(served, proba), f"task {old}'s predictions moved while learning {task}"
        if task:  # task - 1 was consolidated at this task's boundary
            old = task - 1
            recorded[old] = (
                _head_logits(s, x, old),
                s.predict_proba(x, old)[0][:, s.task_classes[old]].clone(),
            )
    assert len(recorded) == 3


def _head_logits(s: Eidetic, x: torch.Tensor, task: int) -> torch.Tensor:
    """Task `task`'s head output in eval mode: its stored rows over the backbone's features."""
    classes, weight, bias = s.task_heads[task]
    s.model.eval()
    with torch.no_grad():
        logits = torch.nn.functional.linear(s.model.features(x), weight, bias)
    s.model.train()
    return logits


@pytest.mark.parametrize("backbone", ["mlp", "cnn"])
def test_frozen_parameters_unchanged_by_a_later_consolidation(backbone: str) -> None:
    """Entries fixed at task 0's consolidation, and BatchNorm statistics of its channels, stay equal tensor by tensor."""
    s = _strategy(backbone, "adam+decay")
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng)
    _learn_task(s, 1, rng)  # consolidates task 0
    params = dict(s._protected_params())
    masks = {n: m.clone() for n, m in s.fixed_mask.items()}
    before = {n: p.detach()[masks[n]].clone() for n, p in params.items()}
    assert any(m.any() for m in masks.values()), "task 0 owns nothing"
    norms = [(layer.norm, layer.norm.frozen.clone()) for layer in s.layers if layer.norm is not None]
    stats = [(n.running_mean[f].clone(), n.running_var[f].clone()) for n, f in norms]  # type: ignore[index]
    _learn_task(s, 2, rng)  # trains task 1, then consolidates it (pruning + recovery)
    for name, p in params.items():
        assert torch.equal(p.detach()[masks[name]], before[name]), f"{name}: a frozen entry moved"
    for (norm, frozen), (mean, var) in zip(norms, stats, strict=True):
        assert torch.equal(norm.running_mean[frozen], mean) and torch.equal(norm.running_var[frozen], var)  # type: ignore[index]
    assert (backbone == "cnn") == bool(norms)


def test_owned_neurons_never_read_newer_ones() -> None:
    """Synapses from units not owned by the same or an earlier consolidation into owned units are zero."""
    s = _strategy("mlp", "sgd+momentum")
    rng = np.random.default_rng(0)
    for task in range(3):
        _learn_task(s, task, rng)
    first, second = s.layers
    owned, prev_rank = s.rank[1], s.rank[0]
    for i in (owned >= 0).nonzero().flatten():
        unreadable = (prev_rank < 0) | (prev_rank > owned[i])
        assert (second.module.weight[i, unreadable] == 0).all()


def test_layernorm_in_a_protected_layer_is_refused() -> None:
    """LayerNorm mixes neurons, so building eidetic over it fails with a clear error."""
    with pytest.raises(ValueError, match="LayerNorm .* mixes neurons"):
        protected_layers(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU()))


def test_capacity_runs_out_loudly_and_serving_goes_on() -> None:
    """With no free neuron left, a warning is logged, the ratio reads 0, and prediction still works."""
    model = ModelConfig(hidden=[1], seed=0, device="cpu", batch_size=8)
    s = Eidetic.build(SHAPE, model=model, device="cpu", task_buffer=16, recovery_steps=1, router_features=16)
    rng = np.random.default_rng(0)
    assert s.free_capacity_ratio() == 1.0
    _learn_task(s, 0, rng)
    with capture_logs() as logs:
        _learn_task(s, 1, rng)
    assert s.free_capacity_ratio() == 0.0 and s.exhausted
    assert any(e["event"] == "capacity_exhausted" and e["log_level"] == "warning" for e in logs)
    with capture_logs() as later:
        _learn_task(s, 2, rng)
    assert not any(e["event"] == "capacity_exhausted" for e in later)  # warned once, not per task
    proba, routes = s.predict_proba(_random_inputs(1))
    assert torch.isfinite(proba).all() and all(r in (0, 1, 2) for r in routes)


def test_learner_exports_free_capacity(tmp_path: Any) -> None:
    """The learner's capacity gauges read the strategy after a boundary."""
    from stream_cl.learn.learner import Learner

    metrics = Metrics()
    learner = Learner.__new__(Learner)
    learner.metrics, learner.strategy = metrics, _strategy("mlp", "adam+decay")
    learner._capacity_gauges()
    assert metrics.sample_value("stream_cl_free_capacity_ratio") == 1.0
    assert metrics.sample_value("stream_cl_capacity_exhausted") == 0.0


def test_router_picks_the_task_and_a_hint_bypasses_it() -> None:
    """Without a hint the route is the router's task choice; with a hint it is the hint."""
    s = _strategy("mlp", "adam+decay")
    rng = np.random.default_rng(0)
    for task in range(3):
        _learn_task(s, task, rng, steps=30)
    batches = [_batch(t, [2 * t, 2 * t + 1], rng) for t in range(3)]
    x = torch.cat([b.x for b in batches])
    truth = [b.task for b in batches for _ in range(8)]
    proba, routes = s.predict_proba(x)
    assert np.mean(np.array(routes) == np.array(truth)) >= 0.6  # chance is 1/3
    for i, r in enumerate(routes):  # all probability lies on the routed task's classes
        assert proba[i, [2 * r, 2 * r + 1]].sum() == pytest.approx(1.0)
    assert s.predict_proba(x, 1)[1] == [1] * len(truth)


@pytest.mark.parametrize("weight", [0.1, 30.0, 1e4])
def test_no_hint_answers_with_the_best_joint_task_class_score(weight: float) -> None:
    """Without a hint, each task's classes score log p_head + router_weight · router score; the best
    pair's task answers with the softmax of its joint scores (recomputed here from the hinted heads)."""
    s = _strategy("mlp", "adam+decay", router_weight=weight)
    rng = np.random.default_rng(1)
    for task in range(3):
        _learn_task(s, task, rng, steps=20)
    x = torch.cat([_batch(t, [2 * t, 2 * t + 1], rng).x for t in range(3)] + [_random_inputs(2)])
    proba, routes = s.predict_proba(x)  # solves the router first if it is stale
    router = s.router.scores_fn()
    assert router is not None
    scores = router(x)
    joint = []
    for t in range(3):
        classes = s.task_classes[t]
        head_log_p = s.predict_proba(x, t)[0][:, classes].log()
        cols = [router.column[(t, c)] for c in classes]
        joint.append(head_log_p + weight * scores[:, cols])
    best = torch.stack([j.max(1).values for j in joint], 1).max(1).values
    for i, r in enumerate(routes):  # the routed task holds the best pair (up to float ties)
        assert float(joint[r][i].max()) >= float(best[i]) - 1e-4
        assert torch.allclose(proba[i, s.task_classes[r]], joint[r][i].softmax(0), atol=1e-5)
        assert proba[i].sum() == pytest.approx(1.0)
    if weight == 1e4:  # a dominant router weight routes by the router's best (task, class) pair
        by_router = [s.router.targets[int(c)][0] for c in scores.argmax(1)]
        assert routes == by_router


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task_buffer", 0),
        ("probe_tol", 1.0),
        ("max_attempts", 0),
        ("tol", -0.1),
        ("score", "l3"),
        ("router_weight", 0),
    ],
)
def test_bad_options_name_their_key(key: str, value: Any) -> None:
    """A bad option value raises an error that names strategy.options.KEY."""
    with pytest.raises(ValueError, match=f"strategy.options.{key}"):
        Eidetic.build(SHAPE, model=ModelConfig(hidden=[4], device="cpu"), device="cpu", **{key: value})


def test_taylor_scores_consolidate() -> None:
    """Taylor-score pruning runs and leaves some neurons owned and some free."""
    s = _strategy("cnn", "adam+decay", score="taylor")
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng)
    _learn_task(s, 1, rng)
    assert 0.0 < s.free_capacity_ratio() < 1.0


def _consolidations(
    s: Eidetic, learn: Any, events: tuple[str, ...] = ("eidetic_consolidated",)
) -> list[dict[str, Any]]:
    with capture_logs() as logs:
        learn()
    return [e for e in logs if e["event"] in events]


VISIT_ENDS = ("eidetic_consolidated", "eidetic_task_held")  # the events of a visit's buffer used up


def test_a_loose_probe_keeps_one_neuron_per_layer() -> None:
    """`probe_tol` near 1 accepts the smallest probe: the task keeps a single free neuron per layer."""
    s = _strategy("mlp", "adam+decay", probe_tol=0.99)
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng, steps=20)
    (event,) = _consolidations(s, lambda: _learn_task(s, 1, rng))
    assert event["units_kept"] == [1, 1] and event["attempts"] == 1


def test_a_recovery_that_fails_tol_is_undone_and_twice_the_fraction_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each failed attempt restores the model and keeps twice as many neurons, up to `max_attempts`."""
    s = _strategy("mlp", "adam+decay", probe_tol=0.99, max_attempts=3, recovery_steps=1)
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng, steps=20)
    calls = iter([1.0, 0.0, 0.0, 0.0])  # before pruning, then every attempt falls short
    monkeypatch.setattr(s, "_buffer_accuracy", lambda *a: next(calls))
    (event,) = _consolidations(s, lambda: _learn_task(s, 1, rng))
    # fractions 1/16, 1/8, 1/4 of the free [16, 12] units: [1, 1], [2, 2], [4, 3]
    assert event["attempts"] == 3 and event["units_kept"] == [4, 3]
    assert s.free_capacity_ratio() == pytest.approx((16 - 4 + 12 - 3) / 28)


def test_no_task_keeps_more_than_max_keep_of_the_free_neurons(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when every smaller fraction fails, a task keeps at most `max_keep` of the free units."""
    s = _strategy("mlp", "adam+decay", probe_tol=0.99, max_attempts=6, max_keep=0.5)
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng, steps=20)
    calls = iter([1.0] + [0.0] * 6)  # before pruning, then every attempt falls short
    monkeypatch.setattr(s, "_buffer_accuracy", lambda *a: next(calls))
    (event,) = _consolidations(s, lambda: _learn_task(s, 1, rng))
    assert event["units_kept"] == [8, 6]  # half of the free [16, 12], never all of them
    assert s.masks.free_units() == [8, 6]


def test_a_new_task_of_known_classes_trains_fresh_live_rows_and_old_answers_stay() -> None:
    """Domain shift: task 1 has task 0's classes. Its live rows restart (the ridge rows written at
    task 0's consolidation are gone, with a nonzero weight on every free feature), while task 0's
    hinted logits stay bit-identical."""
    s = _strategy("mlp", "adam+decay")
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng, steps=20)
    s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
    x = _random_inputs(3)
    before = _head_logits(s, x, 0)
    consolidated = s.model.head.weight[[0, 1]].detach().clone()
    free = ~s.masks.owned_features()
    assert bool(free.any()) and bool((consolidated[:, free] != 0).all()), "free columns restart from random"
    s.note_task(1, [0, 1])
    assert not torch.equal(s.model.head.weight[[0, 1]], consolidated)
    assert torch.equal(s.model.head.bias[[0, 1]], torch.zeros(2))
    for _ in range(10):
        s.learn(Batch(x=_batch(1, [0, 1], rng).x, y=_batch(0, [0, 1], rng).y, task=1))
    assert torch.equal(_head_logits(s, x, 0), before)
    s.note_task(1, [0, 1])  # known in task 1 already: its rows are not touched again
    trained = s.model.head.weight[[0, 1]].detach().clone()
    s.note_task(1, [1])
    assert torch.equal(s.model.head.weight[[0, 1]], trained)


def test_a_domain_shift_task_s_fresh_rows_start_from_a_ridge_fit_once_overdetermined() -> None:
    """Task 1 has task 0's classes: its fresh rows are replaced, once, by the closed-form ridge head
    on its buffer as soon as the buffer holds more samples than the head reads features (12 here)
    and each of its classes. The start still pending is kept in a checkpoint."""
    s = _strategy("mlp", "adam+decay")
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng, steps=20)
    s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
    s.note_task(1, [0, 1])
    restored = _strategy("mlp", "adam+decay")
    restored.load_state_dict(s.state_dict())
    assert s.ridge_start == restored.ridge_start == {1: [0, 1]}
    features = s.model.head.weight.shape[1]
    batches = [_batch(1, [0, 1], rng) for _ in range(features // 8 + 1)]
    for batch in batches[:-1]:  # not more samples than features yet
        s.learn(batch)
    assert s.ridge_start == {1: [0, 1]}
    s.learn(batches[-1])
    assert s.ridge_start == {}
    buffer = s.task_buffers.of(1)
    s.model.eval()
    with torch.no_grad():
        f = s.model.features(buffer.inputs())
    s.model.train()
    y = buffer.y[: len(buffer)]
    assert set(y.tolist()) == {0, 1}
    fit = fit_ridge_head(f, torch.ones(f.shape[1], dtype=torch.bool), y, 2)
    assert torch.equal(s.model.head.weight[[0, 1]], fit.weight)
    assert torch.equal(s.model.head.bias[[0, 1]], fit.bias)
    s.learn(_batch(1, [0, 1], rng))  # once: the rows train on from there
    assert not torch.equal(s.model.head.weight[[0, 1]], fit.weight)


def test_short_visits_wait_until_the_task_learned_enough_to_consolidate() -> None:
    """A gradual transition with task ids makes every switch a boundary: short visits are not each
    consolidated; a task is, at the first boundary after it learned `min_consolidation` samples."""
    s = _strategy("mlp", "adam+decay", min_consolidation=40)  # batches of 8 samples
    rng = np.random.default_rng(0)
    _learn_task(s, 0, rng, steps=20)

    def transition() -> None:
        s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))  # ends task 0's 160 samples
        s.add_classes([2, 3], 1)
        for visit in range(10):  # 1, 0, 1, 0, ...: five visits of 8 samples each
            task = 1 - visit % 2
            s.learn(_batch(task, [2 * task, 2 * task + 1], rng))
            s.on_boundary(Boundary(previous_task=task, task=1 - task, reason="explicit", recurring=True))

    events = _consolidations(s, transition, VISIT_ENDS)
    assert [e["task"] for e in events] == [0, 1, 0]  # 12 boundaries, three visits' buffers used
    s.learn(_batch(1, [2, 3], rng))  # a visit not consolidated yet
    restored = _strategy("mlp", "adam+decay", min_consolidation=40)
    restored.load_state_dict(s.state_dict())  # its buffer survives a checkpoint
    assert {t: b.seen for t, b in restored.task_buffers.by_task.items()} == {1: 8}


def test_router_learns_from_statistics_and_survives_a_checkpoint() -> None:
    """The ridge router routes held-out samples of three tasks well above chance, also after a reload."""
    s = _strategy("mlp", "adam+decay")
    rng = np.random.default_rng(0)
    for task in range(3):
        _learn_task(s, task, rng, steps=20)
    batches = [_batch(t, [2 * t, 2 * t + 1], rng) for t in range(3)]
    x = torch.cat([b.x for b in batches])
    truth = np.array([b.task for b in batches for _ in range(8)])
    routes = np.array(s.predict_proba(x)[1])
    assert np.mean(routes == truth) >= 0.9
    restored = _strategy("mlp", "adam+decay")
    restored.load_state_dict(s.state_dict())
    assert np.array_equal(np.array(restored.predict_proba(x)[1]), routes)


def test_bench_scores_each_task_after_its_consolidation() -> None:
    """`bench quality` finalizes R[i][i] with the model published at the boundary that ends task i.

    So a task's own accuracy includes its consolidation, and task-incremental forgetting of
    `eidetic` is exactly zero; the route accuracy of the class scenario is reported.
    """
    from stream_cl.bench.quality import learn_stream, with_overrides
    from stream_cl.config import Config
    from stream_cl.evaluate.scoring import average_accuracy, average_forgetting, backward_transfer
    from stream_cl.tools.datasets import load_stream

    config = with_overrides(
        Config(),
        [
            "strategy.name=eidetic",
            "model.device=cpu",
            "model.hidden=[64, 64]",
            "model.lr=0.01",
            "strategy.options={task_buffer = 64, recovery_steps = 5, max_attempts = 4, router_features = 128}",
        ],
    )
    stream = load_stream("split-digits", seed=0)
    run = learn_stream(config, stream, "task")
    assert average_forgetting(run.matrix) == 0.0 and backward_transfer(run.matrix) == 0.0
    assert average_accuracy(run.matrix) > 0.8  # it learned: the zeros above are not vacuous
    routed = learn_stream(config, stream, "class")
    assert 0.5 < routed.route_accuracy <= 1.0


def _revisit(s: Eidetic, task: int, rng: np.random.Generator, swap_labels: bool = False) -> None:
    """Task `task` back for a visit of 20 steps (its two classes swapped if `swap_labels`), ended by
    the boundary to the next task."""
    s.on_boundary(Boundary(previous_task=s.current_task, task=task, reason="explicit", recurring=True))
    classes = [2 * task, 2 * task + 1]  # known already: no class is added
    for _ in range(20):
        b = _batch(task, classes, rng)
        s.learn(Batch(x=b.x, y=4 * task + 1 - b.y if swap_labels else b.y, task=task))


@pytest.mark.parametrize("swap_labels", [False, True])
def test_a_returning_task_keeps_its_stored_rows_while_they_still_answer_it(
    swap_labels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task back for another visit whose stored rows still answer the visit's buffer (within
    `tol` of the whole network) keeps them: no neuron taken, no recovery, its answers with a hint
    bit-identical, the live rows of its classes its stored ones (on the owned features). A visit they no longer answer
    (the task's two labels swapped) is consolidated as any task is."""
    s = _strategy("mlp", "adam+decay")
    rng = np.random.default_rng(0)
    for task in range(2):
        _learn_task(s, task, rng, steps=20)
    _revisit(s, 0, rng, swap_labels)  # its boundary consolidated task 1
    x = _random_inputs(2)
    hinted = s.predict_proba(x, 0)[0]
    stored = s.task_heads[0]
    free = s.masks.free_units()
    recoveries: list[int] = []
    recover = s._recover
    monkeypatch.setattr(s, "_recover", lambda *a: (recoveries.append(1), recover(*a)))

    (event,) = _consolidations(
        s, lambda: s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit")), VISIT_ENDS
    )

    assert event["task"] == 0
    if swap_labels:
        assert event["event"] == "eidetic_consolidated" and recoveries
        assert all(now < before for now, before in zip(s.masks.free_units(), free, strict=True))
        return
    assert event["event"] == "eidetic_task_held" and not recoveries
    assert event["buffer_accuracy"] >= event["live_accuracy"] * (1 - s.options.tol)
    assert s.masks.free_units() == free
    assert s.task_heads[0] is stored
    assert torch.equal(s.predict_proba(x, 0)[0], hinted)
    owned = s.masks.owned_features()  # the live rows' other columns start over, as the free neurons do
    assert torch.equal(s.model.head.weight[[0, 1]][:, owned], stored[1][:, owned])
    assert torch.equal(s.model.head.bias[[0, 1]], stored[2])
