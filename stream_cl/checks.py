"""The strategy conformance suite: every registered strategy runs every check (river's `checks`).

Each `check_*` takes a `StrategyFactory` and raises AssertionError on a violation. The tests
parametrize `CHECKS` over `stream_cl.strategies.available()`, so a strategy is checked the moment
it is registered (built-in or entry point). A check that cannot apply to a strategy is skipped only
through `Strategy.check_opt_outs = {"check_name": "the reason"}`, and the reason is mandatory.

Runs are tiny (a 16-feature input, a 12-unit MLP, batches of 8) so the whole suite stays fast for
every strategy; `Strategy.unit_test_options` shrinks a strategy's own buffers for it.

Third-party strategies can run the suite in their own tests:

    for check in stream_cl.checks.CHECKS:
        check(stream_cl.checks.factory_for(MyStrategy))
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from stream_cl.config import Config, ModelConfig, StrategyConfig
from stream_cl.strategies import (
    HEAD_POLICIES,
    Batch,
    Boundary,
    StepResult,
    Strategy,
    StrategyOptions,
    available,
    check_config,
    from_config,
    get,
)

INPUT_SHAPE = (1, 4, 4)
BATCH = 8

# (task, class indices of one batch), in stream order; a new index must be the next one in order.
Schedule = Sequence[tuple[int, Sequence[int]]]

TWO_TASKS: Schedule = [(0, [0, 1]), (0, [0, 1]), (0, [1, 0]), (1, [2, 3]), (1, [3, 2]), (1, [2, 3])]


class StrategyFactory(Protocol):
    """Builds a fresh strategy for a check; the same arguments must give the same strategy."""

    def __call__(
        self, *, head: str | None = None, head_options: Mapping[str, Any] | None = None, seed: int = 0
    ) -> Strategy: ...


def factory_for(
    cls: type[Strategy],
    head: str = "random",
    head_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> StrategyFactory:
    """A factory for `cls` on the suite's tiny model, with its `unit_test_options` (and `options`).

    `head` / `head_options` are what the factory builds when a check does not ask for a head.
    """
    default_head, default_options = head, head_options

    def build(
        *, head: str | None = None, head_options: Mapping[str, Any] | None = None, seed: int = 0
    ) -> Strategy:
        return cls.build(
            INPUT_SHAPE,
            model=_model(seed),
            head=head or default_head,
            head_options=head_options if head is not None else default_options,
            device="cpu",
            **{**cls.unit_test_options, **options},
        )

    return build


def _model(seed: int = 0) -> ModelConfig:
    return ModelConfig(hidden=[12], seed=seed, device="cpu", batch_size=BATCH)


# -- driving a strategy as the learner does --------------------------------------------------------
def make_batch(task: int, labels: Sequence[int], salt: int = 0) -> Batch:
    """Separable synthetic inputs: a fixed prototype per class plus seeded noise."""
    rng = np.random.default_rng([salt, task, *labels])
    y = np.resize(np.asarray(labels, dtype=np.int64), BATCH)
    protos = np.stack([np.random.default_rng([7, int(c)]).random(int(np.prod(INPUT_SHAPE))) for c in y])
    x = np.clip(protos + 0.1 * rng.standard_normal(protos.shape), 0.0, 1.0).astype(np.float32)
    return Batch(x=torch.from_numpy(x).reshape(BATCH, *INPUT_SHAPE), y=torch.from_numpy(y), task=task)


def probe() -> torch.Tensor:
    """Inputs the checks predict on."""
    return torch.from_numpy(np.random.default_rng(99).random((5, *INPUT_SHAPE)).astype(np.float32))


class Driver:
    """Feeds a schedule like the learner does: a boundary when the task changes (and at the first
    batch), `add_classes` for never-seen labels, `note_task` for known ones, then `learn`."""

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.task: int | None = None

    def prepare(self, task: int, labels: Sequence[int]) -> None:
        """Everything the learner does for a batch before `learn`."""
        s = self.strategy
        if task != self.task:
            s.on_boundary(Boundary(previous_task=self.task, task=task, reason="explicit"))
            self.task = task
        new = sorted({c for c in labels if c >= s.n_classes})
        if new:
            s.add_classes(new, task)
        s.note_task(task, sorted({c for c in labels if c not in new}))

    def feed(self, schedule: Schedule, salt: int = 0) -> list[StepResult]:
        results = []
        for step, (task, labels) in enumerate(schedule):
            self.prepare(task, labels)
            results.append(self.strategy.learn(make_batch(task, labels, salt=salt + step)))
        return results


def _assert_proba(proba: torch.Tensor, n_classes: int) -> None:
    assert proba.shape == (probe().shape[0], n_classes), f"probabilities shaped {tuple(proba.shape)}"
    assert torch.isfinite(proba).all(), "non-finite probabilities"
    if n_classes:
        assert torch.allclose(proba.sum(1), torch.ones(proba.shape[0]), atol=1e-5), "rows do not sum to 1"


def _same_predictions(a: Strategy, b: Strategy, what: str) -> None:
    x = probe()
    for task in (None, 0):
        pa, pb = a.predict_proba(x, task)[0], b.predict_proba(x, task)[0]
        assert torch.equal(pa, pb), f"{what}: predictions differ (task hint {task})"


def _same_steps(a: Sequence[StepResult], b: Sequence[StepResult], what: str) -> None:
    for i, (ra, rb) in enumerate(zip(a, b, strict=True)):
        assert np.array_equal(ra.sample_losses, rb.sample_losses), f"{what}: step {i} losses differ"


# -- the checks ------------------------------------------------------------------------------------
def check_predict_before_learning(factory: StrategyFactory) -> None:
    """Predicting works on a fresh strategy, and after classes are added but nothing learned."""
    s = factory()
    proba, routes = s.predict_proba(probe())
    _assert_proba(proba, 0)
    assert len(routes) == probe().shape[0]
    _assert_proba(s.predictor()(probe(), None)[0], 0)
    s.add_classes([0, 1], 0)
    _assert_proba(s.predict_proba(probe())[0], 2)
    _assert_proba(s.predict_proba(probe(), 0)[0], 2)
    _assert_proba(s.predictor()(probe(), 0)[0], 2)


def check_learn_does_not_mutate_input(factory: StrategyFactory) -> None:
    """`learn` leaves the batch's tensors as they were (buffers must copy, not alias)."""
    s = factory()
    driver = Driver(s)
    for step, (task, labels) in enumerate(TWO_TASKS):
        batch = make_batch(task, labels, salt=step)
        x, y = batch.x.clone(), batch.y.clone()
        driver.prepare(task, labels)
        s.learn(batch)
        assert torch.equal(batch.x, x) and torch.equal(batch.y, y), f"step {step} changed its input batch"


