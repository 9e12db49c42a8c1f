"""Detect: where the stream moves to a new task (explicit ids, new classes, drift)."""
