"""The `interval` strategy (HyperInterval): sound bounds, the universal embedding, frozen tasks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stream_cl import checks
from stream_cl.config import ModelConfig
from stream_cl.strategies import Batch, Boundary
from stream_cl.strategies.interval.bounds import (
    HyperNetwork,
    TargetLayout,
    nested_centres,
    universal_embedding,
)
from stream_cl.strategies.interval.strategy import Interval


def _trained(beta: float = 1.0, tasks: int = 3, steps: int = 6, **options: object) -> Interval:
    """A tiny interval strategy driven through `tasks` two-class tasks like the learner does."""
    s = checks.factory_for(Interval, beta=beta, ramp_steps=3, **options)()
    assert isinstance(s, Interval)
    checks.Driver(s).feed([(t, [2 * t, 2 * t + 1]) for t in range(tasks) for _ in range(steps)])
    return s


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), radius=st.floats(0.0, 0.5), width=st.floats(0.0, 0.3))
def test_bounds_are_sound(seed: int, radius: float, width: float) -> None:
    """Random embeddings in the box and random inputs in the input box give outputs inside the bounds."""
    torch.manual_seed(seed)
    layout = TargetLayout([6, 5, 4])
    hyper = HyperNetwork(layout, embedding_dim=3, hidden=[7, 7], chunk_size=16, chunk_dim=2, n_slots=1)
    head_w, head_b = torch.randn(3, 4), torch.randn(3)
    centre = torch.randn(3)
    x_lo = torch.rand(5, 6) * 0.7
    x_hi = x_lo + width * torch.rand(5, 6)
    with torch.no_grad():
        theta_lo, theta_hi = hyper.bounds(centre, radius)
        h_lo, h_hi = layout.bounds(x_lo, x_hi, theta_lo, theta_hi)
        z_lo = h_lo @ head_w.clamp(min=0).T + h_hi @ head_w.clamp(max=0).T + head_b
        z_hi = h_hi @ head_w.clamp(min=0).T + h_lo @ head_w.clamp(max=0).T + head_b
        for _ in range(20):
            e = centre + radius * (2 * torch.rand(3) - 1)
            theta = hyper(e.unsqueeze(0))[0]
            assert (theta >= theta_lo - 1e-5).all() and (theta <= theta_hi + 1e-5).all()
            x = x_lo + (x_hi - x_lo) * torch.rand(5, 6)
            h = layout.forward(x, theta)
            z = h @ head_w.T + head_b
            assert (h >= h_lo - 1e-5).all() and (h <= h_hi + 1e-5).all()
            assert (z >= z_lo - 1e-5).all() and (z <= z_hi + 1e-5).all()


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), tasks=st.integers(1, 8), epsilon=st.floats(0.01, 5.0))
def test_universal_embedding_in_every_box(seed: int, tasks: int, epsilon: float) -> None:
    """The midpoint of the intersection lies in every nested task box, whatever the embeddings."""
    torch.manual_seed(seed)
    centres, radius = nested_centres(10 * torch.randn(tasks, 5), epsilon)
    e = universal_embedding(centres, radius)
    assert ((e - centres).abs() <= radius + 1e-7).all()


def test_trained_universal_embedding_in_every_task_box() -> None:
    """After three learned tasks, the served universal embedding lies inside each task's box."""
    s = _trained()
    assert s.frozen_slots == [0, 1]
    emb = torch.stack([s._embedding(t) for t in range(3)])
    centres, radius = nested_centres(emb, s.epsilon)
    e = universal_embedding(centres, radius)
    assert ((e - centres).abs() <= radius).all()
    for t in range(3):
        lo, hi = s.hyper.bounds(centres[t], radius)
        theta = s.universal_weights()
        assert (theta >= lo - 1e-5).all() and (theta <= hi + 1e-5).all(), f"θ* outside task {t}'s weight box"