def check_step_result(factory: StrategyFactory) -> None:
    """`learn` returns one finite loss and one correctness flag per stream sample."""
    for r in Driver(factory()).feed(TWO_TASKS):
        assert r.sample_losses.shape == (BATCH,) and r.correct.shape == (BATCH,)
        assert r.correct.dtype == np.bool_
        assert np.isfinite(r.sample_losses).all() and np.isclose(r.loss, r.sample_losses.mean())


def check_seeded_determinism(factory: StrategyFactory) -> None:
    """The same seed and stream give the same step losses and the same predictions."""
    a, b = factory(seed=3), factory(seed=3)
    _same_steps(Driver(a).feed(TWO_TASKS), Driver(b).feed(TWO_TASKS), "same seed")
    _same_predictions(a, b, "same seed")


def _roundtrip(factory: StrategyFactory, restore: Callable[[Strategy], Strategy], what: str) -> None:
    original = factory()
    driver = Driver(original)
    driver.feed(TWO_TASKS)
    copy = restore(original)
    _same_predictions(original, copy, what)
    assert copy.memory_usage() == original.memory_usage(), f"{what}: buffers differ"
    # Resuming must continue exactly where the original is (optimizer, RNG, buffers, statistics).
    more: Schedule = [(1, [2, 3]), (2, [4, 5]), (2, [5, 4])]
    resumed = Driver(copy)
    resumed.task = driver.task
    _same_steps(driver.feed(more, salt=50), resumed.feed(more, salt=50), f"{what}, resumed")
    _same_predictions(original, copy, f"{what}, resumed")


def check_checkpoint_roundtrip(factory: StrategyFactory) -> None:
    """state_dict → torch.save → torch.load(weights_only) → a fresh strategy predicts and learns the same."""

    def restore(s: Strategy) -> Strategy:
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        buf.seek(0)
        fresh = factory()
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        return fresh

    _roundtrip(factory, restore, "checkpoint")


