"""The web servers of the fake internet (tests/fakenet.py), run inside its namespace: HTTP on
80 and 8080, HTTPS on 443, on every address. Each answer says what reached it, as JSON: the Host
asked for, the address it came in on and the one it came from, whether over TLS, and the
request's headers; but `/bytes/N`, which is N bytes.

Usage: python fakenet_server.py CERT KEY
"""

from __future__ import annotations

import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/bytes/"):  # /bytes/N: N bytes, for the bench's downloads
            self._send_bytes(int(self.path.removeprefix("/bytes/")))
            return
        body = json.dumps({
            "host": self.headers.get("Host", ""),
            "local": self.connection.getsockname()[0],
            "peer": self.client_address[0],
            "tls": isinstance(self.connection, ssl.SSLSocket),
            "headers": dict(self.headers),
            "path": self.path,
        }).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_bytes(self, size: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        chunk = b"\0" * 65536
        while size > 0:
            self.wfile.write(chunk[: min(size, len(chunk))])
            size -= len(chunk)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    cert, key = sys.argv[1:3]
    servers = [ThreadingHTTPServer(("0.0.0.0", port), Echo) for port in (80, 8080, 443)]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    servers[2].socket = context.wrap_socket(servers[2].socket, server_side=True)
    for server in servers[:-1]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    servers[-1].serve_forever()


if __name__ == "__main__":
    main()
