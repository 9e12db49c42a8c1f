"""The snapshots a process serves, by model key.

A single-model daemon serves one model, under `DEFAULT_KEY`. A keyed daemon (one model per
Kafka message key: a tenant, a sensor, a site) and a follower replica serve one model per key.
Each model keeps its own `SnapshotHolder`, so publishing one key's snapshot never touches
another's; the registry itself only changes when a model is added or given up (a rebalance),
under a lock, and readers take a reference to a holder once per request.

Request routing (the `key` field of a prediction request, see serve.py):
- unkeyed registry: `key` must be absent (or `DEFAULT_KEY`);
- keyed registry: `key` is required; a key with no model here is `not_ready`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from stream_cl.serve.snapshot import Snapshot, SnapshotHolder

DEFAULT_KEY = ""


class UnroutableKey(LookupError):
    """A request's `key` cannot be served; `code` is the protocol's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SnapshotRegistry:
    """Latest snapshot per model key. `keyed=False`: exactly one model, under `DEFAULT_KEY`."""

    def __init__(self, keyed: bool = False) -> None:
        self.keyed = keyed
        self._holders: dict[str, SnapshotHolder] = {}
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str, Snapshot], None]] = []
        if not keyed:
            self._holders[DEFAULT_KEY] = SnapshotHolder()

    @classmethod
    def single(cls, holder: SnapshotHolder) -> SnapshotRegistry:
        """An unkeyed registry around an existing holder."""
        registry = cls(keyed=False)
        registry._holders[DEFAULT_KEY] = holder
        return registry

    # -- writers (the learner thread of each model, a follower, a rebalance) ----------------------
    def holder(self, key: str = DEFAULT_KEY) -> SnapshotHolder:
        """The holder of `key`, created on first use (keyed registries only create new keys)."""
        holder = self._holders.get(key)
        if holder is not None:
            return holder
        if not self.keyed:
            raise ValueError(f"this registry serves one model; key {key!r} is not {DEFAULT_KEY!r}")
        with self._lock:
            return self._holders.setdefault(key, SnapshotHolder())

    def publish(self, key: str, snapshot: Snapshot) -> None:
        """Publish `snapshot` as `key`'s latest and tell the listeners (e.g. a snapshot publisher)."""
        self.holder(key).publish(snapshot)
        for listener in list(self._listeners):
            listener(key, snapshot)

    def remove(self, key: str) -> None:
        """Stop serving `key` (its model moved to another daemon)."""
        if not self.keyed:
            raise ValueError("an unkeyed registry always serves its one model")
        with self._lock:
            self._holders.pop(key, None)

    def add_listener(self, listener: Callable[[str, Snapshot], None]) -> None:
        """Call `listener(key, snapshot)` after each `publish` (on the publishing thread)."""
        self._listeners.append(listener)

    # -- readers ----------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._holders)

    def get(self, key: str = DEFAULT_KEY) -> Snapshot | None:
        holder = self._holders.get(key)
        return None if holder is None else holder.get()

    def any_ready(self) -> bool:
        return any(h.get() is not None for h in list(self._holders.values()))

    def resolve(self, key: object) -> SnapshotHolder:
        """The holder a request's `key` field (None = absent) routes to, or `UnroutableKey`."""
        if key is None or (not self.keyed and key == DEFAULT_KEY):
            if self.keyed:
                raise UnroutableKey(
                    "bad_request",
                    f"'key' is required: this server serves one model per key ({len(self._holders)} now; "
                    "`info` without a key lists them)",
                )
            return self._holders[DEFAULT_KEY]
        if not isinstance(key, str):
            raise UnroutableKey("bad_request", f"'key' must be a str, got {type(key).__name__}")
        if not self.keyed:
            raise UnroutableKey("bad_request", f"this server serves one model; drop 'key' (got {key!r})")
        holder = self._holders.get(key)
        if holder is None:
            raise UnroutableKey("not_ready", f"no model for key {key!r} here (yet)")
        return holder
