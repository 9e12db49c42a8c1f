"""The example Alertmanager receiver of docker-compose.yml: prints each alert it is sent as a JSON line.

Alertmanager POSTs its webhook payload (https://prometheus.io/docs/alerting/latest/configuration/#webhook_config)
to http://alert-log:9099/<route>; this logs one line per alert with the route (the URL path), the
status (firing or resolved), the labels and the summary. Standard library only: it runs in the
plain python image. Replace it with a real receiver (chat, paging) in alertmanager.yml.

    python webhook_log.py [PORT]     (default 9099)
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        for alert in body.get("alerts", []):
            line = {
                "route": self.path.strip("/"),
                "receiver": body.get("receiver"),
                "status": alert.get("status"),
                "labels": alert.get("labels", {}),
                "summary": alert.get("annotations", {}).get("summary"),
                "startsAt": alert.get("startsAt"),
            }
            print(json.dumps(line, sort_keys=True), flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # one line per alert is enough
        pass


def main(argv: list[str]) -> None:
    port = int(argv[1]) if len(argv) > 1 else 9099
    HTTPServer(("0.0.0.0", port), Handler).serve_forever()


if __name__ == "__main__":
    main(sys.argv)
