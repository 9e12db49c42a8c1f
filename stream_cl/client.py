"""Deprecated import path, kept for existing users: the prediction client now lives in
`stream_cl.serve.client`."""

from __future__ import annotations

import warnings

from stream_cl.serve.client import PredictionClient, PredictionError

__all__ = ["PredictionClient", "PredictionError"]

warnings.warn(
    "stream_cl.client is deprecated; import PredictionClient from stream_cl.serve.client",
    DeprecationWarning,
    stacklevel=2,
)
