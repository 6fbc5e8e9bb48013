"""A small client for a sandbox's envd (`process.Process` over Connect with the JSON codec), for
`vivarium sandbox exec` (`run`) and `vivarium sandbox connect` (`terminal`).

It talks to envd directly or through the sandbox proxy: the caller passes the base URL and the
headers that route and authorize the request (`E2b-Sandbox-Id`, `E2b-Sandbox-Port`,
`X-Access-Token`); the user travels as HTTP Basic `user:` like the E2B clients send it.

Exit codes: a process that exited returns its status; one killed by a signal returns 128 + the
signal number like a shell reports it (137 for SIGKILL), or envd's `exitCode` (-1) when the
signal is not recognised.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import ssl
import struct
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any, BinaryIO

import httpx

from vivarium.errors import VivariumError
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.guest.envd.connect import FLAG_END_STREAM, envelope

Message = dict[str, Any]
Sink = Callable[[bytes], None]

INPUT_CHUNK = 256 * 1024  # stdin bytes per SendInput; a third more once base64-encoded
TERMINAL_READ = 64 * 1024  # one read of local keystrokes (a paste arrives in one go)
UNARY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# envd sends a keepalive on idle streams at least every 25 s (it clamps the interval we ask
# for), so a stream silent for this long has lost its connection.
STREAM_IDLE_S = 120.0
KEEPALIVE_ASK_S = 25
# A PTY has no stdin to close: once local input has ended, the EOF character is sent whenever
# the remote output has been quiet this long, until the remote command ends. Quiet, because a ^D
# that arrives while a shell runs a command (its terminal in canonical mode) can be lost when
# readline takes the terminal back; repeated, because each program reading gets its own EOF.
PTY_EOF = b"\x04"
HANGUP_IDLE_S = 0.5

_SIGNALS_BY_NAME = {
    name.lower(): int(sig) for sig in signal.Signals if (name := signal.strsignal(sig)) is not None
}
# What the sandbox proxy (or anything that is not envd) means by an HTTP error status.
_CODE_BY_STATUS = {
    400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
    404: "not_found", 409: "already_exists", 413: "resource_exhausted",
    429: "resource_exhausted", 499: "canceled", 501: "unimplemented", 502: "unavailable",
    503: "unavailable", 504: "deadline_exceeded",
}  # fmt: skip


class EnvdError(VivariumError):
    """A Connect error from envd (or from the proxy in front of it); `code` is the Connect code
    (`invalid_argument`, `not_found`, `unauthenticated`, `unavailable`, `deadline_exceeded`...).
    A VivariumError, so the CLI prints it as one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"envd: {self.code}: {self.message}"


def proxy_headers(sandbox_id: str, access_token: str | None = None) -> dict[str, str]:
    """The headers that take a request through the sandbox proxy to the sandbox's envd."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
    if access_token:
        headers["X-Access-Token"] = access_token
    return headers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(value: Any) -> bytes:
    if not isinstance(value, str):
        return b""
    # Proto JSON allows URL-safe base64 and omitted padding.
    text = value.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _http_error(response: httpx.Response) -> EnvdError:
    """A non-2xx answer: Connect's `{"code","message"}`, or a proxy's own error shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.text.strip() or response.reason_phrase
    code = _CODE_BY_STATUS.get(response.status_code, "unknown")
    if isinstance(body, dict):
        message = str(body.get("message") or message)
        for key in ("code", "error_code"):  # the proxy sends a numeric code + error_code
            if isinstance(body.get(key), str):
                code = body[key]
                break
    return EnvdError(code, message)


def _stream_error(frame: Message) -> EnvdError | None:
    error = frame.get("error")
    if not isinstance(error, dict):
        return None
    return EnvdError(str(error.get("code") or "unknown"), str(error.get("message") or ""))


Verify = ssl.SSLContext | bool  # httpx's `verify`: True checks against the system's CAs


