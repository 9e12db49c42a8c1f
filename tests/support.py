"""Helpers shared by the tests that run a real daemon (imported as `support`; pytest puts tests/ on the path)."""

from __future__ import annotations


def kafka_overrides(bootstrap_servers: str, topic: str) -> list[str]:
    """Config overrides that give a test daemon its own topic, dead-letter topic and consumer group."""
    return [
        f"kafka.bootstrap_servers={bootstrap_servers}",
        f"kafka.topic={topic}",
        f"kafka.dead_letter_topic={topic}.dlq",
        f"kafka.group_id=g-{topic}",
    ]
