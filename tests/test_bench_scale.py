"""`stream-cl bench scale`: the verb runs end to end (daemons, replicas, load clients, each its own
process, on its own embedded broker) and its CPU accounting reads real process and machine times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stream_cl.bench.scale import CpuWindow, cpu_times, machine_busy

linux_only = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc")


@linux_only
def test_cpu_window_counts_this_process_burning_cpu() -> None:
    window = CpuWindow([os.getpid()])
    end = time.process_time() + 0.3
    while time.process_time() < end:  # burn 0.3 CPU-seconds
        pass
    figures = window.close(work=600.0)
    assert figures["cpu_seconds"] is not None and 0.25 <= figures["cpu_seconds"] <= 1.5
    assert figures["per_cpu_second"] == pytest.approx(600.0 / figures["cpu_seconds"])
    assert figures["machine_busy"] is not None and 0.0 < figures["machine_busy"] <= 1.0


@linux_only
def test_unreadable_processes_give_none() -> None:
    busy = machine_busy()
    assert busy is not None and 0 < busy[0] <= busy[1]
    assert cpu_times([2**22 + 12345]) is None  # beyond pid_max: no such process
    assert CpuWindow([2**22 + 12345]).close(10.0)["per_cpu_second"] is None


def test_bench_scale_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = [
        *("bench", "scale", "--reduced", "--samples", "2000", "--duration", "2", "--clients", "2"),
        *("--json", str(out)),
    ]
    done = subprocess.run(
        [sys.executable, "-m", "stream_cl.cli", *argv], capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["per_key_models"] and figures["cores"]["cpu_count"] == os.cpu_count()
    assert [row["daemons"] for row in figures["learners"]] == [1, 2]
    assert [row["replicas"] for row in figures["replicas"]] == [1, 2]
    for row in figures["learners"]:
        assert row["samples_per_s"] > 0 and row["learned_in_window"] > 0
    two = figures["learners"][1]["learned_per_daemon"]
    assert len(two) == 2 and all(n > 0 for n in two)  # both daemons learned their partitions' keys
    for row in figures["replicas"]:
        assert row["replies"] > 0 and row["errors"] == 0
    assert figures["learners_ratio"] == pytest.approx(
        figures["learners"][1]["samples_per_s"] / figures["learners"][0]["samples_per_s"]
    )
    assert "cores: os.cpu_count()=" in done.stdout and "| learners | 2 |" in done.stdout