def check_pickle_roundtrip(factory: StrategyFactory) -> None:
    """A pickled and unpickled strategy predicts and learns the same as the original."""
    _roundtrip(factory, lambda s: pickle.loads(pickle.dumps(s)), "pickle")


def check_boundary_at_step_zero(factory: StrategyFactory) -> None:
    """A boundary before any class or step (the learner's first sample) is handled."""
    s = factory()
    s.on_boundary(Boundary(previous_task=None, task=0, reason="explicit"))
    _assert_proba(s.predict_proba(probe())[0], 0)
    driver = Driver(s)
    driver.task = 0
    driver.feed([(0, [0, 1])])
    _assert_proba(s.predict_proba(probe(), 0)[0], 2)


def check_repeated_boundaries(factory: StrategyFactory) -> None:
    """Several boundaries in a row with no step between them, then a recurring task, are handled."""
    s = factory()
    driver = Driver(s)
    driver.feed([(0, [0, 1])])
    for previous, task in ((0, 1), (1, 2), (2, 3), (3, 1)):
        s.on_boundary(Boundary(previous_task=previous, task=task, reason="drift", recurring=task == 1))
    driver.task = 1
    for r in driver.feed([(1, [2, 0]), (1, [2, 1])]):
        assert np.isfinite(r.sample_losses).all()
    _assert_proba(s.predict_proba(probe(), 1)[0], 3)


def check_late_labels(factory: StrategyFactory) -> None:
    """A label first seen mid-task, and old labels recurring in a later task, are learned."""
    s = factory()
    Driver(s).feed([*TWO_TASKS, (1, [4, 2]), (1, [0, 4]), (1, [4, 3])])
    assert s.n_classes == 5
    _assert_proba(s.predict_proba(probe())[0], 5)
    proba = s.predict_proba(probe(), 1)[0]
    _assert_proba(proba, 5)
    assert (proba[:, 1] == 0).all(), "class 1 never occurred in task 1 but got probability under its hint"


def check_task_hint_restricts_classes(factory: StrategyFactory) -> None:
    """With a task hint, all probability lies on that task's classes, live and in the predictor."""
    s = factory()
    Driver(s).feed(TWO_TASKS)
    predict = s.predictor()
    for task, classes in ((0, [0, 1]), (1, [2, 3])):
        for proba in (s.predict_proba(probe(), task)[0], predict(probe(), task)[0]):
            other = [c for c in range(s.n_classes) if c not in classes]
            assert (proba[:, other] == 0).all(), f"task {task} hint leaks probability to {other}"


def check_predictor_is_a_frozen_copy(factory: StrategyFactory) -> None:
    """A published predictor keeps predicting the same while the strategy goes on learning."""
    s = factory()
    driver = Driver(s)
    driver.feed(TWO_TASKS[:3])
    predict = s.predictor()
    before = predict(probe(), None)[0].clone()
    driver.feed(TWO_TASKS[3:])
    assert torch.equal(predict(probe(), None)[0], before), "the predictor changed after later learning"


def check_hinted_answers_do_not_change(factory: StrategyFactory) -> None:
    """A strategy that claims task-hinted protection (`Strategy.protects_with_task_hint`): once a
    task has ended, its answers with its task hint stay the same while later tasks are learned,
    in a published predictor built later and in `predict_proba`. Others: nothing to check."""
    s = factory()
    if not s.protects_with_task_hint():
        return
    driver = Driver(s)
    driver.feed(TWO_TASKS)
    driver.prepare(2, [4, 5])  # the boundary that ends task 1
    x = probe()
    ended = {0: [0, 1], 1: [2, 3]}
    before = {t: (s.predictor()(x, t)[0].clone(), s.predict_proba(x, t)[0].clone()) for t in ended}
    driver.feed([(t, [2 * t, 2 * t + 1]) for t in (2, 3) for _ in range(3)], salt=5)
    for t, classes in ended.items():
        now = (s.predictor()(x, t)[0], s.predict_proba(x, t)[0])
        for what, old, new in zip(("predictor", "predict_proba"), before[t], now, strict=True):
            assert (new[:, old.shape[1] :] == 0).all(), f"task {t}'s hinted {what} leaks to later classes"
            new = new[:, : old.shape[1]]
            assert torch.allclose(new, old, rtol=0, atol=1e-6), (
                f"task {t}'s hinted {what} changed after later tasks were learned "
                f"(max change {float((new - old).abs().max()):.3g}) on classes {classes}"
            )


