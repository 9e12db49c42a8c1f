"""Strategy registry, entry points, replay, and switching the daemon's strategy by config alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from stream_cl import checks, strategies
from stream_cl.bench.offline import learn_offline
from stream_cl.config import Config, ConfigError, load_config
from stream_cl.evaluate.scoring import accuracy
from stream_cl.runtime import tuning
from stream_cl.strategies.buffers import ReservoirBuffer, TaskBuffers
from stream_cl.strategies.finetune import Finetune
from stream_cl.strategies.heads import LSHead
from stream_cl.strategies.replay import Replay
from stream_cl.tools.datasets import load_stream


class _ThirdParty(Finetune):
    """Stands in for a strategy shipped by another package."""

    name = "third-party"


class _FakeEntryPoint:
    name = "third-party"

    def load(self) -> type[strategies.Strategy]:
        return _ThirdParty


@pytest.fixture
def third_party(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Pretend an installed package declares `third-party` in the `stream_cl.strategies` group."""
    monkeypatch.setattr(
        strategies,
        "entry_points",
        lambda group: [_FakeEntryPoint()] if group == strategies.ENTRY_POINT_GROUP else [],
    )
    yield
    strategies._REGISTRY.pop("third-party", None)


def test_builtins_are_registered() -> None:
    """finetune and replay are available by name."""
    assert {"finetune", "replay"} <= set(strategies.available())
    assert strategies.get("replay") is Replay


def test_unknown_name_lists_the_valid_ones() -> None:
    """An unknown strategy name is a ConfigError on strategy.name listing every registered one."""
    with pytest.raises(ConfigError) as err:
        strategies.check_config(load_config(None, ["strategy.name=magic"], env={}))
    assert err.value.key == "strategy.name"
    for name in strategies.available():
        assert name in str(err.value)


def test_entry_point_strategies_register_and_build(third_party: None) -> None:
    """A strategy declared through the entry-point group is listed and built from config."""
    assert "third-party" in strategies.available()
    s = strategies.from_config(load_config(None, ["strategy.name=third-party"], env={}), (4,))
    assert isinstance(s, _ThirdParty)


def test_register_refuses_a_taken_name() -> None:
    """Two classes cannot share a registry name."""

    class Impostor(Finetune):
        name = "finetune"

    with pytest.raises(ValueError, match="taken"):
        strategies.register(Impostor)


def test_flush_denormals_is_scoped_to_the_block() -> None:
    """Training flushes subnormal floats (Adam's moments late in training; CPU arithmetic on them
    is many times slower), and the thread gets its previous mode back afterwards: the mode is
    processor state, and other code (hypothesis, for one) refuses to run with it."""
    import threading

    seen: list[bool] = []

    def run() -> None:
        torch.set_flush_denormal(False)
        seen.append(tuning.flushes_denormals())
        with tuning.flush_denormals():
            seen.append(tuning.flushes_denormals())
        seen.append(tuning.flushes_denormals())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == [False, True, False]


def test_default_config_is_eidetic_with_ls_head() -> None:
    """The default [strategy] is the user's stated composition: mask freezing, LS rows, cross-entropy."""
    from stream_cl.strategies.eidetic.strategy import Eidetic

    s = strategies.from_config(Config(), (4,))
    assert type(s) is Eidetic and type(s.head_policy) is LSHead and s.loss == "ce"


