"""Head policies: the LS solve against numpy's least squares, deferral, scaling, freezing, options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stream_cl import checks, strategies
from stream_cl.config import ConfigError, ModelConfig, load_config
from stream_cl.strategies import Batch, Boundary
from stream_cl.strategies.backbones import MLP, Classifier
from stream_cl.strategies.finetune import Finetune
from stream_cl.strategies.heads import HeadRows, LSHead, make_head_policy

D = 6  # feature dimension of the policy-level tests


def _model(n_classes: int) -> Classifier:
    torch.manual_seed(0)
    backbone = MLP(4, [D])
    model = Classifier(backbone, D)
    model.head.grow(n_classes)
    return model


def _ls(**options: object) -> LSHead:
    policy = make_head_policy(
        "ls", {"refresh_buffer": 0, **options}, loss="mse", feature_dim=D, seed=0, device=torch.device("cpu")
    )
    assert isinstance(policy, LSHead)
    return policy


def _features(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, D)))


def _feed_three_classes(policy: LSHead) -> tuple[torch.Tensor, torch.Tensor, HeadRows]:
    """Classes 0 and 1 seen 60 times each; class 2 arrives and is solved after its 5th sample."""
    model = _model(3)
    policy.on_new_classes([0, 1, 2])
    hs, ys, rows = [], [], []
    for step in range(12):
        y = torch.tensor([0, 1] * 5 + ([2] if step >= 7 else []))
        h = _features(len(y), step) + torch.nn.functional.one_hot(y, D).double()
        out = policy.observe(model, torch.zeros(len(y), 4), h, y)
        if out is not None:
            rows.append(out)
        hs.append(h)
        ys.append(y)
    solved = [r for r in rows if 2 in r.classes]
    assert len(solved) == 1, "class 2 must be solved exactly once"
    return torch.cat(hs), torch.cat(ys), solved[0]


def _ridge(a: np.ndarray, targets: np.ndarray, lam: float, weights: np.ndarray | None = None) -> np.ndarray:
    """numpy's lstsq of min_W Σ_i w_i ||a_i W - t_i||² + λ ||W||² (w_i = 1/N by default):
    the rows [A √w; √λ I] against [T √w; 0]."""
    sw = np.sqrt(np.full(len(a), 1.0 / len(a)) if weights is None else weights)[:, None]
    stacked_a = np.vstack([a * sw, np.sqrt(lam) * np.eye(a.shape[1])])
    stacked_t = np.vstack([targets * sw, np.zeros((a.shape[1], targets.shape[1]))])
    return np.linalg.lstsq(stacked_a, stacked_t, rcond=None)[0]


def test_ls_solve_matches_numpy_ridge_least_squares() -> None:
    """Unbalanced, mse: the new row is numpy's lstsq of the ridge problem on the same features,
    bias-free (the closed form without intercept): its bias is 0."""
    lam = 0.05
    policy = _ls(balance=False, lam=lam, min_samples=5)
    h, y, rows = _feed_three_classes(policy)
    w = _ridge(h.numpy(), np.eye(3)[y.numpy()], lam)[:, 2]
    assert rows.classes == (2,)
    np.testing.assert_allclose(rows.weight[0].numpy(), w, rtol=1e-4, atol=1e-6)
    assert rows.bias[0].item() == 0.0


def test_ls_solve_under_cross_entropy_has_an_intercept() -> None:
    """Under ce, rows solved with no old row to calibrate against (the first classes) are numpy's
    ridge fit with the bias as the last feature, λ on it too."""
    lam = 0.05
    policy = make_head_policy(
        "ls",
        {"refresh_buffer": 0, "balance": False, "lam": lam, "min_samples": 5},
        loss="ce",
        feature_dim=D,
        seed=0,
        device=torch.device("cpu"),
    )
    assert isinstance(policy, LSHead)
    policy.on_new_classes([0, 1])
    y = torch.tensor([0, 1] * 5)
    h = _features(len(y), 0) + torch.nn.functional.one_hot(y, D).double()
    rows = policy.observe(_model(2), torch.zeros(len(y), 4), h, y)
    assert rows is not None and rows.classes == (0, 1)
    w = _ridge(np.hstack([h.numpy(), np.ones((len(y), 1))]), np.eye(2)[y.numpy()], lam)
    np.testing.assert_allclose(rows.weight.numpy(), w[:D].T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(rows.bias.numpy(), w[D], rtol=1e-4, atol=1e-6)


def test_ls_solve_with_tiny_lambda_is_plain_least_squares() -> None:
    """With λ → 0 the solve is numpy's ordinary least squares of one-hot targets on the features."""
    policy = _ls(balance=False, lam=1e-10, min_samples=5)
    h, y, rows = _feed_three_classes(policy)
    w = np.linalg.lstsq(h.numpy(), np.eye(3)[y.numpy()], rcond=None)[0][:, 2]
    np.testing.assert_allclose(rows.weight[0].numpy(), w, rtol=1e-3, atol=1e-5)


