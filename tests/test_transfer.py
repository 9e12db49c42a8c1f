"""Trajectory transfer: permutation matching, trajectory endpoints in checkpoints, and a transferred
checkpoint that the daemon restores and serves over a real socket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_cl.bench.offline import stream_records
from stream_cl.cli import main
from stream_cl.config import Config, load_config
from stream_cl.learn.learner import Learner
from stream_cl.learn.trajectory import TrajectoryRecorder
from stream_cl.metrics import Metrics
from stream_cl.runtime.daemon import Daemon, checkpoint_dir
from stream_cl.serve.client import PredictionClient
from stream_cl.serve.server import PredictionServer
from stream_cl.serve.snapshot import SnapshotHolder
from stream_cl.store.checkpoints import CheckpointStore, read_checkpoint
from stream_cl.strategies.backbones import MLP, Classifier
from stream_cl.tools.datasets import load_stream
from stream_cl.tools.transfer import (
    Layer,
    _grads,
    batches_of,
    match,
    match_statistics,
    mlp_layers,
    permute,
    transfer,
    unit_statistics,
)

STREAM = "split-mnist1d"


def tiny_classifier(seed: int = 0) -> Classifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(MLP(20, [16, 12]), 12)
        model.head.grow(5)
    return model


def known_permutation() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randperm(16, generator=gen), torch.randperm(12, generator=gen)]


def test_matching_weights_recovers_a_known_permutation_exactly() -> None:
    """Matching a network against a copy permuted by a known π returns exactly π, per layer."""
    model = tiny_classifier()
    layers = mlp_layers(model)
    source = dict(model.state_dict())
    known = known_permutation()
    permuted = permute(source, layers, known)
    found = match([(permuted, source)], layers)
    assert all(torch.equal(f, k) for f, k in zip(found, known, strict=True))


def test_gradient_matching_recovers_a_known_permutation_exactly() -> None:
    """Gradients of the permuted network on the same batch are the permuted gradients: matched to π."""
    model, scratch = tiny_classifier(), tiny_classifier(1)
    layers = mlp_layers(model)
    source = dict(model.state_dict())
    known = known_permutation()
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(64, 20, generator=gen), torch.randint(0, 5, (64,), generator=gen)
    g_source = _grads(model, source, x, y)
    g_permuted = _grads(scratch, permute(source, layers, known), x, y)
    found = match([(g_permuted, g_source)], layers)
    assert all(torch.equal(f, k) for f, k in zip(found, known, strict=True))


def offset_inputs(n: int = 256, seed: int = 3) -> torch.Tensor:
    """Inputs like min-max scaled mnist1d: every feature about 0.55 ± 0.10, so the offset
    dominates each first-layer unit's pre-activation."""
    return 0.55 + 0.1 * torch.randn(n, 20, generator=torch.Generator().manual_seed(seed))


def test_match_statistics_gives_each_unit_its_source_units_statistics() -> None:
    """After `match_statistics`, unit i of every hidden layer has, on the buffer, the pre-activation
    mean and std of the source unit π(i) it takes, though the two initializations differ."""
    source, other = tiny_classifier(), tiny_classifier(1)
    layers, x, known = mlp_layers(source), offset_inputs(), known_permutation()
    target = unit_statistics(source, dict(source.state_dict()), layers, x)
    before = unit_statistics(other, dict(other.state_dict()), layers, x)
    assert not torch.allclose(before[0][0], target[0][0][known[0]], atol=0.05)
    fixed = match_statistics(other, dict(other.state_dict()), target, layers, known, x)
    after = unit_statistics(other, fixed, layers, x)
    for (mean, std), (want_mean, want_std), perm in zip(after, target, known, strict=True):
        torch.testing.assert_close(mean, want_mean[perm], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, want_std[perm], atol=1e-4, rtol=1e-4)


