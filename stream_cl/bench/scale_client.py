"""The prediction load of `stream-cl bench scale`: one client process
(`python -m stream_cl.bench.scale_client HOST PORT START DURATION DEPTH FEATURES`)."""

from __future__ import annotations

import json
import sys
import time


def client_main(argv: list[str]) -> int:
    """Pipeline `predict` requests from START (epoch s) for DURATION s; print {"replies", "errors"}."""
    import numpy as np

    from stream_cl.serve.client import PredictionClient

    host, port, start_at, duration, depth, features = (
        argv[0],
        int(argv[1]),
        float(argv[2]),
        float(argv[3]),
        int(argv[4]),
        int(argv[5]),
    )
    xs = np.random.default_rng(port).normal(size=(64, features)).astype("<f4")
    replies = errors = 0
    with PredictionClient(host, port, timeout=30) as client:
        time.sleep(max(0.0, start_at - time.time()))
        end = time.monotonic() + duration
        in_flight = 0
        i = 0
        while True:
            now = time.monotonic()
            while in_flight < depth and now < end:
                client.send({"op": "predict", "x": xs[i % len(xs)]})
                in_flight += 1
                i += 1
            if not in_flight:
                break
            reply = client.recv()
            in_flight -= 1
            if time.monotonic() <= end:
                if reply.get("ok"):
                    replies += 1
                else:
                    errors += 1
    print(json.dumps({"replies": replies, "errors": errors}))
    return 0


if __name__ == "__main__":
    sys.exit(client_main(sys.argv[1:]))