def check_memory_bounded(factory: StrategyFactory) -> None:
    """Every buffer stays within its configured size, with a buffered head policy too."""
    s = factory(head="ls", head_options={"refresh_buffer": 6})
    driver = Driver(s)
    schedule: Schedule = [(t, [2 * t, 2 * t + 1]) for t in range(4) for _ in range(4)]
    for step, item in enumerate(schedule):
        driver.feed([item], salt=step)
        usage = s.memory_usage()
        assert "head.refresh_buffer" in usage, "the head policy's buffer is not reported"
        for name, (held, capacity) in usage.items():
            assert 0 <= held <= capacity, f"step {step}: {name} holds {held} > its capacity {capacity}"


def check_composes_with_head_policies(factory: StrategyFactory) -> None:
    """Every head policy works under the strategy, and frozen old rows stay bit-identical."""
    for head in HEAD_POLICIES:
        s = factory(head=head, head_options={"freeze_old": True})
        driver = Driver(s)
        driver.feed(TWO_TASKS[:3])
        s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
        driver.task = 1
        old_w, old_b = s.model.head.weight[:2].detach().clone(), s.model.head.bias[:2].detach().clone()
        driver.feed(TWO_TASKS[3:])
        assert torch.equal(s.model.head.weight[:2], old_w), f"head {head}: frozen rows moved"
        assert torch.equal(s.model.head.bias[:2], old_b), f"head {head}: frozen biases moved"
        _assert_proba(s.predict_proba(probe())[0], 4)


def _toml(value: Any) -> str:
    """`value` as TOML text, as `--set strategy.options.KEY=TEXT` and the environment deliver it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def check_options_roundtrip(factory: StrategyFactory) -> None:
    """`options_type` is a frozen `StrategyOptions` dataclass with a default for every field (so
    `strategy.options = {}` builds the strategy), and options written to `strategy.options`, as
    TOML values or as text, come back equal from `from_config`."""
    s = factory()
    cls = type(s)
    kind = cls.options_type
    assert dataclasses.is_dataclass(kind) and issubclass(kind, StrategyOptions), (
        f"{cls.__qualname__}.options_type is not a StrategyOptions dataclass"
    )
    params = getattr(kind, "__dataclass_params__", None)
    assert params is not None and params.frozen, f"{kind.__qualname__} is not frozen"
    for f in dataclasses.fields(kind):
        missing = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        assert not missing, f"{kind.__qualname__}.{f.name} has no default"
    defaults = kind()
    defaults.validate()
    assert cls.parse_options({}) == defaults, "strategy.options = {} does not give the defaults"
    assert isinstance(s.options, kind), f"built with {type(s.options).__qualname__}, not {kind.__qualname__}"
    raw = dataclasses.asdict(s.options)
    assert cls.parse_options(raw) == s.options, "options do not round-trip through strategy.options"
    text = {k: v if isinstance(v, str) else _toml(v) for k, v in raw.items()}  # strings stay raw
    assert cls.parse_options(text) == s.options, "options do not round-trip through --set text"
    if cls.name not in available() or get(cls.name) is not cls:
        return  # not registered (a strategy under test): `from_config` cannot select it
    for options in (raw, text):
        config = Config(
            model=_model(),
            strategy=StrategyConfig(name=cls.name, head="random", options=dict(options)),
        )
        built = from_config(config, INPUT_SHAPE)
        assert type(built) is cls, f"from_config built {type(built).__qualname__}"
        assert built.options == s.options, "options do not round-trip through from_config"
        assert check_config(config) is cls


Check = Callable[[StrategyFactory], None]

CHECKS: tuple[Check, ...] = (
    check_predict_before_learning,
    check_learn_does_not_mutate_input,
    check_step_result,
    check_seeded_determinism,
    check_checkpoint_roundtrip,
    check_pickle_roundtrip,
    check_boundary_at_step_zero,
    check_repeated_boundaries,
    check_late_labels,
    check_task_hint_restricts_classes,
    check_predictor_is_a_frozen_copy,
    check_hinted_answers_do_not_change,
    check_memory_bounded,
    check_composes_with_head_policies,
    check_options_roundtrip,
)
