"""The OIP v2 HTTP front's latency and throughput, for `stream-cl bench latency` (bench/latency.py
runs it next to the socket and the in-process forward on the same server and snapshot).

Two encodings of the same `infer` request: JSON tensors, and Triton's binary tensors (the
float32 row after the JSON header, the probabilities back as raw float32). Latency is taken on one
keep-alive connection with prebuilt requests, each reply read whole and decoded; throughput with
such connections driven by one selector thread in a process of its own (`http_throughput_elsewhere`).
"""

from __future__ import annotations

import io
import json
import selectors
import socket
import subprocess
import sys
import time
from typing import cast

import numpy as np

PATH = "/v2/models/{model}/infer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def infer_bodies(xs: np.ndarray, binary: bool) -> list[tuple[bytes, dict[str, str]]]:
    """One infer request (body, headers) per row of `xs` [n, input_size] float32, built once."""
    out = []
    for x in xs:
        tensor: dict[str, object] = {"name": "x", "datatype": "FP32", "shape": [1, int(x.size)]}
        if binary:
            raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            header = json.dumps(
                {
                    "inputs": [tensor],
                    "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
                }
            ).encode()
            out.append((header + raw, {HEADER_LENGTH: str(len(header))}))
        else:
            tensor["data"] = x.tolist()
            body = json.dumps({"inputs": [tensor], "outputs": [{"name": "probabilities"}]}).encode()
            out.append((body, {"Content-Type": "application/json"}))
    return out


def _decode(raw: bytes, header_length: str | None) -> np.ndarray:
    """The probabilities of a reply, as a caller would decode them."""
    if header_length is None:
        (out,) = json.loads(raw)["outputs"]
        return np.asarray(out["data"], dtype=np.float32)
    n = int(header_length)
    json.loads(raw[:n])
    return np.frombuffer(raw[n:], dtype="<f4")


def http_seconds(port: int, bodies: list[tuple[bytes, dict[str, str]]], n: int, model: str) -> list[float]:
    """Per-request seconds of `n` sequential infer requests on one keep-alive connection, each
    reply read whole and its probabilities decoded (a lean client: prebuilt requests, so the
    figure is the server's and the wire's, not `http.client`'s header handling)."""
    requests = _requests(bodies, model)
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=10.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = _HttpClient(sock, 0)
        for i in range(n):
            start = time.perf_counter()
            sock.sendall(requests[i % len(requests)])
            while (reply := client.feed()) is None:
                pass
            _decode(*reply)
            out.append(time.perf_counter() - start)
    return out


def _requests(bodies: list[tuple[bytes, dict[str, str]]], model: str) -> list[bytes]:
    path = PATH.format(model=model)
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode()
        + body
        for body, headers in bodies
    ]


def http_throughput(
    port: int, bodies: list[tuple[bytes, dict[str, str]]], clients: int, duration_s: float, model: str
) -> float:
    """Infer requests/s answered to `clients` keep-alive connections, each sending its next
    request on each reply (one selector thread drives them all)."""
    requests = _requests(bodies, model)
    selector = selectors.DefaultSelector()
    load: list[_HttpClient] = []
    try:
        for k in range(clients):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10.0)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            load.append(_HttpClient(sock, k % len(requests)))
            selector.register(sock, selectors.EVENT_READ, load[-1])
        answered = 0
        start = time.perf_counter()
        stop_at = start + duration_s
        for client in load:
            client.sock.sendall(requests[client.next])
        while selector.get_map():
            events = selector.select(timeout=10.0)
            if not events:
                raise TimeoutError("the HTTP front stopped answering")
            for key, _ in events:
                client = cast(_HttpClient, key.data)
                if client.feed() is None:
                    continue
                answered += 1
                if time.perf_counter() < stop_at:
                    client.next = (client.next + 1) % len(requests)
                    client.sock.sendall(requests[client.next])
                else:
                    selector.unregister(client.sock)
        return answered / (time.perf_counter() - start)
    finally:
        selector.close()
        for client in load:
            client.sock.close()


class _HttpClient:
    """One sequential keep-alive connection of the load generator; checks each reply is a 200."""

    def __init__(self, sock: socket.socket, next_request: int) -> None:
        self.sock = sock
        self.next = next_request
        self._buf = bytearray()

    def feed(self) -> tuple[bytes, str | None] | None:
        """Read what arrived; once a whole 200 reply is in, (its body, its header length).

        Kept lean (byte searches, no header dict): it shares the GIL with the server it measures."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the HTTP front closed a connection")
        buf = self._buf
        buf += chunk
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(buf[:end]).lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"unexpected reply: {bytes(buf[:300])!r}")
        length = int(_field(head, b"content-length") or 0)
        if len(buf) < end + 4 + length:
            return None
        body = bytes(buf[end + 4 : end + 4 + length])
        del buf[: end + 4 + length]
        header_length = _field(head, HEADER_LENGTH.lower().encode())
        return body, None if header_length is None else header_length.decode()


def _field(head: bytes, name: bytes) -> bytes | None:
    """A header's value in a lower-cased response head, or None."""
    i = head.find(b"\r\n" + name + b":")
    if i < 0:
        return None
    start = i + len(name) + 3
    stop = head.find(b"\r\n", start)
    return head[start : stop if stop >= 0 else len(head)].strip()


def http_throughput_elsewhere(
    port: int, xs: np.ndarray, binary: bool, clients: int, duration_s: float, model: str
) -> float:
    """`http_throughput` driven from a separate process, as a service's clients are. In the
    server's own process the load generator's HTTP parsing competes with the server for the GIL,
    and that, not the server, set the 32-client rate."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(xs, dtype=np.float32))
    argv = [
        sys.executable,
        "-m",
        "stream_cl.bench.latency_http",
        str(port),
        str(clients),
        str(duration_s),
        model,
    ]
    done = subprocess.run(
        [*argv, "binary" if binary else "json"],
        input=buffer.getvalue(),
        capture_output=True,
        timeout=duration_s + 60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the HTTP load process failed: {done.stderr.decode()[-500:]}")
    return float(done.stdout.decode().strip())


if __name__ == "__main__":  # the load process: PORT CLIENTS DURATION MODEL ENCODING, inputs (.npy) on stdin
    port, clients, duration, model, encoding = sys.argv[1:6]
    inputs = np.load(io.BytesIO(sys.stdin.buffer.read()))
    bodies = infer_bodies(inputs, binary=encoding == "binary")
    print(http_throughput(int(port), bodies, int(clients), float(duration), model))
