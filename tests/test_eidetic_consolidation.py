"""The probe search of `eidetic`'s consolidation (`strategies/eidetic/consolidation.py`), function by function."""

from __future__ import annotations

import pytest
import torch

from stream_cl.config import ModelConfig
from stream_cl.strategies.eidetic.consolidation import (
    FittedHead,
    KeptUnits,
    Probe,
    fit_ridge_head,
    fractions,
    keep_top,
    smallest_fraction,
)
from stream_cl.strategies.eidetic.masks import FREE
from stream_cl.strategies.eidetic.strategy import Eidetic


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


def _untrained_two_class_task(
    seed: int,
) -> tuple[Eidetic, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """A small eidetic MLP with classes 0 and 1, 64 random samples of them, which units are free,
    and random unit scores."""
    model = ModelConfig(backbone="mlp", hidden=[16, 12], seed=0, device="cpu", batch_size=8)
    s = Eidetic.build((1, 8, 8), model=model, device="cpu", router_features=64)
    s.add_classes([0, 1], 0)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 1, 8, 8, generator=gen), torch.randint(0, 2, (64,), generator=gen)
    free = [rank == FREE for rank in s.masks.rank]
    scores = [torch.rand(len(f), generator=gen) for f in free]
    return s, x, y, free, scores


def test_a_probe_reuses_the_first_layer_only_while_its_parameters_stay_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Later fits of one probe skip the first protected layer (no kept set changes its output) and
    answer exactly as a fresh probe; an in-place change of that layer's weights is seen."""
    s, x, y, free, scores = _untrained_two_class_task(seed=0)
    first = s.layers[0].module
    computed = []  # one entry per forward the first layer really computed
    linear_forward = torch.nn.Linear.forward

    def counting(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if self is first:
            computed.append(1)
        return linear_forward(self, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counting)

    def fresh(kept: KeptUnits) -> FittedHead:
        return Probe(s.model, s.layers, s.masks.rank, x, y, [0, 1], torch.Generator()).fit(kept)

    probe = Probe(s.model, s.layers, s.masks.rank, x, y, [0, 1], torch.Generator())
    for fraction in (1.0, 0.5, 0.25):
        kept = keep_top(scores, free, fraction)
        head, before = probe.fit(kept), len(computed)
        expected = fresh(kept)
        assert len(computed) == before + 1  # the fresh probe computed it
        assert head.accuracy == expected.accuracy
        assert torch.equal(head.weight, expected.weight) and torch.equal(head.bias, expected.bias)
    assert len(computed) == 1 + 3  # the probe itself computed it once, for its first fit
    assert "forward" not in vars(first)  # the module's own forward is back
    with torch.no_grad():
        first.weight.mul_(-1.0)  # in place: the cached output is stale now
    kept = keep_top(scores, free, 0.5)
    assert torch.equal(probe.fit(kept).weight, fresh(kept).weight)
    assert len(computed) == 4 + 2


def test_a_kept_sets_features_are_computed_once_and_are_the_models_own_once_the_rest_is_pruned() -> None:
    """What lets a consolidation take its accuracies from the probe's features instead of forwards
    of its own: keeping every free unit gives the model's features bit for bit, and so does a kept
    set once the other free units are pruned. Asked again for the same kept set of the same
    parameters, a probe answers with the features it computed; a parameter change is seen."""
    s, x, y, free, scores = _untrained_two_class_task(seed=1)

    def own_features() -> torch.Tensor:
        s.model.eval()
        with torch.no_grad():
            f = s.model.features(x)
        s.model.train()
        return f

    probe = Probe(s.model, s.layers, s.masks.rank, x, y, [0, 1], torch.Generator())
    everything = keep_top(scores, free, 1.0)
    f = probe.features(everything)
    assert torch.equal(f, own_features())
    assert probe.features(everything) is f  # not computed again
    kept = keep_top(scores, free, 0.5)
    assert not torch.equal(probe.features(kept), f)  # the other half silenced
    s.masks.apply_pruned(kept.pruned(free))  # in place: the probe sees the new parameters
    assert torch.equal(probe.features(kept), own_features())
