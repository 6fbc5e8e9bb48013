"""Pausing a sandbox while TCP connections keep being opened to it and from it.

Connections over the sandbox's interface that are being opened, open or closing at the save are
cut (runsc's --net-disconnect-ok): whatever the traffic, every pause succeeds, and the sandbox
resumes serving. Clients on the host hammer a server inside with new connections during every
pause; in the second test a program inside also keeps connecting out.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox

from tests.integration.support import Server, running_server, sdk_options

pytestmark = pytest.mark.timeout(1200)

API_PORT = 3115  # proxy on API_PORT + 1000
CYCLES = int(os.environ.get("VIVARIUM_RACE_CYCLES", "5"))
HAMMERS = 4  # host threads opening connections to the server inside, back to back
PORT = 8000

# Answers each connection once its client has sent everything (so the client closes first, as
# HTTP clients and the proxy do).
SERVER = f"""
import socketserver
class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        while self.request.recv(4096):
            pass
        self.request.sendall(b"ok")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""
# Keeps connecting out to its gateway, which drops the SYNs (nothing there is reachable):
# at any moment a connection is being opened.
CONNECTOR = """
import socket, time
while True:
    s = socket.socket()
    s.settimeout(0.05)
    try:
        s.connect(("169.254.0.22", 9))
    except OSError:
        pass
    s.close()
    time.sleep(0.005)
"""


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server("race", "vw", "10.244.0.0/24", API_PORT) as srv:
        yield srv


_opts = sdk_options


class Hammer:
    """Host threads opening connections to the sandbox's server at its current slot address,
    counting what happened to each (answered, refused, failed otherwise)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.seen: Counter[str] = Counter()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(HAMMERS)]

    def __enter__(self) -> Hammer:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with socket.create_connection((self.address, PORT), timeout=2) as conn:
                    conn.sendall(b"ping")
                    conn.shutdown(socket.SHUT_WR)
                    answer = conn.recv(16)
                self.seen["answered" if answer == b"ok" else "cut"] += 1
            except ConnectionRefusedError:
                self.seen["refused"] += 1
                time.sleep(0.01)
            except OSError:
                self.seen["failed"] += 1
                time.sleep(0.01)

    def wait_answered(self, timeout: float = 30) -> None:
        start = self.seen["answered"]
        deadline = time.monotonic() + timeout
        while self.seen["answered"] < start + 5:
            assert time.monotonic() < deadline, f"the server inside stopped answering: {self.seen}"
            time.sleep(0.05)


def _pause(srv: Server, sandbox_id: str) -> httpx.Response:
    headers = {"X-API-Key": _opts(srv)["api_key"]}
    return httpx.post(f"http://127.0.0.1:{API_PORT}/sandboxes/{sandbox_id}/pause",
                      headers=headers, timeout=120)  # fmt: skip


def _state(srv: Server, sandbox_id: str) -> str:
    headers = {"X-API-Key": _opts(srv)["api_key"]}
    row = httpx.get(f"http://127.0.0.1:{API_PORT}/sandboxes/{sandbox_id}", headers=headers)
    assert row.status_code == 200, f"the sandbox is gone: {row.text}"
    return str(row.json()["state"])


def _address(srv: Server, sandbox_id: str) -> str:
    with srv.client() as client:
        return str(client.get(sandbox_id)["slot_address"])


def _cycles(srv: Server, sbx: Sandbox, outbound: bool) -> Counter[str]:
    """Pause under fire, CYCLES times; resume after each successful pause."""
    outcomes: Counter[str] = Counter()
    for cycle in range(CYCLES):
        with Hammer(_address(srv, sbx.sandbox_id)) as hammer:
            hammer.wait_answered()
            response = _pause(srv, sbx.sandbox_id)
            during = dict(hammer.seen)
        assert response.status_code == 204, f"cycle {cycle}: {response.text}"
        outcomes["paused"] += 1
        assert _state(srv, sbx.sandbox_id) == "paused"
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=300, **_opts(srv))  # type: ignore[arg-type]
        # It runs again, with its server and (if started) its connector.
        assert sbx.commands.run("echo alive").stdout == "alive\n"
        processes = sbx.commands.run("ps -eo args").stdout
        assert "server.py" in processes
        assert not outbound or "connector.py" in processes
        with Hammer(_address(srv, sbx.sandbox_id)) as hammer:
            hammer.wait_answered()
        outcomes["connections cut or refused during pauses"] += (
            during.get("refused", 0) + during.get("failed", 0) + during.get("cut", 0)
        )
    with srv.client() as client:
        lost = [e for e in client.info()["events"] if e["sandbox_id"] == sbx.sandbox_id]
    assert lost == [], lost
    print(f"{'with' if outbound else 'without'} outbound connections: {dict(outcomes)}")
    return outcomes


def _start(srv: Server, outbound: bool) -> Sandbox:
    sbx = Sandbox.create(timeout=300, **_opts(srv))  # type: ignore[arg-type]
    sbx.files.write("/home/user/server.py", SERVER)
    sbx.commands.run("python3 /home/user/server.py", background=True, timeout=0)
    if outbound:
        sbx.files.write("/home/user/connector.py", CONNECTOR)
        sbx.commands.run("python3 /home/user/connector.py", background=True, timeout=0)
    deadline = time.monotonic() + 30
    while f":{PORT:04X} " not in sbx.commands.run("cat /proc/net/tcp").stdout:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    return sbx


def test_pause_while_clients_keep_connecting_always_succeeds(server: Server) -> None:
    sbx = _start(server, outbound=False)
    try:
        outcomes = _cycles(server, sbx, outbound=False)
        assert outcomes["paused"] == CYCLES, outcomes
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(sbx.sandbox_id, **_opts(server))  # type: ignore[arg-type]


def test_pause_while_the_sandbox_also_keeps_connecting_out_always_succeeds(server: Server) -> None:
    sbx = _start(server, outbound=True)
    try:
        outcomes = _cycles(server, sbx, outbound=True)
        assert outcomes["paused"] == CYCLES, outcomes
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(sbx.sandbox_id, **_opts(server))  # type: ignore[arg-type]
