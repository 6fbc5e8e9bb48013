"""Servers listening inside a sandbox and pause: this gVisor cannot checkpoint a listening TCP
socket that an epoll instance watches (asyncio, Node.js, most servers), and a failed checkpoint
takes the whole sandbox down. So such a pause is refused up front and the sandbox runs on; a
server that waits with poll() or accept() (Python's http.server) pauses and serves again."""

from __future__ import annotations

import time

import pytest
from e2b import Sandbox

from tests.integration.support import Server
from tests.pause.conftest import opts as _opts

pytestmark = pytest.mark.timeout(180)

EVENT_LOOP_SERVER = (
    "import asyncio\n"
    "async def main():\n"
    "    server = await asyncio.start_server(lambda r, w: w.close(), '0.0.0.0', 8000)\n"
    "    await server.serve_forever()\n"
    "asyncio.run(main())\n"
)
POLL_SERVER = (
    "import http.server\n"
    "http.server.ThreadingHTTPServer(('0.0.0.0', 8001),\n"
    "                                http.server.SimpleHTTPRequestHandler).serve_forever()\n"
)


def _listening(sbx: Sandbox, port: int) -> bool:
    return f":{port:04X} " in sbx.commands.run("cat /proc/net/tcp").stdout


def _wait_listening(sbx: Sandbox, port: int) -> None:
    deadline = time.monotonic() + 30
    while not _listening(sbx, port):
        assert time.monotonic() < deadline, f"nothing listens on {port}"
        time.sleep(0.2)


def test_event_loop_listener_refuses_pause_and_keeps_the_sandbox(server: Server) -> None:
    sbx = Sandbox.create(timeout=120, **_opts(server))  # type: ignore[arg-type]
    try:
        sbx.files.write("/home/user/state.txt", "kept")
        sbx.files.write("/home/user/loop_server.py", EVENT_LOOP_SERVER)
        sbx.commands.run("python3 /home/user/loop_server.py", background=True)
        _wait_listening(sbx, 8000)
        with pytest.raises(Exception, match="listens on TCP port 8000"):
            sbx.pause()
        # Refused before anything was stopped: the sandbox, its files and its server are there.
        assert sbx.is_running()
        assert sbx.files.read("/home/user/state.txt") == "kept"
        assert _listening(sbx, 8000)
        sbx.commands.run("pkill -f '[l]oop_server.py'")
        deadline = time.monotonic() + 10
        while _listening(sbx, 8000):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A server that waits with poll() saves fine, and serves again after the resume.
        sbx.files.write("/home/user/poll_server.py", POLL_SERVER)
        sbx.commands.run("cd /home/user && python3 poll_server.py", background=True)
        _wait_listening(sbx, 8001)
        time.sleep(0.5)  # the probe's own connection has closed
        assert sbx.pause() is True
        resumed = Sandbox.connect(sbx.sandbox_id, **_opts(server))  # type: ignore[arg-type]
        fetched = resumed.commands.run("curl -s http://127.0.0.1:8001/state.txt", timeout=30)
        assert fetched.stdout == "kept"
    finally:
        Sandbox.kill(sbx.sandbox_id, **_opts(server))  # type: ignore[arg-type]
