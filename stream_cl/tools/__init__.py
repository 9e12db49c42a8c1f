"""Tools: the demo, the embedded broker, the producer, reports and offline utilities."""
