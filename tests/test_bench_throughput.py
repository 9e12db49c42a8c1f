"""`stream-cl bench throughput`'s CPU accounting (the bench itself runs outside the suite)."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from stream_cl.bench.throughput import CpuMeter, format_throughput


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_cpu_meter_charges_a_busy_thread_and_not_an_idle_one() -> None:
    stop = threading.Event()

    def spin() -> None:
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass
        stop.wait()

    busy = threading.Thread(target=spin, name="stream-cl-busy")
    idle = threading.Thread(target=stop.wait, name="stream-cl-idle")
    busy.start()
    idle.start()
    try:
        meter = CpuMeter([busy, idle], {"none": None})
        time.sleep(0.6)
        cpu = meter.seconds()
    finally:
        stop.set()
        busy.join()
        idle.join()
    assert set(cpu) == {"stream-cl-busy", "stream-cl-idle"}
    assert cpu["stream-cl-busy"] >= 0.1
    assert cpu["stream-cl-idle"] <= 0.02


def test_the_report_shows_both_fetch_modes_and_the_breakdown() -> None:
    r = {
        "stream": "split-mnist",
        "samples": 20000,
        "strategy": "finetune",
        "batch_size": 32,
        "raw_consume_decode_samples_per_s": 50000.0,
        "raw_train_samples_per_s": 16000.0,
        "fetch_in_subprocess": False,
        "daemon_in_process_fetch_samples_per_s": 9000.0,
        "daemon_subprocess_fetch_samples_per_s": 9600.0,
        "daemon_in_process_fetch_vs_slower_limit": 9000 / 16000,
        "daemon_subprocess_fetch_vs_slower_limit": 9600 / 16000,
        "raw_train_us_per_sample": 62.5,
        "cpu_us_per_sample": {
            "in_process_fetch": {"stream-cl-learner": 80.0, "stream-cl-source": 22.0},
            "subprocess_fetch": {"stream-cl-learner": 78.0, "fetcher": 25.0},
        },
        "cores_busy": {"in_process_fetch": 1.2, "subprocess_fetch": 1.4},
        "goal_met": False,
    }
    text = format_throughput(r)
    assert "0.56x slower limit" in text and "0.60x slower limit" in text and "NOT met" in text
    learner = next(line for line in text.splitlines() if "stream-cl-learner" in line).split()
    assert learner[-2:] == ["80.0", "78.0"]
    fetcher = next(line for line in text.splitlines() if "fetcher" in line.split()).split()
    assert fetcher[-2:] == ["0.0", "25.0"]  # no fetcher process in the in-process run
    assert "raw train step: 62.5 us per sample" in text
