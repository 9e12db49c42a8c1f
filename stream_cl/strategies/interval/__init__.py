"""HyperInterval: interval freezing of each task's weight box."""
