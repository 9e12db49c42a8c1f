"""Prediction-socket frames: a 4-byte big-endian length, then one msgpack map (docs/socket-protocol.md)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np

HEADER = struct.Struct(">I")


class RequestError(Exception):
    """A request the server answers with an error; `code` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _to_builtin(obj: Any) -> Any:
    """msgpack `default` hook: numpy scalars (labels, task routes) pack as their Python value."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot pack {type(obj).__name__}")


def pack_frame(message: dict[str, Any]) -> bytes:
    """One framed msgpack map."""
    payload = msgpack.packb(message, use_bin_type=True, default=_to_builtin)
    return HEADER.pack(len(payload)) + payload


def error_frame(rid: Any, code: str, message: str) -> bytes:
    return pack_frame({"id": rid, "ok": False, "error": {"code": code, "message": message}})
