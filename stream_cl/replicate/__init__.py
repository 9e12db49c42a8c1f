"""Replicate: snapshots published to Kafka and followed by serving replicas."""
