"""Typed options: a dataclass per option set, its fields and comments the one place each option
is documented, values parsed from TOML (or from `--set` text) with errors naming the config key."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


def parse_typed(options_type: type[T], raw: Mapping[str, Any], prefix: str, owner: str) -> T:
    """`options_type(**raw)` with every value checked against the field's type; ValueError
    "PREFIX.KEY: ..." for an unknown key or a value of the wrong type (`owner` names whose
    options they are, e.g. "head policy 'ls'")."""
    hints = typing.get_type_hints(options_type)
    names = [f.name for f in dataclasses.fields(options_type)]  # type: ignore[arg-type]
    values = {}
    for key, value in raw.items():
        if key not in names:
            raise ValueError(
                f"{prefix}.{key}: not an option of {owner} (valid: {', '.join(names) or 'none'})"
            )
        expected = hints[key]
        if isinstance(value, str) and expected is not str:
            value = parse_text(value)  # from `--set PREFIX.KEY=...` or the environment
        if not _has_type(value, expected):
            raise ValueError(
                f"{prefix}.{key}: expected {getattr(expected, '__name__', expected)}, "
                f"got {type(value).__name__} {value!r}"
            )
        if typing.get_origin(expected) is tuple and isinstance(value, list):
            value = tuple(value)  # a TOML array; the options stay immutable
        values[key] = value
    return options_type(**values)


def parse_text(text: str) -> Any:
    """A TOML value written as text (`4`, `0.1`, `true`), as `--set a.b.c=4` and the environment
    deliver table entries; the text itself if it is not one."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _has_type(value: Any, expected: Any) -> bool:
    """TOML-typed check: bools are not numbers, and an integer is a fine float. A sequence type
    (`tuple[int, ...]`) takes any TOML array; its items are the options' `validate` to check."""
    if typing.get_origin(expected) in (list, tuple, Sequence):
        return isinstance(value, list | tuple)
    if expected is bool or isinstance(value, bool):
        return expected is bool and isinstance(value, bool)
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


# -- options ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyOptions:
    """A strategy's own options (`strategy.options` in config.toml); base of every strategy's
    `options_type`. Every field needs a default: `strategy.options = {}` must build the strategy."""

    def validate(self) -> None:
        """Raise ValueError("strategy.options.KEY: ...") for a bad value."""


@dataclass(frozen=True)
class HeadOptions:
    """Options every policy takes (`strategy.head_options` in config.toml)."""

    freeze_old: bool = False  # freeze every existing row at each task boundary

    def validate(self) -> None:
        """Raise ValueError("strategy.head_options.KEY: ...") for a bad value."""


@dataclass(frozen=True)
class DeferredOptions(HeadOptions):
    min_samples: int = 1  # samples of a new class observed before its row is written

    def validate(self) -> None:
        if self.min_samples < 1:
            raise ValueError(f"strategy.head_options.min_samples: must be >= 1, got {self.min_samples}")


@dataclass(frozen=True)
class LSOptions(DeferredOptions):
    lam: float = 0.001  # ridge λ: keeps the solve well-posed with few samples
    balance: bool = True  # weight classes equally, so a class seen k times gets a full-size row
    refresh_buffer: int = 256  # inputs kept to recompute the second moment at a solve; 0 = off
    # Cross-entropy only: how a ridge row (output ~1 on its class, ~0 elsewhere) meets the head.
    calibrate: bool = True  # map it onto the head's logits (needs refresh_buffer); else match norms
    margin: float = 1.0  # calibrate: its mean logit on its class beats the strongest old row's by this
    max_norm: float = 2.0  # calibrate: its norm stays <= this x the old rows' mean norm

    def validate(self) -> None:
        super().validate()
        if not self.lam > 0:
            raise ValueError(f"strategy.head_options.lam: must be > 0, got {self.lam}")
        if self.refresh_buffer < 0:
            raise ValueError(f"strategy.head_options.refresh_buffer: must be >= 0, got {self.refresh_buffer}")
        if not self.margin >= 0:
            raise ValueError(f"strategy.head_options.margin: must be >= 0, got {self.margin}")
        if not self.max_norm > 0:
            raise ValueError(f"strategy.head_options.max_norm: must be > 0, got {self.max_norm}")
