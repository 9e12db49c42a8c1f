"""The CLI's help renders for every verb and bench verb (argparse formats help strings lazily)."""

from __future__ import annotations

import argparse

import pytest

from stream_cl import cli
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


def test_every_option_of_every_verb_has_help_text() -> None:
    """`--help` documents each option: none is left for the reader to guess."""
    import argparse

    missing: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif action.help is None:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(cli.build_parser(), "stream-cl")
    assert missing == []


def test_version_names_stream_cl_and_what_it_runs_on(capsys: pytest.CaptureFixture[str]) -> None:
    """`stream-cl --version` prints the versions of stream_cl, Python, torch and kafka-python."""
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("stream-cl ") and "torch " in out and "kafka-python " in out


def test_predict_health_exits_non_zero_until_a_model_serves(capsys: pytest.CaptureFixture[str]) -> None:
    """`predict --health` is a readiness check: exit 3 while the daemon starts, 0 once it serves."""
    import json

    import torch

    from stream_cl.config import ServeConfig
    from stream_cl.serve.server import PredictionServer
    from stream_cl.serve.snapshot import Snapshot, SnapshotHolder

    holder = SnapshotHolder()
    with PredictionServer(ServeConfig(port=0, http_port=0), holder) as server:
        argv = ["predict", "--host", "127.0.0.1", "--port", str(server.port), "--timeout", "5", "--health"]
        assert cli.main(argv) == cli.EXIT_NOT_READY
        # the last line: the server's own events go to stdout too (no logging configured here)
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "starting"
        holder.publish(
            Snapshot(1, "test", (0,), (), (2,), lambda x, task: (torch.ones(len(x), 1), [None] * len(x)))
        )
        assert cli.main(argv) == 0
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["status"] == "ready"
