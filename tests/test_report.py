"""`stream-cl report`: PNGs and Markdown from an evaluator summary, and a summary rebuilt from /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from prometheus_client import generate_latest

from stream_cl.cli import main
from stream_cl.metrics import Metrics
from stream_cl.tools.report import summary_from_metrics_text, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def forgetting_summary(n_tasks: int = 3) -> dict[str, Any]:
    """A class-incremental run under fine-tuning: each task learned to 0.95, then forgotten to 0.05."""
    matrix: list[list[float | None]] = [
        [0.95 if j == i else 0.05 if j < i else None for j in range(n_tasks)] for i in range(n_tasks)
    ]
    history = []
    for i in range(n_tasks):
        for step in (1, 2):
            acc = {str(j): (0.5 * step - 0.05 if j == i else 0.05) for j in range(i + 1)}
            history.append({"t": 1e9 + 10 * i + step, "samples": 1000 * i + 500 * step, "accuracy": acc})
    boundaries = [
        {"t": 1e9 + 10 * i, "samples": 1000 * i, "task": i, "reason": "explicit"} for i in range(1, n_tasks)
    ]
    figures = {
        "average_accuracy": 0.35,
        "average_forgetting": 0.9,
        "backward_transfer": -0.9,
        "stability_gap": 0.9,
    }
    return {
        "tasks": list(range(n_tasks)),
        "matrix": matrix,
        "history": history,
        "boundaries": boundaries,
        "figures": figures,
    }


def assert_real_png(path: Path) -> None:
    assert path.read_bytes().startswith(PNG_MAGIC)
    image = imread(path)
    assert image.shape[0] > 300 and image.shape[1] > 300
    assert float(np.std(image[..., :3])) > 0.05  # something was drawn, not a blank canvas


def test_write_report_writes_two_pngs_and_markdown(tmp_path: Path) -> None:
    """write_report returns the paths of a heatmap PNG, an accuracy-over-time PNG and report.md."""
    paths = write_report(forgetting_summary(), tmp_path / "out", source="unit test")
    assert set(paths) == {"accuracy_matrix", "accuracy_over_time", "summary"}
    assert_real_png(paths["accuracy_matrix"])
    assert_real_png(paths["accuracy_over_time"])
    assert paths["summary"].parent == tmp_path / "out"


def test_markdown_holds_matrix_figures_and_boundaries(tmp_path: Path) -> None:
    """The Markdown has R as a table (– where unmeasured), the figures, the boundaries and both images."""
    text = write_report(forgetting_summary(), tmp_path)["summary"].read_text()
    assert "| after task \\ task | 0 | 1 | 2 |" in text
    assert "| 2 | 0.050 | 0.050 | 0.950 |" in text
    assert "| 0 | 0.950 | – | – |" in text
    assert "| 0.350 | 0.900 | -0.900 | 0.900 |" in text
    assert "| 1000 | 1 | explicit |" in text
    assert "![accuracy matrix](accuracy_matrix.png)" in text
    assert "![accuracy over time](accuracy_over_time.png)" in text


def test_report_of_an_empty_summary_still_renders(tmp_path: Path) -> None:
    """Before any evaluation (no tasks, no history) the report is written and says so."""
    empty = {"tasks": [], "matrix": [], "history": [], "boundaries": []}
    paths = write_report(empty, tmp_path)
    assert paths["accuracy_matrix"].read_bytes().startswith(PNG_MAGIC)
    assert "No task evaluated yet." in paths["summary"].read_text()


def test_many_tasks_sort_numerically_in_the_matrix(tmp_path: Path) -> None:
    """Task ids rebuilt from /metrics labels order as numbers ("2" before "10"), not as text."""
    metrics = Metrics()
    for i in range(12):
        for j in range(i + 1):
            metrics.accuracy_matrix.labels(after_task=str(i), task=str(j)).set(0.5)
    summary = summary_from_metrics_text(generate_latest(metrics.registry).decode())
    assert summary["tasks"] == list(range(12))
    assert_real_png(write_report(summary, tmp_path)["accuracy_matrix"])


def test_summary_from_metrics_text_rebuilds_matrix_and_figures() -> None:
    """A scrape of the daemon's collectors gives back R, the latest per-task accuracy and the figures."""
    metrics = Metrics()
    for (i, j), value in {("0", "0"): 0.9, ("1", "0"): 0.1, ("1", "1"): 0.8}.items():
        metrics.accuracy_matrix.labels(after_task=i, task=j).set(value)
    metrics.task_accuracy.labels(task="0").set(0.1)
    metrics.task_accuracy.labels(task="1").set(0.8)
    metrics.average_forgetting.set(0.8)
    metrics.average_accuracy.set(0.45)
    metrics.samples.labels(outcome="learned").inc(1234)
    summary = summary_from_metrics_text(generate_latest(metrics.registry).decode(), now=5.0)
    assert summary["tasks"] == [0, 1]
    assert summary["matrix"] == [[0.9, None], [0.1, 0.8]]
    assert summary["history"] == [{"t": 5.0, "samples": 1234, "accuracy": {"0": 0.1, "1": 0.8}}]
    assert summary["boundaries"] == []
    assert summary["figures"]["average_forgetting"] == pytest.approx(0.8)
    assert summary["figures"]["average_accuracy"] == pytest.approx(0.45)


def test_cli_report_from_an_unreachable_daemon_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`stream-cl report --metrics-url` on a closed port fails with one clear line, no traceback."""
    code = main(["report", "--metrics-url", "http://127.0.0.1:1/metrics", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith("stream-cl report: cannot scrape http://127.0.0.1:1/metrics")
    assert not any(tmp_path.iterdir())
