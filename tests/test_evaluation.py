"""Accuracy-matrix metrics (average accuracy, max-based forgetting, BWT) and the quality harness."""

from __future__ import annotations

import math

import pytest

from stream_cl.evaluate.scoring import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    task_forgetting,
)

# R[i][j]: accuracy on task j after learning task i.
R = [
    [0.9],
    [0.6, 0.8],
    [0.7, 0.4, 1.0],
]


def test_average_accuracy_uses_the_last_row() -> None:
    """Average accuracy is the mean of the last row over the tasks seen."""
    assert average_accuracy(R) == pytest.approx((0.7 + 0.4 + 1.0) / 3)


def test_forgetting_is_max_based() -> None:
    """Forgetting of task j is its best earlier accuracy minus its final one (not its first)."""
    assert task_forgetting(R) == pytest.approx([0.9 - 0.7, 0.8 - 0.4])
    assert average_forgetting(R) == pytest.approx(((0.9 - 0.7) + (0.8 - 0.4)) / 2)


def test_backward_transfer_against_just_learned() -> None:
    """BWT compares each task's final accuracy with its accuracy right after it was learned."""
    assert backward_transfer(R) == pytest.approx(((0.7 - 0.9) + (0.4 - 0.8)) / 2)


def test_padded_and_ragged_matrices_agree() -> None:
    """A NaN-padded square matrix gives the same metrics as the ragged one."""
    padded = [row + [math.nan] * (3 - len(row)) for row in R]
    for metric in (average_accuracy, average_forgetting, backward_transfer):
        assert metric(padded) == pytest.approx(metric(R))


def test_single_task_and_empty_matrices() -> None:
    """With one task there is no forgetting or BWT (NaN); an empty matrix has no accuracy."""
    assert average_accuracy([[0.5]]) == 0.5
    assert math.isnan(average_forgetting([[0.5]])) and math.isnan(backward_transfer([[0.5]]))
    assert task_forgetting([[0.5]]) == []
    assert math.isnan(average_accuracy([]))


def test_nan_entries_are_ignored() -> None:
    """A task without a score (NaN, e.g. an empty test split) is left out of every mean."""
    r = [[0.8], [math.nan, 0.6]]
    assert average_accuracy(r) == pytest.approx(0.6)
    assert math.isnan(average_forgetting(r)) and math.isnan(backward_transfer(r))


def test_with_overrides_types_and_merges_tables() -> None:
    """Contender overrides apply like --set: a dotted table key merges, a whole table replaces."""
    from stream_cl.bench.quality import with_overrides
    from stream_cl.config import Config

    base = with_overrides(Config(), ["strategy.name=replay", "strategy.options={buffer_size = 10}"])
    merged = with_overrides(base, ["strategy.options.replay_batch=4", "model.hidden=[8]"])
    assert merged.strategy.options == {"buffer_size": 10, "replay_batch": "4"}  # text, as from --set
    assert merged.model.hidden == [8] and base.model.hidden == [256, 256]
    assert with_overrides(base, ["strategy.options={}"]).strategy.options == {}


def test_quality_harness_scores_contenders_and_references() -> None:
    """One run gives a row per contender and reference per scenario, with a lower-triangular R."""
    from stream_cl.bench.quality import Contender, format_quality, run_quality
    from stream_cl.config import load_config

    config = load_config(
        None,
        ["strategy.head=random", "model.hidden=[32]", "boundaries.drift=false", "log.level=warning"],
        env={},
    )
    result = run_quality(config, [Contender.strategy("finetune")], streams=("split-digits",), joint_epochs=1)
    rows = {(r["scenario"], r["strategy"]): r for r in result["rows"]}
    assert set(rows) == {(s, n) for s in ("class", "task") for n in ("finetune", "joint", "iid-online")}
    matrix = rows[("class", "finetune")]["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2, 3, 4, 5]
    # Class-incremental fine-tuning forgets; the task hint recovers much of it.
    assert rows[("class", "finetune")]["average_forgetting"] > 0.1
    assert rows[("task", "finetune")]["average_accuracy"] > rows[("class", "finetune")]["average_accuracy"]
    assert rows[("class", "joint")]["average_accuracy"] > rows[("class", "finetune")]["average_accuracy"]
    table = format_quality(result)
    assert "iid-online" in table and "avg forgetting" in table
