"""The sample wire format (docs/sample-format.md): one msgpack map per Kafka message.

| field | type                                         |
|-------|----------------------------------------------|
| x     | bin (little-endian float32) or number array  |
| shape | optional array of ints                       |
| y     | optional int or str label                    |
| task  | optional int or str task id                  |
| id    | optional int or str sample id                |
| ts    | optional float event time (epoch seconds)    |

`decode_sample` raises `InvalidSample` with a short machine-readable `reason`; the source sends the
original bytes and that reason to the dead-letter topic.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

Label = int | str

MAX_FEATURES_DEFAULT = 1 << 20
_MISSING = object()
_NATIVE_F32 = sys.byteorder == "little"  # float32 bytes on the wire are little-endian
_unpackb = msgpack.unpackb
_isfinite = np.isfinite


class InvalidSample(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)  # immutable by convention: a frozen dataclass cost ~1.5 µs more per sample to build
class Sample:
    x: np.ndarray  # float32, flat
    y: Label | None = None
    task: Label | None = None
    id: Label | None = None
    ts: float | None = None
    shape: tuple[int, ...] | None = None


def decode_features(value: Any, max_features: int = MAX_FEATURES_DEFAULT, field: str = "x") -> np.ndarray:
    """Decode a feature vector sent as float32 LE bytes or as a number array; flat float32, finite."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) % 4:
            raise InvalidSample("bad_length", f"'{field}' has {len(raw)} bytes, not a multiple of 4")
        if len(raw) // 4 > max_features:
            raise InvalidSample("too_large", f"'{field}' has {len(raw) // 4} features (max {max_features})")
        x = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    elif isinstance(value, list | tuple):
        if len(value) > max_features:
            raise InvalidSample("too_large", f"'{field}' has {len(value)} features (max {max_features})")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise InvalidSample("bad_type", f"'{field}' must hold only numbers")
        with np.errstate(over="ignore"):  # numbers beyond float32 become inf: refused below, no warning
            x = np.asarray(value, dtype=np.float32)
    else:
        raise InvalidSample("bad_type", f"'{field}' must be bin or an array, got {type(value).__name__}")
    if x.size == 0:
        raise InvalidSample("bad_length", f"'{field}' is empty")
    if not np.isfinite(x).all():
        raise InvalidSample("not_finite", f"'{field}' holds NaN or inf")
    return x


def _id_like(obj: dict[str, Any], key: str) -> Label | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidSample("bad_type", f"'{key}' must be an int or a str, got {type(value).__name__}")
    if isinstance(value, str) and len(value) > 256:
        raise InvalidSample("bad_type", f"'{key}' is longer than 256 characters")
    return value


def decode_sample(
    payload: bytes, expected_size: int | None = None, max_features: int = MAX_FEATURES_DEFAULT
) -> Sample:
    """Decode and validate one message value; `expected_size` checks the feature count.

    Runs once per consumed message, so the common case (a map whose `x` is float32 bytes and
    whose ids are ints) takes a fast path with the same checks in the same order; anything
    else goes through the general helpers, which give the same reasons and details.
    """
    try:
        obj = _unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise InvalidSample("not_msgpack", str(e)[:200]) from None
    if type(obj) is not dict:
        raise InvalidSample("not_a_map", f"top-level value is {type(obj).__name__}")
    value = obj.get("x", _MISSING)
    if value is _MISSING:
        raise InvalidSample("missing_x", "the sample has no 'x' field")
    if type(value) is bytes and _NATIVE_F32 and 0 < len(value) <= 4 * max_features and not len(value) % 4:
        x = np.frombuffer(value, dtype=np.float32)
        if not _isfinite(x).all():
            raise InvalidSample("not_finite", "'x' holds NaN or inf")
    else:
        x = decode_features(value, max_features)
    shape: tuple[int, ...] | None = None
    s = obj.get("shape")
    if s is not None:
        if not isinstance(s, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s
        ):
            raise InvalidSample("bad_shape", "'shape' must be an array of positive ints")
        shape = tuple(s)
        if math.prod(shape) != x.size:  # math.prod: np.prod costs ~5 µs on a small tuple
            raise InvalidSample("bad_shape", f"'shape' {list(shape)} does not match {x.size} features")
    if expected_size is not None and x.size != expected_size:
        raise InvalidSample("bad_length", f"'x' has {x.size} features, the model expects {expected_size}")
    ts = obj.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
        raise InvalidSample("bad_type", "'ts' must be a number")
    # ids: `type(v) is int` is the common, valid case (bool is not int's type); else the checks
    y = obj.get("y")
    if y is not None and type(y) is not int:
        y = _id_like(obj, "y")
    task = obj.get("task")
    if task is not None and type(task) is not int:
        task = _id_like(obj, "task")
    sid = obj.get("id")
    if sid is not None and type(sid) is not int:
        sid = _id_like(obj, "id")
    return Sample(x=x, y=y, task=task, id=sid, ts=float(ts) if ts is not None else None, shape=shape)


def encode_sample(
    x: np.ndarray,
    y: Label | None = None,
    task: Label | None = None,
    id: Label | None = None,
    ts: float | None = None,
    shape: tuple[int, ...] | None = None,
    binary: bool = True,
) -> bytes:
    """Encode one sample; `binary` sends `x` as float32 bytes (compact, fast) rather than an array."""
    arr = np.ascontiguousarray(x, dtype="<f4").reshape(-1)
    msg: dict[str, Any] = {"x": arr.tobytes() if binary else arr.tolist()}
    if shape is not None:
        msg["shape"] = list(shape)
    for key, value in (("y", y), ("task", task), ("id", id), ("ts", ts)):
        if value is not None:
            msg[key] = value.item() if isinstance(value, np.generic) else value
    return msgpack.packb(msg, use_bin_type=True)
