"""`stream-cl demo`, the quick start's first command, end to end: embedded broker, producer, daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _demo(cwd: Path, stream: str) -> str:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stream_cl.cli",
            "demo",
            "--config",
            str(ROOT / "config.toml"),
            "--stream",
            stream,
            "--exit-when-done",
            "--log-level",
            "warning",
            "--set",
            "serve.port=0",
            "--set",
            "serve.http_port=0",
            "--set",
            "metrics.port=0",
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _learned(out: str) -> tuple[int, int]:
    """(learned, total) from the demo's last progress line. The daemon holds out a fraction of the
    stream for its evaluator (`evaluation.holdout_fraction`), so learned ends below total."""
    *_, last = re.findall(r"learned\s+(\d+)/(\d+)", out)
    return int(last[0]), int(last[1])


def _average_accuracy(out: str) -> float:
    match = re.search(r"average accuracy over tasks: ([\d.]+)", out)
    assert match, out
    return float(match.group(1))


def test_demo_learns_the_stream_and_a_second_demo_starts_fresh(tmp_path: Path) -> None:
    """The demo learns every sample of its stream and reports per-task accuracy well above chance
    (0.1 for ten classes). Run again from the same directory on another stream, it starts from
    scratch: its broker is new, so nothing of the first demo's checkpoints may be loaded (this
    once resumed the split-mnist model on split-digits and crashed on the input shape)."""
    first = _demo(tmp_path, "split-digits")
    learned, total = _learned(first)
    assert 0.8 * total <= learned < total and total > 1000
    assert _average_accuracy(first) > 0.8
    assert (tmp_path / "reports" / "report.md").exists()

    second = _demo(tmp_path, "split-mnist1d")
    learned, total = _learned(second)
    assert 0.8 * total <= learned < total
    assert _average_accuracy(second) > 0.3
    assert not (tmp_path / "checkpoints").exists()


def test_demo_of_a_stream_with_unlabeled_stretches_ends(tmp_path: Path) -> None:
    """Unlabeled samples are predicted, never learned: the demo counts the labeled ones as its total
    and ends (it once waited for every sample to be learned, forever)."""
    from stream_cl.tools.streams import load_stream

    out = _demo(tmp_path, "split-digits:label-free:fraction=0.3")
    learned, total = _learned(out)
    assert total == load_stream("split-digits:label-free:fraction=0.3").n_labeled
    assert 0.8 * total <= learned < total
