"""The `fip` strategy: bounded input memory, outputs snapshotted at boundaries, old outputs kept
closer than by `finetune`; and `compress` keeping the function on the memory."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stream_cl.bench.offline import stream_records
from stream_cl.cli import main
from stream_cl.config import ModelConfig, load_config
from stream_cl.learn.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.store.checkpoints import CheckpointStore, read_checkpoint
from stream_cl.strategies import Batch, Boundary, create
from stream_cl.strategies.base import Strategy
from stream_cl.strategies.fip import FIP, bhattacharyya, soften
from stream_cl.tools.compress import apply_masks, compress, magnitude_masks, sparsity_of
from stream_cl.tools.datasets import load_stream

DIM = 10


def two_tasks(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two Gaussian-blob tasks with classes (0, 1) then (2, 3)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, DIM, generator=gen) * 2
    tasks = []
    for classes in ((0, 1), (2, 3)):
        y = torch.tensor(classes).repeat(200)
        tasks.append((centers[y] + torch.randn(len(y), DIM, generator=gen), y))
    return tasks


def run(strategy: Strategy, tasks: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Learn the tasks in order; return the distance of task 0's outputs to their state after task 0."""
    x0 = tasks[0][0][:100]
    p_after_task0 = None
    for t, (x, y) in enumerate(tasks):
        strategy.on_boundary(Boundary(previous_task=t - 1 if t else None, task=t, reason="explicit"))
        strategy.add_classes([2 * t, 2 * t + 1], t)
        for i in range(0, len(y), 16):
            strategy.learn(Batch(x=x[i : i + 16], y=y[i : i + 16], task=t))
        if t == 0:
            p_after_task0 = strategy.predict_proba(x0)[0]
    assert p_after_task0 is not None
    return bhattacharyya(strategy.predict_proba(x0)[0], p_after_task0).mean()


def model_config() -> ModelConfig:
    return ModelConfig(hidden=[32], device="cpu", lr=0.01)


@pytest.mark.parametrize("step", ["optimizer", "normalized"])
def test_fip_keeps_old_outputs_closer_than_finetune(step: str) -> None:
    """On the same two-task stream, task 0's outputs drift much less under fip than under finetune,
    with either step rule."""
    tasks = two_tasks()
    fip = create("fip", (DIM,), model=model_config(), memory_size=100, step=step, step_size=0.05)
    d_fip = run(fip, tasks)
    d_finetune = run(create("finetune", (DIM,), model=model_config()), tasks)
    assert float(d_fip) < 0.5 * float(d_finetune)


@pytest.mark.parametrize("step", ["optimizer", "normalized"])
def test_fip_learns_the_new_task(step: str) -> None:
    """Protection does not freeze the network: the second task is still learned."""
    tasks = two_tasks()
    fip = create("fip", (DIM,), model=model_config(), memory_size=100, step=step, step_size=0.05)
    run(fip, tasks)
    x1, y1 = tasks[1]
    assert float((fip.predict_proba(x1, 1)[0].argmax(1) == y1).float().mean()) > 0.9


def test_memory_is_bounded_and_snapshotted_at_boundaries() -> None:
    """The memory never exceeds `memory_size`; anchors exist only after a boundary snapshot."""
    fip = FIP.build((DIM,), model=model_config(), memory_size=20)
    fip.on_boundary(Boundary(previous_task=None, task=0, reason="explicit"))
    fip.add_classes([0, 1], 0)
    x, y = two_tasks()[0]
    for i in range(0, 100, 16):
        fip.learn(Batch(x=x[i : i + 16], y=y[i : i + 16], task=0))
    assert fip.memory_usage()["fip_memory"] == (20, 20) and fip.memory.anchored() == 0
    fip.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
    right = fip.memory.p_old[:20].argmax(dim=1) == fip.memory.y[:20]
    assert fip.memory.anchored() == int(right.sum()) > 0 and fip.memory.p_old.shape[1] == 2


def test_only_right_answers_become_anchors_and_wrong_ones_wait_for_a_later_boundary() -> None:
    """A snapshot anchors an input only where the network answers its label; an input left
    unanchored gets its target at a later boundary, once the network answers it right."""
    from stream_cl.strategies.fip import InputMemory

    memory = InputMemory(4, (2,), torch.device("cpu"))
    memory.add(
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
        torch.tensor([0, 1, 0, 1]),
        torch.Generator(),
    )
    says_zero = torch.nn.Linear(2, 2)
    with torch.no_grad():
        says_zero.weight.zero_()
        says_zero.bias.copy_(torch.tensor([1.0, 0.0]))
    memory.snapshot(says_zero, keep=True)
    assert memory.valid[:4].tolist() == [True, False, True, False]
    with torch.no_grad():
        says_zero.weight.copy_(torch.eye(2))
        says_zero.bias.zero_()
    memory.snapshot(says_zero, keep=True)
    assert memory.valid[:4].tolist() == [True, True, True, True]
    assert memory.p_old[0].argmax() == 0 and memory.p_old[1].argmax() == 1