def test_transfer_keeps_weights_whose_units_have_the_source_statistics() -> None:
    """With a buffer, the kept θ₂ (here T = 1, the trajectory's end) has every hidden unit's
    statistics equal to the source unit it was matched to, not θ₂⁰'s."""
    start, init = tiny_classifier(), tiny_classifier(1)
    gen = torch.Generator().manual_seed(4)
    s0 = dict(start.state_dict())
    end = {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in s0.items()}
    x = offset_inputs()
    y = torch.randint(0, 5, (len(x),), generator=gen)
    model = tiny_classifier(2)
    layers = mlp_layers(model)
    result = transfer(model, s0, end, dict(init.state_dict()), batches_of(x, y, 64, 0), (x, y), 1, x)
    kept = unit_statistics(model, result.params, layers, x)
    target = unit_statistics(model, end, layers, x)
    for (mean, std), (want_mean, want_std), perm in zip(kept, target, result.perms, strict=True):
        torch.testing.assert_close(mean, want_mean[perm], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std, want_std[perm], atol=1e-4, rtol=1e-4)


def test_transfer_recovers_a_permuted_initialization_with_statistics_reestimated() -> None:
    """θ₂⁰ = π(θ₁⁰): the transfer finds π exactly although the kept weights' statistics are
    re-estimated on the buffer (re-estimating at the gradients' points too, towards a π not yet
    found, loses it)."""
    start = tiny_classifier()
    layers, known = mlp_layers(start), known_permutation()
    s0 = dict(start.state_dict())
    gen = torch.Generator().manual_seed(4)
    end = {k: v + 0.2 * torch.randn(v.shape, generator=gen) for k, v in s0.items()}
    x = torch.randn(256, 20, generator=gen)
    y = torch.randint(0, 5, (len(x),), generator=gen)
    model = tiny_classifier(2)
    init = permute(s0, layers, known)
    result = transfer(model, s0, end, init, batches_of(x, y, 64, 0), (x, y), 4, x)
    assert all(torch.equal(f, k) for f, k in zip(result.perms, known, strict=True))


def reference_match(
    pairs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]], layers: list[Layer]
) -> list[torch.Tensor]:
    """`match` written straight from its definition: per layer, with the other layers' π applied
    to b through `permute`, A[i, j] = Σ ⟨a's unit i, b's unit j⟩ over the layer's outgoing and
    consuming tensors; Hungarian; sweep until stable."""
    from scipy.optimize import linear_sum_assignment

    perms = [torch.arange(pairs[0][1][layer.out[0]].shape[0]) for layer in layers]
    for _ in range(20):
        changed = False
        for li, layer in enumerate(layers):
            cost = torch.zeros(len(perms[li]), len(perms[li]))
            for a, b in pairs:
                others = [p if k != li else torch.arange(len(p)) for k, p in enumerate(perms)]
                pb = permute(b, layers, others)
                for name in layer.out:
                    cost += a[name].reshape(len(cost), -1) @ pb[name].reshape(len(cost), -1).T
                for name in layer.consumers:
                    cost += a[name].T @ pb[name].T.T
            new = torch.as_tensor(linear_sum_assignment(cost.double().numpy(), maximize=True)[1])
            changed |= not torch.equal(new, perms[li])
            perms[li] = new
        if not changed:
            return perms
    return perms


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_equals_its_definition(seed: int) -> None:
    """On unrelated random pairs (no exact answer), `match`'s stacked per-layer costs give the same
    permutations as the definition computed pair by pair."""
    torch.manual_seed(seed)
    model = Classifier(MLP(20, [16, 12, 10]), 10)
    model.head.grow(5)
    layers = mlp_layers(model)
    gen = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in model.state_dict().items()}

    def draw() -> dict[str, torch.Tensor]:
        return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}

    pairs = [(draw(), draw()) for _ in range(3)]
    found, expected = match(pairs, layers), reference_match(pairs, layers)
    assert all(torch.equal(f, e) for f, e in zip(found, expected, strict=True))


