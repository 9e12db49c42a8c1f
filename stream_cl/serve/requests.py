"""What every prediction front (the socket, and any other) checks and answers the same way:
TLS, a request's features, the model its key routes to, its task hint, health and info."""

from __future__ import annotations

import ssl
from typing import Any

import numpy as np

from stream_cl.config import ServeConfig
from stream_cl.ingest.codec import InvalidSample, decode_features
from stream_cl.serve.frames import RequestError
from stream_cl.serve.registry import SnapshotRegistry, UnroutableKey
from stream_cl.serve.snapshot import Snapshot, SnapshotHolder
from stream_cl.types import TaskId

# `info` on a keyed server lists at most this many keys (the reply must stay well under a frame).
MAX_INFO_KEYS = 1000


def server_ssl_context(config: ServeConfig) -> ssl.SSLContext | None:
    """The TLS context for `serve.tls_cert`/`serve.tls_key`, or None for plain TCP.

    `ssl.create_default_context(CLIENT_AUTH)` brings the library's vetted cipher and option
    defaults; only the floor is raised to TLS 1.2 so no deployment can negotiate 1.0/1.1.
    """
    if not config.tls_cert and not config.tls_key:
        return None
    config.validate()  # a programmatic ServeConfig skips load_config: one clear error naming the key
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    return context


def features(value: Any, size: int, field: str) -> np.ndarray:
    try:
        x = decode_features(value, max_features=size, field=field)
    except InvalidSample as e:
        raise RequestError("bad_request", str(e)) from None
    if x.size != size:
        raise RequestError("bad_request", f"'{field}' has {x.size} features, the model expects {size}")
    return x


def model_holder(registry: SnapshotRegistry, key: Any) -> SnapshotHolder:
    """The model a request's `key` routes to (absent: the one model of an unkeyed server)."""
    try:
        return registry.resolve(key)
    except UnroutableKey as e:
        raise RequestError(e.code, e.message) from None


def task_hint(value: Any, snapshot: Snapshot) -> TaskId | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RequestError("bad_request", f"'task' must be an int or a str, got {type(value).__name__}")
    if value not in snapshot.tasks:
        raise RequestError("bad_request", f"unknown task {value!r}; known tasks: {list(snapshot.tasks)}")
    return value


def model_status(registry: SnapshotRegistry, key: Any) -> str:
    """ "ready" once the model `key` routes to (or, without a key, any model) serves, else "starting"."""
    if key is None:
        return "ready" if registry.any_ready() else "starting"
    return "starting" if model_holder(registry, key).get() is None else "ready"


def model_info(registry: SnapshotRegistry, key: Any) -> dict[str, Any]:
    """The served model's description; on a keyed server without a key, which models it holds."""
    if key is None and registry.keyed:
        keys = registry.keys()
        return {"keys": keys[:MAX_INFO_KEYS], "models": len(keys)}
    snapshot = model_holder(registry, key).get()
    if snapshot is None:
        raise RequestError("not_ready", "no model snapshot published yet")
    return snapshot.info() if key is None else {"key": key, **snapshot.info()}
