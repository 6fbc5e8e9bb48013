"""`vivarium sandbox exec`: run one command in a sandbox, streaming its output as it comes.

Exit codes: a process that exited returns its status; one killed by a signal returns 128 + the
signal number like a shell reports it (137 for SIGKILL), or envd's `exitCode` (-1) when the
signal is not recognised.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import BinaryIO

from vivarium.guest.envd.wire import decode_bytes, encode_bytes

from .transport import Envd, EnvdError, Message, Verify

Sink = Callable[[bytes], None]

INPUT_CHUNK = 256 * 1024  # stdin bytes per SendInput; a third more once base64-encoded

_SIGNALS_BY_NAME = {
    name.lower(): int(sig) for sig in signal.Signals if (name := signal.strsignal(sig)) is not None
}


def process_config(
    cmd: str, args: Sequence[str], cwd: str | None, envs: Mapping[str, str] | None
) -> Message:
    config: Message = {"cmd": cmd, "args": list(args), "envs": dict(envs or {})}
    if cwd is not None:
        config["cwd"] = cwd
    return config


def started(events: Iterator[Message]) -> int:
    for event in events:
        if "start" in event:
            return int(event["start"].get("pid", 0))
        if "keepalive" not in event:
            raise EnvdError("internal", f"expected a start event, got {sorted(event)}")
    raise EnvdError("internal", "the stream ended before the process started")


def exit_code(end: Message) -> int:
    """The shell-style exit code of an `end` event (see the module docstring)."""
    code = int(end.get("exitCode") or 0)  # proto3 JSON omits a zero
    status = str(end.get("status") or "")
    if not end.get("exited") and status.startswith("signal: "):
        sig = _SIGNALS_BY_NAME.get(status.removeprefix("signal: "))
        if sig is not None:
            return 128 + sig
    return code


def _write_to(stream: BinaryIO) -> Sink:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


def run(
    base_url: str,
    headers: Mapping[str, str],
    argv: Sequence[str] | str,
    *,
    user: str | None = "user",
    cwd: str | None = None,
    envs: Mapping[str, str] | None = None,
    stdin: bytes | BinaryIO | None = None,
    timeout: float | None = None,
    on_stdout: Sink | None = None,
    on_stderr: Sink | None = None,
    verify: Verify = True,
) -> int:
    """Run a command in the sandbox, streaming its output to the callbacks (default: this
    process's stdout/stderr) as it comes, and return its exit code.

    A string runs as `/bin/bash -l -c <string>` (as the E2B SDK does); a list runs as is. `stdin`
    (bytes, or a binary file read until EOF) is fed to the process and then closed; without it
    the process's stdin is /dev/null. `user=None` leaves the choice to envd. With `timeout`
    (seconds; None or 0 for none) envd kills the process at the deadline and this raises
    EnvdError("deadline_exceeded"). Ctrl-C (KeyboardInterrupt) kills the remote process too.
    """
    if isinstance(argv, str):
        cmd, args = "/bin/bash", ["-l", "-c", argv]
    elif argv:
        cmd, args = argv[0], list(argv[1:])
    else:
        raise ValueError("argv is empty")
    sinks = {
        "stdout": on_stdout or _write_to(sys.stdout.buffer),
        "stderr": on_stderr or _write_to(sys.stderr.buffer),
    }
    sinks["pty"] = sinks["stdout"]
    request = {"process": process_config(cmd, args, cwd, envs), "stdin": stdin is not None}

    with Envd(base_url, headers, user, verify) as envd:
        events = envd.stream("Start", request, timeout)
        with contextlib.closing(events):
            pid = started(events)
            done = threading.Event()
            if stdin is not None:
                threading.Thread(
                    target=_feed, args=(envd, pid, stdin, done), daemon=True, name="envd-stdin"
                ).start()
            end: Message | None = None
            try:
                for event in events:
                    if "data" in event:
                        for kind, data in event["data"].items():
                            if kind in sinks:
                                sinks[kind](decode_bytes(data))
                    elif "end" in event:
                        end = event["end"]
            except KeyboardInterrupt:
                envd.kill(pid)
                raise
            finally:
                done.set()
    if end is None:
        raise EnvdError("internal", "the stream ended without the process's end")
    return exit_code(end)


def _reader(stdin: BinaryIO) -> Callable[[], bytes]:
    """What a pipe has now, without waiting for a whole chunk. A file with a descriptor is read
    raw: this runs in a daemon thread, and one blocked inside a buffered read holds the buffer's
    lock, which the interpreter takes at exit (a fatal error: "could not acquire lock for
    <stdin> at interpreter shutdown", the command's exit status lost)."""
    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        read = getattr(stdin, "read1", stdin.read)
        return lambda: bytes(read(INPUT_CHUNK))
    return lambda: os.read(fd, INPUT_CHUNK)


def _feed(envd: Envd, pid: int, stdin: bytes | BinaryIO, done: threading.Event) -> None:
    """Send stdin, then close it. Runs beside the output stream: a process that echoes its input
    (`cat`) only reads more once its output is taken."""
    selector = {"pid": pid}
    if isinstance(stdin, bytes | bytearray | memoryview):
        view = memoryview(stdin)
        chunks: Iterator[bytes] = (
            bytes(view[i : i + INPUT_CHUNK]) for i in range(0, len(view), INPUT_CHUNK)
        )
    else:
        chunks = iter(_reader(stdin), b"")
    try:
        for chunk in chunks:
            if done.is_set():
                return
            envd.call("SendInput", {"process": selector, "input": {"stdin": encode_bytes(chunk)}})
        if not done.is_set():
            envd.call("CloseStdin", {"process": selector})
    except (EnvdError, OSError, ValueError):
        # The process exited or closed its input: what it did not read is dropped, as a pipe
        # to an exited reader would.
        return
