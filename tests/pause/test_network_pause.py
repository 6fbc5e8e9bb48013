"""Pause never refuses because of networking: servers of every kind, a connection open inside the
sandbox, a connection to the outside and a response streaming through the proxy, each paused and
resumed with the official client.

Connections inside the sandbox (loopback) are saved and carry on after the resume. One that
crosses the sandbox's interface is cut at the save, as closing a laptop's lid would: its ends see
a clean error, and the program inside reconnects.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import Sandbox

from tests.integration.support import Server, outside_host, running_server, sdk_options

pytestmark = pytest.mark.timeout(900)

API_PORT = 3118  # proxy on API_PORT + 1000
# A host "on the internet" in a namespace of its own, with an echo server the sandbox dials.
OUT_NS = "vn-out"
OUT_HOST_IF = "vn-out0"
OUT_GATEWAY = "10.246.0.1"
OUT_ADDR = "10.246.0.2"
OUT_PORT = 7000
SILENT_PORT = 7009  # the outside host drops SYNs to it: a connection there stays half-open
ECHO = (
    "import socketserver\n"
    "class H(socketserver.StreamRequestHandler):\n"
    "    def handle(self):\n"
    "        for line in self.rfile:\n"
    "            self.wfile.write(line)\n"
    "socketserver.ThreadingTCPServer.allow_reuse_address = True\n"
    f"socketserver.ThreadingTCPServer(('0.0.0.0', {OUT_PORT}), H).serve_forever()\n"
)

ASYNCIO_ECHO = """
import asyncio
async def echo(reader, writer):
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
async def main():
    server = await asyncio.start_server(echo, "0.0.0.0", 8000)
    await server.serve_forever()
asyncio.run(main())
"""
STARLETTE_APP = """
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
hits = 0
async def home(request):
    global hits
    hits += 1
    return PlainTextResponse(f"starlette {hits}")
app = Starlette(routes=[Route("/", home)])
"""
THREADED = """
import http.server
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"threaded"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8002), H).serve_forever()
"""
# Keeps one connection open and talks over it; writes "<local port> <exchanges> <errors>" after
# every exchange, and reconnects after an error (how it saw the cut is logged).
TALKER = """
import socket, sys, time
host, port, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
count = errors = 0
while True:
    try:
        conn = socket.create_connection((host, port), timeout=5)
        reader = conn.makefile("rb")
        while True:
            conn.sendall(b"ping\\n")
            if reader.readline() != b"ping\\n":
                raise ConnectionError("short answer")
            count += 1
            with open(out + ".tmp", "w") as f:
                f.write(f"{conn.getsockname()[1]} {count} {errors}")
            import os; os.replace(out + ".tmp", out)
            time.sleep(0.05)
    except OSError as exc:
        errors += 1
        with open(out + ".err", "a") as f:
            f.write(type(exc).__name__ + "\\n")
        time.sleep(0.2)
