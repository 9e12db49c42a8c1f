"""The probe search of `eidetic`'s consolidation (`strategies/eidetic/consolidation.py`), function by function."""

from __future__ import annotations

import torch

from stream_cl.strategies.eidetic.consolidation import (
    FittedHead,
    KeptUnits,
    fit_ridge_head,
    fractions,
    keep_top,
    smallest_fraction,
)


def test_keep_top_keeps_the_best_scored_free_units_and_at_least_one() -> None:
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.7])]
    free = [torch.tensor([True, False, True, True])]  # unit 1 is owned: never kept, whatever its score
    assert keep_top(scores, free, 0.6).keep[0].tolist() == [False, False, True, True]
    assert keep_top(scores, free, 0.01).keep[0].tolist() == [False, False, False, True]
    assert keep_top(scores, free, 1.0).keep[0].tolist() == [True, False, True, True]
    assert keep_top(scores, free, 0.6).pruned(free)[0].tolist() == [True, False, False, False]


def test_fractions_halve_until_one_unit_per_layer() -> None:
    assert fractions([torch.ones(8, dtype=torch.bool), torch.ones(3, dtype=torch.bool)]) == [
        1.0,
        0.5,
        0.25,
        0.125,
    ]


class _ScriptedProbe:
    """Accuracy by kept fraction, as scripted (not monotone in the fraction)."""

    def __init__(self, accuracy: dict[float, float]) -> None:
        self.accuracy = accuracy

    def fit(self, kept: KeptUnits) -> FittedHead:
        return FittedHead(self.accuracy[kept.fraction], torch.zeros(0), torch.zeros(0))


def test_the_smallest_passing_fraction_wins_even_when_a_larger_one_probes_worse() -> None:
    free = [torch.ones(8, dtype=torch.bool)]
    scores = [torch.arange(8.0)]
    probe = _ScriptedProbe({1.0: 1.0, 0.5: 0.99, 0.25: 0.5, 0.125: 0.98})
    kept, head = smallest_fraction(probe, scores, free, tol=0.03)  # type: ignore[arg-type]
    assert kept.fraction == 0.125 and head.accuracy == 0.98
    probe = _ScriptedProbe({1.0: 1.0, 0.5: 0.99, 0.25: 0.5, 0.125: 0.5})
    assert smallest_fraction(probe, scores, free, tol=0.03)[0].fraction == 0.5  # type: ignore[arg-type]
    probe = _ScriptedProbe({1.0: 1.0, 0.5: 0.5, 0.25: 0.5, 0.125: 0.5})
    assert smallest_fraction(probe, scores, free, tol=0.03)[0].fraction == 1.0  # type: ignore[arg-type]


def test_the_ridge_head_reads_only_its_readable_columns_and_separates_the_classes() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(2, (200,), generator=gen)
    f = torch.randn(200, 4, generator=gen)
    f[:, 1] += 6 * target  # column 1 tells the classes apart
    readable = torch.tensor([True, True, False, True])
    head = fit_ridge_head(f, readable, target, 2)
    assert head.accuracy > 0.95
    assert head.weight.shape == (2, 4) and torch.all(head.weight[:, 2] == 0)
    logits = f @ head.weight.T + head.bias
    assert float((logits.argmax(1) == target).float().mean()) == head.accuracy
    unreadable = fit_ridge_head(f, torch.tensor([True, False, True, True]), target, 2)
    assert unreadable.accuracy < 0.8  # without column 1 the classes are not separable


def test_max_keep_caps_the_kept_fraction() -> None:
    free = [torch.ones(8, dtype=torch.bool)]
    scores = [torch.arange(8.0)]
    probe = _ScriptedProbe({1.0: 1.0, 0.5: 0.5, 0.25: 0.5, 0.125: 0.5})
    kept, head = smallest_fraction(probe, scores, free, tol=0.03, max_keep=0.5)  # type: ignore[arg-type]
    assert kept.fraction == 0.5 and int(kept.keep[0].sum()) == 4 and head.accuracy == 0.5
    probe = _ScriptedProbe({1.0: 1.0, 0.5: 0.5, 0.25: 0.99, 0.125: 0.5})
    assert smallest_fraction(probe, scores, free, tol=0.03, max_keep=0.5)[0].fraction == 0.25  # type: ignore[arg-type]
