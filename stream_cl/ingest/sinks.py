"""What the daemon writes back to Kafka besides commits: dead letters and predictions, through one
producer factory so both are configured in one place."""

from __future__ import annotations

from typing import Any

import msgpack
from kafka import KafkaProducer

from stream_cl.config import KafkaConfig
from stream_cl.ingest.codec import Sample


def kafka_producer(config: KafkaConfig, durable: bool) -> KafkaProducer:
    """A producer on `kafka.bootstrap_servers`. `durable`: every in-sync replica has a message
    before it counts as sent (`acks="all"`): a dead letter must be durable before the offset of
    its record is committed. Idempotence is not needed: offsets are committed only after a flush."""
    settings: dict[str, Any] = {"acks": "all", "enable_idempotence": False} if durable else {}
    return KafkaProducer(bootstrap_servers=config.bootstrap_servers.split(","), linger_ms=5, **settings)


def dead_letter_headers(reason: str, detail: str, topic: str, partition: int, offset: int) -> list:
    """The headers of a dead letter (docs/sample-format.md): why, and where the record came from."""
    return [
        ("stream_cl.reason", reason.encode()),
        ("stream_cl.detail", detail[:500].encode()),
        ("stream_cl.source", f"{topic}:{partition}:{offset}".encode()),
    ]


class PredictionsSink:
    """`kafka.predictions_topic`: one msgpack map per unlabeled sample (docs/sample-format.md)."""

    def __init__(self, config: KafkaConfig) -> None:
        self.topic = config.predictions_topic
        self._producer = kafka_producer(config, durable=False)

    def send(self, sample: Sample, prediction: dict[str, Any]) -> None:
        message = {"id": sample.id, **prediction}
        self._producer.send(self.topic, msgpack.packb(message, use_bin_type=True))

    def close(self, timeout: float) -> None:
        self._producer.close(timeout=timeout)
