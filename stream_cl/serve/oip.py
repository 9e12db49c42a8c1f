"""Open Inference Protocol v2 bodies (docs/http-protocol.md): an infer request's JSON (with or
without Triton's binary tensor data extension) in, the reply body out. Pure functions, no I/O:
the HTTP front (serve/http.py) feeds them bytes and answers what they raise as HTTP errors."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_cl.ingest.codec import InvalidSample, decode_features
from stream_cl.types import Label

INPUT = "x"
PROBABILITIES = "probabilities"
LABEL = "label"
OUTPUTS = (PROBABILITIES, LABEL)
HEADER_LENGTH = "Inference-Header-Content-Length"
_LEN = struct.Struct("<I")  # BYTES elements in binary form: uint32 LE length, then the bytes


class HttpError(Exception):
    """A request answered with `status` and `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad(message: str) -> HttpError:
    return HttpError(400, message)


@dataclass
class InferRequest:
    """A decoded infer request: `xs` is [n, input_size] float32, finite."""

    xs: np.ndarray
    id: str | None = None
    task: Any = None  # parameters.task: checked against the snapshot by the caller
    outputs: dict[str, bool] = field(default_factory=dict)  # requested output -> binary


def parse_infer(body: bytes, header_length: str | None, input_size: int, max_batch: int) -> InferRequest:
    """Decode an infer request body for a model whose flattened input holds `input_size` values."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise bad(f"{HEADER_LENGTH} must be an integer, got {header_length[:40]!r}") from None
        if not 0 <= n <= len(body):
            raise bad(f"{HEADER_LENGTH} {n} is outside the body's {len(body)} bytes")
        body, binary = body[:n], body[n:]
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad("the request body is not valid JSON") from None
    if not isinstance(request, dict):
        raise bad(f"the request must be a JSON object, got {type(request).__name__}")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad(f"'id' must be a string, got {type(rid).__name__}")
    params = _object(request.get("parameters"), "parameters")
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad("parameters.binary_data_output must be a boolean")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise bad(f"'inputs' must be an array holding exactly one tensor, named {INPUT!r}")
    xs, used = _input(inputs[0], binary, input_size, max_batch)
    if used != len(binary):
        raise bad(f"{len(binary) - used} bytes of binary data follow the inputs that no input claims")
    return InferRequest(xs, rid, params.get("task"), _outputs(request.get("outputs"), binary_default))


def _object(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"'{name}' must be a JSON object")
    return value


def _input(tensor: Any, binary: bytes, input_size: int, max_batch: int) -> tuple[np.ndarray, int]:
    """The input tensor as [n, input_size] float32, and how many binary bytes it took."""
    if not isinstance(tensor, dict):
        raise bad("each input must be a JSON object")
    if tensor.get("name") != INPUT:
        raise bad(f"unknown input {tensor.get('name')!r}; the model's one input is {INPUT!r}")
    if tensor.get("datatype") != "FP32":
        raise bad(f"input {INPUT!r} must have datatype FP32, got {tensor.get('datatype')!r}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) < 2
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise bad(f"input {INPUT!r} needs a shape [N, ...] of non-negative integers, got {shape!r}")
    n, per_row = shape[0], math.prod(shape[1:])
    if per_row != input_size:
        raise bad(
            f"input {INPUT!r} has shape {shape}: {per_row} values per row, the model expects {input_size}"
        )
    if not 1 <= n <= max_batch:
        raise bad(f"input {INPUT!r} holds {n} rows (1 to serve.max_batch = {max_batch})")
    params = _object(tensor.get("parameters"), "inputs[0].parameters")
    if any(k.startswith("shared_memory") for k in params):
        raise bad("shared memory tensors are not supported")
    size = params.get("binary_data_size")
    where = f"input {INPUT!r}"
    try:
        if size is not None:
            if "data" in tensor:
                raise bad(f"{where} has both 'data' and parameters.binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary):
                raise bad(f"{where}: binary_data_size {size!r} is outside the {len(binary)} binary bytes")
            if size != 4 * n * input_size:
                raise bad(f"{where}: binary_data_size {size} is not 4 x {n * input_size} FP32 values")
            flat = decode_features(binary[:size], max_features=n * input_size, field=INPUT)
            return flat.reshape(n, input_size), size
        if "data" not in tensor:
            raise bad(f"{where} has neither 'data' nor parameters.binary_data_size")
        values = _flatten(tensor["data"], len(shape), n * input_size)
        flat = decode_features(values, max_features=n * input_size, field=INPUT)
    except InvalidSample as e:
        raise bad(f"{where}: {e}") from None
    if flat.size != n * input_size:
        raise bad(f"{where} holds {flat.size} values, its shape {shape} needs {n * input_size}")
    return flat.reshape(n, input_size), 0


def _flatten(data: Any, depth: int, limit: int) -> list[Any]:
    """Row-major values of `data`, flat or nested (at most `depth` levels, `limit` values)."""
    if not isinstance(data, list):
        raise bad(f"input {INPUT!r}: 'data' must be an array")
    out: list[Any] = []

    def walk(items: list[Any], level: int) -> None:
        for v in items:
            if isinstance(v, list):
                if level >= depth:
                    raise bad(f"input {INPUT!r}: 'data' is nested deeper than its shape")
                walk(v, level + 1)
            else:
                out.append(v)
                if len(out) > limit:
                    raise bad(f"input {INPUT!r}: 'data' holds more than the {limit} values its shape needs")

    if any(isinstance(v, list) for v in data):
        walk(data, 1)
        return out
    return data


def _outputs(value: Any, binary_default: bool) -> dict[str, bool]:
    if value is None:
        return dict.fromkeys(OUTPUTS, binary_default)
    if not isinstance(value, list) or not value:
        raise bad("'outputs' must be a non-empty array")
    out: dict[str, bool] = {}
    for tensor in value:
        if not isinstance(tensor, dict) or tensor.get("name") not in OUTPUTS:
            name = tensor.get("name") if isinstance(tensor, dict) else tensor
            raise bad(f"unknown output {name!r}; the model's outputs are {list(OUTPUTS)}")
        params = _object(tensor.get("parameters"), "outputs[].parameters")
        if any(k.startswith("shared_memory") for k in params) or "classification" in params:
            raise bad("shared memory and classification outputs are not supported")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad("outputs[].parameters.binary_data must be a boolean")
        out[tensor["name"]] = binary
    return out


def infer_reply(
    model: str, version: int, request: InferRequest, proba: np.ndarray, labels: list[Label]
) -> tuple[bytes, int | None]:
    """The reply body for predicted `proba` [n, C] and top `labels` [n]; with binary outputs, the
    JSON header's length (the `Inference-Header-Content-Length` to send), else None."""
    n = len(labels)
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in request.outputs.items():
        if name == PROBABILITIES:
            tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": [n, int(proba.shape[1])]}
            raw = np.ascontiguousarray(proba, dtype="<f4")
            data: Any = raw.ravel().tolist()
            blob = raw.tobytes() if binary else b""
        else:
            tensor = {"name": name, "datatype": "BYTES", "shape": [n]}
            data = [str(label) for label in labels]
            blob = b"".join(_LEN.pack(len(e)) + e for e in (s.encode() for s in data)) if binary else b""
        if binary:
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = data
        outputs.append(tensor)
    reply: dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.id is not None:
        reply["id"] = request.id
    reply["outputs"] = outputs
    header = json.dumps(reply, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)
