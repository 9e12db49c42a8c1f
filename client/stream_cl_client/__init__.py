"""stream-cl-client: talk to a stream_cl daemon or replica without installing stream_cl (no torch).

    pip install "stream-cl-client @ git+<this repository URL>#subdirectory=client"

- `PredictionClient`: the prediction socket (docs/socket-protocol.md): msgpack over TCP, optional
  TLS and token, task hints, per-key models (`key=`), pipelining, reconnect on a dropped connection.
- `HttpPredictionClient`: the same calls over the Open Inference Protocol v2 (docs/http-protocol.md).
"""

from stream_cl_client.http_client import HttpPredictionClient
from stream_cl_client.socket_client import PredictionClient, PredictionError, client_ssl_context

__all__ = ["HttpPredictionClient", "PredictionClient", "PredictionError", "client_ssl_context"]
__version__ = "0.1.0"
