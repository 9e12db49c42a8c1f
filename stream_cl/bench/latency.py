"""Socket and OIP v2 HTTP latency and throughput of the prediction server, against the
in-process forward.

Everything is measured side by side in one run on the same machine, server and snapshot (the
in-process forward, the plain backbone's, the socket round trip, the round trip to a model that
answers at once, the round trip to one that busy-waits as long as the forward instead, and the
in-process forward right after a round trip take turns in blocks of 50 calls), and
the result is reported as ratios measured side by side: socket p50 over in-process p50, HTTP
(JSON and binary tensors) p50 over socket p50, and throughput with many concurrent clients over
throughput with one. Socket latency is taken with `PredictionClient`, as a caller sees it; HTTP
latency with a lean keep-alive client (bench/latency_http.py); throughput with connections that each do
sequential request/reply, driven for HTTP from a process of its own (in the server's process an HTTP
load generator's parsing competes with the server for the GIL and sets the rate).
"""

from __future__ import annotations

import os
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import msgpack
import numpy as np
import torch

from stream_cl.bench.latency_http import http_seconds, http_throughput_elsewhere, infer_bodies
from stream_cl.config import ServeConfig
from stream_cl.serve.client import PredictionClient
from stream_cl.serve.frames import HEADER
from stream_cl.serve.server import PredictionServer
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder

# Goals the server is held to (see the `goals` entry of the result).
P50_GOAL_X_INPROCESS = 5.0
THROUGHPUT_GOAL_X_ONE_CLIENT = 4.0
HTTP_BINARY_P50_GOAL_X_SOCKET = 1.5
HTTP_ENCODINGS = ("json", "binary")
_WARMUP = 200
_BLOCK = 50  # timed calls of one kind before the next kind's turn


def _percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds), q) * 1000.0)


def _interleaved_seconds(
    calls: dict[str, Callable[[np.ndarray], object]],
    xs: np.ndarray,
    n: int,
    block: int = _BLOCK,
    untimed_before: dict[str, Callable[[np.ndarray], object]] | None = None,
) -> dict[str, list[float]]:
    """Per named call, `n` timings of it on one row of `xs` (shaped [1, input size]), the calls
    taking turns in blocks of `block`: on a machine whose speed drifts (a shared host), every call
    meets the same slow and fast stretches, so their ratios hold where back-to-back runs drift.
    `untimed_before[name]`, where given, runs on the same row right before each timed call."""
    before = untimed_before or {}
    out: dict[str, list[float]] = {name: [] for name in calls}
    for first in range(0, n, block):
        for name, call in calls.items():
            setup = before.get(name)
            for i in range(first, min(n, first + block)):
                j = i % len(xs)
                if setup is not None:
                    setup(xs[j : j + 1])
                start = time.perf_counter()
                call(xs[j : j + 1])
                out[name].append(time.perf_counter() - start)
    return out


def _request_frames(xs: np.ndarray) -> list[bytes]:
    """One framed `predict` request per row, packed once so the load generator stays cheap."""
    frames = []
    for i, x in enumerate(xs):
        payload = msgpack.packb({"op": "predict", "id": i, "x": x.tobytes()}, use_bin_type=True)
        frames.append(HEADER.pack(len(payload)) + payload)
    return frames


