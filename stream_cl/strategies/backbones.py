"""Backbones and the classifier head that grows when a new label appears."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn


def resolve_device(device: str) -> torch.device:
    """`auto` means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class MLP(nn.Module):
    """Flatten, then Linear+ReLU blocks; `feature_dim` is the width of the last block."""

    def __init__(self, input_size: int, hidden: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = input_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.feature_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SmallCNN(nn.Module):
    """Two conv+BatchNorm+ReLU+pool blocks, then a Linear+ReLU block of width `hidden[-1]`."""

    def __init__(self, input_shape: Sequence[int], hidden: Sequence[int], channels: Sequence[int] = (16, 32)):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(
                f"the cnn backbone needs a (channels, height, width) input shape, got {input_shape}"
            )
        c, h, w = input_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.conv = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden[-1]), nn.ReLU())
        self.feature_dim = hidden[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


def build_backbone(kind: str, input_shape: Sequence[int], hidden: Sequence[int]) -> MLP | SmallCNN:
    size = math.prod(input_shape)
    if kind == "mlp":
        return MLP(size, hidden)
    if kind == "cnn":
        return SmallCNN(input_shape, hidden)
    raise ValueError(f"unknown backbone {kind!r} (valid: mlp, cnn)")


class ExpandingHead(nn.Module):
    """A linear classifier with one row per class seen so far.

    `grow` replaces the parameters with larger ones (old rows copied), so optimizers holding the
    old tensors must be rebuilt by the caller; `Strategy` does that.
    """

    def __init__(self, feature_dim: int, n_classes: int = 0) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.weight = nn.Parameter(torch.zeros(n_classes, feature_dim))
        self.bias = nn.Parameter(torch.zeros(n_classes))

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def grow(self, n_new: int, generator: torch.Generator | None = None) -> None:
        """Append `n_new` rows with PyTorch's default Linear initialization (the `random` policy)."""
        bound = 1.0 / math.sqrt(self.feature_dim)
        dev = self.weight.device
        new_w = (torch.rand(n_new, self.feature_dim, generator=generator) * 2 - 1) * bound
        new_b = (torch.rand(n_new, generator=generator) * 2 - 1) * bound
        with torch.no_grad():
            self.weight = nn.Parameter(torch.cat([self.weight.detach(), new_w.to(dev)]))
            self.bias = nn.Parameter(torch.cat([self.bias.detach(), new_b.to(dev)]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(h, self.weight, self.bias)


class Classifier(nn.Module):
    """backbone → features → expanding head."""

    def __init__(self, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = ExpandingHead(feature_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


M = TypeVar("M", bound=nn.Module)


def frozen_copy(module: M) -> M:
    """An eval-mode copy of `module` with cloned, gradient-free parameters and buffers.

    What `copy.deepcopy(module).eval()` gives a snapshot, at a fraction of its cost: deepcopy's
    generic memo walk over every attribute is what a snapshot every few steps would pay for. Each module is rebuilt from a shallow copy of its
    attributes with its parameters and buffers cloned; other tensor attributes are cloned and
    containers deep-copied, so nothing mutable is shared with the live model. Modules that
    customize copying (`__deepcopy__`) or use parametrizations fall back to `copy.deepcopy`.
    """
    cls = type(module)
    if "__deepcopy__" in vars(cls) or "parametrizations" in module._modules:
        dup = copy.deepcopy(module).eval()
        for p in dup.parameters():
            p.requires_grad_(False)
        return dup
    new = object.__new__(cls)
    attrs = module.__dict__.copy()
    for key, value in attrs.items():
        if key == "_parameters":
            attrs[key] = {
                k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
                for k, p in value.items()
            }
        elif key == "_buffers":
            attrs[key] = {k: None if b is None else b.detach().clone() for k, b in value.items()}
        elif key == "_modules":
            attrs[key] = {k: None if m is None else frozen_copy(m) for k, m in value.items()}
        elif isinstance(value, torch.Tensor):
            attrs[key] = value.detach().clone()
        elif isinstance(value, dict | list | set):  # hooks, non-persistent buffer names, ...
            attrs[key] = copy.deepcopy(value) if value else value.copy()  # mostly empty: cheap
    attrs["training"] = False
    new.__dict__ = attrs
    return new