def test_recorder_keeps_the_first_start_and_the_last_tasks() -> None:
    """Bounded: the initialization's entry stays, then the most recent tasks; ends fill at boundaries."""
    model = tiny_classifier()
    rec = TrajectoryRecorder(keep=3)
    rec.on_boundary(None, 0, model)
    for task in range(1, 5):
        rec.on_boundary(task - 1, task, model)
    assert [e["task"] for e in rec.entries] == [0, 3, 4]
    assert rec.entries[0]["end"] is not None and rec.entries[-1]["end"] is None


def config_for(tmp_path: object, *extra: str) -> Config:
    return load_config(
        None,
        [
            "model.hidden=[32, 32]",
            "model.device=cpu",
            "strategy.name=replay",
            "evaluation.holdout_fraction=0",
            "serve.port=0",
            "serve.http_port=0",
            f"checkpoint.dir={tmp_path}",
            *extra,
        ],
        env={},
    )


def test_transferred_checkpoint_loads_and_serves(tmp_path: pytest.TempPathFactory) -> None:
    """`stream-cl transfer` writes a checkpoint the daemon restores and serves over the socket."""
    source_dir = tmp_path / "source"  # type: ignore[operator]
    config = config_for(source_dir)
    stream = load_stream(STREAM, seed=0)
    learner = Learner(config, SnapshotHolder(), Metrics(), checkpoints=CheckpointStore(source_dir))
    for chunk in stream_records(stream)[:4]:
        learner.process(chunk)
    assert learner.checkpoint()
    state = CheckpointStore(source_dir).load_latest()
    assert state is not None and len(state[0]["trajectory"]) >= 2

    replica = config_for(tmp_path / "replica", "kafka.group_id=replica")  # type: ignore[operator]
    out = checkpoint_dir(replica)
    args = ["transfer", str(source_dir), "--out", str(out), "--stream", STREAM]
    args += ["--buffer", "300", "--steps", "3", "--seed", "5", "--set", "model.hidden=[32, 32]"]
    assert main(args) == 0
    written = read_checkpoint(next(out.glob("ckpt-*.pt")))
    assert written["labels"] == state[0]["labels"]
    assert not torch.equal(
        written["strategy"]["model"]["head.weight"], state[0]["strategy"]["model"]["head.weight"]
    )

    daemon = Daemon(replica)
    assert daemon.restore()
    server = PredictionServer(replica.serve, daemon.holder)
    port = server.start()
    try:
        x = np.asarray(stream.tasks[0].test_x[0], dtype=np.float32)
        with PredictionClient(port=port) as client:
            reply = client.predict(x.tolist())
        assert reply["ok"] and reply["label"] in state[0]["labels"]
        assert abs(sum(reply["proba"].values()) - 1.0) < 1e-4
    finally:
        server.stop()


def test_bench_transfer_learns_its_source_with_a_random_head(tmp_path: pytest.TempPathFactory) -> None:
    """`stream-cl bench transfer` end to end on split-mnist: its source learns with a `random` head
    whatever config.toml's default head is (an `ls` head writes rows in closed form, not along
    the learned trajectory), and the transferred weights beat the identity permutation before any
    training. Measured: +10.6 points for seed 1 (+10.6 to +26.0 over seeds 1-6)."""
    import json

    out = tmp_path / "transfer.json"  # type: ignore[operator]
    args = ["bench", "transfer", "--streams", "split-mnist", "--seeds", "1", "--max-samples", "0"]
    assert main([*args, "--json", str(out), "--set", "strategy.head=ls"]) == 0
    figures = json.loads(out.read_text())
    assert figures["source_head"] == "random"
    (row,) = figures["rows"]
    acc = row["accuracy"]
    assert acc["source"] > 0.5 and acc["fresh"] < 0.2
    assert acc["transferred"] - acc["naive"] > 0.05
