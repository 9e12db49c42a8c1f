"""Trajectory transfer: permutation matching, trajectory endpoints in checkpoints, and a transferred
checkpoint that the daemon restores and serves over a real socket."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stream_cl.checkpoint import CheckpointStore, read_checkpoint
from stream_cl.cli import main
from stream_cl.client import PredictionClient
from stream_cl.config import Config, load_config
from stream_cl.daemon import Daemon, checkpoint_dir
from stream_cl.datasets import load_stream
from stream_cl.learner import Learner
from stream_cl.metrics import Metrics
from stream_cl.models import MLP, Classifier
from stream_cl.offline import stream_records
from stream_cl.serve import PredictionServer
from stream_cl.snapshot import SnapshotHolder
from stream_cl.transfer import Layer, TrajectoryRecorder, _grads, match, mlp_layers, permute

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