def test_balanced_solve_is_ridge_on_reweighted_samples() -> None:
    """`balance` equals the ridge fit with each class's samples weighted to the same total
    (old classes enter pooled, which is exact here: they are equally frequent)."""
    lam = 0.05
    policy = _ls(balance=True, lam=lam, min_samples=5)
    h, y, rows = _feed_three_classes(policy)
    counts = np.bincount(y.numpy())
    weights = 1.0 / (len(counts) * counts[y.numpy()])  # every class sums to 1 / C
    w = _ridge(h.numpy(), np.eye(3)[y.numpy()], lam, weights)[:, 2]
    np.testing.assert_allclose(rows.weight[0].numpy(), w, rtol=1e-4, atol=1e-6)


def test_rows_wait_for_min_samples_and_only_new_rows_are_written() -> None:
    """No rows before `min_samples` of the class; then one write holding only the new class."""
    policy = make_head_policy(
        "class_mean", {"min_samples": 3}, loss="ce", feature_dim=D, seed=0, device=torch.device("cpu")
    )
    model = _model(2)
    policy.on_new_classes([0, 1])
    assert policy.observe(model, torch.zeros(2, 4), _features(2, 0), torch.tensor([0, 1])) is None
    first = policy.observe(model, torch.zeros(2, 4), _features(2, 1), torch.tensor([0, 0]))
    assert first is not None and first.classes == (0,)
    assert policy.observe(model, torch.zeros(2, 4), _features(2, 2), torch.tensor([0, 1])) is None
    second = policy.observe(model, torch.zeros(1, 4), _features(1, 3), torch.tensor([1]))
    assert second is not None and second.classes == (1,)


def test_class_mean_row_is_the_normalized_mean_at_the_old_norm() -> None:
    """class_mean: direction of the mean normalized feature, norm and bias of the old rows."""
    policy = make_head_policy("class_mean", {}, loss="ce", feature_dim=D, seed=0, device=torch.device("cpu"))
    model = _model(1)
    policy.on_new_classes([0])
    policy.observe(model, torch.zeros(4, 4), _features(4, 0), torch.zeros(4, dtype=torch.long))
    model.head.grow(1)
    policy.on_new_classes([1])
    h = _features(5, 1)
    rows = policy.observe(model, torch.zeros(5, 4), h, torch.ones(5, dtype=torch.long))
    assert rows is not None
    direction = torch.nn.functional.normalize(torch.nn.functional.normalize(h, dim=1).mean(0), dim=0)
    old_norm = model.head.weight[0].norm()
    torch.testing.assert_close(rows.weight[0], (direction * old_norm).float())
    torch.testing.assert_close(rows.bias[0], model.head.bias[0].detach())


def test_ls_rows_match_the_old_rows_norm_under_cross_entropy_without_a_buffer() -> None:
    """With loss=ce and no refresh buffer to calibrate on, a new ls row has the old rows' mean norm."""
    policy = make_head_policy(
        "ls", {"refresh_buffer": 0}, loss="ce", feature_dim=D, seed=0, device=torch.device("cpu")
    )
    model = _model(3)
    policy.on_new_classes([0, 1, 2])
    policy.observe(model, torch.zeros(8, 4), _features(8, 0), torch.tensor([0, 1] * 4))  # solves 0, 1
    rows = policy.observe(model, torch.zeros(3, 4), _features(3, 1), torch.tensor([2, 0, 1]))
    assert rows is not None and rows.classes == (2,)
    expected = model.head.weight[:2].norm(dim=1).mean()
    torch.testing.assert_close(rows.weight[0].norm(), expected.detach())


