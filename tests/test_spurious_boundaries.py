"""False task boundaries (a detector's false alarm: a new task id mid-visit, same classes) under
`replay` and `fip`: `replay` keeps no per-task state, so the boundary hooks change nothing; `fip`
takes back the anchors a false boundary snapshotted, but keeps those of a real new task (a new
domain with the same labels) and of a return to a known task."""

from __future__ import annotations

import torch

from stream_cl.config import ModelConfig
from stream_cl.strategies import Batch, Boundary, create
from stream_cl.strategies.fip import FIP

DIM = 10


def blobs(
    centers: torch.Tensor, classes: tuple[int, ...], n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(n // len(classes))
    y = y[torch.randperm(len(y), generator=gen)]
    return centers[y] + 0.5 * torch.randn(len(y), DIM, generator=gen), y


CENTERS = torch.randn(4, DIM, generator=torch.Generator().manual_seed(0)) * 3


def model_config() -> ModelConfig:
    return ModelConfig(hidden=[32], device="cpu", lr=0.01)


def learn(strategy: object, x: torch.Tensor, y: torch.Tensor, task: int) -> None:
    assert hasattr(strategy, "learn")
    for i in range(0, len(y), 16):
        strategy.learn(Batch(x=x[i : i + 16], y=y[i : i + 16], task=task))


def test_replay_learns_the_same_through_a_false_boundary() -> None:
    """The boundary hooks of a false task (same classes) leave replay's learning bit-identical: a
    false boundary reaches replay only through the learner's partial batch there."""
    x, y = blobs(CENTERS, (0, 1), 192, seed=1)
    runs = []
    for false_boundary in (False, True):
        s = create("replay", (DIM,), model=model_config(), buffer_size=50)
        s.on_boundary(Boundary(previous_task=None, task=0, reason="explicit"))
        s.add_classes([0, 1], 0)
        learn(s, x[:96], y[:96], 0)
        task = 0
        if false_boundary:
            s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
            s.note_task(1, [0, 1])
            task = 1
        learn(s, x[96:], y[96:], task)
        runs.append(s)
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters(), strict=True):
        assert torch.equal(a, b)


def fip_in_task_1() -> FIP:
    """fip after task 0 (classes 0, 1), a real boundary, and half of task 1 (classes 2, 3)."""
    # Room for every input: none is overwritten, so anchors change only at boundaries.
    s = create("fip", (DIM,), model=model_config(), memory_size=1000)
    assert isinstance(s, FIP)
    s.on_boundary(Boundary(previous_task=None, task=0, reason="explicit"))
    s.add_classes([0, 1], 0)
    learn(s, *blobs(CENTERS, (0, 1), 160, seed=1), 0)
    s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
    s.add_classes([2, 3], 1)
    learn(s, *blobs(CENTERS, (2, 3), 160, seed=2), 1)
    return s


def test_fip_takes_back_the_anchors_of_a_false_boundary() -> None:
    s = fip_in_task_1()
    valid, p_old = s.memory.valid.clone(), s.memory.p_old.clone()
    s.on_boundary(Boundary(previous_task=1, task=2, reason="explicit"))
    s.note_task(2, [2, 3])
    assert s.memory.anchored() > int(valid.sum())  # the snapshot anchored task 1's inputs...
    learn(s, *blobs(CENTERS, (2, 3), 16, seed=3), 2)  # ...until task 2 turned out to be task 1
    assert torch.equal(s.memory.valid[: len(valid)], valid)
    assert torch.equal(s.memory.p_old[: len(valid)], p_old)
    # Task 1's inputs are anchored at the next real boundary, as without the false one.
    s.on_boundary(Boundary(previous_task=2, task=3, reason="explicit"))
    assert s.memory.anchored() > int(valid.sum())


def test_fip_keeps_the_anchors_of_a_new_domain_and_of_a_return() -> None:
    # Same labels on new inputs (a domain shift): answered badly, so a real boundary.
    s = fip_in_task_1()
    s.on_boundary(Boundary(previous_task=1, task=2, reason="explicit"))
    s.note_task(2, [2, 3])
    anchored = s.memory.anchored()
    learn(s, *blobs(-CENTERS, (2, 3), 16, seed=3), 2)
    assert s.memory.anchored() == anchored
    # A return to a known task is never taken back.
    s = fip_in_task_1()
    s.on_boundary(Boundary(previous_task=1, task=0, reason="explicit", recurring=True))
    anchored = s.memory.anchored()
    learn(s, *blobs(CENTERS, (2, 3), 16, seed=3), 0)
    assert s.memory.anchored() == anchored
