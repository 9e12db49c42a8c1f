"""Benchmarks behind `stream-cl bench`: each returns its figures as a dict and renders a table."""
