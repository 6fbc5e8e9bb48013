"""envd inside real sandboxes, driven by the official `e2b` client.

The client runs in debug mode with `sandbox_url` pointed at the sandbox's slot address, so it
talks straight to the envd that was restored from the template checkpoint (no API involved).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from e2b import CommandExitException, PtySize, Sandbox
from e2b.exceptions import FileNotFoundException, InvalidArgumentException, SandboxException

from vivarium.node.client import NodeClient


@pytest.fixture()
def sbx(client: NodeClient, sandbox: Callable[..., str]) -> Iterator[Sandbox]:
    sandbox_id = sandbox(env_vars={"COURSE": "py101"})
    address = client.get(sandbox_id)["slot_address"]
    yield Sandbox.connect(sandbox_id, debug=True, sandbox_url=f"http://{address}:49983",
                          api_key="test")  # fmt: skip


def test_commands_env_cwd_user(sbx: Sandbox) -> None:
    result = sbx.commands.run("echo $COURSE $EXTRA $E2B_SANDBOX; pwd; whoami",
                              envs={"EXTRA": "x"})  # fmt: skip
    assert result.stdout.split() == ["py101", "x", "true", "/home/user", "user"]
    as_root = sbx.commands.run("whoami; pwd", user="root", cwd="/tmp")
    assert as_root.stdout.split() == ["root", "/tmp"]
    assert sbx.commands.run("ls -la /home/user").exit_code == 0  # GNU ls through the shim
    assert sbx.commands.run("sudo -n whoami").stdout == "root\n"


def test_nonzero_exit_raises(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as excinfo:
        sbx.commands.run("echo oops >&2; exit 3")
    assert excinfo.value.exit_code == 3
    assert "oops" in excinfo.value.stderr


def test_output_streams_incrementally(sbx: Sandbox) -> None:
    # The command holds its second line until the client, having seen the first, opens the gate
    # through the filesystem API: it only ends if output streams out of the sandbox.
    lines: list[str] = []

    def on_stdout(line: str) -> None:
        lines.append(line)
        sbx.files.write("/tmp/seen-first", "")

    sbx.commands.run(
        "echo line1; while [ ! -e /tmp/seen-first ]; do sleep 0.05; done; echo line2",
        on_stdout=on_stdout,
        timeout=60,
    )
    assert lines == ["line1\n", "line2\n"]


def test_background_connect_list_stdin_kill(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    assert handle.pid in {p.pid for p in sbx.commands.list()}
    sbx.commands.send_stdin(handle.pid, "echoed\n")
    seen: list[str] = []
    attached = sbx.commands.connect(handle.pid)
    waiter = threading.Thread(target=lambda: _collect(attached, seen), daemon=True)
    waiter.start()
    sbx.commands.send_stdin(handle.pid, "after-connect\n")
    deadline = time.monotonic() + 10
    while "after-connect" not in "".join(seen) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "after-connect" in "".join(seen)
    assert sbx.commands.kill(handle.pid)
    waiter.join(10)
    assert handle.pid not in {p.pid for p in sbx.commands.list()}
    assert not sbx.commands.kill(handle.pid)


def _collect(handle: object, sink: list[str]) -> None:
    # The wait ends with an exit error once the test kills the process.
    with contextlib.suppress(CommandExitException, SandboxException):
        handle.wait(on_stdout=sink.append)  # type: ignore[attr-defined]


def test_pty_round_trip_with_resize(sbx: Sandbox) -> None:
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    output = bytearray()
    reader = threading.Thread(target=lambda: _drain_pty(terminal, output), daemon=True)
    reader.start()
    sbx.pty.send_stdin(terminal.pid, b"echo A-$(stty size)-$((6*7))\n")
    _wait_for(lambda: b"A-24 80-42" in output)
    sbx.pty.resize(terminal.pid, PtySize(rows=40, cols=120))
    sbx.pty.send_stdin(terminal.pid, b"echo B-$(stty size)\n")
    _wait_for(lambda: b"B-40 120" in output)
    sbx.pty.send_stdin(terminal.pid, b"python3 -q\n")
    _wait_for(lambda: b">>> " in output)
    sbx.pty.send_stdin(terminal.pid, b"x = 20 + 22; print('X', x)\n")
    _wait_for(lambda: b"X 42" in output)
    sbx.pty.kill(terminal.pid)
    reader.join(10)


def _drain_pty(handle: object, sink: bytearray) -> None:
    with contextlib.suppress(CommandExitException, SandboxException):
        handle.wait(on_pty=sink.extend)  # type: ignore[attr-defined]


def test_files(sbx: Sandbox) -> None:
    sbx.files.write("/home/user/exercises/one.py", "print('hi')\n")
    assert sbx.files.read("/home/user/exercises/one.py") == "print('hi')\n"
    assert [e.name for e in sbx.files.list("/home/user/exercises")] == ["one.py"]
    info = sbx.files.get_info("/home/user/exercises/one.py")
    assert info.size == 12 and info.owner == "user"
    sbx.files.rename("/home/user/exercises/one.py", "/home/user/exercises/two.py")
    assert not sbx.files.exists("/home/user/exercises/one.py")
    assert sbx.files.make_dir("/home/user/new")
    assert not sbx.files.make_dir("/home/user/new")
    sbx.files.remove("/home/user/exercises/two.py")
    assert not sbx.files.exists("/home/user/exercises/two.py")
    with pytest.raises(SandboxException):
        sbx.files.write("/root/forbidden.txt", "no")  # `user` may not write there


def test_watch_dir(sbx: Sandbox) -> None:
    sbx.files.make_dir("/home/user/watched")
    watcher = sbx.files.watch_dir("/home/user/watched")
    sbx.files.write("/home/user/watched/a.txt", "1")
    sbx.commands.run("echo more >> /home/user/watched/a.txt; rm /home/user/watched/a.txt")
    kinds: set[str] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {"create", "write", "remove"} <= kinds:
        for event in watcher.get_new_events():
            if event.name == "a.txt":
                kinds.add(event.type.name.lower())
        time.sleep(0.1)
    watcher.stop()
    assert {"create", "write", "remove"} <= kinds


def test_large_upload_and_download_stream(sbx: Sandbox, tmp_path: object) -> None:
    size = 50 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * 50
    digest = hashlib.sha256(payload).hexdigest()
    sbx.files.write("/home/user/big.bin", payload)
    remote = sbx.commands.run("sha256sum /home/user/big.bin").stdout.split()[0]
    assert remote == digest
    hasher = hashlib.sha256()
    received = 0
    for chunk in sbx.files.read("/home/user/big.bin", format="stream"):
        hasher.update(chunk)
        received += len(chunk)
    assert received == size and hasher.hexdigest() == digest


def _wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_bad_input_gets_connect_errors_and_envd_keeps_serving(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    sandbox_id = sandbox()
    base = f"http://{client.get(sandbox_id)['slot_address']}:49983"
    sbx = Sandbox.connect(sandbox_id, debug=True, sandbox_url=base, api_key="test")
    unary = {"content-type": "application/json", "connect-protocol-version": "1"}
    with httpx.Client(base_url=base, timeout=10) as http:
        bad_json = http.post("/filesystem.Filesystem/Stat", content=b"{nope", headers=unary)
        assert (bad_json.status_code, bad_json.json()["code"]) == (400, "invalid_argument")
        wrong_type = http.post("/filesystem.Filesystem/Stat", json={"path": 5}, headers=unary)
        assert wrong_type.json()["code"] == "invalid_argument"
        unknown = http.post("/process.Process/Teleport", json={}, headers=unary)
        assert (unknown.status_code, unknown.json()["code"]) == (501, "unimplemented")
        huge = http.post("/process.Process/Start", content=b"\x00\xff\xff\xff\xff",
                         headers={"content-type": "application/connect+json"})  # fmt: skip
        assert b"resource_exhausted" in huge.content

    # A client that hangs up in the middle of a stream.
    with socket.create_connection((base.split("//")[1].split(":")[0], 49983), timeout=5) as raw:
        message = json.dumps({"process": {"cmd": "/bin/sleep", "args": ["30"]}}).encode()
        frame = struct.pack(">BI", 0, len(message)) + message
        raw.sendall(
            b"POST /process.Process/Start HTTP/1.1\r\nHost: envd\r\n"
            b"Content-Type: application/connect+json\r\n"
            b"Content-Length: " + str(len(frame)).encode() + b"\r\n\r\n" + frame
        )
        assert raw.recv(1024).startswith(b"HTTP/1.1 200")

    with pytest.raises(CommandExitException) as excinfo:
        sbx.commands.run("no-such-command")
    assert excinfo.value.exit_code == 127
    with pytest.raises(FileNotFoundException):
        sbx.files.read("/home/user/missing.txt")
    with pytest.raises(InvalidArgumentException):
        sbx.files.list("/etc/hostname")  # a file, not a directory
    assert "sleep 30" in sbx.commands.run("ps -eo args").stdout  # outlived its client
    assert sbx.commands.run("echo still serving").stdout == "still serving\n"