def _calibrated_row(**options: object) -> tuple[Classifier, torch.Tensor, torch.Tensor, HeadRows]:
    """Classes 0 and 1 solved first (no old rows: as solved); class 2 then meets them under ce."""
    policy = make_head_policy(
        "ls", {"refresh_buffer": 64, **options}, loss="ce", feature_dim=D, seed=0, device=torch.device("cpu")
    )
    model = _model(3)
    policy.on_new_classes([0, 1, 2])
    generator = torch.Generator().manual_seed(0)
    xs, ys = [], []
    rows = None
    for y in (torch.tensor([0, 1] * 8), torch.tensor([2] * 6 + [0, 1] * 2)):
        x = torch.rand(len(y), 4, generator=generator) + torch.nn.functional.one_hot(y, 4)
        out = policy.observe(model, x, model.features(x).detach(), y)
        if out is not None and out.classes == (2,):
            rows = out
        elif out is not None:
            with torch.no_grad():  # rows 0 and 1 join the head, as the strategy would write them
                model.head.weight[list(out.classes)] = out.weight
                model.head.bias[list(out.classes)] = out.bias
        xs.append(x)
        ys.append(y)
    assert rows is not None and rows.classes == (2,)
    return model, torch.cat(xs), torch.cat(ys), rows


def test_ls_rows_beat_the_old_rows_by_the_margin_under_cross_entropy() -> None:
    """calibrate: on its class the new row's mean logit is the strongest old row's plus `margin`;
    on the old classes it sits at the old rows' mean logit on other classes' samples."""
    model, x, y, rows = _calibrated_row(margin=1.5, max_norm=1e6)
    with torch.no_grad():
        h = model.features(x).double()
        old = h @ model.head.weight[:2].double().T + model.head.bias[:2].double()
        new = h @ rows.weight[0].double() + rows.bias[0].double()
    mine = y == 2
    torch.testing.assert_close(new[mine].mean(), old[mine].max(dim=1).values.mean() + 1.5)
    other = y[:, None] != torch.arange(2)[None, :]
    torch.testing.assert_close(new[~mine].mean(), old[other].mean(), atol=0.05, rtol=0.0)


def test_calibrated_ls_rows_keep_within_max_norm() -> None:
    """max_norm caps the row's norm (× the old rows' mean norm); the bias still sets its level."""
    model, x, y, rows = _calibrated_row(margin=1.0, max_norm=0.5)
    old_norm = model.head.weight[:2].detach().norm(dim=1).mean()
    torch.testing.assert_close(rows.weight[0].norm(), 0.5 * old_norm)
    with torch.no_grad():
        h = model.features(x[y == 2]).double()
        old = h @ model.head.weight[:2].double().T + model.head.bias[:2].double()
        new = h @ rows.weight[0].double() + rows.bias[0].double()
    torch.testing.assert_close(new.mean(), old.max(dim=1).values.mean() + 1.0)