def test_reservoir_is_bounded_and_uniform() -> None:
    """The reservoir never exceeds its capacity and keeps a uniform sample of everything offered."""
    buffer = ReservoirBuffer(50, (1,), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for start in range(0, 2000, 10):
        ids = torch.arange(start, start + 10)
        buffer.add(ids[:, None].float(), ids, g)
        assert len(buffer) <= 50
    held = buffer.y[: len(buffer)]
    assert len(buffer) == 50 and buffer.seen == 2000
    assert len(set(held.tolist())) == 50
    assert 700 < held.float().mean().item() < 1300  # uniform over 0..1999 has mean 999.5


def test_reservoir_batch_writes_equal_writing_the_items_one_by_one() -> None:
    """A batch is written with one indexed copy; what is held equals algorithm R writing each item
    in turn with the same draws (where items of one batch land on one slot, the last one wins)."""
    capacity, batch = 5, 16
    buffer = ReservoirBuffer(capacity, (1,), torch.device("cpu"))
    g, reference_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    held: list[int] = []
    seen = 0
    for start in range(0, 400, batch):
        ids = torch.arange(start, start + batch)
        buffer.add(ids[:, None].float(), ids, g)
        draws: list[float] | None = None
        for i, item in enumerate(ids.tolist()):
            seen += 1
            if len(held) < capacity:
                held.append(item)
                continue
            if draws is None:  # one draw per item of the batch, made once the buffer is full
                draws = torch.rand(batch, generator=reference_g, dtype=torch.float64).tolist()
            slot = int(draws[i] * seen)
            if slot < capacity:
                held[slot] = item
        assert buffer.y[: len(buffer)].tolist() == held
        assert buffer.x[: len(buffer), 0].tolist() == [float(item) for item in held]
    assert buffer.seen == seen == 400


def test_a_reservoir_restored_into_a_smaller_capacity_keeps_a_subset_and_its_count() -> None:
    """A checkpoint written before the capacity was lowered (`task_buffer`, `buffer_size`) loads:
    the same `capacity` items of it each time, and `seen` still counts every item offered."""
    gen = torch.Generator().manual_seed(0)
    large = ReservoirBuffer(10, (1,), torch.device("cpu"))
    large.add(torch.arange(25.0).view(25, 1), torch.arange(25), gen)
    state = large.state_dict()
    restored = [ReservoirBuffer(4, (1,), torch.device("cpu")) for _ in range(2)]
    for buffer in restored:
        buffer.load_state_dict(state)
    a, b = restored
    assert len(a) == 4 and a.seen == 25
    assert torch.equal(a.labels(), b.labels()) and torch.equal(a.inputs(), b.inputs())
    held = dict(zip(large.labels().tolist(), large.inputs().flatten().tolist(), strict=True))
    assert set(a.labels().tolist()) <= set(held)
    assert all(held[int(y)] == float(x) for x, y in zip(a.inputs().flatten(), a.labels(), strict=True))


def test_task_buffers_held_at_once_share_the_capacity() -> None:
    """Two tasks' buffers (a gradual transition) hold `capacity` samples together: the first keeps
    a subset of its own samples when the second opens, and grows back once it is alone again."""
    gen = torch.Generator().manual_seed(0)
    buffers = TaskBuffers(10, (1,), torch.device("cpu"))
    buffers.of(0).add(torch.arange(30.0).view(30, 1), torch.arange(30), gen)
    first = set(buffers.of(0).labels().tolist())
    assert len(first) == 10 and buffers.of(0).seen == 30
    buffers.of(1).add(torch.arange(100.0, 120.0).view(20, 1), torch.arange(100, 120), gen)
    assert buffers.held() == 10 and len(buffers.of(0)) == len(buffers.of(1)) == 5
    assert set(buffers.of(0).labels().tolist()) <= first
    restored = TaskBuffers(10, (1,), torch.device("cpu"))
    restored.load_state_dict(buffers.state_dict())
    assert {t: b.labels().tolist() for t, b in restored.by_task.items()} == {
        t: b.labels().tolist() for t, b in buffers.by_task.items()
    }
    buffers.drop(1)
    buffers.of(0).add(torch.arange(200.0, 205.0).view(5, 1), torch.arange(200, 205), gen)
    assert len(buffers.of(0)) == 10 and buffers.of(0).capacity == 10


def test_replay_mixes_a_buffer_batch_into_each_step() -> None:
    """After the first step, every forward pass sees the stream batch plus a replayed batch."""
    s = checks.factory_for(Replay)()
    seen: list[int] = []
    s.model.backbone.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    checks.Driver(s).feed(checks.TWO_TASKS[:2])
    assert seen == [checks.BATCH, 2 * checks.BATCH]
    assert s.memory_usage()["replay_buffer"] == (12, 12)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ("{buffer_size = 0}", "strategy.options.buffer_size"),
        ('{buffer_size = "big"}', "strategy.options.buffer_size"),
        ("{replay_batch = -1}", "strategy.options.replay_batch"),
    ],
)
def test_replay_options_are_validated(options: str, key: str) -> None:
    """Bad replay options are ConfigErrors naming strategy.options.KEY."""
    config = load_config(None, ["strategy.name=replay", f"strategy.options={options}"], env={})
    with pytest.raises(ConfigError) as err:
        strategies.from_config(config, (4,))
    assert err.value.key == key


def test_dotted_options_from_set_are_typed() -> None:
    """`--set strategy.options.buffer_size=7` (text) reaches the constructor as an integer."""
    config = load_config(None, ["strategy.name=replay", "strategy.options.buffer_size=7"], env={})
    s = strategies.from_config(config, (4,))
    assert isinstance(s, Replay) and s.buffer.capacity == 7


