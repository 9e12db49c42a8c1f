"""The CLI's help renders for every verb and bench verb (argparse formats help strings lazily)."""

from __future__ import annotations

import argparse

import pytest

from stream_cl.bench.commands import VERBS
from stream_cl.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_paths() -> list[list[str]]:
    parser = build_parser()
    paths: list[list[str]] = [[]]
    for name, sub in _subcommands(parser).items():
        paths.append([name])
        paths.extend([name, inner] for inner in _subcommands(sub))
    return paths


@pytest.mark.parametrize("path", _help_paths(), ids=lambda p: " ".join(p) or "stream-cl")
def test_help_renders(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*path, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stream-cl")
    if path == ["bench"]:
        assert all(verb in out for verb in VERBS)


def test_the_old_client_import_path_still_works_with_a_deprecation_warning() -> None:
    """`stream_cl.client` moved to `stream_cl.serve.client`; the old path warns and gives the same class."""
    import importlib
    import sys

    from stream_cl.serve.client import PredictionClient

    sys.modules.pop("stream_cl.client", None)
    with pytest.warns(DeprecationWarning, match="stream_cl.serve.client"):
        old = importlib.import_module("stream_cl.client")
    assert old.PredictionClient is PredictionClient
