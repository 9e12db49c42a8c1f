"""Evaluate: held-out reservoirs per task, the accuracy matrix and forgetting."""
