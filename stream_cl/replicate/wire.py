"""How a snapshot travels on the snapshot topic: chunks, then a manifest that names and verifies them.

A published snapshot is the learner's inference state, rebuildable anywhere: the strategy's
`state_dict()` (weights and everything its predictor reads) plus what `Learner.publish` wraps
around it (version, label map, task ids, input shape) and the `[model]`/`[strategy]` sections
that rebuild the strategy with `stream_cl.strategies.from_config`. A `Snapshot` itself holds a
closure and cannot be sent.

Messages (value = one msgpack map; every message of one model goes to one partition, so they
arrive in the order they were sent):
- chunk:    key `chunk/<publish_id>/<index>/<model>`, `{"kind": "chunk", "model", "publish_id",
            "index", "data": bin}`; payload = `torch.save({"format", "strategy_state"})`, cut into
            `publish.chunk_bytes` pieces (Kafka's default message limit is 1 MB).
- manifest: key `manifest/<model>`, `{"kind": "manifest", "format", "model", "publish_id",
            "version", "chunks", "size", "sha256", "strategy", "labels", "tasks", "input_shape",
            "model_config", "strategy_config", "created_at"}`, sent after its chunks.
- tombstone (value null) for the previous publish's chunk keys, sent after the new manifest.

Keys are stable per model, so a compacted topic keeps each model's latest manifest and the chunks
it names (a publish id is new for every publish: a crash between chunks and manifest never
leaves the latest manifest pointing at overwritten chunks). A follower must not depend on
compaction: it reads the log in order, keeps only the newest publish's chunks per model, and
accepts a manifest only when its chunks are all there, add up to `size` and hash to `sha256`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from stream_cl.config import Config, ModelConfig, StrategyConfig, build
from stream_cl.serve.snapshot import Snapshot, build_snapshot
from stream_cl.types import Label, TaskId

FORMAT = 1


class SnapshotRejected(ValueError):
    """A manifest whose payload is missing, incomplete, too large or fails verification."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class SnapshotCapture:
    """The learner's inference state at one published version: taken on the learner thread."""

    model: str  # the model key ("" = the one model of an unkeyed daemon)
    version: int
    strategy: str
    labels: tuple[Label, ...]
    tasks: tuple[TaskId, ...]
    input_shape: tuple[int, ...]
    state: dict[str, Any]  # strategy.state_dict(): CPU clones, never touched by the learner again
    created_at: float = dataclasses.field(default_factory=time.time)


@dataclass(frozen=True)
class PublishedSnapshot:
    """A verified manifest with its payload, as a follower received it."""

    manifest: dict[str, Any]
    payload: bytes

    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def version(self) -> int:
        return int(self.manifest["version"])


def chunk_key(model: str, publish_id: str, index: int) -> bytes:
    return f"chunk/{publish_id}/{index}/{model}".encode()


def manifest_key(model: str) -> bytes:
    return f"manifest/{model}".encode()


def encode(
    capture: SnapshotCapture, config: Config, chunk_bytes: int
) -> tuple[str, list[tuple[bytes, bytes]], int]:
    """(publish id, [(key, value)] in send order: chunks then the manifest, payload size)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "strategy_state": capture.state}, buf)
    payload = buf.getvalue()
    publish_id = uuid.uuid4().hex
    messages: list[tuple[bytes, bytes]] = []
    pieces = [payload[i : i + chunk_bytes] for i in range(0, len(payload), chunk_bytes)] or [b""]
    for index, piece in enumerate(pieces):
        value = {
            "kind": "chunk",
            "model": capture.model,
            "publish_id": publish_id,
            "index": index,
            "data": piece,
        }
        messages.append((chunk_key(capture.model, publish_id, index), _pack(value)))
    manifest = {
        "kind": "manifest",
        "format": FORMAT,
        "model": capture.model,
        "publish_id": publish_id,
        "version": capture.version,
        "chunks": len(pieces),
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "strategy": capture.strategy,
        "labels": list(capture.labels),
        "tasks": list(capture.tasks),
        "input_shape": list(capture.input_shape),
        "model_config": dataclasses.asdict(config.model),
        "strategy_config": dataclasses.asdict(config.strategy),
        "created_at": capture.created_at,
    }
    messages.append((manifest_key(capture.model), _pack(manifest)))
    return publish_id, messages, len(payload)


def tombstones(model: str, publish_id: str, chunks: int) -> Iterator[bytes]:
    """Keys whose null value lets compaction drop a superseded publish's chunks."""
    for index in range(chunks):
        yield chunk_key(model, publish_id, index)