class _Envd:
    """One HTTP client (kept alive) for one sandbox and user; safe to share between a thread
    reading a stream and one sending input, each request taking its own pooled connection."""

    def __init__(
        self, base_url: str, headers: Mapping[str, str], user: str | None, verify: Verify = True
    ) -> None:
        self.base_url = base_url.rstrip("/")
        sent = {
            **headers,
            "Connect-Protocol-Version": "1",
            # Compression (by a proxy, say) would hold output back until a buffer fills.
            "Accept-Encoding": "identity",
        }
        if user:
            sent["Authorization"] = "Basic " + _b64(f"{user}:".encode())
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=sent,
            timeout=httpx.Timeout(UNARY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            verify=verify,
        )

    def __enter__(self) -> _Envd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.HTTPError) -> EnvdError:
        return EnvdError("unavailable", f"cannot reach envd at {self.base_url}: {exc}")

    def call(self, method: str, message: Message) -> Message:
        try:
            response = self.http.post(
                f"/process.Process/{method}",
                content=json.dumps(message).encode(),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if not response.is_success:
            raise _http_error(response)
        try:
            reply = response.json()
        except ValueError:
            raise EnvdError("internal", f"{method} answered with non-JSON") from None
        return reply if isinstance(reply, dict) else {}

    def stream(
        self, method: str, message: Message, timeout: float | None
    ) -> Generator[Message, None, None]:
        """The events of a server stream as they arrive; raises EnvdError for its error."""
        headers = {
            "Content-Type": "application/connect+json",
            "Connect-Content-Encoding": "identity",
            "Connect-Accept-Encoding": "identity",
            "Keepalive-Ping-Interval": str(KEEPALIVE_ASK_S),
        }
        if timeout:
            # envd kills the process at this deadline, as it does for the E2B clients.
            headers["Connect-Timeout-Ms"] = str(max(1, round(timeout * 1000)))
        try:
            with self.http.stream(
                "POST",
                f"/process.Process/{method}",
                content=envelope(message),
                headers=headers,
                timeout=httpx.Timeout(STREAM_IDLE_S, connect=CONNECT_TIMEOUT_S),
            ) as response:
                if not response.is_success:
                    response.read()
                    raise _http_error(response)
                buffer = bytearray()
                for chunk in response.iter_bytes():
                    buffer += chunk
                    while len(buffer) >= 5:
                        flags, length = struct.unpack_from(">BI", buffer)
                        if len(buffer) < 5 + length:
                            break
                        payload = bytes(buffer[5 : 5 + length])
                        del buffer[: 5 + length]
                        frame = json.loads(payload) if payload else {}
                        if flags & FLAG_END_STREAM:
                            error = _stream_error(frame)
                            if error is not None:
                                raise error
                            return
                        event = frame.get("event")
                        if isinstance(event, dict):
                            yield event
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        raise EnvdError("unavailable", "the connection to envd closed in the middle of a stream")

    def kill(self, pid: int) -> None:
        """Best effort: the caller is leaving, and a process nobody watches should not linger."""
        with contextlib.suppress(EnvdError):
            self.call("SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})


def _process_config(
    cmd: str, args: Sequence[str], cwd: str | None, envs: Mapping[str, str] | None
) -> Message:
    config: Message = {"cmd": cmd, "args": list(args), "envs": dict(envs or {})}
    if cwd is not None:
        config["cwd"] = cwd
    return config


def _started(events: Iterator[Message]) -> int:
    for event in events:
        if "start" in event:
            return int(event["start"].get("pid", 0))
        if "keepalive" not in event:
            raise EnvdError("internal", f"expected a start event, got {sorted(event)}")
    raise EnvdError("internal", "the stream ended before the process started")


def _exit_code(end: Message) -> int:
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
    request = {"process": _process_config(cmd, args, cwd, envs), "stdin": stdin is not None}

    with _Envd(base_url, headers, user, verify) as envd:
        began = time.monotonic()
        events = envd.stream("Start", request, timeout)
        with contextlib.closing(events):
            pid = _started(events)
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
                                sinks[kind](_unb64(data))
                    elif "end" in event:
                        end = event["end"]
            except KeyboardInterrupt:
                envd.kill(pid)
                raise
            finally:
                done.set()
    if end is None:
        raise EnvdError("internal", "the stream ended without the process's end")
    code = _exit_code(end)
    if timeout and code == 128 + signal.SIGKILL and time.monotonic() - began >= timeout:
        raise EnvdError("deadline_exceeded", f"the command did not finish in {timeout:g} s")
    return code


def _feed(envd: _Envd, pid: int, stdin: bytes | BinaryIO, done: threading.Event) -> None:
    """Send stdin, then close it. Runs beside the output stream: a process that echoes its input
    (`cat`) only reads more once its output is taken."""
    selector = {"pid": pid}
    if isinstance(stdin, bytes | bytearray | memoryview):
        view = memoryview(stdin)
        chunks: Iterator[bytes] = (
            bytes(view[i : i + INPUT_CHUNK]) for i in range(0, len(view), INPUT_CHUNK)
        )
    else:
        # read1 forwards what a pipe has now instead of waiting for a whole chunk.
        read = getattr(stdin, "read1", stdin.read)
        chunks = iter(lambda: bytes(read(INPUT_CHUNK)), b"")
    try:
        for chunk in chunks:
            if done.is_set():
                return
            envd.call("SendInput", {"process": selector, "input": {"stdin": _b64(chunk)}})
        if not done.is_set():
            envd.call("CloseStdin", {"process": selector})
    except (EnvdError, OSError, ValueError):
        # The process exited or closed its input: what it did not read is dropped, as a pipe
        # to an exited reader would.
        return


def _terminal_size(*fds: int) -> tuple[int, int]:
    for fd in fds:
        try:
            size = os.get_terminal_size(fd)
        except OSError:
            continue
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    size = shutil.get_terminal_size()
    return size.lines, size.columns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def terminal(
    base_url: str,
    headers: Mapping[str, str],
    *,
    user: str | None = "user",
    cwd: str | None = None,
    envs: Mapping[str, str] | None = None,
    cmd: str = "/bin/bash",
    args: Sequence[str] = ("-i", "-l"),
    verify: Verify = True,
) -> int:
    """An interactive terminal in the sandbox on this process's stdin/stdout; returns the remote
    exit code once the remote command ends.

    The remote PTY starts at the local terminal's size and follows it (SIGWINCH, when called from
    the main thread). A local TTY is put in raw mode, so Ctrl-C and friends go to the remote side,
    and restored however this returns. Without a TTY (pipes), input is forwarded as is; once it
    ends, Ctrl-D is sent whenever the remote output goes quiet, so the remote shell ends too. If
    this ends abnormally (an error, or Ctrl-C without a TTY), the remote command is killed.
    """
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    rows, cols = _terminal_size(stdout_fd, stdin_fd)
    env = {
        "TERM": os.environ.get("TERM") or "xterm-256color",
        "LANG": "C.UTF-8",  # the remote image need not have the local locale
        "LC_ALL": "C.UTF-8",
        **(envs or {}),
    }
    request = {
        "process": _process_config(cmd, args, cwd, env),
        "pty": {"size": {"rows": rows, "cols": cols}},
    }
    sys.stdout.flush()  # what was printed before must come before the remote output
    with _Envd(base_url, headers, user, verify) as envd:
        events = envd.stream("Start", request, None)
        pid = _started(events)
        session = _Session(envd, pid, events, stdin_fd, stdout_fd)
        try:
            return session.run()
        except BaseException:
            envd.kill(pid)
            raise


class _Session:
    """A terminal session: a thread copies the remote output to stdout while the main thread
    copies stdin (and resizes) to the remote PTY."""

    def __init__(
        self, envd: _Envd, pid: int, events: Iterator[Message], stdin_fd: int, stdout_fd: int
    ) -> None:
        self.envd = envd
        self.pid = pid
        self.events = events
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.end: Message | None = None
        self.last_output = time.monotonic()
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.resized = False
        # Wakes the select() of the main thread: the stream ended, or the window changed size.
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        # The reader may outlive a session that ended abnormally: it must not write to the pipe
        # once closed (its number could by then belong to another file). Reentrant because the
        # SIGWINCH handler runs on the main thread, which may hold it.
        self.wake_lock = threading.RLock()

    def _read_output(self) -> None:
        try:
            for event in self.events:
                if "data" in event and "pty" in event["data"]:
                    self.last_output = time.monotonic()
                    _write_all(self.stdout_fd, _unb64(event["data"]["pty"]))
                elif "end" in event:
                    self.end = event["end"]
        except BaseException as exc:  # handed to the main thread, which raises it
            self.error = exc
        finally:
            self.finished.set()
            self._wake()

    def _wake(self) -> None:
        with self.wake_lock, contextlib.suppress(BlockingIOError):
            if self.wake_w >= 0:
                os.write(self.wake_w, b"!")

    def _close_wake(self) -> None:
        with self.wake_lock:
            os.close(self.wake_r)
            os.close(self.wake_w)
            self.wake_r = self.wake_w = -1

    def _on_winch(self, signum: int, frame: FrameType | None) -> None:
        self.resized = True
        self._wake()

    def _send(self, method: str, message: Message) -> None:
        try:
            self.envd.call(method, {"process": {"pid": self.pid}, **message})
        except EnvdError as exc:
            # Input racing the process's exit is lost, as it would be locally.
            if exc.code not in ("not_found", "failed_precondition"):
                raise

    def run(self) -> int:
        reader = threading.Thread(target=self._read_output, daemon=True, name="envd-pty")
        saved_mode = None
        old_winch: Any = None
        in_main = threading.current_thread() is threading.main_thread()
        try:
            if os.isatty(self.stdin_fd):
                saved_mode = termios.tcgetattr(self.stdin_fd)
                # TCSANOW: keys typed ahead of this call are kept (setraw's default flushes).
                tty.setraw(self.stdin_fd, termios.TCSANOW)
            if in_main:
                old_winch = signal.signal(signal.SIGWINCH, self._on_winch)
            reader.start()
            self._pump_input()
        finally:
            if in_main and old_winch is not None:
                signal.signal(signal.SIGWINCH, old_winch)
            if saved_mode is not None:
                termios.tcsetattr(self.stdin_fd, termios.TCSADRAIN, saved_mode)
            self._close_wake()
        reader.join()
        if self.error is not None:
            raise self.error
        if self.end is None:
            raise EnvdError("internal", "the stream ended without the process's end")
        return _exit_code(self.end)

    def _pump_input(self) -> None:
        stdin_open = True
        last_eof = 0.0
        while not self.finished.is_set():
            if stdin_open:
                ready, _, _ = select.select([self.wake_r, self.stdin_fd], [], [])
            else:
                ready, _, _ = select.select([self.wake_r], [], [], HANGUP_IDLE_S)
            if self.wake_r in ready:
                os.read(self.wake_r, 512)
            if self.resized:
                self.resized = False
                rows, cols = _terminal_size(self.stdout_fd, self.stdin_fd)
                self._send("Update", {"pty": {"size": {"rows": rows, "cols": cols}}})
            if stdin_open and self.stdin_fd in ready:
                # Everything typed (or pasted) since the last read goes in one SendInput.
                data = os.read(self.stdin_fd, TERMINAL_READ)
                if data:
                    self._send("SendInput", {"input": {"pty": _b64(data)}})
                else:
                    stdin_open = False
                    last_eof = time.monotonic()  # the first ^D, too, waits for quiet
            now = time.monotonic()
            if not stdin_open and now - max(self.last_output, last_eof) >= HANGUP_IDLE_S:
                last_eof = now
                self._send("SendInput", {"input": {"pty": _b64(PTY_EOF)}})