def _weighted_drift(s: Interval, slot: int, target: torch.Tensor) -> float:
    """Relative drift of a slot's centre weights from `target`, in the regularizer's own metric."""
    weight = torch.ones_like(target) if s.weight_importance is None else s.weight_importance
    drift = (weight * (s._centre_weights(slot) - target) ** 2).sum()
    return float((drift / (weight * target**2).sum()).sqrt())


@pytest.mark.parametrize("importance", ["none", "fisher"])
def test_earlier_tasks_stay_near_their_targets(importance: str) -> None:
    """An earlier task's weights stay within tolerance of its stored target, thanks to the regularizer
    (plain L2, or weighted by the frozen tasks' Fisher information)."""
    drifts = {}
    # The penalty sums over weights: the suite's 200-weight target needs a far larger β than MNIST's.
    for beta in (0.0, 100.0):
        s = checks.factory_for(Interval, beta=beta, ramp_steps=3, importance=importance)()
        assert isinstance(s, Interval)
        checks.Driver(s).feed([(t, [2 * t, 2 * t + 1]) for t in range(3) for _ in range(4)])
        target = s.targets[0].clone()
        checks.Driver(s).feed([(2, [4, 5])] * 20, salt=100)
        drifts[beta] = _weighted_drift(s, 0, target)
    assert drifts[100.0] < 0.05, f"task 0's weights drifted by {drifts[100.0]:.3f} (relative)"
    assert drifts[0.0] > 2 * drifts[100.0], f"the regularizer made no difference: {drifts}"


def test_old_head_rows_stay_near_their_targets() -> None:
    """The shared head's rows of earlier classes are regularized towards their boundary values."""
    moved = {}
    for beta in (0.0, 100.0):
        s = _trained(beta=beta, tasks=2)
        assert s.head_target is not None
        w = s.head_target[0].clone()
        checks.Driver(s).feed([(1, [2, 3])] * 20, salt=5)
        assert s.head_importance is not None
        omega = s.head_importance[0][: w.shape[0]]  # the regularizer's metric
        with torch.no_grad():
            drift = (omega * (s.model.head.weight[: w.shape[0]] - w) ** 2).sum()
            moved[beta] = float((drift / (omega * w**2).sum()).sqrt())
    assert moved[100.0] < 0.5 * moved[0.0], f"old head rows were not held: {moved}"


def test_fisher_importance_sums_normalized_tasks() -> None:
    """Each frozen task adds its diagonal Fisher scaled to mean 1; the sum is non-negative and not flat."""
    s = _trained(tasks=3)
    assert s.weight_importance is not None and s.head_importance is not None
    assert (s.weight_importance >= 0).all()
    assert float(s.weight_importance.mean()) == pytest.approx(len(s.frozen_slots), rel=1e-4)
    assert float(s.weight_importance.std()) > 0
    assert s.head_target is not None and s.head_importance[0].shape == s.head_target[0].shape
    plain = checks.factory_for(Interval, importance="none")()
    checks.Driver(plain).feed(checks.TWO_TASKS)
    assert plain.weight_importance is None


def test_frozen_embeddings_are_bit_exact() -> None:
    """A frozen task's embedding does not move while later tasks learn (Adam moments included)."""
    s = _trained(tasks=2)
    frozen = s.hyper.embeddings[0].detach().clone()
    checks.Driver(s).feed([(1, [2, 3])] * 5, salt=7)
    assert torch.equal(s.hyper.embeddings[0], frozen)


