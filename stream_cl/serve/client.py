"""The prediction clients, from the torch-free `stream-cl-client` distribution (client/): this
package ships it too, so `stream_cl.serve.client` and `stream_cl_client` are the same classes."""

from __future__ import annotations

from stream_cl_client.http_client import HttpPredictionClient
from stream_cl_client.socket_client import PredictionClient, PredictionError, client_ssl_context

__all__ = ["HttpPredictionClient", "PredictionClient", "PredictionError", "client_ssl_context"]
