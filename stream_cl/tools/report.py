"""`stream-cl report`: the accuracy matrix and accuracy over time as PNGs, plus a Markdown summary.

Everything is drawn from one *summary* dict, the shape `Evaluator.summary()` returns:

- `tasks`: task ids, in matrix order;
- `matrix`: `R[i][j]` rows (row i = after training up to task i), floats or None where not measured;
- `history`: `[{"t": epoch_s, "samples": learned, "accuracy": {task_id: acc}}]`, one per evaluation;
- `boundaries`: `[{"t", "samples", "task", "reason"}]`, the task the stream moved to and why;
- `figures` (optional): `average_accuracy`, `average_forgetting`, `backward_transfer`, `stability_gap`.

Two sources give one: a checkpoint holds the evaluator's summary (history included), and a running
daemon's `/metrics` holds R, the latest per-task accuracy and the figures but no history, so a report
from `/metrics` has one evaluation point and no boundaries (Grafana keeps the history; a checkpoint
has it too). Figures are drawn with matplotlib's object API on the Agg canvas: no pyplot global
state, no display needed, safe from any thread.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from prometheus_client.parser import text_string_to_metric_families

Summary = dict[str, Any]

FIGURES = (  # (summary["figures"] key, gauge it is exported as, Markdown heading)
    ("average_accuracy", "stream_cl_average_accuracy", "average accuracy"),
    ("average_forgetting", "stream_cl_average_forgetting", "average forgetting"),
    ("backward_transfer", "stream_cl_backward_transfer", "backward transfer (BWT)"),
    ("stability_gap", "stream_cl_stability_gap", "stability gap"),
)
_ANNOTATE_UP_TO = 16  # tasks; beyond this the cell values would not be legible
_LABEL_BOUNDARIES_UP_TO = 40  # boundaries; beyond this their "→ task" labels would overlap


def _task_sort_key(task: str) -> tuple[int, int, str]:
    """Numeric task ids in numeric order ("2" before "10"), then other ids alphabetically."""
    try:
        return (0, int(task), "")
    except ValueError:
        return (1, 0, task)


def _task_id(label: str) -> int | str:
    """A task label back as the id the stream used: integers were exported as their decimal text."""
    try:
        return int(label)
    except ValueError:
        return label


def summary_from_metrics_text(text: str, now: float | None = None) -> Summary:
    """Rebuild a summary from one scrape of a daemon's `/metrics` (Prometheus text format)."""
    matrix_cells: dict[tuple[str, str], float] = {}
    accuracy: dict[str, float] = {}
    gauges: dict[str, float] = {}
    learned = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "stream_cl_accuracy_matrix":
                matrix_cells[(s.labels["after_task"], s.labels["task"])] = s.value
            elif s.name == "stream_cl_task_accuracy":
                accuracy[s.labels["task"]] = s.value
            elif s.name == "stream_cl_samples_total" and s.labels.get("outcome") == "learned":
                learned = s.value
            elif not s.labels:
                gauges[s.name] = s.value
    labels = sorted(
        {a for a, _ in matrix_cells} | {t for _, t in matrix_cells} | set(accuracy), key=_task_sort_key
    )
    history = (
        [{"t": time.time() if now is None else now, "samples": int(learned), "accuracy": accuracy}]
        if accuracy
        else []
    )
    return {
        "tasks": [_task_id(label) for label in labels],
        "matrix": [[matrix_cells.get((i, j)) for j in labels] for i in labels],
        "history": history,
        "boundaries": [],
        "figures": {key: gauges[gauge] for key, gauge, _ in FIGURES if gauge in gauges},
    }


class ReportSourceError(RuntimeError):
    """The daemon or checkpoint a report was asked for cannot be read (one line for the CLI)."""


