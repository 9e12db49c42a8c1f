"""Strategy registry: name → class, built-ins plus the `stream_cl.strategies` entry-point group.

A strategy is a `Strategy` subclass with a `name`, an `options_type` (a frozen dataclass
deriving `StrategyOptions`, a default for every field, `validate()` raising
ValueError("strategy.options.KEY: ...")) and a constructor `__init__(self, context, options)`
that calls `super().__init__(context, options)` first:

    @dataclass(frozen=True)
    class MyOptions(StrategyOptions):
        memory: int = 500  # samples kept (documented here, and only here)

    class MyStrategy(Strategy):
        name = "my_strategy"
        options_type = MyOptions
        options: MyOptions

        def __init__(self, context: StrategyContext, options: MyOptions | None = None) -> None:
            super().__init__(context, options)
            ...  # self.options.memory, self.input_shape, self.device, self.model_config

A third-party package registers it in its own pyproject.toml:

    [project.entry-points."stream_cl.strategies"]
    my_strategy = "my_package.module:MyStrategy"

and it is selected with `[strategy] name = "my_strategy"`, `options = { memory = 100 }` like a
built-in one; the conformance suite (`stream_cl.checks`) then runs over it as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from stream_cl.config import ConfigError
from stream_cl.strategies.base import LOSSES, Batch, Boundary, StepResult, Strategy, StrategyContext
from stream_cl.strategies.eidetic.strategy import Eidetic
from stream_cl.strategies.finetune import Finetune
from stream_cl.strategies.fip import FIP
from stream_cl.strategies.heads import HEAD_POLICIES, HeadPolicy, parse_options
from stream_cl.strategies.interval.strategy import Interval
from stream_cl.strategies.options import StrategyOptions
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
    "StrategyContext",
    "StrategyOptions",
    "available",
    "check_config",
    "context_from_config",
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


def create(name: str, input_shape: Sequence[int], **arguments: Any) -> Strategy:
    """The strategy `name` from plain arguments, as `Strategy.build` takes them; ValueError names the key."""
    return get(name).build(input_shape, **arguments)


def check_config(config: Config) -> type[Strategy]:
    """Validate `[strategy]` (name, head, head_options, loss, options) without building a model.

    Raises ConfigError naming the key at fault, so the daemon fails before consuming anything.
    """
    cls, _ = _parse(config)
    return cls


def _parse(config: Config) -> tuple[type[Strategy], StrategyOptions]:
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
        # `--set strategy.options.KEY=4` and the environment deliver text: parsed by field type.
        return cls, cls.parse_options(config.strategy.options)
    except ValueError as e:
        raise _config_error(e) from e


def context_from_config(config: Config, input_shape: Sequence[int]) -> StrategyContext:
    """The `StrategyContext` of `[model]` and `[strategy]` for inputs shaped `input_shape`."""
    try:
        return StrategyContext.create(
            input_shape,
            model=config.model,
            head=config.strategy.head,
            head_options=config.strategy.head_options,
            loss=config.strategy.loss,
            device=config.model.device,
        )
    except ValueError as e:
        raise _config_error(e) from e


def from_config(config: Config, input_shape: Sequence[int]) -> Strategy:
    """Build the configured strategy; bad options or values raise ConfigError naming the key."""
    cls, options = _parse(config)
    context = context_from_config(config, input_shape)
    try:
        return cls(context, options)
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
