"""Strategy registry: name → class, built-ins plus the `stream_cl.strategies` entry-point group.

A third-party package registers a strategy in its own pyproject.toml:

    [project.entry-points."stream_cl.strategies"]
    my_strategy = "my_package.module:MyStrategy"

and it is selected with `[strategy] name = "my_strategy"` like a built-in one; the conformance
suite (`stream_cl.checks`) then runs over it as well.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from stream_cl.config import ConfigError
from stream_cl.strategies.base import LOSSES, Batch, Boundary, StepResult, Strategy
from stream_cl.strategies.eidetic.strategy import Eidetic
from stream_cl.strategies.finetune import Finetune
from stream_cl.strategies.fip import FIP
from stream_cl.strategies.heads import HEAD_POLICIES, HeadPolicy, parse_options, parse_text
from stream_cl.strategies.interval.strategy import Interval
from stream_cl.strategies.replay import Replay

if TYPE_CHECKING:
    from stream_cl.config import Config

__all__ = [
    "HEAD_POLICIES",
    "Batch",
    "Boundary",
    "HeadPolicy",
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
    """Validate `[strategy]` (name, head, head_options, loss, options) without building a model.

    Raises ConfigError naming the key at fault, so the daemon fails before consuming anything.
    """
    try:
        cls = get(config.strategy.name)
    except KeyError:
        raise ConfigError(
            "strategy.name", f"unknown strategy {config.strategy.name!r}; valid: {', '.join(available())}"
        ) from None
    if config.strategy.loss not in LOSSES:
        raise ConfigError(
            "strategy.loss", f"expected one of {', '.join(LOSSES)}; got {config.strategy.loss!r}"
        )
    try:
        parse_options(config.strategy.head, config.strategy.head_options)
    except ValueError as e:
        raise _config_error(e) from e
    params = inspect.signature(cls.__init__).parameters
    fixed = {"self", "input_shape", "model", "head", "head_options", "loss", "device"}
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
        hints = typing.get_type_hints(cls.__init__)
    except NameError:  # annotations naming types imported only for type checking
        hints = {}
    options = {
        # `--set strategy.options.KEY=4` and the environment deliver text: parse it unless the
        # option is a string.
        key: parse_text(value) if isinstance(value, str) and hints.get(key) is not str else value
        for key, value in config.strategy.options.items()
    }
    try:
        return cls(
            input_shape,
            model=config.model,
            head=config.strategy.head,
            head_options=config.strategy.head_options,
            loss=config.strategy.loss,
            device=config.model.device,
            **options,
        )
    except (TypeError, ValueError) as e:
        raise _config_error(e) from e


def _config_error(e: Exception) -> ConfigError:
    """Turn "strategy.KEY: message" from a constructor into ConfigError("strategy.KEY", message)."""
    key, sep, message = str(e).partition(": ")
    if sep and key.startswith("strategy."):
        return ConfigError(key, message)
    return ConfigError("strategy", str(e))


for _cls in (Finetune, Replay, FIP, Interval, Eidetic):
    register(_cls)