def test_predictor_is_one_plain_forward_pass() -> None:
    """`routing = "universal"`: task-free serving is the plain MLP with θ* and the live head; a hint
    for the active task uses its centre weights, one for an ended task the weights and head rows
    stored at its boundary."""
    s = _trained(routing="universal")
    predict = s.predictor()
    x = checks.probe()
    head = s.model.head
    answer = s.task_answers[1]
    cases = (
        (None, s.universal_weights(), head.weight, head.bias),
        (2, s._centre_weights(2), head.weight, head.bias),
        (1, answer.theta, answer.weight, answer.bias),
    )
    for task, theta, w, b in cases:
        with torch.no_grad():
            logits = torch.nn.functional.linear(s.layout.forward(x, theta), w, b)
        if task is not None:
            classes = s.task_classes[task]
            full = torch.full((x.shape[0], s.n_classes), float("-inf"))
            full[:, classes] = logits if logits.shape[1] == len(classes) else logits[:, classes]
            logits = full
        assert torch.allclose(predict(x, task)[0], torch.softmax(logits, dim=1), atol=1e-6)


def test_hinted_answers_of_ended_tasks_never_change() -> None:
    """An ended task's hinted answers are bit-identical after later tasks are learned (its weights
    and head rows are kept from its own boundary), whatever the routing."""
    for routing in ("router", "universal", "entropy"):
        s = _trained(tasks=2, routing=routing)
        before = s.predictor()(checks.probe(), 0)[0].clone()
        driver = checks.Driver(s)
        driver.task = 1
        driver.feed([(t, [2 * t, 2 * t + 1]) for t in (2, 3) for _ in range(4)], salt=11)
        after = s.predictor()(checks.probe(), 0)[0]
        assert torch.equal(after[:, : before.shape[1]], before), routing  # later classes: probability 0


def test_router_routes_without_a_hint() -> None:
    """`routing = "router"` (the default): without a hint each sample goes to one known task,
    whose classes alone get its probability; the router keeps no samples."""
    s = _trained(tasks=3)
    assert s.routing == "router" and s.router is not None
    proba, routes = s.predict_proba(checks.probe())
    assert torch.allclose(proba.sum(1), torch.ones(proba.shape[0]))
    for row, task in zip(proba, routes, strict=True):
        assert task in (0, 1, 2)
        other = [c for c in range(s.n_classes) if c not in s.task_classes[task]]
        assert (row[other] == 0).all()
    assert "router" not in {k for k in s.memory_usage() if "buffer" in k}


def test_entropy_routing_picks_a_task_per_sample() -> None:
    """With `routing = "entropy"`, each sample is routed to one task and gets a distribution."""
    s = checks.factory_for(Interval, routing="entropy")()
    checks.Driver(s).feed(checks.TWO_TASKS)
    proba, routes = s.predict_proba(checks.probe())
    assert torch.allclose(proba.sum(1), torch.ones(proba.shape[0]))
    assert set(routes) <= {0, 1}


def test_hypernetwork_size_does_not_grow_with_the_target() -> None:
    """Chunking: H's last layer is hidden × chunk_size, whatever the target network's size."""
    small, large = TargetLayout([16, 8]), TargetLayout([784, 256, 256])
    sizes = [
        HyperNetwork(lay, 8, [10], chunk_size=64, chunk_dim=4, n_slots=2).layers[-1].weight.numel()
        for lay in (small, large)
    ]
    assert sizes == [10 * 64, 10 * 64]


def test_recurring_task_thaws_its_embedding() -> None:
    """Returning to a frozen task unfreezes its embedding and drops it from the regularized set."""
    s = _trained(tasks=2)
    s.on_boundary(Boundary(previous_task=1, task=0, reason="explicit", recurring=True))
    assert s.active == 0 and s.frozen_slots == [1]


def test_a_recurring_task_answers_live_then_stores_its_answer_again() -> None:
    """A task that comes back is served by its live network while it learns, and its stored
    answer is replaced (not mutated: published predictors hold the old one) when it ends again."""
    s = _trained(tasks=2)
    old = s.task_answers[0]
    published = s.predictor()
    before = published(checks.probe(), 0)[0].clone()
    s.on_boundary(Boundary(previous_task=1, task=0, reason="explicit", recurring=True))
    driver = checks.Driver(s)
    driver.task = 0
    driver.feed([(0, [0, 1])] * 3, salt=3)
    state = s._serving_state()
    assert 0 in state.live and 0 not in state.stored and 1 in state.stored
    s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit", recurring=True))
    assert s.task_answers[0] is not old and not torch.equal(s.task_answers[0].theta, old.theta)
    assert torch.equal(published(checks.probe(), 0)[0], before)