"""
STREAMER = """
import http.server, time
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(600):
            chunk = f"{i}\\n".encode()
            self.wfile.write(f"{len(chunk):x}\\r\\n".encode() + chunk + b"\\r\\n")
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"0\\r\\n\\r\\n")
http.server.ThreadingHTTPServer(("0.0.0.0", 8003), H).serve_forever()
"""


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@pytest.fixture(scope="module")
def outside() -> Iterator[str]:
    with outside_host(OUT_NS, OUT_HOST_IF, OUT_GATEWAY, [OUT_ADDR], 30,
                      [sys.executable, "-c", ECHO]):  # fmt: skip
        subprocess.run(["ip", "netns", "exec", OUT_NS, "iptables", "-A", "INPUT", "-p", "tcp",
                        "--dport", str(SILENT_PORT), "-j", "DROP"], check=True)  # fmt: skip
        yield OUT_ADDR


@pytest.fixture(scope="module")
def server(outside: str) -> Iterator[Server]:
    with running_server("netpause", "ve", "10.245.0.0/24", API_PORT,
                        egress_allow=f"{outside}/32") as srv:  # fmt: skip
        yield srv


def _get(srv: Server, sandbox_id: str, port: int) -> httpx.Response:
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)}
    return httpx.get(f"{sdk_options(srv)['sandbox_url']}/", headers=headers, timeout=10)


def _wait(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # not there yet (no file, no listener): look again
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _first_line(url: str, headers: dict[str, str]) -> str:
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        return next(response.iter_lines()) if response.status_code == 200 else ""


def _talk(sbx: Sandbox, name: str) -> tuple[int, int, int]:
    port, count, errors = sbx.files.read(f"/home/user/{name}").split()
    return int(port), int(count), int(errors)


def test_servers_and_open_connections_pause_resume_and_keep_working(server: Server) -> None:
    opts = sdk_options(server)
    sbx = Sandbox.create(timeout=300, **opts)  # type: ignore[arg-type]
    try:
        for name, code in (("asyncio_echo.py", ASYNCIO_ECHO), ("app.py", STARLETTE_APP),
                           ("threaded.py", THREADED), ("talker.py", TALKER)):  # fmt: skip
            sbx.files.write(f"/home/user/{name}", code)
        sbx.commands.run("python3 asyncio_echo.py", background=True, timeout=0, cwd="/home/user")
        sbx.commands.run("python3 -m uvicorn --host 0.0.0.0 --port 8001 app:app",
                         background=True, timeout=0, cwd="/home/user",
                         envs={"PYTHONPATH": "/opt/vivarium/lib"})  # fmt: skip
        sbx.commands.run("python3 threaded.py", background=True, timeout=0, cwd="/home/user")
        _wait(lambda: _get(server, sbx.sandbox_id, 8001).text == "starlette 1", "uvicorn")
        _wait(lambda: _get(server, sbx.sandbox_id, 8002).text == "threaded", "http.server")
        sbx.commands.run("python3 talker.py 127.0.0.1 8000 inside", background=True, timeout=0,
                         cwd="/home/user")  # fmt: skip
        sbx.commands.run(f"python3 talker.py {OUT_ADDR} {OUT_PORT} outside", background=True,
                         timeout=0, cwd="/home/user")  # fmt: skip
        _wait(lambda: _talk(sbx, "inside")[1] > 5, "the connection inside")
        _wait(lambda: _talk(sbx, "outside")[1] > 5, "the connection to the outside")
        inside_port, _, _ = _talk(sbx, "inside")

        assert sbx.pause() is True
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)  # type: ignore[arg-type]

        # The event-loop servers answer again, with their state (uvicorn's counter).
        assert _get(server, sbx.sandbox_id, 8001).text == "starlette 2"
        assert _get(server, sbx.sandbox_id, 8002).text == "threaded"
        echo = resumed.commands.run(
            "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', 8000)); "
            "s.sendall(b'hi\\n'); print(s.recv(3).decode(), end='')\""
        )
        assert echo.stdout == "hi\n"
        # The loopback connection was saved: the same one carries on, without an error.
        _, before, _ = _talk(resumed, "inside")
        _wait(lambda: _talk(resumed, "inside")[1] > before + 5, "the saved connection")
        port, _, errors = _talk(resumed, "inside")
        assert (port, errors) == (inside_port, 0)
        # The outside connection was cut at the pause: a clean error, then a new connection.
        _wait(lambda: _talk(resumed, "outside")[2] >= 1, "the outside connection's cut")
        _, before, _ = _talk(resumed, "outside")
        _wait(lambda: _talk(resumed, "outside")[1] > before + 5, "a new outside connection")
        seen = set(resumed.files.read("/home/user/outside.err").split())
        assert seen <= {"ConnectionResetError", "BrokenPipeError", "ConnectionError",
                        "TimeoutError", "ConnectionAbortedError"}, seen  # fmt: skip
    finally:
        Sandbox.kill(sbx.sandbox_id, **opts)  # type: ignore[arg-type]


def test_a_response_streaming_through_the_proxy_is_cut_cleanly_by_a_pause(server: Server) -> None:
    opts = sdk_options(server)
    sbx = Sandbox.create(timeout=300, **opts)  # type: ignore[arg-type]
    try:
        sbx.files.write("/home/user/streamer.py", STREAMER)
        sbx.commands.run("python3 streamer.py", background=True, timeout=0, cwd="/home/user")
        headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8003"}
        url = f"{opts['sandbox_url']}/"
        _wait(lambda: _first_line(url, headers) == "0", "the streamer")
        lines: list[str] = []
        outcome: list[BaseException | None] = []

        def stream() -> None:
            try:
                with httpx.stream("GET", url, headers=headers, timeout=30) as response:
                    assert response.status_code == 200
                    for line in response.iter_lines():
                        lines.append(line)
                outcome.append(None)
            except BaseException as exc:  # what the client saw is the point
                outcome.append(exc)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        _wait(lambda: len(lines) > 10, "streamed lines")
        assert sbx.pause() is True
        thread.join(30)
        assert not thread.is_alive(), "the client hangs after the pause"
        assert isinstance(outcome[-1], httpx.HTTPError), outcome
        assert len(lines) < 600
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)  # type: ignore[arg-type]
        assert _first_line(url, headers) == "0"
        assert resumed.commands.run("echo alive").stdout == "alive\n"
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(sbx.sandbox_id, **opts)  # type: ignore[arg-type]


# Dials a peer that never answers, over and over: at any moment a connection is being opened.
# Writes what each attempt ended with.
DIALER = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
while True:
    try:
        socket.create_connection((host, port), timeout=30)
        outcome = "connected"
    except OSError as exc:
        outcome = type(exc).__name__
    with open("/home/user/dialer.log", "a") as f:
        f.write(outcome + "\\n")
"""


def test_a_connection_being_opened_does_not_stop_a_pause(server: Server) -> None:
    opts = sdk_options(server)
    sbx = Sandbox.create(timeout=300, **opts)  # type: ignore[arg-type]
    try:
        sbx.files.write("/home/user/dialer.py", DIALER)
        sbx.files.write("/home/user/kept.txt", "kept")
        sbx.commands.run(f"python3 dialer.py {OUT_ADDR} {SILENT_PORT}", background=True, timeout=0,
                         cwd="/home/user")  # fmt: skip
        ss = sbx.commands.run("sleep 0.5; cat /proc/net/tcp").stdout
        assert " 02 " in ss, "no connection in SYN-SENT inside the sandbox"  # st 02 = SYN_SENT

        assert sbx.pause() is True
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)  # type: ignore[arg-type]
        assert resumed.files.read("/home/user/kept.txt") == "kept"
        # The half-open connection was refused at the pause: the dialer saw a clean error and
        # keeps dialing.
        _wait(lambda: resumed.files.read("/home/user/dialer.log").split(), "the dialer's error")
        seen = set(resumed.files.read("/home/user/dialer.log").split())
        assert seen <= {"ConnectionRefusedError", "ConnectionResetError",
                        "ConnectionAbortedError", "TimeoutError"}, seen  # fmt: skip
        assert "dialer.py" in resumed.commands.run("ps -eo args").stdout
        assert resumed.commands.run("echo alive").stdout == "alive\n"
    finally:
        with contextlib.suppress(Exception):
            Sandbox.kill(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
