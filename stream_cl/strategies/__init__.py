"""Strategy registry: name → class, built-ins plus the `stream_cl.strategies` entry-point group."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from stream_cl.config import ConfigError
from stream_cl.strategies.base import Batch, Boundary, StepResult, Strategy
from stream_cl.strategies.finetune import Finetune

if TYPE_CHECKING:
    from stream_cl.config import Config

__all__ = [
    "Batch",
    "Boundary",
    "StepResult",
    "Strategy",
    "available",
    "check_config",
    "create",
    "from_config",
    "get",
    "register",
]

_REGISTRY: dict[str, type[Strategy]] = {}
ENTRY_POINT_GROUP = "stream_cl.strategies"


def register(cls: type[Strategy]) -> type[Strategy]:
    """Register a strategy class under its `name` (usable as a decorator)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no `name`")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"strategy name {cls.name!r} is taken by {existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in _REGISTRY:
            register(ep.load())


def available() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def get(name: str) -> type[Strategy]:
    _load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; valid: {', '.join(available())}") from None


def create(name: str, input_shape: Any, **kwargs: Any) -> Strategy:
    return get(name)(input_shape, **kwargs)


def check_config(config: Config) -> type[Strategy]:
    """Validate `[strategy]` against the registry and the class's constructor; raise ConfigError."""
    try:
        cls = get(config.strategy.name)
    except KeyError:
        raise ConfigError(
            "strategy.name", f"unknown strategy {config.strategy.name!r}; valid: {', '.join(available())}"
        ) from None
    params = inspect.signature(cls.__init__).parameters
    fixed = {"self", "input_shape", "model", "head", "device"}
    valid = sorted(n for n in params if n not in fixed)
    for key in config.strategy.options:
        if key not in params or key in fixed:
            raise ConfigError(
                f"strategy.options.{key}",
                f"not an option of strategy {cls.name!r} (valid: {', '.join(valid) or 'none'})",
            )
    return cls


def from_config(config: Config, input_shape: Sequence[int]) -> Strategy:
    """Build the configured strategy; bad options or values raise ConfigError naming the key."""
    cls = check_config(config)
    try:
        return cls(
            input_shape,
            model=config.model,
            head=config.strategy.head,
            device=config.model.device,
            **config.strategy.options,
        )
    except (TypeError, ValueError) as e:
        message = str(e)
        key = message.split(":", 1)[0] if message.startswith("strategy.") else "strategy"
        raise ConfigError(key, message) from e


for _cls in (Finetune,):
    register(_cls)
