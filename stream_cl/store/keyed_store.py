"""The shared checkpoint store of per-key models (`models.per_key = true`).

Daemons in one consumer group share one directory (on shared storage) per group and topic: the
same `checkpoint_dir(config)` a single-model daemon uses. Layout:

    <checkpoint.dir>/<group_id>/<topic>/
        keys/<key-dir>/ckpt-<seq>.pt   one CheckpointStore per model key (atomic, checksummed, keep K)
        partitions/<p>.json            the resume manifest of partition p

`<key-dir>` is `k-` + the key's UTF-8 bytes percent-encoded (letters, digits and `._-~` kept), or
`h-` + the sha256 of the key when that would exceed 200 characters; every checkpoint also holds
its key (`model_key`), which is checked on load.

A partition manifest says where a daemon that takes the partition over resumes reading:
`next_offset` is an offset such that every record of the partition before it is in the checkpoint
of its key's model (or needs no model: dead-lettered). `keys` lists the models that have learned
from the partition, so the new owner can load (and serve) them before their next record arrives.
Each key's checkpoint keeps its own per-partition offsets, so records at or after `next_offset`
that a model already learned are dropped by that model: nothing is learned twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from stream_cl.log import get_logger
from stream_cl.store.checkpoints import CheckpointError, CheckpointStore, _fsync_dir

MANIFEST_FORMAT = 1
MAX_KEY_DIR = 200


def key_dir_name(key: str) -> str:
    """The directory name of `key`'s checkpoints: readable, filesystem-safe, never `.`/`..`."""
    encoded = quote(key, safe="")
    if len(encoded) <= MAX_KEY_DIR:
        return "k-" + encoded
    return "h-" + hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyCheckpointStore(CheckpointStore):
    """A `CheckpointStore` for one model key: stamps the key into each checkpoint, checks it on load."""

    def __init__(self, directory: str | os.PathLike[str], key: str, keep: int = 3) -> None:
        super().__init__(directory, keep)
        self.key = key
        self.last_written: Path | None = None  # the newest file this process wrote, if any

    def save(self, state: dict[str, Any]) -> Path:
        path = super().save({**state, "model_key": self.key})
        self.last_written = path
        return path

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        found = super().load_latest()
        if found is not None and found[0].get("model_key") != self.key:
            raise CheckpointError(
                f"{found[1]} holds the model of key {found[0].get('model_key')!r}, not {self.key!r}"
            )
        return found

    def newest_is_mine(self) -> bool:
        """True when the newest checkpoint file is still the one this process wrote last."""
        existing = self._existing()
        return self.last_written is not None and bool(existing) and existing[-1][1] == self.last_written


@dataclass(frozen=True)
class PartitionManifest:
    partition: int
    next_offset: int  # every record before it is in its key's checkpoint (or dead-lettered)
    keys: tuple[str, ...]  # models that learned from this partition

    def to_json(self, writer: str) -> str:
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "partition": self.partition,
                "next_offset": self.next_offset,
                "keys": list(self.keys),
                "written_by": writer,
                "written_at": time.time(),
            }
        )


class SharedModelStore:
    """The per-key layout above, rooted at `root` (`checkpoint_dir(config)`)."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = keep
        self.log = get_logger("stream_cl.store.keyed_store")

    def key_store(self, key: str) -> KeyCheckpointStore:
        return KeyCheckpointStore(self.root / "keys" / key_dir_name(key), key, self.keep)

    def manifest_path(self, partition: int) -> Path:
        return self.root / "partitions" / f"{partition}.json"

    def read_manifest(self, partition: int) -> PartitionManifest | None:
        """The partition's manifest, or None (none yet, or unreadable: logged, then read from Kafka's offset)."""
        path = self.manifest_path(partition)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != MANIFEST_FORMAT or int(data["partition"]) != partition:
                raise ValueError(f"unexpected format or partition in {data!r:.200}")
            return PartitionManifest(
                partition=partition,
                next_offset=int(data["next_offset"]),
                keys=tuple(str(k) for k in data["keys"]),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # The keys' own checkpoints still hold their offsets: resuming from the committed offset
            # (never ahead of a manifest) re-reads more, but learns nothing twice.
            self.log.warning("partition_manifest_unreadable", path=str(path), error=str(e))
            return None

    def write_manifest(self, manifest: PartitionManifest, writer: str) -> None:
        """Write atomically (temporary file, fsync, rename, fsync the directory). Raises OSError."""
        directory = self.manifest_path(manifest.partition).parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".manifest-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(manifest.to_json(writer))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.manifest_path(manifest.partition))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