def test_refresh_recomputes_statistics_under_the_current_backbone() -> None:
    """At a solve, the second moment is rebuilt from the buffer through the backbone as it is now."""
    policy = make_head_policy(
        "ls", {"refresh_buffer": 16}, loss="mse", feature_dim=D, seed=0, device=torch.device("cpu")
    )
    assert isinstance(policy, LSHead)
    model = _model(2)
    policy.on_new_classes([0, 1])
    x = torch.rand(8, 4)
    policy.observe(model, x, model.features(x).detach(), torch.tensor([0] * 8))  # solves class 0
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.5)  # the backbone moves on
    x2 = torch.rand(4, 4)
    policy.observe(model, x2, model.features(x2).detach(), torch.tensor([1] * 4))  # solves class 1
    held = torch.cat([x, x2])
    with torch.no_grad():
        a = torch.cat([model.features(held).double(), torch.ones(12, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(policy.second_moment, a.T @ a)
    assert policy.memory_usage() == {"refresh_buffer": (12, 16)}


@pytest.mark.parametrize("refresh_buffer", [16, 0])
def test_with_a_refresh_buffer_the_solve_rebuilds_the_second_moment_unread(refresh_buffer: int) -> None:
    """So it is not summed per batch: a solve writes the same rows whatever it held before. Without a
    refresh buffer the summed moment is what the solve reads, and garbage there changes the rows."""
    rows = []
    for garbage in (False, True):
        policy = make_head_policy(
            "ls",
            {"refresh_buffer": refresh_buffer, "min_samples": 4},
            loss="mse",
            feature_dim=D,
            seed=0,
            device=torch.device("cpu"),
        )
        assert isinstance(policy, LSHead)
        model = _model(2)
        policy.on_new_classes([0])
        x = torch.rand(8, 4, generator=torch.Generator().manual_seed(3))
        policy.observe(model, x, model.features(x).detach(), torch.tensor([0] * 8))  # solves class 0
        policy.on_new_classes([1])
        if garbage:
            policy.second_moment.fill_(1e6)
        x2 = torch.rand(4, 4, generator=torch.Generator().manual_seed(4))
        out = policy.observe(model, x2, model.features(x2).detach(), torch.tensor([1] * 4))  # solves 1
        assert out is not None and out.classes == (1,)
        rows.append(out.weight)
    assert torch.equal(rows[0], rows[1]) == bool(refresh_buffer)


def _finetune(head: str, **head_options: object) -> Finetune:
    model = ModelConfig(hidden=[16], weight_decay=0.1, seed=0, device="cpu")
    return Finetune.build((1, 4, 4), model=model, head=head, head_options=head_options, device="cpu")


@pytest.mark.parametrize("head", list(strategies.HEAD_POLICIES))
def test_frozen_old_rows_stay_bit_identical_under_adam(head: str) -> None:
    """With freeze_old, old rows and biases are bit-identical after new classes are learned,
    although Adam's moments and weight decay would otherwise keep moving them."""
    s = _finetune(head, freeze_old=True)
    driver = checks.Driver(s)
    driver.feed(checks.TWO_TASKS[:3])
    s.on_boundary(Boundary(previous_task=0, task=1, reason="explicit"))
    driver.task = 1
    weight, bias = s.model.head.weight[:2].detach().clone(), s.model.head.bias[:2].detach().clone()
    driver.feed([*checks.TWO_TASKS[3:]] * 3)
    assert torch.equal(s.model.head.weight[:2], weight) and torch.equal(s.model.head.bias[:2], bias)


def test_without_freezing_old_rows_move() -> None:
    """The control: with freeze_old off, the same run changes the old rows."""
    s = _finetune("ls")
    driver = checks.Driver(s)
    driver.feed(checks.TWO_TASKS[:3])
    weight = s.model.head.weight[:2].detach().clone()
    driver.feed([*checks.TWO_TASKS[3:]] * 3)
    assert not torch.equal(s.model.head.weight[:2], weight)


@pytest.mark.parametrize("head", ["class_mean", "ls"])
def test_policy_state_round_trips_through_a_checkpoint(head: str) -> None:
    """A strategy with a stateful head policy (a class still waiting for its solve) resumes exactly."""
    checks.check_checkpoint_roundtrip(
        checks.factory_for(Finetune, head=head, head_options={"min_samples": 13})
    )


def test_mse_loss_scores_squared_error_against_one_hot() -> None:
    """With loss=mse the step's per-sample losses are the squared error to one-hot targets."""
    s = Finetune.build((1, 4, 4), model=ModelConfig(hidden=[8], device="cpu"), loss="mse", device="cpu")
    s.add_classes([0, 1], 0)
    batch = checks.make_batch(0, [0, 1])
    with torch.no_grad():
        expected = ((s.model(batch.x) - torch.eye(2)[batch.y]) ** 2).sum(1)
    result = s.learn(Batch(x=batch.x, y=batch.y, task=0))
    np.testing.assert_allclose(result.sample_losses, expected.numpy(), rtol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["strategy.head=magic"], "strategy.head"),
        (["strategy.head=ls", "strategy.head_options={colour = 1}"], "strategy.head_options.colour"),
        (["strategy.head=ls", "strategy.head_options={lam = -1.0}"], "strategy.head_options.lam"),
        (["strategy.head=ls", 'strategy.head_options={balance = "yes"}'], "strategy.head_options.balance"),
        (
            ["strategy.head=class_mean", "strategy.head_options={min_samples = 0}"],
            "strategy.head_options.min_samples",
        ),
        (["strategy.head=random", "strategy.head_options={lam = 0.1}"], "strategy.head_options.lam"),
        (["strategy.loss=hinge"], "strategy.loss"),
    ],
)
def test_bad_head_config_names_the_key(overrides: list[str], key: str) -> None:
    """Head-policy and loss errors surface as ConfigError naming the exact key."""
    config = load_config(None, overrides, env={})
    with pytest.raises(ConfigError) as err:
        strategies.check_config(config)
    assert err.value.key == key


def test_head_options_from_set_and_environment_are_typed() -> None:
    """`--set strategy.head_options.KEY=4` (text) is parsed to the option's type."""
    config = load_config(
        None,
        ["strategy.head=ls", "strategy.head_options.min_samples=4"],
        env={"STREAM_CL_STRATEGY__HEAD_OPTIONS__FREEZE_OLD": "true"},
    )
    s = strategies.from_config(config, (4,))
    assert isinstance(s.head_policy, LSHead)
    assert s.head_policy.options.min_samples == 4 and s.head_policy.options.freeze_old is True


@pytest.mark.slow
def test_heads_bench_cross_entropy_meets_the_goal_under_replay() -> None:
    """`stream-cl bench heads` as it runs by default (replay), seed 0, under cross-entropy: ls
    halves random's spike and recovery on split-mnist and on split-digits, with final accuracy
    no lower (seeds 0-5 meet it on 10 of 12 stream-seed pairs: see the README)."""
    from stream_cl.bench.heads import PROTECTION, run_heads
    from stream_cl.bench.quality import Contender

    config = load_config(None, ["log.level=warning", f"strategy.name={PROTECTION}"], env={})
    contenders = [Contender(h, (f"strategy.head={h}",)) for h in ("random", "ls")]
    result = run_heads(config, contenders, losses=("ce",))
    assert all(g["met"] for g in result["goals"].values()) and len(result["goals"]) == 2, result["goals"]


def test_heads_bench_splits_the_mse_spike_into_the_old_rows_part() -> None:
    """Under mse the bench reports the part of the spike from earlier tasks' rows: measured on the
    same samples before the same steps, it is a part of the loss, so each head's is above 0 (the
    old rows fire on a class they never saw) and below its spike; under ce it is not measured."""
    from stream_cl.bench.heads import run_heads
    from stream_cl.bench.quality import Contender

    config = load_config(None, ["log.level=warning", "strategy.name=replay"], env={})
    contenders = [Contender(h, (f"strategy.head={h}",)) for h in ("random", "ls")]
    result = run_heads(config, contenders, streams=("split-digits",), losses=("mse", "ce"))
    by_loss = {loss: [r for r in result["rows"] if r["loss"] == loss] for loss in ("mse", "ce")}
    assert len(by_loss["mse"]) == 2 and len(by_loss["ce"]) == 2
    for row in by_loss["mse"]:
        assert 0 < row["old_rows_spike"] < row["spike"], row
    assert all(math.isnan(row["old_rows_spike"]) for row in by_loss["ce"])
    goal = result["goals"]["split-digits mse"]
    assert goal["old_rows_ratio"] < goal["spike_ratio"]


def test_class_balanced_buffer_keeps_a_late_class_and_stays_bounded() -> None:
    """A class that arrives when the buffer is full takes slots from the largest class, so it is
    held about as often as the others; the buffer never exceeds its capacity."""
    from stream_cl.strategies.class_buffer import ClassBalancedBuffer

    buffer = ClassBalancedBuffer(30, (2,), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for label in (0, 1):
        y = torch.full((200,), label)
        buffer.add(torch.rand(200, 2), y, generator)
    assert len(buffer) == 30
    buffer.add(torch.rand(12, 2), torch.full((12,), 2), generator)  # a late class: 12 samples only
    held = torch.bincount(buffer.labels(), minlength=3).tolist()
    assert len(buffer) == 30 and held[2] == 10 and held[0] == held[1] == 10, held
    state = buffer.state_dict()
    other = ClassBalancedBuffer(30, (2,), torch.device("cpu"))
    other.load_state_dict(state)
    assert torch.equal(other.inputs(), buffer.inputs()) and other.seen == {0: 200, 1: 200, 2: 12}


def test_class_balanced_buffer_mirror_matches_its_tensors_through_replacements() -> None:
    """The held labels and slots the buffer keeps in Python agree with its tensors after batches
    whose items replace each other (several writes to one slot in a batch: the last one is kept),
    and after a checkpoint round trip; each held input is one that was offered with its label."""
    from stream_cl.strategies.class_buffer import ClassBalancedBuffer

    buffer = ClassBalancedBuffer(8, (3,), torch.device("cpu"))
    generator = torch.Generator().manual_seed(1)
    offered: dict[tuple[float, ...], int] = {}
    for step in range(60):
        y = torch.randint(0, 1 + step // 10, (16,), generator=generator)
        x = torch.rand(16, 3, generator=generator)
        offered.update({tuple(row): int(label) for row, label in zip(x.tolist(), y.tolist(), strict=True)})
        buffer.add(x, y, generator)
        assert buffer._label_at == buffer.labels().tolist()
        for label, slots in buffer._slots_of.items():
            assert slots == [i for i, held in enumerate(buffer._label_at) if held == label]
            assert buffer._held[label] == len(slots)
        assert all(
            offered[tuple(row)] == label
            for row, label in zip(buffer.inputs().tolist(), buffer._label_at, strict=True)
        )
    assert len(buffer) == 8 and len(buffer._held) > 3
    other = ClassBalancedBuffer(8, (3,), torch.device("cpu"))
    other.load_state_dict(buffer.state_dict())
    assert other._label_at == buffer._label_at
    assert other._slots_of == {c: slots for c, slots in buffer._slots_of.items() if slots}
    assert other._held == {c: n for c, n in buffer._held.items() if n}


def test_heads_bench_folds_head_options_overrides_into_one_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--override ls:strategy.head_options.lam=0.01` (the help text's own form) reaches the head
    as its options, not a config error, and other heads keep no options; every head runs under
    `--strategy`, whatever the config's strategy."""
    import argparse
    from typing import Any

    from stream_cl.bench import heads as bench
    from stream_cl.bench.quality import Contender, with_overrides

    seen: dict[str, Any] = {}

    def fake_run_heads(config: Any, contenders: list[Contender], **kwargs: Any) -> dict[str, Any]:
        seen["protection"] = config.strategy.name
        for contender in contenders:
            seen[contender.label] = with_overrides(config, contender.overrides).strategy.head_options
        return {"seed": 0, "strategy": "finetune", "rows": [], "goals": {}}

    monkeypatch.setattr(bench, "run_heads", fake_run_heads)
    overrides = ["ls:strategy.head_options.lam=0.01", "ls:strategy.head_options.min_samples=4"]
    args = argparse.Namespace(
        heads="random,ls", streams="split-digits", losses="mse", seed=0, override=overrides, strategy="replay"
    )
    bench.run(load_config(None, ["strategy.name=eidetic"], env={}), args)
    assert seen == {"protection": "replay", "random": {}, "ls": {"lam": 0.01, "min_samples": 4}}


def test_heads_bench_over_several_seeds_counts_the_seeds_that_meet_the_goal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--seed 0,3`: one run per seed (each its own table), then per stream and loss how many seeds
    meet the goal and the mean ratios; a bad list is an error naming `--seed`."""
    import argparse
    from typing import Any

    from stream_cl.bench import heads as bench
    from stream_cl.bench.quality import Contender
    from stream_cl.config import ConfigError

    ratios = {0: (0.4, 0.3, 0.1), 3: (0.6, 0.5, 0.2)}  # seed 3 misses on the spike

    def fake_run_heads(
        config: Any, contenders: list[Contender], *, seed: int, **kwargs: Any
    ) -> dict[str, Any]:
        spike, recovery, delta = ratios[seed]
        goal = {"spike_ratio": spike, "recovery_ratio": recovery, "accuracy_delta": delta}
        goal["old_rows_ratio"] = math.nan  # ce: the loss does not split by row
        goal["met"] = spike <= 0.5 and recovery <= 0.5 and delta >= 0
        return {
            "seed": seed,
            "strategy": config.strategy.name,
            "rows": [],
            "goals": {"split-digits ce": goal},
        }

    monkeypatch.setattr(bench, "run_heads", fake_run_heads)
    args = argparse.Namespace(
        heads="random,ls", streams="split-digits", losses="ce", seed="0,3", override=[], strategy="replay"
    )
    result, text = bench.run(load_config(None, [], env={}), args)
    assert result["seeds"] == [0, 3] and [r["seed"] for r in result["runs"]] == [0, 3]
    summary = result["summary"]["split-digits ce"]
    assert summary["seeds"] == 2 and summary["met"] == 1
    assert summary["spike_ratio_mean"] == pytest.approx(0.5) and summary[
        "recovery_ratio_mean"
    ] == pytest.approx(0.4)
    assert "split-digits ce: goal met on 1 of 2 seeds; mean spike 0.50x, recovery 0.40x" in text
    with pytest.raises(ConfigError, match="--seed"):
        bench.run(load_config(None, [], env={}), argparse.Namespace(**{**vars(args), "seed": "0,x"}))
