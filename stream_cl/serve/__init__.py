"""Serve: immutable snapshots and the fronts that answer predictions from them."""
