"""Child processes for multi-process benchmarks: `stream-cl` daemons, replicas and load clients.

Every child is ended when the `Fleet` exits, however it exits (an exception, Ctrl-C): SIGTERM,
then SIGKILL after a grace period. On Linux a child also gets SIGTERM if the benchmark process
dies hard (`PR_SET_PDEATHSIG`, set only from the main thread, which Linux ties it to). Each
child's output goes to a log file in the fleet's directory, quoted when a child fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

_PR_SET_PDEATHSIG = 1
_prctl: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kafka_overrides(bootstrap_servers: str, topic: str) -> list[str]:
    """Config overrides that give a daemon its own topic, dead-letter topic and consumer group, and
    any free port for the HTTP front (several daemons on one host cannot share serve.http_port)."""
    return [
        f"kafka.bootstrap_servers={bootstrap_servers}",
        f"kafka.topic={topic}",
        f"kafka.dead_letter_topic={topic}.dlq",
        f"kafka.group_id=g-{topic}",
        "serve.http_port=0",
    ]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, poll_s: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll_s)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """A /metrics page as {'name{labels}': value} (labels exactly as exposed), or {} if unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


class Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path, log: IO[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path
        self._log = log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise if the child exited on its own, quoting the end of its log."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with code {self.proc.returncode}; its log ends:\n{self.log_tail()}"
            )

    def log_tail(self, max_bytes: int = 3000) -> str:
        with contextlib.suppress(OSError):
            data = self.log_path.read_bytes()
            return data[-max_bytes:].decode("utf-8", "replace")
        return ""

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


class Fleet:
    """Starts children; ends every one of them on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Child:
        log_path = self.workdir / f"{name}.log"
        log = log_path.open("wb")
        with_parent = _prctl is not None and threading.current_thread() is threading.main_thread()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent if with_parent else None,
        )
        child = Child(name, proc, log_path, log)
        self.children.append(child)
        return child

    def stop_all(self, grace_s: float = 15.0) -> None:
        for child in self.children:  # signal all first, so they shut down side by side
            if child.alive():
                with contextlib.suppress(OSError):
                    child.proc.terminate()
        for child in self.children:
            child.stop(grace_s)
        self.children.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()


def stream_cl_argv(verb: Sequence[str], base: Sequence[str], overrides: Sequence[str]) -> list[str]:
    """`python -m stream_cl.cli VERB... BASE... --set k=v ...` with this interpreter."""
    argv = [sys.executable, "-m", "stream_cl.cli", *verb, *base]
    for item in overrides:
        argv += ["--set", item]
    return argv
