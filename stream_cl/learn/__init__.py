"""Learn: the one thread that owns the model: chunks in, strategy steps, snapshots and offsets out."""
