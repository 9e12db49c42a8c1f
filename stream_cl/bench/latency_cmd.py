"""`stream-cl bench latency`: socket and OIP v2 HTTP (JSON, binary) latency and throughput vs in-process forward."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from stream_cl.config import Config

if TYPE_CHECKING:
    from stream_cl.serve.snapshot import Snapshot

HELP = "socket and HTTP (JSON, binary) predict latency/throughput against in-process forward"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stream", default="split-mnist", help="stream the served model is trained on")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per throughput measurement")


def run(config: Config, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from stream_cl.bench.latency import format_latency_table, run_latency_bench
    from stream_cl.bench.trained import trained_snapshot

    snapshot, xs = trained_snapshot(config, args.stream)
    result = run_latency_bench(snapshot, xs, duration_s=args.duration, plain=plain_snapshot(config, snapshot))
    return result, format_latency_table(result)


def plain_snapshot(config: Config, served: Snapshot) -> Snapshot:
    """The configured backbone with a plain linear head over `served`'s classes, as a snapshot: what
    a forward costs without the strategy's protection (routing, masks, per-task answers)."""
    import torch

    from stream_cl.serve.snapshot import Snapshot
    from stream_cl.strategies.backbones import Classifier, build_backbone

    backbone = build_backbone(config.model.backbone, served.input_shape, config.model.hidden)
    model = Classifier(backbone, backbone.feature_dim)
    model.head.grow(len(served.labels))
    model.eval()

    def predictor(x: torch.Tensor, task: Any) -> tuple[torch.Tensor, list[None]]:
        return torch.softmax(model(x), dim=1), [None] * len(x)

    return Snapshot(0, "plain", served.labels, (), served.input_shape, predictor)
