"""Atomic, checksummed checkpoints: model + strategy + detector + label map + Kafka offsets, together.

A checkpoint file is `MAGIC | sha256(payload) | payload`, payload = `torch.save` of a dict of
plain Python values and tensors. It is written to a temporary file, fsynced, renamed into place and
the directory fsynced, so a crash leaves either the old set of checkpoints or the new one. On load,
the newest file whose checksum verifies wins; a torn or corrupt file is skipped with a warning.

Files are named `ckpt-<sequence>.pt`; the last `keep` are kept.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from stream_cl.log import get_logger

MAGIC = b"STREAMCL-CKPT-1\n"
FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


class CheckpointError(RuntimeError):
    pass


class CheckpointStore:
    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        self.dir = Path(directory)
        self.keep = keep
        self.log = get_logger("stream_cl.store.checkpoints")

    def _existing(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _NAME.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
        return sorted(found)

    def save(self, state: dict[str, Any]) -> Path:
        """Write `state` atomically as the newest checkpoint; prune beyond `keep`. Raises OSError."""
        self.dir.mkdir(parents=True, exist_ok=True)
        existing = self._existing()
        seq = existing[-1][0] + 1 if existing else 1
        buf = io.BytesIO()
        torch.save({"format": FORMAT_VERSION, **state}, buf)
        payload = buf.getvalue()
        digest = hashlib.sha256(payload).digest()
        final = self.dir / f"ckpt-{seq:010d}.pt"
        fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(digest)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.dir)
        for _, old in existing[: max(0, len(existing) + 1 - self.keep)]:
            old.unlink(missing_ok=True)
        return final

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that verifies, or None; corrupt files are skipped with a warning."""
        for _, path in reversed(self._existing()):
            try:
                return read_checkpoint(path), path
            except CheckpointError as e:
                self.log.warning("checkpoint_skipped", path=str(path), reason=str(e))
        return None


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    data = Path(path).read_bytes()
    header = len(MAGIC) + 32
    if len(data) < header or not data.startswith(MAGIC):
        raise CheckpointError("not a stream_cl checkpoint (bad header)")
    digest, payload = data[len(MAGIC) : header], data[header:]
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError("checksum mismatch (torn or corrupt file)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a verified payload that still fails to load: an incompatible writer
        raise CheckpointError(f"unreadable payload: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"unsupported checkpoint format {state.get('format') if isinstance(state, dict) else '?'}"
        )
    return state


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