def _throughput(port: int, frames: list[bytes], clients: int, duration_s: float) -> float:
    """Requests/s answered to `clients` sockets, each sending its next request on each reply.

    One thread drives every socket through a selector. Client threads in this process would
    mostly measure themselves: they share the server's GIL, and on the 2-core dev machine 32 of
    them reached about half of this loop's throughput against the same server.
    """
    selector = selectors.DefaultSelector()
    clients_: list[_LoadClient] = []
    try:
        for k in range(clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            clients_.append(_LoadClient(sock, k % len(frames)))
            selector.register(sock, selectors.EVENT_READ, clients_[-1])
        answered = 0
        start = time.perf_counter()
        stop_at = start + duration_s
        for client in clients_:
            client.sock.sendall(frames[client.request_id])
        while selector.get_map():
            events = selector.select(timeout=10.0)
            if not events:
                raise TimeoutError("the prediction server stopped answering")
            for key, _ in events:
                client = cast(_LoadClient, key.data)
                if not client.feed():
                    continue
                answered += 1
                if time.perf_counter() < stop_at:
                    client.request_id = (client.request_id + 1) % len(frames)
                    client.sock.sendall(frames[client.request_id])
                else:
                    selector.unregister(client.sock)
        return answered / (time.perf_counter() - start)
    finally:
        selector.close()
        for client in clients_:
            client.sock.close()


class _LoadClient:
    """One sequential client of the load generator: one request in flight, its reply checked."""

    def __init__(self, sock: socket.socket, request_id: int) -> None:
        self.sock = sock
        self.request_id = request_id
        self._buf = bytearray()

    def feed(self) -> bool:
        """Read what arrived; True once the reply to `request_id` is complete and ok."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the prediction server closed a connection")
        self._buf += chunk
        if len(self._buf) < HEADER.size:
            return False
        (n,) = HEADER.unpack_from(self._buf)
        if len(self._buf) < HEADER.size + n:
            return False
        reply = msgpack.unpackb(bytes(self._buf[HEADER.size : HEADER.size + n]), strict_map_key=False)
        del self._buf[: HEADER.size + n]
        if not reply.get("ok") or reply.get("id") != self.request_id:
            raise RuntimeError(f"unexpected reply to request {self.request_id}: {reply!r}")
        return True


def run_latency_bench(
    snapshot: Snapshot,
    xs: np.ndarray,
    n_requests: int = 2000,
    concurrency: Sequence[int] = (1, 32),
    duration_s: float = 3.0,
    plain: Snapshot | None = None,
) -> dict[str, Any]:
    """Serve `snapshot` on a free port and measure it against its own in-process forward.

    `xs` [n, *input_shape] are the inputs sent, cycled. Returns in-process and socket latency
    (ms), throughput per client count (requests/s), their ratios and whether the goals hold.
    `plain`: the same backbone with a plain head, timed in-process beside the strategy's forward.
    """
    xs = np.ascontiguousarray(xs, dtype=np.float32).reshape(len(xs), -1)
    lo, hi = min(concurrency), max(concurrency)
    # How long the stand-in that waits instead of a forward busy-waits: the forward's p50 now.
    wait_s = float(np.median(_interleaved_seconds({"f": snapshot.predict}, xs, _WARMUP)["f"]))
    holder, noop_holder, waiting_holder = SnapshotHolder(), SnapshotHolder(), SnapshotHolder()
    holder.publish(snapshot)
    noop_holder.publish(stand_in_snapshot(snapshot))
    waiting_holder.publish(stand_in_snapshot(snapshot, busy_s=wait_s))
    stand_in_config = ServeConfig(port=0, http_enabled=False)
    with (
        PredictionServer(ServeConfig(port=0, http_port=0), holder) as server,
        PredictionServer(stand_in_config, noop_holder) as noop_server,
        PredictionServer(stand_in_config, waiting_holder) as waiting_server,
    ):
        port = server.port
        assert port is not None and noop_server.port is not None and waiting_server.port is not None
        with (
            PredictionClient(port=port) as client,
            PredictionClient(port=noop_server.port) as noop,
            PredictionClient(port=waiting_server.port) as waiting,
        ):
            calls: dict[str, Callable[[np.ndarray], object]] = {
                "inprocess": snapshot.predict,
                "socket": lambda x: client.predict(x[0]),
                "noop": lambda x: noop.predict(x[0]),
                "waiting": lambda x: waiting.predict(x[0]),
                # the forward as a server meets it, on a core that idled through the round trip (a
                # 0.3 ms sleep in-process before each forward slowed it down alike, every op of it)
                "inprocess_cold": snapshot.predict,
            }
            if plain is not None:
                calls["plain"] = plain.predict
            before: dict[str, Callable[[np.ndarray], object]] = {
                "inprocess_cold": lambda x: noop.predict(x[0])
            }
            _interleaved_seconds(calls, xs, _WARMUP, untimed_before=before)
            timed = _interleaved_seconds(calls, xs, n_requests, untimed_before=before)
        noop_server.stop()  # before the throughput runs: their loop threads would only compete
        waiting_server.stop()
        inprocess, sock, plain_seconds = timed["inprocess"], timed["socket"], timed.get("plain")
        frames = _request_frames(xs)
        throughput = {str(c): _throughput(port, frames, c, duration_s) for c in concurrency}
        http_port, model = server.http_port, server.config.model_name
        assert http_port is not None
        http: dict[str, dict[str, Any]] = {}
        for encoding in HTTP_ENCODINGS:
            bodies = infer_bodies(xs, binary=encoding == "binary")
            http_seconds(http_port, bodies, _WARMUP, model)
            seconds = http_seconds(http_port, bodies, n_requests, model)
            rps = {
                str(c): http_throughput_elsewhere(http_port, xs, encoding == "binary", c, duration_s, model)
                for c in concurrency
            }
            http[encoding] = {
                "p50_ms": _percentile_ms(seconds, 50),
                "p99_ms": _percentile_ms(seconds, 99),
                "throughput_rps": rps,
                f"throughput_{hi}_vs_{lo}": rps[str(hi)] / rps[str(lo)],
            }
    inprocess_p50 = _percentile_ms(inprocess, 50)
    socket_p50 = _percentile_ms(sock, 50)
    p50_ratio = socket_p50 / inprocess_p50
    scaling = throughput[str(hi)] / throughput[str(lo)]
    for figures in http.values():
        figures["p50_vs_socket"] = figures["p50_ms"] / socket_p50
    binary = http["binary"]
    return {
        "n_requests": n_requests,
        "duration_s": duration_s,
        "input_size": snapshot.input_size,
        "concurrency": [lo, hi],
        # With OpenMP's default spin-waiting, a batch forward on the server's worker thread can
        # stall behind spinning threads on a small machine; OMP_WAIT_POLICY=PASSIVE (set before
        # torch loads) avoids it. The figures depend on it, so the result records it.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "torch_threads": torch.get_num_threads(),
        "inprocess_p50_ms": inprocess_p50,
        "inprocess_p99_ms": _percentile_ms(inprocess, 99),
        # the configured backbone with a plain head: the forward without the strategy's protection
        "plain_forward_p50_ms": None if plain_seconds is None else _percentile_ms(plain_seconds, 50),
        "socket_p50_ms": socket_p50,
        # the same round trip to a server whose model answers at once: what the serving stack
        # (client, loopback, event loop, batcher, msgpack) costs alone
        "socket_noop_model_p50_ms": _percentile_ms(timed["noop"], 50),
        # ... to a server whose model busy-waits as long as the in-process forward (no memory
        # touched) and then answers: the stack, that wait, and the cost of waking the client's
        # core after a wait that long
        "waiting_model_busy_ms": wait_s * 1000.0,
        "socket_waiting_model_p50_ms": _percentile_ms(timed["waiting"], 50),
        # the in-process forward, each call right after a round trip to that server
        "inprocess_after_round_trip_p50_ms": _percentile_ms(timed["inprocess_cold"], 50),
        "socket_p99_ms": _percentile_ms(sock, 99),
        "throughput_rps": throughput,
        "p50_vs_inprocess": p50_ratio,
        f"throughput_{hi}_vs_{lo}": scaling,
        "http": http,  # per encoding: p50/p99 (1 client), throughput per client count, ratios
        "goals": {
            f"p50_within_{P50_GOAL_X_INPROCESS:g}x_inprocess": p50_ratio <= P50_GOAL_X_INPROCESS,
            f"throughput_{hi}_clients_at_least_{THROUGHPUT_GOAL_X_ONE_CLIENT:g}x_one": scaling
            >= THROUGHPUT_GOAL_X_ONE_CLIENT,
            f"http_binary_p50_within_{HTTP_BINARY_P50_GOAL_X_SOCKET:g}x_socket": binary["p50_vs_socket"]
            <= HTTP_BINARY_P50_GOAL_X_SOCKET,
            f"http_{hi}_clients_at_least_{THROUGHPUT_GOAL_X_ONE_CLIENT:g}x_one": binary[
                f"throughput_{hi}_vs_{lo}"
            ]
            >= THROUGHPUT_GOAL_X_ONE_CLIENT,
        },
    }


def stand_in_snapshot(served: Snapshot, busy_s: float = 0.0) -> Snapshot:
    """A snapshot like `served` (labels, tasks, input shape) whose predictor answers uniform
    probabilities at once, or after busy-waiting `busy_s` without touching memory: served, it
    shows the round trip's cost without a model, or with a wait as long as the model's."""
    n_labels = len(served.labels)

    def predictor(x: torch.Tensor, task: Any) -> tuple[torch.Tensor, list[Any]]:
        if busy_s > 0:
            until = time.perf_counter() + busy_s
            while time.perf_counter() < until:
                pass
        return torch.full((len(x), n_labels), 1.0 / n_labels), [task] * len(x)

    return Snapshot(0, "noop", served.labels, served.tasks, served.input_shape, predictor)


def overhead_parts(result: dict[str, Any]) -> dict[str, float]:
    """The server's own cost, "socket p50 − in-process p50", split three ways (ms; they add up to
    it) by the stand-ins' round trips: the stack alone; what the same round trip costs more when
    the server takes as long as the forward without running it (waking the waiting client's
    core: on a virtual machine whose idle cores halt, a wake-up after a longer wait costs more);
    the rest, the forward run in the server over the same forward run back to back."""
    noop, waiting, busy = (
        result["socket_noop_model_p50_ms"],
        result["socket_waiting_model_p50_ms"],
        result["waiting_model_busy_ms"],
    )
    return {
        "the stack alone": noop,
        "waking after a wait as long as the forward": waiting - noop - busy,
        "the forward in the server over the in-process one": result["socket_p50_ms"]
        - waiting
        - (result["inprocess_p50_ms"] - busy),
    }


def format_latency_table(result: dict[str, Any]) -> str:
    """A plain-text table of `run_latency_bench`'s figures, ratios and goals."""
    rows: list[tuple[str, str]] = [
        ("in-process forward p50", f"{result['inprocess_p50_ms']:.3f} ms"),
        ("in-process forward p99", f"{result['inprocess_p99_ms']:.3f} ms"),
        ("socket predict p50 (1 client)", f"{result['socket_p50_ms']:.3f} ms"),
        ("socket predict p99 (1 client)", f"{result['socket_p99_ms']:.3f} ms"),
    ]
    plain = result.get("plain_forward_p50_ms")
    if plain is not None:
        rows.insert(2, ("plain backbone forward p50 (no strategy)", f"{plain:.3f} ms"))
        rows.insert(3, ("in-process p50 / plain backbone p50", f"{result['inprocess_p50_ms'] / plain:.2f}x"))
    for clients, rps in result["throughput_rps"].items():
        rows.append((f"throughput, {clients} client(s)", f"{rps:,.0f} req/s"))
    rows.append(("socket p50 / in-process p50", f"{result['p50_vs_inprocess']:.2f}x"))
    overhead = result["socket_p50_ms"] - result["inprocess_p50_ms"]
    rows.append(("socket p50 - in-process p50 (the server's own cost)", f"{overhead:.3f} ms"))
    rows.append(
        (
            "socket p50 with a model that answers at once (the stack alone)",
            f"{result['socket_noop_model_p50_ms']:.3f} ms",
        )
    )
    waited = result["waiting_model_busy_ms"]
    rows.append(
        (
            f"socket p50 with a model that busy-waits {waited:.3f} ms (as long as the forward)",
            f"{result['socket_waiting_model_p50_ms']:.3f} ms",
        )
    )
    rows.append(
        (
            "in-process forward p50 right after such a round trip (the core idled)",
            f"{result['inprocess_after_round_trip_p50_ms']:.3f} ms",
        )
    )
    for part, ms in overhead_parts(result).items():
        rows.append((f"  of the server's own cost: {part}", f"{ms:.3f} ms"))
    lo, hi = result["concurrency"]
    rows.append((f"throughput {hi} / {lo} client(s)", f"{result[f'throughput_{hi}_vs_{lo}']:.2f}x"))
    for encoding, figures in result.get("http", {}).items():
        rows.append((f"HTTP {encoding} infer p50 (1 client)", f"{figures['p50_ms']:.3f} ms"))
        rows.append((f"HTTP {encoding} infer p99 (1 client)", f"{figures['p99_ms']:.3f} ms"))
        for clients, rps in figures["throughput_rps"].items():
            rows.append((f"HTTP {encoding} throughput, {clients} client(s)", f"{rps:,.0f} req/s"))
        rows.append((f"HTTP {encoding} p50 / socket p50", f"{figures['p50_vs_socket']:.2f}x"))
        rows.append(
            (
                f"HTTP {encoding} throughput {hi} / {lo} client(s)",
                f"{figures[f'throughput_{hi}_vs_{lo}']:.2f}x",
            )
        )
    for goal, met in result["goals"].items():
        rows.append((f"goal {goal}", "met" if met else "NOT met"))
    rows.append(
        ("OMP_WAIT_POLICY / torch threads", f"{result['omp_wait_policy']} / {result['torch_threads']}")
    )
    width = max(len(name) for name, _ in rows)
    lines = [f"{'figure':<{width}}  value", f"{'-' * width}  {'-' * 16}"]
    lines += [f"{name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
