"""Store: checkpoints on disk, single-model and per-key."""
