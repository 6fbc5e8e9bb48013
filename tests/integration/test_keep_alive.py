"""The API and the node socket keep an idle connection open longer than clients keep theirs
(httpx and uvicorn both default to 5 s), so that the client closes it first: with both at 5 s,
a request sent just as the server closed its connection failed on a loaded host."""

from __future__ import annotations

import socket
import time

from tests.integration.support import Server

PAST_CLIENT_KEEP_ALIVE_S = 7


def _health(conn: socket.socket) -> bytes:
    conn.sendall(b"GET /health HTTP/1.1\r\nHost: vivarium\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return head.split(b"\r\n", 1)[0]


def test_idle_connections_outlive_the_clients_keep_alive(server: Server) -> None:
    api = socket.create_connection(("127.0.0.1", int(server.env["VIVARIUM_API_PORT"])), 60)
    node = socket.socket(socket.AF_UNIX)
    node.settimeout(60)
    node.connect(str(server.socket))
    with api, node:
        for conn in (api, node):
            assert _health(conn) == b"HTTP/1.1 200 OK"
        time.sleep(PAST_CLIENT_KEEP_ALIVE_S)
        for conn in (api, node):  # the same connections, still open
            assert _health(conn) == b"HTTP/1.1 200 OK"
