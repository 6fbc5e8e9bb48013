"""`vivarium sandbox connect`: an interactive terminal on a PTY in the sandbox."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

from vivarium.guest.envd.wire import decode_bytes, encode_bytes

from .exec import exit_code, process_config, started
from .transport import Envd, EnvdError, Message, Verify

TERMINAL_READ = 64 * 1024  # one read of local keystrokes (a paste arrives in one go)
# A PTY has no stdin to close: once local input has ended, the EOF character is sent whenever
# the remote output has been quiet this long, until the remote command ends. Quiet, because a ^D
# that arrives while a shell runs a command (its terminal in canonical mode) can be lost when
# readline takes the terminal back; repeated, because each program reading gets its own EOF.
PTY_EOF = b"\x04"
HANGUP_IDLE_S = 0.5


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
        "process": process_config(cmd, args, cwd, env),
        "pty": {"size": {"rows": rows, "cols": cols}},
    }
    sys.stdout.flush()  # what was printed before must come before the remote output
    with Envd(base_url, headers, user, verify) as envd:
        events = envd.stream("Start", request, None)
        pid = started(events)
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
        self, envd: Envd, pid: int, events: Iterator[Message], stdin_fd: int, stdout_fd: int
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
                    _write_all(self.stdout_fd, decode_bytes(event["data"]["pty"]))
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
        return exit_code(self.end)

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
                    self._send("SendInput", {"input": {"pty": encode_bytes(data)}})
                else:
                    stdin_open = False
                    last_eof = time.monotonic()  # the first ^D, too, waits for quiet
            now = time.monotonic()
            if not stdin_open and now - max(self.last_output, last_eof) >= HANGUP_IDLE_S:
                last_eof = now
                self._send("SendInput", {"input": {"pty": encode_bytes(PTY_EOF)}})
