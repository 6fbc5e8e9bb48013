"""envd's process.Process service, driven by the official `e2b` client (plus a few raw Connect
calls for wire details the client hides: keepalives, tags, error codes)."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize
from e2b.sandbox_sync.commands.command_handle import CommandHandle

from tests.envd.conftest import ENVD_PIDS, run_envd
from tests.envd.connect_wire import connect_stream, envelope

pytestmark = pytest.mark.timeout(300)


def _running(marker: str) -> list[int]:
    """Host pids whose command line contains marker (envd runs on this host)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker.encode() in cmdline and state != "Z":
                pids.append(int(entry))
    return pids


def _eventually(check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# --- commands.run -------------------------------------------------------------------------------


def test_run_with_envs_cwd_and_user_environment(sbx: Sandbox) -> None:
    result = sbx.commands.run(
        'echo "$FOO|$PWD|$HOME|$USER|$E2B_SANDBOX"; echo oops >&2',
        envs={"FOO": "bar baz"},
        cwd="/tmp",
    )
    assert result.exit_code == 0
    assert result.stdout == "bar baz|/tmp|/root|root|true\n"
    assert result.stderr == "oops\n"
    assert result.error is None


def test_default_cwd_is_home_and_relative_cwd_is_under_it(sbx: Sandbox) -> None:
    assert sbx.commands.run("pwd").stdout == "/root\n"
    os.makedirs("/root/.cache", exist_ok=True)
    assert sbx.commands.run("pwd", cwd=".cache").stdout == "/root/.cache\n"
    assert sbx.commands.run("pwd", cwd="~/.cache").stdout == "/root/.cache\n"


def test_runs_as_the_requested_user(sbx: Sandbox) -> None:
    result = sbx.commands.run("id -u; id -g; echo $USER $LOGNAME", user="nobody", cwd="/tmp")
    uid, gid, names = result.stdout.splitlines()
    assert (uid, names) == ("65534", "nobody nobody")
    assert gid != "0"


def test_nonzero_exit_raises_with_code_and_stderr(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; echo boom >&2; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "boom\n"
    assert info.value.error == "exit status 3"


def test_on_stdout_receives_output_as_it_is_produced(sbx: Sandbox, tmp_path: Path) -> None:
    # The command holds its last line until the client has seen the first one: it only ends if
    # output streams, whatever the machine's speed (a buffered stream times out instead).
    gate = tmp_path / "seen-first"
    chunks: list[str] = []
    errors: list[str] = []

    def on_stdout(chunk: str) -> None:
        chunks.append(chunk)
        gate.touch()

    sbx.commands.run(
        f"echo tick1; echo err1 >&2; while [ ! -e {gate} ]; do sleep 0.05; done; echo tick2",
        on_stdout=on_stdout,
        on_stderr=errors.append,
        timeout=60,
    )
    assert "".join(chunks) == "tick1\ntick2\n"
    assert chunks[0] == "tick1\n"
    assert "".join(errors) == "err1\n"


def test_stdin_is_dev_null_unless_requested(sbx: Sandbox) -> None:
    # `cat` would hang on an open pipe; with /dev/null it sees EOF at once.
    assert sbx.commands.run("cat; echo done", timeout=60).stdout == "done\n"


def test_background_grandchild_holding_stdout_does_not_delay_the_end(sbx: Sandbox) -> None:
    # The grandchild outlives the command's timeout: waiting for it would raise instead.
    result = sbx.commands.run("sleep 300 & echo $!", timeout=60)
    grandchild = int(result.stdout)
    sbx.commands.run(f"kill {grandchild}")


def test_large_output_arrives_complete(sbx: Sandbox) -> None:
    result = sbx.commands.run("head -c 3000000 /dev/zero | tr '\\0' x; echo")
    assert result.stdout == "x" * 3_000_000 + "\n"


# --- stdin --------------------------------------------------------------------------------------


def test_send_stdin_and_close_stdin(sbx: Sandbox) -> None:
    handle = sbx.commands.run(
        "read first; echo got:$first; cat | tr a-z A-Z", background=True, stdin=True
    )
    sbx.commands.send_stdin(handle.pid, "hello\n")
    handle.send_stdin(b"more ")
    sbx.commands.send_stdin(handle.pid, "text\n")
    sbx.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "got:hello\nMORE TEXT\n"


def test_stream_input(sbx: Sandbox) -> None:
    handle = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(handle.pid, ["one\n", b"two\n", "three\n"])
    sbx.commands.close_stdin(handle.pid)
    assert handle.wait().stdout == "one\ntwo\nthree\n"


def test_send_stdin_without_a_stdin_pipe_fails(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 10", background=True)
    try:
        with pytest.raises(SandboxException, match="stdin"):
            sbx.commands.send_stdin(handle.pid, "x")
    finally:
        handle.kill()


# --- background, connect, list, kill ------------------------------------------------------------


def test_background_connect_after_disconnect_and_kill(sbx: Sandbox) -> None:
    marker = f"mark-{uuid.uuid4().hex[:8]}"
    handle = sbx.commands.run(
        f"echo {marker}; for i in $(seq 1 300); do echo line$i; sleep 0.05; done",
        background=True,
    )
    first = next(iter(handle))
    assert first[0] is not None and marker in first[0]
    handle.disconnect()  # the process must keep running without a client

    time.sleep(0.5)
    assert handle.pid in [p.pid for p in sbx.commands.list()]
    again = sbx.commands.connect(handle.pid)
    seen: list[str] = []
    for stdout, _, _ in again:
        if stdout:
            seen.append(stdout)
        if "line" in "".join(seen):
            break
    assert sbx.commands.kill(handle.pid) is True
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == -1
    assert info.value.error == "signal: killed"
    # Once it ended, it is gone: kill reports "not found".
    assert sbx.commands.kill(handle.pid) is False
    assert handle.pid not in [p.pid for p in sbx.commands.list()]


def test_output_while_detached_is_kept_for_the_next_client(sbx: Sandbox) -> None:
    handle = sbx.commands.run(
        "sleep 0.5; head -c 200000 /dev/zero | tr '\\0' a; echo; echo tail-end", background=True
    )
    handle.disconnect()
    _eventually(lambda: handle.pid not in [p.pid for p in sbx.commands.list()])
    # Finished moments ago: Connect still reaches it and gets the newest 64 KiB it kept.
    result = sbx.commands.connect(handle.pid).wait()
    assert result.stdout.endswith("aaaa\ntail-end\n")
    assert len(result.stdout) == 64 * 1024


def test_two_clients_see_the_same_output(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 0.5; echo shared; sleep 0.2", background=True)
    other = sbx.commands.connect(handle.pid)
    results: dict[str, str] = {}
    thread = threading.Thread(target=lambda: results.update(b=other.wait().stdout))
    thread.start()
    assert handle.wait().stdout == "shared\n"
    thread.join(10)
    assert results == {"b": "shared\n"}


def test_list_shows_running_commands(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 20", background=True, envs={"K": "v"}, cwd="/tmp")
    try:
        info = next(p for p in sbx.commands.list() if p.pid == handle.pid)
        assert info.cmd == "/bin/bash"
        assert info.args == ["-l", "-c", "sleep 20"]
        assert info.envs == {"K": "v"}
        assert info.cwd == "/tmp"
        assert info.tag is None
    finally:
        assert handle.kill()
    # Kill answers once the process is gone: a List right after does not show it.
    assert handle.pid not in [p.pid for p in sbx.commands.list()]
    with pytest.raises(CommandExitException):
        handle.wait()


def test_kill_takes_the_whole_process_group(sbx: Sandbox) -> None:
    marker = f"{40000 + int(uuid.uuid4().int % 10000)}"
    handle = sbx.commands.run(f"sleep {marker} & sleep {marker} & wait", background=True)
    _eventually(lambda: len(_running(f"sleep\0{marker}")) == 2)
    assert handle.kill()
    with pytest.raises(CommandExitException):
        handle.wait()
    _eventually(lambda: not _running(f"sleep\0{marker}"))


def test_command_timeout_kills_the_process(sbx: Sandbox) -> None:
    marker = f"{50000 + int(uuid.uuid4().int % 10000)}"
    with pytest.raises(TimeoutException):
        sbx.commands.run(f"sleep {marker}", timeout=1)
    _eventually(lambda: not _running(f"sleep\0{marker}"))


def test_the_deadline_ends_the_stream_with_deadline_exceeded(envd_url: str) -> None:
    # As connect-go ends envd's stream: the client learns its deadline passed, not the exit
    # status of the process that the deadline killed (the 2.45 client would raise that).
    marker = f"{60000 + int(uuid.uuid4().int % 10000)}"
    frames = list(connect_stream(
        envd_url, "/process.Process/Start",
        {"process": {"cmd": "/bin/sleep", "args": [marker]}},
        headers={"Connect-Timeout-Ms": "500", "Authorization": "Basic cm9vdDo="},
    ))  # fmt: skip
    assert "start" in frames[0]["event"]
    assert not any("end" in f.get("event", {}) for f in frames)
    assert frames[-1]["end_of_stream"]["error"]["code"] == "deadline_exceeded"
    _eventually(lambda: not _running(f"sleep\0{marker}"))


# --- PTY ----------------------------------------------------------------------------------------


class PtyReader:
    """Collects a PTY's output on a thread, so the test can wait for what it expects."""

    def __init__(self, handle: CommandHandle) -> None:
        self.handle = handle
        self.output = bytearray()
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for _, _, pty in self.handle:
                if pty:
                    self.output += pty
        except Exception as exc:  # surfaced by wait_for / the test, not as a thread crash
            self.error = exc

    def wait_for(self, needle: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            assert self.error is None, self.error
            assert time.monotonic() < deadline, f"{needle!r} not in {bytes(self.output)!r}"
            time.sleep(0.02)


def test_pty_input_resize_and_repl(sbx: Sandbox) -> None:
    handle = sbx.pty.create(PtySize(rows=24, cols=80), envs={"MARK": "pty-ok"})
    reader = PtyReader(handle)
    sbx.pty.send_stdin(handle.pid, b"echo A-$(stty size)-$MARK-$TERM; tty\n")
    reader.wait_for(b"A-24 80-pty-ok-xterm-256color")
    reader.wait_for(b"/dev/pts/")

    sbx.pty.resize(handle.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(handle.pid, b"echo B-$(stty size)\n")
    reader.wait_for(b"B-30 100")

    # An interactive program on the terminal: the Python REPL.
    sbx.pty.send_stdin(handle.pid, b"python3 -q\n")
    reader.wait_for(b">>> ")
    sbx.pty.send_stdin(handle.pid, b"print(6 * 7)\n")
    reader.wait_for(b"42\r\n")
    sbx.pty.send_stdin(handle.pid, b"exit()\n")

    sbx.pty.send_stdin(handle.pid, b"exit 0\n")
    reader.thread.join(10)
    assert not reader.thread.is_alive()


def test_pty_ctrl_c_interrupts_the_foreground_job(sbx: Sandbox) -> None:
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    reader = PtyReader(handle)
    try:
        sbx.pty.send_stdin(handle.pid, b"sleep 29.75; echo after-$?\n")
        _eventually(lambda: "sleep 29.75" in sbx.commands.run("ps -eo args", timeout=60).stdout)
        sbx.pty.send_stdin(handle.pid, b"\x03")
        # The quotes keep the terminal's echo of this line from matching the output.
        sbx.pty.send_stdin(handle.pid, b"echo al''ive\n")
        reader.wait_for(b"alive\r\n")
        # ^C killed sleep and, as in a terminal, abandoned the rest of the line.
        assert not re.search(rb"after-\d", reader.output)
    finally:
        assert sbx.pty.kill(handle.pid)
        reader.thread.join(10)


def test_pty_connect_and_kill(sbx: Sandbox) -> None:
    handle = sbx.pty.create(PtySize(rows=24, cols=80))
    handle.disconnect()
    again = sbx.pty.connect(handle.pid)
    reader = PtyReader(again)
    sbx.pty.send_stdin(handle.pid, b"echo re-$((40 + 2))\n")
    reader.wait_for(b"re-42")
    assert sbx.pty.kill(handle.pid)
    reader.thread.join(10)
    assert not reader.thread.is_alive()


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input(sbx: Sandbox) -> None:
    missing = 4_000_000  # above any real pid_max default
    assert sbx.commands.kill(missing) is False
    assert sbx.pty.kill(missing) is False
    with pytest.raises(NotFoundException):
        sbx.commands.send_stdin(missing, "x")
    with pytest.raises(NotFoundException):
        sbx.commands.close_stdin(missing)
    with pytest.raises(NotFoundException):
        sbx.commands.connect(missing)
    with pytest.raises(NotFoundException):
        sbx.pty.resize(missing, PtySize(rows=10, cols=10))
    with pytest.raises(InvalidArgumentException, match="does not exist"):
        sbx.commands.run("true", cwd="/no/such/dir")
    with pytest.raises(SandboxException):
        sbx.commands.run("true", user="no-such-user-xyz")


def test_resize_and_close_stdin_mismatches(sbx: Sandbox) -> None:
    handle = sbx.commands.run("sleep 10", background=True)
    pty = sbx.pty.create(PtySize(rows=24, cols=80))
    try:
        with pytest.raises(SandboxException, match="no PTY"):
            sbx.pty.resize(handle.pid, PtySize(rows=10, cols=10))
        with pytest.raises(SandboxException, match="PTY"):
            sbx.commands.close_stdin(pty.pid)
        with pytest.raises(SandboxException, match="PTY"):
            sbx.commands.send_stdin(pty.pid, "x")
    finally:
        handle.kill()
        pty.kill()


# --- raw Connect: wire details the client does not surface --------------------------------------


def _stream(
    url: str, method: str, message: dict[str, Any], headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    return connect_stream(url, f"/process.Process/{method}", message, headers)


def _unary(url: str, method: str, message: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{url}/process.Process/{method}", json=message, timeout=60)


def _listed(url: str) -> list[int]:
    return [p["pid"] for p in _unary(url, "List", {}).json().get("processes", [])]


def test_keepalive_tag_and_wire_shapes(envd_url: str) -> None:
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    request = {"process": {"cmd": "/bin/sh", "args": ["-c", "sleep 1.6; printf hi; exit 3"]},
               "tag": tag, "stdin": False}  # fmt: skip
    events = _stream(envd_url, "Start", request, {"Keepalive-Ping-Interval": "1"})
    first = next(events)
    pid = first["event"]["start"]["pid"]
    assert first == {"event": {"start": {"pid": pid}}}

    listed = _unary(envd_url, "List", {}).json()["processes"]
    mine = next(p for p in listed if p["pid"] == pid)
    assert mine["tag"] == tag
    assert mine["config"]["args"] == request["process"]["args"]  # type: ignore[index]

    rest = list(events)
    assert {"event": {"keepalive": {}}} in rest
    assert {"event": {"data": {"stdout": base64.b64encode(b"hi").decode()}}} in rest
    end = {"exitCode": 3, "exited": True, "status": "exit status 3", "error": "exit status 3"}
    assert rest[-2] == {"event": {"end": end}}
    assert rest[-1] == {"end_of_stream": {}}


def test_signal_and_connect_by_tag(envd_url: str) -> None:
    tag = f"tag-{uuid.uuid4().hex[:8]}"
    start = _stream(envd_url, "Start", {"process": {"cmd": "sleep", "args": ["20"]}, "tag": tag})
    pid = next(start)["event"]["start"]["pid"]
    attached = _stream(envd_url, "Connect", {"process": {"tag": tag}})
    assert next(attached) == {"event": {"start": {"pid": pid}}}
    response = _unary(envd_url, "SendSignal",
                      {"process": {"tag": tag}, "signal": "SIGNAL_SIGTERM"})  # fmt: skip
    assert response.status_code == 200, response.text
    end = {"event": {"end": {"exitCode": -1, "status": "signal: terminated",
                             "error": "signal: terminated"}}}  # fmt: skip
    assert list(attached)[-2:] == [end, {"end_of_stream": {}}]
    assert list(start)[-2:] == [end, {"end_of_stream": {}}]
    gone = _unary(envd_url, "SendSignal", {"process": {"tag": tag}, "signal": "SIGNAL_SIGKILL"})
    assert (gone.status_code, gone.json()["code"]) == (404, "not_found")


def test_a_stalled_client_holds_the_process_back_until_it_leaves(envd_url: str) -> None:
    # Output back-pressures the process instead of piling up in envd; once the client goes,
    # the process runs on (to completion here). A raw socket with a small receive buffer, so
    # the kernel's socket buffers cannot soak up the output instead.
    body = json.dumps({"process": {"cmd": "head", "args": ["-c", "100000000", "/dev/zero"]}})
    host, port = envd_url.removeprefix("http://").split(":")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.connect((host, int(port)))
        request_frame = envelope(json.loads(body))
        sock.sendall(
            b"POST /process.Process/Start HTTP/1.1\r\nHost: envd\r\n"
            b"Content-Type: application/connect+json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(request_frame), request_frame)
        )
        head = b""
        while b'"pid":' not in head or b"}}}" not in head:
            head += sock.recv(1)
        pid = int(head.split(b'"pid":')[1].split(b"}")[0])
        time.sleep(1.0)
        assert pid in _listed(envd_url), "finished although nobody read its output"
    _eventually(lambda: pid not in _listed(envd_url))


def test_start_errors_are_connect_errors(envd_url: str) -> None:
    def error(request: dict[str, Any]) -> dict[str, Any]:
        frames = list(_stream(envd_url, "Start", request))
        assert len(frames) == 1, frames
        return frames[0]["end_of_stream"]["error"]  # type: ignore[no-any-return]

    missing = error({"process": {"cmd": "/no/such/binary"}})
    assert missing["code"] == "invalid_argument" and "/no/such/binary" in missing["message"]
    assert error({"process": {"args": ["x"]}})["code"] == "invalid_argument"
    assert error({"process": {"cmd": "true", "envs": {"A": 1}}})["code"] == "invalid_argument"
    sleeper = _stream(envd_url, "Start", {"process": {"cmd": "sleep", "args": ["20"]}})
    pid = next(sleeper)["event"]["start"]["pid"]
    for signal in ("SIGNAL_SIGHUP", "SIGNAL_UNSPECIFIED", 1):
        bad = _unary(envd_url, "SendSignal", {"process": {"pid": pid}, "signal": signal})
        assert bad.json()["code"] == "invalid_argument"
    assert _unary(envd_url, "SendSignal", {"process": {"pid": pid}, "signal": 9}).status_code == 200
    assert list(sleeper)[-1] == {"end_of_stream": {}}
    no_selector = _unary(envd_url, "SendSignal", {"signal": "SIGNAL_SIGKILL"})
    assert no_selector.json()["code"] == "invalid_argument"


def test_commands_get_default_signal_dispositions(sbx: Sandbox) -> None:
    # envd's Python ignores SIGPIPE; its children must not inherit that, or `yes | head` fails.
    result = sbx.commands.run("yes | head -1; trap -p")
    assert result.stdout.strip() == "y" and result.stderr == ""


def test_exec_failures_are_reported_as_the_user(envd_url: str) -> None:
    script = f"/tmp/envd-root-only-{uuid.uuid4().hex[:8]}"
    with open(script, "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(script, 0o700)  # root may run it, nobody may not
    as_nobody = {"Authorization": "Basic " + base64.b64encode(b"nobody:").decode()}
    try:
        request = {"process": {"cmd": script, "cwd": "/tmp"}, "stdin": False}
        frames = list(_stream(envd_url, "Start", request, as_nobody))
        error = frames[-1]["end_of_stream"]["error"]
        assert error["code"] == "invalid_argument" and "permission denied" in error["message"]
        frames = list(_stream(envd_url, "Start", request))  # as root: runs
        assert frames[0]["event"]["start"]["pid"] > 0
        request = {"process": {"cmd": "no-such-command-xyz", "cwd": "/tmp"}, "stdin": False}
        error = list(_stream(envd_url, "Start", request))[-1]["end_of_stream"]["error"]
        assert "no such file or directory" in error["message"]
        locked = {"process": {"cmd": "true", "cwd": "/root"}, "stdin": False}
        error = list(_stream(envd_url, "Start", locked, as_nobody))[-1]["end_of_stream"]["error"]
        assert error["code"] == "permission_denied" and "/root" in error["message"]
    finally:
        os.unlink(script)


def test_a_lost_spawner_is_replaced_and_its_processes_still_end() -> None:
    with run_envd() as url:
        sleeper = _stream(url, "Start", {"process": {"cmd": "sleep", "args": ["1"]}})
        pid = next(sleeper)["event"]["start"]["pid"]
        envd = ENVD_PIDS[url]
        helpers = [p for p in _running("vivarium-spawn") if _parent(p) == envd]
        assert len(helpers) == 1
        os.kill(helpers[0], 9)
        # The running command still ends (its exit status is lost with the spawner) ...
        end = [f for f in sleeper if "event" in f][-1]["event"]["end"]
        assert end["status"] == "exit status unknown"
        assert pid not in _running("sleep")
        # ... and the next command gets a new spawner.
        frames = list(_stream(url, "Start", {"process": {"cmd": "echo", "args": ["back"]}}))
        stdout = [f["event"]["data"]["stdout"] for f in frames if "data" in f.get("event", {})]
        assert base64.b64decode("".join(stdout)) == b"back\n"


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
