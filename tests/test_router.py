"""The task router's random features and its per-snapshot scoring grid, against plain formulas."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from stream_cl.strategies.router import RandomFeatures, RidgeRouter, RouterScores
from stream_cl.strategies.routing import TaskSlots


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 12, 12), (1, 9, 7)])
@pytest.mark.parametrize("n", [1, 5])
def test_image_features_are_pooled_relu_of_both_signs_square_rooted(shape: tuple[int, ...], n: int) -> None:
    features = RandomFeatures(shape, 256, seed=3)
    x = torch.randn(n, *shape)
    z = F.conv2d(x, features.weight)  # the default convolution, whatever kernel `RandomFeatures` runs
    pooled = [F.adaptive_avg_pool2d(F.relu(s * z), features.pool) for s in (1.0, -1.0)]
    expected = torch.cat(pooled, dim=1).flatten(1).sqrt()
    got = features(x)
    assert got.shape == (n, features.dim)
    assert torch.allclose(got[:, :-1], expected, atol=1e-5)
    assert torch.equal(got[:, -1], torch.ones(n))
    assert torch.equal(features.unbiased(x), got[:, :-1])


def test_a_batch_larger_than_a_slice_gets_each_sample_s_own_features_bit_for_bit() -> None:
    features = RandomFeatures((1, 28, 28), 1024, seed=0)
    x = torch.randn(2 * features.chunk + 3, 1, 28, 28)
    assert features.chunk < len(x)  # the batch is computed in three slices
    alone = torch.cat([features(sample[None]) for sample in x])
    assert torch.equal(features(x), alone)


def test_flat_features_are_relu_of_both_signs_square_rooted() -> None:
    features = RandomFeatures((20,), 64, seed=1)
    x = torch.randn(4, 20)
    projection = features.weight
    expected = torch.cat([F.relu(x @ projection), F.relu(-(x @ projection))], dim=1).sqrt()
    assert torch.allclose(features(x)[:, :-1], expected, atol=1e-6)
    assert features.dim == 65


def test_grid_scores_are_the_weighted_slot_scores_padded() -> None:
    features = RandomFeatures((1, 8, 8), 64, seed=0)
    task_classes = [[0, 1], [], [2, 3, 4], [5]]
    layout = TaskSlots.of(task_classes, 6, torch.device("cpu"))
    pairs = layout.pairs()
    column = {pair: i for i, pair in enumerate(pairs[:-1])}  # the last pair was not solved yet
    router = RouterScores(features, torch.randn(features.dim, len(column)), column)
    x = torch.randn(3, 1, 8, 8)
    grid = router.on_grid(layout, scale=30.0)(x)
    assert grid.shape == (3, 3, 3)  # 3 known tasks, at most 3 classes each
    assert torch.allclose(grid, 30.0 * layout.padded(router.by_slot(x, layout), 0.0), atol=1e-4)
    assert torch.equal(grid[:, 2, 0], torch.zeros(3))  # the unsolved pair scores nothing
    assert torch.equal(grid[:, 0, 2], torch.zeros(3))  # past task 0's two classes


def _learned(router: RidgeRouter, task: int, samples: int) -> None:
    for _ in range(samples // 8):
        router.observe(torch.rand(8, 1, 8, 8), torch.arange(8) % 2, task)


def test_a_new_task_is_solved_at_doubling_counts_and_its_boundary_a_returning_one_every_refresh() -> None:
    router = RidgeRouter((1, 8, 8), 64, lam=0.001, refresh=400, seed=0, device=torch.device("cpu"))
    for task in (0, 1):
        _learned(router, task, 16)
        assert router.stale()  # its targets are new
        router.solve()
        _learned(router, task, 32)
        assert router.stale()  # a new task: 32 samples since the solve (the doubling schedule)
        router.solve()
        _learned(router, task, 8)
        assert router.due_at_boundary()  # a new task's visit ends: its last samples are solved for
        router.solve()
        router.new_task(task + 1)
    router.new_task(0)  # task 0 returns: its targets were solved for
    _learned(router, 0, 392)
    assert not router.stale() and not router.due_at_boundary()  # its samples wait for `refresh`
    _learned(router, 0, 8)
    assert router.stale()  # `refresh` samples since the last solve
    router.solve()
    router.new_task(2)  # a task never solved for: the doubling schedule again
    _learned(router, 2, 8)
    assert router.stale()
    router.solve()
    _learned(router, 2, 32)
    assert router.stale()
    restored = RidgeRouter((1, 8, 8), 64, lam=0.001, refresh=400, seed=0, device=torch.device("cpu"))
    router.new_task(1)
    restored.load_state_dict(router.state_dict())
    assert restored.returning and restored.stale() == router.stale()


def test_the_statistics_are_the_gram_matrix_and_the_solve_is_ridge_on_it() -> None:
    """Only the Gram matrix's lower triangle is folded; a checkpoint holds the whole symmetric
    matrix, Σ φφᵀ over the learned samples, and the solve is the ridge solution on it."""
    cpu = torch.device("cpu")
    router = RidgeRouter((20,), 512, lam=1.0, refresh=10_000, seed=0, device=cpu)
    assert router.features.dim > 2 * 128  # more than two blocks of the triangle's rows
    x, y = (
        torch.randn(300, 20, generator=torch.Generator().manual_seed(0)),
        torch.arange(300) % 3,
    )  # 300: a fold of 256 and some pending
    for i in range(0, 300, 30):
        router.observe(x[i : i + 30], y[i : i + 30], task=0)
    router.solve()
    state = router.state_dict()
    phi = router.features(x).double()
    assert torch.equal(state["gram"], state["gram"].T)
    assert torch.allclose(state["gram"], phi.T @ phi, rtol=1e-5, atol=1e-3)
    samples = phi.shape[0]
    ridge = 1.0 * float((phi * phi).sum()) / samples * torch.eye(phi.shape[1], dtype=torch.float64)
    expected = torch.linalg.solve(phi.T @ phi + ridge, phi.T @ F.one_hot(y, 3).double())
    assert router.weight is not None
    assert torch.allclose(router.weight.double(), expected, rtol=1e-4, atol=1e-5)
    restored = RidgeRouter((20,), 512, lam=1.0, refresh=10_000, seed=0, device=cpu)
    restored.load_state_dict(state)
    restored.solve()
    assert restored.weight is not None and torch.equal(restored.weight, router.weight)