def summary_from_metrics_url(url: str, timeout: float = 10.0) -> Summary:
    """Scrape `url` (a daemon's `/metrics`) and rebuild its summary."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return summary_from_metrics_text(response.read().decode())
    except OSError as e:
        raise ReportSourceError(f"cannot scrape {url}: {e}") from e


def summary_from_checkpoint(path: str | os.PathLike[str]) -> Summary:
    """The evaluator summary in a checkpoint file, or in the newest valid one of a checkpoint directory."""
    # imported here: they load torch, which a report from /metrics never needs
    from stream_cl.evaluate.evaluator import summary_from_checkpoint_state
    from stream_cl.store.checkpoints import CheckpointError, CheckpointStore, read_checkpoint

    p = Path(path)
    try:
        if p.is_dir():
            found = CheckpointStore(p).load_latest()
            if found is None:
                raise ReportSourceError(f"no valid checkpoint in {p}")
            state = found[0]
        else:
            state = read_checkpoint(p)
    except (OSError, CheckpointError) as e:
        raise ReportSourceError(f"cannot read checkpoint {p}: {e}") from e
    return summary_from_checkpoint_state(state)


# -- figures --------------------------------------------------------------------------------------
def _matrix_array(summary: Summary) -> np.ndarray:
    rows = summary["matrix"]
    out = np.full((len(rows), len(summary["tasks"])), np.nan)
    for i, row in enumerate(rows):
        for j, value in enumerate(row):
            if value is not None:
                out[i, j] = value
    return out


def plot_accuracy_matrix(summary: Summary, path: Path) -> Path:
    """Heatmap of R (red = forgotten, green = kept), each measured cell annotated with its value."""
    tasks = [str(t) for t in summary["tasks"]]
    r = _matrix_array(summary)
    side = min(12.0, 2.5 + 0.6 * max(1, len(tasks)))
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("Accuracy matrix R[i][j]")
    if not tasks:
        ax.text(0.5, 0.5, "no tasks evaluated yet", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=120)
        return path
    image = ax.imshow(np.ma.masked_invalid(r), cmap=_colormap(), vmin=0.0, vmax=1.0, aspect="equal")
    fig.colorbar(image, ax=ax, label="accuracy", shrink=0.8)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xlabel("evaluated on task j (held-out samples)")
    ax.set_ylabel("after training up to task i")
    if len(tasks) <= _ANNOTATE_UP_TO:
        for (i, j), value in np.ndenumerate(r):
            if not math.isnan(value):
                # dark text on the light middle of the colormap, white on its dark ends
                color = "black" if 0.25 <= value <= 0.8 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=9)
    fig.savefig(path, dpi=120)
    return path


def _colormap() -> Any:
    """RdYlGn with grey for cells never measured (a task evaluated before it existed, say)."""
    return colormaps["RdYlGn"].with_extremes(bad="#dddddd")


def plot_accuracy_over_time(summary: Summary, path: Path) -> Path:
    """One line per task (accuracy at each evaluation vs. samples learned), boundaries as dashed lines."""
    history: Sequence[Mapping[str, Any]] = summary["history"]
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    tasks = sorted({str(t) for point in history for t in point["accuracy"]}, key=_task_sort_key)
    colors = _colormap_cycle(len(tasks))
    marker = "o" if len(history) <= 1 else None
    for task, color in zip(tasks, colors, strict=True):
        xs = [p["samples"] for p in history if task in _str_keys(p["accuracy"])]
        ys = [_str_keys(p["accuracy"])[task] for p in history if task in _str_keys(p["accuracy"])]
        ax.plot(xs, ys, label=f"task {task}", color=color, marker=marker, linewidth=1.6)
    reason_styles = {"explicit": "-", "new_class": "--", "drift": ":"}
    seen_reasons: set[str] = set()
    for b in summary["boundaries"]:
        reason = str(b.get("reason", ""))
        ax.axvline(
            b["samples"],
            color="0.35",
            linestyle=reason_styles.get(reason, "-."),
            linewidth=1.0,
            label=f"boundary ({reason})" if reason not in seen_reasons else None,
        )
        seen_reasons.add(reason)
        if len(summary["boundaries"]) > _LABEL_BOUNDARIES_UP_TO:
            continue
        ax.annotate(
            f"→ {b['task']}",
            (b["samples"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize=8,
            color="0.25",
        )
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("samples learned")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Accuracy per task over time")
    ax.grid(alpha=0.3)
    if tasks or seen_reasons:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    if len(history) <= 1:
        note = (
            "no evaluations yet"
            if not history
            else "one evaluation only: the history is in checkpoints (report --checkpoint) and in Grafana"
        )
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, color="0.3")
    fig.savefig(path, dpi=120)
    return path


def _str_keys(accuracy: Mapping[Any, float]) -> dict[str, float]:
    """History keys as text: a checkpoint's summary may hold int or str task ids."""
    return {str(k): v for k, v in accuracy.items()}


def _colormap_cycle(n: int) -> list[Any]:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


# -- Markdown -------------------------------------------------------------------------------------
def _cell(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def render_markdown(summary: Summary, images: Mapping[str, Path], source: str = "") -> str:
    """The summary as Markdown: figures, R as a table, the boundaries, and the two images."""
    tasks = [str(t) for t in summary["tasks"]]
    figures: Mapping[str, float] = summary.get("figures") or {}
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    lines = ["# stream_cl report", ""]
    lines.append(f"Generated {generated}" + (f" from {source}" if source else "") + ".")
    lines.append(
        f"Tasks: {len(tasks)} · evaluations: {len(summary['history'])} · "
        f"boundaries recorded: {len(summary['boundaries'])}"
    )
    lines.append("")
    shown = [(heading, figures[key]) for key, _, heading in FIGURES if key in figures]
    if shown:
        lines += ["| " + " | ".join(h for h, _ in shown) + " |", "|" + "---|" * len(shown)]
        lines += ["| " + " | ".join(_cell(v) for _, v in shown) + " |", ""]
    lines += ["## Accuracy matrix", ""]
    lines.append(
        "R[i][j]: accuracy on task j's held-out samples after training up to task i (– = not measured)."
    )
    lines.append("")
    if tasks:
        lines.append("| after task \\ task | " + " | ".join(tasks) + " |")
        lines.append("|---|" + "---:|" * len(tasks))
        for task, row in zip(tasks, summary["matrix"], strict=True):
            lines.append(f"| {task} | " + " | ".join(_cell(v) for v in row) + " |")
    else:
        lines.append("No task evaluated yet.")
    lines += ["", f"![accuracy matrix]({images['accuracy_matrix'].name})", ""]
    lines += ["## Accuracy over time", "", f"![accuracy over time]({images['accuracy_over_time'].name})", ""]
    if summary["boundaries"]:
        lines += ["## Task boundaries", "", "| samples learned | new task | evidence |", "|---:|---|---|"]
        lines += [f"| {b['samples']} | {b['task']} | {b.get('reason', '')} |" for b in summary["boundaries"]]
        lines.append("")
    return "\n".join(lines)


def write_report(summary: Summary, out_dir: str | os.PathLike[str], source: str = "") -> dict[str, Path]:
    """Write `accuracy_matrix.png`, `accuracy_over_time.png` and `report.md` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "accuracy_matrix": plot_accuracy_matrix(summary, out / "accuracy_matrix.png"),
        "accuracy_over_time": plot_accuracy_over_time(summary, out / "accuracy_over_time.png"),
    }
    markdown = out / "report.md"
    markdown.write_text(render_markdown(summary, paths, source))
    return {**paths, "summary": markdown}
