"""Ingest: Kafka records in, typed chunks of decoded samples out; dead letters and predictions out."""