@pytest.mark.parametrize("targets", ["first", "latest"])
def test_targets_first_keeps_each_input_anchored_to_its_own_task(targets: str) -> None:
    """`first`: an anchored input keeps the outputs snapshotted at its own task's end through later
    boundaries (new classes' columns are zero); `latest`: every input is re-snapshotted."""
    fip = FIP.build((DIM,), model=model_config(), memory_size=50, targets=targets)
    (x0, y0), (x1, y1) = two_tasks()
    fip.on_boundary(Boundary(previous_task=None, task=0, reason="explicit"))
    fip.add_classes([0, 1], 0)
    for i in range(0, 64, 16):
        fip.learn(Batch(x=x0[i : i + 16], y=y0[i : i + 16], task=0))
    fip.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
    first = fip.memory.p_old[:50].clone()
    fip.add_classes([2, 3], 1)
    for i in range(0, 160, 16):  # 160 more inputs offered: some slots stay task 0's, some are replaced
        fip.learn(Batch(x=x1[i : i + 16], y=y1[i : i + 16], task=1))
    kept = fip.memory.valid[:50].clone()
    assert 0 < int(kept.sum()) < 50
    fip.on_boundary(Boundary(previous_task=1, task=2, reason="explicit"))
    after = fip.memory.p_old[:50]
    right = after.argmax(dim=1) == fip.memory.y[:50]  # only outputs that answer right anchor
    assert after.shape[1] == 4
    assert torch.equal(fip.memory.valid[:50], kept | right if targets == "first" else right)
    if targets == "first":
        assert torch.equal(after[kept, :2], first[kept]) and float(after[kept, 2:].abs().max()) == 0.0
    else:
        assert not torch.allclose(after[kept, :2], first[kept], atol=1e-3)
    assert float(after[~kept, 2:].sum()) > 0  # task 1's inputs: outputs of the grown head


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_soften_gives_the_softmax_of_the_logits_over_the_temperature(temperature: float) -> None:
    """Targets are stored as softmax(z); `soften` recovers softmax(z / T) from them, and a class
    the old network gave probability 0 (a class added later, zero-padded) stays at 0."""
    z = torch.randn(6, 5, generator=torch.Generator().manual_seed(3)) * 4
    soft = soften(torch.softmax(z, dim=1), temperature)
    assert torch.allclose(soft, torch.softmax(z / temperature, dim=1), atol=1e-6)
    padded = torch.cat([torch.softmax(z, dim=1), torch.zeros(6, 2)], dim=1)
    out = soften(padded, temperature)
    assert float(out[:, 5:].abs().max()) == 0.0 and torch.allclose(out.sum(1), torch.ones(6))


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("memory_size", 0),
        ("step_size", 0.0),
        ("beta", -1.0),
        ("memory_batch", -1),
        ("temperature", 0.0),
        ("step", "sgd"),
        ("targets", "oldest"),
    ],
)
def test_bad_option_names_its_key(option: str, value: object) -> None:
    """A bad option raises ValueError naming `strategy.options.KEY`."""
    with pytest.raises(ValueError, match=f"strategy.options.{option}"):
        create("fip", (DIM,), model=model_config(), **{option: value})


def test_compress_reaches_the_sparsity_and_keeps_the_function_better_than_pruning() -> None:
    """The path ends exactly at the target sparsity, closer to the original outputs than plain pruning."""
    tasks = two_tasks()
    strategy = create("finetune", (DIM,), model=model_config())
    run(strategy, tasks)
    memory = torch.cat([tasks[0][0][:100], tasks[1][0][:100]])
    model = strategy.model.eval()
    with torch.no_grad():
        p_ref = torch.softmax(model(memory), dim=1)
    pruned = copy.deepcopy(model)
    apply_masks(pruned, magnitude_masks(pruned, 0.8))
    with torch.no_grad():
        d_pruned = float(bhattacharyya(torch.softmax(pruned(memory), dim=1), p_ref).mean())
    result = compress(model, memory, 0.8, steps=150, step_size=0.02)
    assert result.sparsity == pytest.approx(0.8, abs=0.01) and sparsity_of(model) == pytest.approx(
        0.8, abs=0.01
    )
    assert result.distance_after < d_pruned
    assert np.isfinite(result.distance_after)


def test_compress_verb_writes_a_sparse_checkpoint_and_reports_per_task(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream-cl compress` uses the fip memory, writes the sparse model and reports per-task accuracy."""
    settings = [
        "model.hidden=[32, 32]",
        "model.device=cpu",
        "strategy.name=fip",
        "evaluation.holdout_fraction=0",
    ]
    config = load_config(None, settings, env={})
    learner = Learner(config, SnapshotHolder(), Metrics(), checkpoints=CheckpointStore(tmp_path / "src"))
    for chunk in stream_records(load_stream("split-mnist1d", seed=0))[:4]:
        learner.process(chunk)
    assert learner.checkpoint()
    args = ["compress", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--stream", "split-mnist1d"]
    args += ["--sparsity", "0.5", "--steps", "20", *[a for s in settings for a in ("--set", s)]]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()  # log lines may come first
    report = json.loads("\n".join(lines[lines.index("{") :]))
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01) and report["memory_inputs"] > 0
    assert len(report["accuracy_per_task"]["before"]) == len(report["accuracy_per_task"]["fip"]) == 5
    weights = read_checkpoint(report["checkpoint"])["strategy"]["model"]["backbone.body.1.weight"]
    assert float((weights == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