def test_a_batch_of_another_task_freezes_the_active_one() -> None:
    """Training moved to another slot without a boundary first still ends the active task: its
    embedding is frozen and its targets stored (before issue 29 it stayed live and unprotected)."""
    s = checks.factory_for(Interval, ramp_steps=3)()
    assert isinstance(s, Interval)
    driver = checks.Driver(s)
    driver.feed([(0, [0, 1])] * 4)
    x = checks.probe()
    s.add_classes([2, 3], 1)
    s.learn(Batch(x=x[:4], y=torch.tensor([2, 3, 2, 3]), task=1))
    assert s.active == 1 and s.frozen_slots == [0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epsilon", -1.0),
        ("embedding_dim", 0),
        ("hyper_hidden", [0]),
        ("routing", "vote"),
        ("importance", "ewc"),
    ],
)
def test_bad_options_name_the_key(key: str, value: object) -> None:
    """A bad option raises ValueError naming `strategy.options.KEY`."""
    with pytest.raises(ValueError, match=f"strategy.options.{key}"):
        Interval.build((1, 4, 4), model=ModelConfig(hidden=[4], device="cpu"), device="cpu", **{key: value})


def test_ramp_counts_samples_not_steps() -> None:
    """Single-sample batches (the learner's flushes at new labels) advance the ε ramp by one sample each."""
    s = checks.factory_for(Interval, ramp_steps=2)()
    s.add_classes([0, 1], 0)
    one = checks.make_batch(0, [0, 1])
    for _ in range(4):
        s.learn(Batch(x=one.x[:1], y=one.y[:1], task=0))
    assert s._progress() == pytest.approx(4 / (2 * checks.BATCH))


def test_short_visits_of_a_gradual_transition_consolidate_only_once_enough_was_learned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Back and forth between two tasks, one batch per visit: a task is consolidated when left
    only once it learned `min_consolidation` samples since its last consolidation, and a short
    visit of a frozen task leaves its embedding frozen as it was."""
    batch = len(checks.make_batch(0, [0, 1]).y)
    s = checks.factory_for(Interval, ramp_steps=3, min_consolidation=6 * batch)()
    assert isinstance(s, Interval)
    consolidated: list[int] = []
    consolidate = s._consolidate
    monkeypatch.setattr(s, "_consolidate", lambda: (consolidated.append(s.active), consolidate())[1])
    driver = checks.Driver(s)
    driver.feed([(0, [0, 1])] * 6)  # a first visit of 6 batches: enough
    driver.feed([(1, [2, 3])], salt=10)
    assert consolidated == [0] and s.frozen_slots == [0]
    frozen = s.frozen_embeddings[0].clone()
    for k in range(8):  # one batch per visit: task 0 learns 4 more batches, task 1 5 in all
        driver.feed([(k % 2, [2 * (k % 2), 2 * (k % 2) + 1])], salt=20 + k)
    assert consolidated == [0], "no short visit was consolidated"
    assert torch.equal(s.hyper.embeddings[0], frozen) and s.frozen_slots == [0]
    assert set(s.buffers.by_task) == {0, 1}  # the two tasks share the buffers' capacity
    assert len(s.buffers.of(1)) == min(5 * batch, s.buffers.capacity // 2)
    assert s.buffers.held() <= s.buffers.capacity
    driver.feed([(1, [2, 3])], salt=40)  # task 1's sixth batch, then a switch: consolidated
    driver.feed([(0, [0, 1])], salt=41)
    assert (
        consolidated == [0, 1] and s.frozen_slots == [1] and set(s.buffers.by_task) == {0}
    )  # 0 is active again