def test_daemon_switches_strategy_and_head_by_config_alone() -> None:
    """The daemon's Learner runs replay with an ls head when config says so, and learns with it."""
    stream = load_stream("split-digits", seed=0)
    config = load_config(
        None,
        [
            "strategy.name=replay",
            "strategy.options={buffer_size = 64}",
            "strategy.head=ls",
            "strategy.loss=mse",
            "model.hidden=[32]",
            "boundaries.drift=false",  # the stream sends task ids; drift detection only costs time here
            "log.level=warning",
        ],
        env={},
    )
    learner = learn_offline(config, stream)
    s = learner.strategy
    assert isinstance(s, Replay) and isinstance(s.head_policy, LSHead) and s.loss == "mse"
    assert s.memory_usage()["replay_buffer"] == (64, 64)
    snapshot = learner.holder.get()
    assert snapshot is not None and snapshot.strategy == "replay"
    last = stream.tasks[-1]
    assert accuracy(snapshot, last.test_x, last.test_y.tolist()) > 0.5


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_fused_optimizer_follows_the_plain_update_and_survives_a_checkpoint(optimizer: str) -> None:
    """The strategy's fused optimizer takes the same steps as torch's default (for-loop) one, and a
    strategy restored from a checkpoint keeps fused kernels."""
    config = load_config(
        None,
        [
            "strategy.name=finetune",
            "strategy.head=random",
            "model.hidden=[16]",
            f"model.optimizer={optimizer}",
            "model.momentum=0.9" if optimizer == "sgd" else "model.weight_decay=0.01",
        ],
        env={},
    )
    fused = strategies.from_config(config, (12,))
    plain = strategies.from_config(config, (12,))
    for s in (fused, plain):
        s.add_classes([0, 1, 2], 0)
    plain.optimizer = type(plain.optimizer)(
        plain.model.parameters(), **{**plain.optimizer.defaults, "fused": None}
    )
    assert fused.optimizer.param_groups[0]["fused"] is True
    assert plain.optimizer.param_groups[0]["fused"] is None
    initial = [p.detach().clone() for p in fused.model.parameters()]
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(8, 12, generator=generator)
        y = torch.randint(0, 3, (8,), generator=generator)
        for s in (fused, plain):
            s.learn(strategies.Batch(x=x, y=y, task=0))
    for a, b in zip(fused.model.parameters(), plain.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(fused.model.parameters(), initial, strict=True)]
    assert all(moved)  # the comparison is not between two untouched models
    restored = strategies.from_config(config, (12,))
    restored.load_state_dict(plain.state_dict())  # written by a non-fused optimizer
    assert restored.optimizer.param_groups[0]["fused"] is True


def test_optimizer_falls_back_where_torch_has_no_fused_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device (or torch version) without fused kernels gets torch's default implementation."""

    class NoFusedAdam(torch.optim.Adam):
        def __init__(self, params: object, **kwargs: object) -> None:
            if kwargs.get("fused"):
                raise RuntimeError(
                    "`fused=True` requires all the params to be floating point Tensors of supported devices"
                )
            super().__init__(params, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim, "Adam", NoFusedAdam)
    config = load_config(None, ["strategy.name=finetune", "strategy.head=random", "model.hidden=[8]"], env={})
    strategy = strategies.from_config(config, (4,))
    strategy.add_classes([0, 1], 0)
    assert isinstance(strategy.optimizer, NoFusedAdam) and not strategy.optimizer.param_groups[0]["fused"]
    strategy.learn(strategies.Batch(x=torch.randn(4, 4), y=torch.tensor([0, 1, 0, 1]), task=0))


def test_config_toml_points_at_every_options_dataclass() -> None:
    """config.toml's [strategy] names each built-in strategy's and head policy's options dataclass
    and every one of its fields (the dataclass documents them; config.toml only points there)."""
    import dataclasses
    from pathlib import Path

    from stream_cl.strategies import HEAD_POLICIES

    text = (Path(__file__).resolve().parents[1] / "config.toml").read_text()
    section = text[text.index("[strategy]") : text.index("[learner]")]
    builtins = ["finetune", "replay", "fip", "interval", "eidetic"]
    kinds = [strategies.get(n).options_type for n in builtins] + [
        p.options_type for p in HEAD_POLICIES.values()
    ]
    for kind in kinds:
        fields = [f.name for f in dataclasses.fields(kind)]
        if fields:
            assert kind.__name__ in section, f"config.toml does not point at {kind.__name__}"
        for name in fields:
            assert name in section, f"config.toml does not name {kind.__name__}.{name}"


def test_building_a_strategy_leaves_the_process_torch_thread_count_to_the_runtime() -> None:
    """`model.torch_threads` is process-wide: the daemon, a replica or a benchmark applies it
    (runtime.tuning.set_torch_threads), never a library call such as building a strategy."""
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    config = load_config(None, ["model.hidden=[8]", f"model.torch_threads={other}"], env={})
    try:
        strategies.from_config(config, (4,))
        assert torch.get_num_threads() == before
        tuning.set_torch_threads(config)
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(before)
