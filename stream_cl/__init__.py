"""stream_cl: continual learning on live Kafka streams."""

__version__ = "0.1.0"
