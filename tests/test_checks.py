"""The conformance suite over every registered strategy, and proof that it catches broken ones."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from stream_cl import checks, strategies
from stream_cl.strategies import Batch, StepResult
from stream_cl.strategies.finetune import Finetune


def _cases() -> list[Any]:
    """(strategy name, check) pairs with readable ids; opted-out pairs are skipped with their reason."""
    cases = []
    for name in strategies.available():
        cls = strategies.get(name)
        for check in checks.CHECKS:
            reason = cls.check_opt_outs.get(check.__name__)
            marks = [pytest.mark.skip(reason=f"opt-out: {reason}")] if reason is not None else []
            cases.append(pytest.param(name, check, id=f"{name}-{check.__name__}", marks=marks))
    return cases


@pytest.mark.parametrize(("name", "check"), _cases())
def test_conformance(name: str, check: checks.Check) -> None:
    """Every registered strategy passes every check it has not opted out of (with a reason)."""
    check(checks.factory_for(strategies.get(name)))


@pytest.mark.parametrize("name", strategies.available())
def test_opt_outs_name_real_checks_and_give_reasons(name: str) -> None:
    """An opt-out names an existing check and carries a non-empty reason."""
    known = {c.__name__ for c in checks.CHECKS}
    for check_name, reason in strategies.get(name).check_opt_outs.items():
        assert check_name in known, f"{name} opts out of unknown check {check_name!r}"
        assert isinstance(reason, str) and reason.strip(), f"{name} opts out of {check_name} without a reason"


class _Mutating(Finetune):
    """Normalizes its input in place: the kind of bug check_learn_does_not_mutate_input exists for."""

    name = "test-mutating"

    def learn(self, batch: Batch) -> StepResult:
        batch.x.mul_(0.5)
        return super().learn(batch)


class _GlobalRandom(Finetune):
    """Draws noise from torch's global RNG instead of its own seeded generator."""

    name = "test-global-random"

    def learn(self, batch: Batch) -> StepResult:
        noisy = Batch(x=batch.x + 0.1 * torch.randn(batch.x.shape), y=batch.y, task=batch.task)
        return super().learn(noisy)


class _Amnesic(Finetune):
    """Forgets its task bookkeeping in checkpoints."""

    name = "test-amnesic"

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({**state, "task_classes": [[] for _ in state["task_classes"]]})


class _Boastful(Finetune):
    """Claims task-hinted protection without any."""

    name = "test-boastful"

    def protects_with_task_hint(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("cls", "check"),
    [
        (_Mutating, checks.check_learn_does_not_mutate_input),
        (_GlobalRandom, checks.check_seeded_determinism),
        (_Amnesic, checks.check_checkpoint_roundtrip),
        (_Boastful, checks.check_hinted_answers_do_not_change),
    ],
    ids=["mutating", "global-rng", "lossy-checkpoint", "unprotected-hint"],
)
def test_checks_catch_broken_strategies(cls: type[Finetune], check: checks.Check) -> None:
    """Each check fails on a strategy with the bug it is meant to catch."""
    with pytest.raises(AssertionError):
        check(checks.factory_for(cls))


def test_hinted_protection_check_holds_interval_to_its_stored_answers() -> None:
    """`interval` with `keep_task_weights = false` serves ended tasks from `H(c_t)` as it is now,
    which the one-pass regularizer keeps only near: the check notices."""
    from stream_cl.strategies.interval.strategy import Interval

    checks.check_hinted_answers_do_not_change(checks.factory_for(Interval))
    with pytest.raises(AssertionError, match="hinted"):
        checks.check_hinted_answers_do_not_change(checks.factory_for(Interval, keep_task_weights=False))
