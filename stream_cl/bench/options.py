"""What the bench verbs' options share: comma-separated lists, per-contender overrides, and the
`--strategies`/`--streams` pair. Errors name the flag they are about."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from stream_cl.config import ConfigError


def comma_list(value: str) -> list[str]:
    """`a, b,c` -> ["a", "b", "c"]; empty items are dropped."""
    return [item.strip() for item in value.split(",") if item.strip()]


def comma_ints(value: str | int, flag: str) -> list[int]:
    """One integer or a comma-separated list of them, at least one."""
    try:
        ints = [value] if isinstance(value, int) else [int(item) for item in comma_list(value)]
    except ValueError:
        raise ConfigError(
            flag, f"expected an integer or a comma-separated list of them, got {value!r}"
        ) from None
    if not ints:
        raise ConfigError(flag, "expected at least one integer")
    return ints


def overrides_by_name(items: Sequence[str], names: Sequence[str], kind: str) -> dict[str, list[str]]:
    """`--override KIND:section.key=value` items, grouped by the contender they name."""
    by_name: dict[str, list[str]] = {name: [] for name in names}
    for item in items:
        name, sep, override = item.partition(":")
        if not sep or name not in by_name:
            raise ConfigError(
                "--override", f"expected {kind}:section.key=value with {kind} in {list(names)}, got {item!r}"
            )
        by_name[name].append(override)
    return by_name


def add_strategies_and_streams(p: argparse.ArgumentParser, strategies: str, streams: str) -> None:
    """The strategies compared and the built-in streams they learn, with their defaults."""
    p.add_argument(
        "--strategies", default=strategies, help=f"comma-separated strategy names (default: {strategies})"
    )
    p.add_argument(
        "--streams",
        default=streams,
        help=f"comma-separated built-in streams, shapes included, e.g. split-mnist:gradual (default: {streams})",
    )
