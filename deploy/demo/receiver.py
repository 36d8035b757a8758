"""The demo's webhook receiver: HTTPS, prints one JSON line per delivery it gets.

python receiver.py CERT_DIR PORT, with DEMO_SECRET set to the webhook's secret. Answers
200 to a delivery whose X-Webhook-Signature matches, 401 otherwise. Standard library
only, so it runs on the plain Python image.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = os.environ["DEMO_SECRET"].encode()


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        expected = "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()
        valid = hmac.compare_digest(expected, self.headers.get("X-Webhook-Signature", ""))
        line = {
            "webhook_id": self.headers.get("X-Webhook-Id"),
            "event": self.headers.get("X-Webhook-Event"),
            "attempt": self.headers.get("X-Webhook-Attempt"),
            "signature_valid": valid,
            "body": json.loads(body or b"null"),
        }
        print(json.dumps(line), flush=True)
        self.send_response(200 if valid else 401)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        """Each delivery is printed once, by do_POST."""


def main() -> None:
    cert_dir, port = sys.argv[1], int(sys.argv[2])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(f"{cert_dir}/receiver.pem", f"{cert_dir}/receiver.key")
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(f"receiving on https://0.0.0.0:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
