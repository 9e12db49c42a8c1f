"""The bench verbs' shared option parsing (`stream_cl/bench/options.py`)."""

from __future__ import annotations

import argparse

import pytest

from stream_cl.bench.options import add_strategies_and_streams, comma_ints, comma_list, overrides_by_name
from stream_cl.config import ConfigError


def test_comma_lists_are_stripped_and_drop_empty_items() -> None:
    assert comma_list(" eidetic, replay,,fip ") == ["eidetic", "replay", "fip"]
    assert comma_list("") == []


def test_comma_ints_take_one_or_several_and_name_the_flag_on_error() -> None:
    assert comma_ints("0, 1,2", "--seeds") == [0, 1, 2]
    assert comma_ints(3, "--seed") == [3]
    with pytest.raises(ConfigError, match="--seeds") as bad:
        comma_ints("0,x", "--seeds")
    assert "'0,x'" in str(bad.value)
    with pytest.raises(ConfigError, match="at least one"):
        comma_ints(" , ", "--seeds")


def test_overrides_are_grouped_by_the_contender_they_name() -> None:
    by_name = overrides_by_name(["replay:a.b=1", "replay:c.d=2", "fip:e.f=3"], ["replay", "fip", "x"], "NAME")
    assert by_name == {"replay": ["a.b=1", "c.d=2"], "fip": ["e.f=3"], "x": []}
    with pytest.raises(ConfigError, match="NAME:section.key=value with NAME in"):
        overrides_by_name(["nobody:a.b=1"], ["replay"], "NAME")
    with pytest.raises(ConfigError, match="--override"):
        overrides_by_name(["a.b=1"], ["replay"], "NAME")


def test_strategies_and_streams_have_the_verbs_defaults() -> None:
    p = argparse.ArgumentParser()
    add_strategies_and_streams(p, strategies="eidetic,replay", streams="split-mnist")
    args = p.parse_args([])
    assert (args.strategies, args.streams) == ("eidetic,replay", "split-mnist")
    assert p.parse_args(["--streams", "split-mnist:gradual"]).streams == "split-mnist:gradual"