def _pack(value: dict[str, Any]) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


class Assembler:
    """Follower side: feeds on message values in log order, yields verified snapshots.

    Memory stays bounded: per model only the newest publish's chunks are kept, and a publish whose
    chunks exceed `max_bytes` is dropped.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # model -> (publish_id, {index: data}, bytes held)
        self._chunks: dict[str, tuple[str, dict[int, bytes], int]] = {}

    def feed(self, value: bytes | None) -> PublishedSnapshot | None:
        """One message value; a verified snapshot when it completes one. Raises SnapshotRejected."""
        if value is None:  # a tombstone
            return None
        try:
            message = msgpack.unpackb(value, raw=False, strict_map_key=False)
        except Exception as e:
            raise SnapshotRejected("not_msgpack", str(e)) from None
        if not isinstance(message, dict) or not isinstance(message.get("model"), str):
            raise SnapshotRejected("bad_message", "not a map with a 'model' string")
        kind = message.get("kind")
        if kind == "chunk":
            self._chunk(message)
            return None
        if kind == "manifest":
            return self._manifest(message)
        raise SnapshotRejected("bad_message", f"unknown kind {kind!r}")

    def _chunk(self, message: dict[str, Any]) -> None:
        model, publish_id, index, data = (
            message["model"],
            message.get("publish_id"),
            message.get("index"),
            message.get("data"),
        )
        if not isinstance(publish_id, str) or not isinstance(index, int) or not isinstance(data, bytes):
            raise SnapshotRejected("bad_message", "chunk without publish_id, index or data")
        held = self._chunks.get(model)
        if held is None or held[0] != publish_id:  # a newer publish began: the older one is done
            held = (publish_id, {}, 0)
        pid, pieces, size = held
        size += len(data) - len(pieces.get(index, b""))
        pieces[index] = data
        if size > self.max_bytes:
            self._chunks.pop(model, None)
            raise SnapshotRejected("too_large", f"model {model!r}: chunks exceed {self.max_bytes} bytes")
        self._chunks[model] = (pid, pieces, size)

    def _manifest(self, manifest: dict[str, Any]) -> PublishedSnapshot:
        model = manifest["model"]
        if manifest.get("format") != FORMAT:
            raise SnapshotRejected("bad_format", f"manifest format {manifest.get('format')!r}")
        held = self._chunks.pop(model, None)
        publish_id, count = manifest.get("publish_id"), manifest.get("chunks")
        if held is None or held[0] != publish_id:
            raise SnapshotRejected("missing_chunks", f"model {model!r}: no chunks of publish {publish_id}")
        pieces = held[1]
        if not isinstance(count, int) or sorted(pieces) != list(range(count)):
            raise SnapshotRejected(
                "missing_chunks", f"model {model!r}: have chunks {sorted(pieces)}, manifest says {count}"
            )
        payload = b"".join(pieces[i] for i in range(count))
        if len(payload) != manifest.get("size"):
            raise SnapshotRejected("bad_size", f"{len(payload)} bytes, manifest says {manifest.get('size')}")
        if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
            raise SnapshotRejected("bad_checksum", f"model {model!r}: sha256 mismatch")
        return PublishedSnapshot(manifest, payload)


def rebuild(published: PublishedSnapshot, config: Config) -> Snapshot:
    """The published model as a `Snapshot` with exactly the learner's version.

    The strategy is built from the published `[model]`/`[strategy]`; only where it runs (device,
    torch threads) comes from this process's `config`.
    """
    from stream_cl.strategies import from_config  # torch-heavy: imported when a snapshot arrives

    m = published.manifest
    model_cfg = {
        **m["model_config"],
        "device": config.model.device,
        "torch_threads": config.model.torch_threads,
    }
    try:
        local = dataclasses.replace(
            config,
            model=build(ModelConfig, model_cfg, "model"),
            strategy=build(StrategyConfig, m["strategy_config"], "strategy"),
        )
        state = torch.load(io.BytesIO(published.payload), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise SnapshotRejected("bad_format", "payload is not a stream_cl snapshot")
        input_shape = tuple(int(d) for d in m["input_shape"])
        strategy = from_config(local, input_shape)
        strategy.load_state_dict(state["strategy_state"])
    except SnapshotRejected:
        raise
    except Exception as e:  # an unknown strategy here, a config this version cannot build, ...
        raise SnapshotRejected("unloadable", f"{type(e).__name__}: {e}") from e
    return build_snapshot(strategy, int(m["version"]), m["labels"], m["tasks"], input_shape)
