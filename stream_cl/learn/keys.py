"""Message keys as model keys (`models.per_key`): which model a record goes to, and the config
each key's model learns with."""

from __future__ import annotations

import dataclasses

from stream_cl.config import Config


class InvalidKey(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def model_key(raw: bytes | None) -> str:
    """The model key of a Kafka message key: its UTF-8 text. Raises `InvalidKey` (a dead-letter reason)."""
    if raw is None:
        raise InvalidKey("missing_key", "models.per_key is on and the message has no key")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidKey("bad_key", f"the message key is not UTF-8: {e}") from None


def per_key_config(config: Config) -> Config:
    """The config each key's Learner gets: its held-out reservoirs are `evaluation.keyed_reservoir_size`
    samples per task (the evaluation of per-key models: evaluate/models.py)."""
    return dataclasses.replace(
        config,
        evaluation=dataclasses.replace(
            config.evaluation, reservoir_size=config.evaluation.keyed_reservoir_size
        ),
    )
