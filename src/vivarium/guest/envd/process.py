"""The `process.Process` Connect service: start commands (with pipes or a real PTY) as the
request's user, fan their output out to any number of attached streams, and take input, signals
and terminal resizes for them.

Semantics follow E2B's envd where the official client can tell:

- `Start` streams `start{pid}`, then `data` and `keepalive` events, then `end`. Processes outlive
  the stream that started them; only the client's deadline (`Connect-Timeout-Ms`) kills them, as
  envd does (`commands.run(timeout=0)` for no limit).
- `end` is sent when the process exits, not when every copy of its stdout is closed: a background
  grandchild (`server &`) holding the pipe must not keep `commands.run` from returning.
- Output back-pressures the process (a slow client makes its writes block) instead of being
  dropped, like envd. Output produced while no stream is attached is kept, up to BACKLOG_BYTES
  (newest kept), and handed to the next stream that attaches; envd drops it.
- `StartRequest.stdin` absent means a stdin pipe (the proto documents that default for older
  clients); `false` means /dev/null. The current client always sends it.

Guest code: standard library, starlette and relative imports only.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import os
import signal
import struct
import termios
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from .auth import User, request_user
from .connect import (
    ConnectError,
    Message,
    client_stream,
    keepalive_interval,
    server_stream,
    timeout_s,
    unary,
)
from .spawner import Launch, Spawner, SpawnError
from .state import EnvdState
from .wire import decode_bytes, encode_bytes

CHUNK = 32 * 1024  # one read from a pipe / the PTY; also the largest data event
SUBSCRIBER_EVENTS = 64  # events queued per attached stream before the process is held back
BACKLOG_BYTES = 64 * 1024  # output kept for the next stream while none is attached
OUTPUT_GRACE_S = 0.25  # after exit, how long to wait for the output to reach EOF
DRAIN_LIMIT = 1024 * 1024  # after that grace, read at most this much more per stream
ENDED_TTL_S = 10.0  # a finished process stays reachable by Connect this long
KILL_WAIT_S = 2.0  # SendSignal(SIGKILL) answers once the process is gone, or after this
DEFAULT_PTY_SIZE = (24, 80)  # rows, cols when the request names none
# Proto JSON enums arrive as names, but numbers are valid too.
SIGNALS: dict[str | int, signal.Signals] = {
    "SIGNAL_SIGTERM": signal.SIGTERM, 15: signal.SIGTERM,
    "SIGNAL_SIGKILL": signal.SIGKILL, 9: signal.SIGKILL,
}  # fmt: skip


_sequence = itertools.count()  # start order, to pick the newest of processes sharing a tag


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{what} must be base64 text")
    try:
        return decode_bytes(value)
    except ValueError:
        raise ConnectError("invalid_argument", f"{what} is not valid base64") from None


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows, cols, 0, 0)


def _pty_size(pty: Any) -> tuple[int, int]:
    size = pty.get("size") if isinstance(pty, dict) else None
    if not isinstance(size, dict):
        return DEFAULT_PTY_SIZE
    rows, cols = size.get("rows") or DEFAULT_PTY_SIZE[0], size.get("cols") or DEFAULT_PTY_SIZE[1]
    if not all(isinstance(v, int) and 0 < v < 65536 for v in (rows, cols)):
        raise ConnectError("invalid_argument", "pty size must be 1..65535 rows and cols")
    return rows, cols


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():  # a reader/writer callback can fire again before it is removed
        future.set_result(None)


def _start_error(cmd: str, cwd: str, exc: Exception) -> ConnectError:
    if isinstance(exc, SpawnError) and exc.stage == "cwd":
        code = "permission_denied" if exc.errno == errno.EACCES else "invalid_argument"
        return ConnectError(code, f"cwd '{cwd}': {os.strerror(exc.errno).lower()}")
    if isinstance(exc, SpawnError | OSError) and exc.errno:
        detail = os.strerror(exc.errno).lower()
    else:
        detail = str(exc)
    return ConnectError("invalid_argument", f"error starting process '{cmd}': {detail}")


class Subscriber:
    """One attached stream: a bounded queue of ProcessEvent messages."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue(SUBSCRIBER_EVENTS)
        self.closed = False


class Proc:
    """A started process, its output fan-out and its input side."""

    def __init__(self, pid: int, exit: asyncio.Future[int | None], config: Message,
                 tag: str | None, master: int | None, stdin: int | None,
                 outputs: list[tuple[int, str]],
                 on_end: Callable[[Proc], None]) -> None:  # fmt: skip
        self.pid = pid
        self.started = next(_sequence)
        self.config = config
        self.tag = tag
        self.is_pty = master is not None
        self.master = master  # PTY master (output and input); None in pipe mode or once ended
        self.stdin = stdin  # write end of the stdin pipe; None when closed or /dev/null
        self.end: Message | None = None
        self.subscribers: list[Subscriber] = []
        self.backlog: deque[tuple[str, bytes]] = deque()  # (stdout|stderr|pty, output)
        self.backlog_bytes = 0
        self.input_lock = asyncio.Lock()  # keeps concurrent inputs whole and in order
        self._on_end = on_end
        self._fds = [fd for fd, _ in outputs]
        self._stop_reading = False
        self._waiting: set[asyncio.Future[None]] = set()
        self._deadline: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self._exit = exit  # the spawner resolves it when the process exits
        self._pumps = [loop.create_task(self._pump(fd, kind)) for fd, kind in outputs]
        self._supervisor = loop.create_task(self._supervise())

    @property
    def running(self) -> bool:
        return self.end is None

    # --- output ---------------------------------------------------------------------------

    async def _readable(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, ready)
        self._waiting.add(ready)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
            self._waiting.discard(ready)

    async def _pump(self, fd: int, kind: str) -> None:
        drained = 0
        while True:
            try:
                chunk = os.read(fd, CHUNK)
            except BlockingIOError:
                if self._stop_reading:
                    return
                await self._readable(fd)
                continue
            except OSError:  # EIO from a PTY master once no one holds the slave side
                return
            if not chunk:
                return
            await self._publish(kind, chunk)
            if self._stop_reading:
                drained += len(chunk)
                if drained >= DRAIN_LIMIT:
                    return

    async def _publish(self, kind: str, chunk: bytes) -> None:
        if not self.subscribers:
            self._keep(kind, chunk)
            return
        event = {"data": {kind: encode_bytes(chunk)}}
        for sub in list(self.subscribers):
            if not sub.closed:
                await sub.queue.put(event)  # back-pressure: waits while this stream is behind

    def _keep(self, kind: str, chunk: bytes) -> None:
        """Keep the newest BACKLOG_BYTES of output, in fewer events than a subscriber queue
        holds (room is left for the end event)."""
        self.backlog.append((kind, chunk))
        self.backlog_bytes += len(chunk)
        while len(self.backlog) >= SUBSCRIBER_EVENTS:
            self.backlog_bytes -= len(self.backlog.popleft()[1])
        while self.backlog_bytes > BACKLOG_BYTES:
            oldest_kind, oldest = self.backlog[0]
            excess = self.backlog_bytes - BACKLOG_BYTES
            if len(oldest) <= excess:
                self.backlog.popleft()
                self.backlog_bytes -= len(oldest)
            else:
                self.backlog[0] = (oldest_kind, oldest[excess:])
                self.backlog_bytes -= excess

    def subscribe(self) -> Subscriber:
        sub = Subscriber()
        for kind, chunk in self.backlog:
            sub.queue.put_nowait({"data": {kind: encode_bytes(chunk)}})
        self.backlog.clear()
        self.backlog_bytes = 0
        if self.end is not None:
            sub.queue.put_nowait(self.end)
        else:
            self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        sub.closed = True
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        # Emptying the queue releases a publisher blocked on it; the stream is gone anyway.
        while not sub.queue.empty():
            sub.queue.get_nowait()

    async def _supervise(self) -> None:
        code = await self._exit
        if self._deadline is not None:
            self._deadline.cancel()
        # Output written before the exit is in the pipe (or on its way through the PTY line
        # discipline): wait briefly for EOF, then read what is there and stop, so a grandchild
        # that keeps the pipe open does not hold the end event back.
        _, pending = await asyncio.wait(self._pumps, timeout=OUTPUT_GRACE_S)
        if pending:
            self._stop_reading = True
            for ready in list(self._waiting):
                _wake(ready)
        await asyncio.gather(*self._pumps, return_exceptions=True)
        async with self.input_lock:  # not under a SendInput that is still writing
            for fd in {*self._fds, *([self.stdin] if self.stdin is not None else [])}:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.stdin = None
            self.master = None
        if code is None:  # its spawner was lost, and with it the exit status
            end: Message = {"exitCode": -1, "status": "exit status unknown"}
        elif code >= 0:
            end = {"exitCode": code, "exited": True, "status": f"exit status {code}"}
        else:  # killed by a signal: Go's os.ProcessState wording, which envd reports
            name = (signal.strsignal(-code) or f"signal {-code}").lower()
            end = {"exitCode": -1, "status": f"signal: {name}"}
        if code != 0:
            end["error"] = end["status"]  # envd sets error to the Wait() error text
        self.end = {"end": {k: v for k, v in end.items() if v}}
        for sub in list(self.subscribers):
            if not sub.closed:
                await sub.queue.put(self.end)
        self.subscribers.clear()
        self._on_end(self)

    # --- control --------------------------------------------------------------------------

    def kill_at_deadline(self, seconds: float) -> None:
        self._deadline = asyncio.get_running_loop().call_later(
            seconds, self.send_signal, signal.SIGKILL
        )

    async def ended(self, timeout: float) -> None:
        """Wait (at most `timeout`) until the process has exited and is off the list."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._supervisor), timeout)

    def send_signal(self, sig: int) -> None:
        # The child leads its own session and process group: signal all of it, so a shell's
        # children go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def resize(self, rows: int, cols: int) -> None:
        if not self.is_pty:
            raise ConnectError("failed_precondition", f"process {self.pid} has no PTY")
        if self.master is None:
            raise ConnectError("failed_precondition", f"process {self.pid} has exited")
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, _winsize(rows, cols))

    async def write(self, data: bytes, to_pty: bool) -> None:
        async with self.input_lock:
            if to_pty != self.is_pty:
                raise ConnectError(
                    "failed_precondition",
                    f"process {self.pid} "
                    + ("has no PTY: send stdin input" if to_pty else "has a PTY: send pty input"),
                )
            fd = self.master if to_pty else self.stdin
            if fd is None and to_pty:
                raise ConnectError("failed_precondition", f"process {self.pid} has exited")
            if fd is None:
                raise ConnectError("failed_precondition",
                                   f"stdin of process {self.pid} is not open (start it with "
                                   "stdin=True; CloseStdin closes it)")  # fmt: skip
            view = memoryview(data)
            loop = asyncio.get_running_loop()
            while view:
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:  # the process is not reading: wait, don't spin
                    ready: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(fd, _wake, ready)
                    # A grandchild may hold the pipe without reading: once the process itself
                    # exited, give up rather than block its end event (which waits for this
                    # lock) forever.
                    either: set[asyncio.Future[Any]] = {ready, self._exit}
                    try:
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        loop.remove_writer(fd)
                    if self._exit.done():
                        raise ConnectError(
                            "failed_precondition", f"process {self.pid} has exited"
                        ) from None
                except OSError as exc:  # EPIPE / EIO: it closed its input or exited
                    raise ConnectError("failed_precondition",
                                       f"cannot write to process {self.pid}: {exc.strerror}"
                                       ) from None  # fmt: skip

    async def close_stdin(self) -> None:
        if self.is_pty:
            raise ConnectError(
                "failed_precondition", "a PTY has no stdin to close: send Ctrl+D (0x04) instead"
            )
        async with self.input_lock:
            if self.stdin is not None:
                with contextlib.suppress(OSError):
                    os.close(self.stdin)
                self.stdin = None


class Registry:
    """Processes by pid; finished ones linger ENDED_TTL_S for late Connect calls."""

    def __init__(self, state: EnvdState, spawner: Spawner) -> None:
        self.state = state
        self.spawner = spawner
        self.procs: dict[int, Proc] = {}

    def find(self, selector: Any, *, running: bool = True) -> Proc:
        if not isinstance(selector, dict) or not ({"pid", "tag"} & selector.keys()):
            raise ConnectError("invalid_argument", "process selector needs a pid or a tag")
        if "pid" in selector:
            pid = selector["pid"]
            if isinstance(pid, str) and pid.isascii() and pid.isdigit() and len(pid) < 19:
                pid = int(pid)
            if not isinstance(pid, int) or isinstance(pid, bool):
                raise ConnectError("invalid_argument", "pid must be an integer")
            proc = self.procs.get(pid)
            if proc is None or (running and not proc.running):
                raise ConnectError("not_found", f"process with pid {pid} not found")
            return proc
        tag = selector["tag"]
        matches = [p for p in self.procs.values() if p.tag == tag and (p.running or not running)]
        if not matches:
            raise ConnectError("not_found", f"process with tag {tag} not found")
        # A tag can be reused: prefer one still running, then the newest.
        return max(matches, key=lambda p: (p.running, p.started))

    def _forget(self, proc: Proc) -> None:
        def drop() -> None:
            if self.procs.get(proc.pid) is proc:
                del self.procs[proc.pid]

        asyncio.get_running_loop().call_later(ENDED_TTL_S, drop)

    async def start(self, user: User, msg: Message) -> Proc:
        config = msg.get("process")
        if not isinstance(config, dict):
            raise ConnectError("invalid_argument", "process config is required")
        cmd, args = config.get("cmd"), config.get("args") or []
        envs, cwd = config.get("envs") or {}, config.get("cwd")
        tag = msg.get("tag")
        if not isinstance(cmd, str) or not cmd:
            raise ConnectError("invalid_argument", "process.cmd is required")
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise ConnectError("invalid_argument", "process.args must be a list of strings")
        if not (
            isinstance(envs, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in envs.items())
        ):
            raise ConnectError("invalid_argument", "process.envs must map strings to strings")
        if any(not k or "=" in k for k in envs):
            raise ConnectError("invalid_argument", "environment variable names must be "
                               "non-empty and contain no '='")  # fmt: skip
        if cwd is not None and not isinstance(cwd, str):
            raise ConnectError("invalid_argument", "process.cwd must be a string")
        if tag is not None and not isinstance(tag, str):
            raise ConnectError("invalid_argument", "tag must be a string")
        workdir = self._workdir(cwd, user)

        env = {"HOME": user.home, "USER": user.name, "LOGNAME": user.name, "SHELL": user.shell,
               **self.state.process_env(), **envs}  # fmt: skip
        if os.geteuid() != 0 and user.uid != os.geteuid():
            raise ConnectError(
                "permission_denied", f"envd is not root and cannot run commands as {user.name!r}"
            )

        pty = msg.get("pty")
        child_fds: list[int] = []
        parent_fds: list[int] = []
        try:
            if pty is not None:
                rows, cols = _pty_size(pty)
                master, slave = os.openpty()
                parent_fds.append(master)
                child_fds.append(slave)
                fcntl.ioctl(master, termios.TIOCSWINSZ, _winsize(rows, cols))
                stdio = (slave, slave, slave)
                stdin_w: int | None = None
                outputs = [(master, "pty")]
            else:
                out_r, out_w = os.pipe()
                err_r, err_w = os.pipe()
                parent_fds += [out_r, err_r]
                child_fds += [out_w, err_w]
                stdin_r: int | None = None
                stdin_w = None
                if msg.get("stdin", True) is not False:
                    stdin_r, stdin_w = os.pipe()
                    parent_fds.append(stdin_w)
                    child_fds.append(stdin_r)
                if stdin_r is None:
                    stdin_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    child_fds.append(stdin_r)
                stdio = (stdin_r, out_w, err_w)
                master = None
                outputs = [(out_r, "stdout"), (err_r, "stderr")]
            launch = Launch([cmd, *args], env, user.uid, user.gid, user.groups, workdir, stdio,
                            ctty=pty is not None)  # fmt: skip
            pid, exited = await self.spawner.spawn(launch)
        except (OSError, ValueError, SpawnError) as exc:
            for fd in parent_fds:
                os.close(fd)
            raise _start_error(cmd, workdir, exc) from None
        except BaseException:  # the client left while it started: it runs on, unattached
            for fd in parent_fds:
                os.close(fd)
            raise
        finally:
            for fd in child_fds:
                os.close(fd)  # the child has its copies; ours would hide EOF
        for fd in parent_fds:
            _set_nonblocking(fd)

        proc = Proc(pid, exited, config, tag, master, stdin_w, outputs, self._forget)
        self.procs[proc.pid] = proc
        return proc

    def _workdir(self, cwd: str | None, user: User) -> str:
        # envd's rules: no cwd -> the default workdir, else the user's home; `~` expands to the
        # home; relative paths are relative to the home.
        path = cwd or self.state.default_workdir or ""
        if path == "~" or path.startswith("~/"):
            path = user.home + path[1:]
        elif path.startswith("~"):
            raise ConnectError("invalid_argument", f"cannot expand {path!r}: only ~ is supported")
        path = os.path.normpath(os.path.join(user.home, path))
        if not os.path.isdir(path):
            what = "is not a directory" if os.path.exists(path) else "does not exist"
            raise ConnectError("invalid_argument", f"cwd '{path}' {what}")
        return path


async def _follow(proc: Proc, sub: Subscriber, interval: float) -> AsyncIterator[Message]:
    """A Start/Connect response stream: start, then the process's events until its end."""
    try:
        yield {"event": {"start": {"pid": proc.pid}}}
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), interval)
            except TimeoutError:
                yield {"event": {"keepalive": {}}}
                continue
            yield {"event": event}
            if "end" in event:
                return
    finally:
        # Also on client disconnect (cancellation): the process keeps running.
        proc.unsubscribe(sub)


def _input(msg: Any) -> tuple[bytes, bool]:
    if isinstance(msg, dict) and "pty" in msg:
        return _unb64(msg["pty"], "input.pty"), True
    if isinstance(msg, dict) and "stdin" in msg:
        return _unb64(msg["stdin"], "input.stdin"), False
    raise ConnectError("invalid_argument", "input needs stdin or pty bytes")


def routes(state: EnvdState, spawner: Spawner) -> list[Route]:
    registry = Registry(state, spawner)

    async def start(request: Request, msg: Message) -> AsyncIterator[Message]:
        proc = await registry.start(request_user(request, state), msg)
        # Subscribe before yielding to the loop, so no output can come before this stream.
        sub = proc.subscribe()
        deadline = timeout_s(request)
        if deadline:
            proc.kill_at_deadline(deadline)
        async for event in _follow(proc, sub, keepalive_interval(request)):
            yield event

    async def connect(request: Request, msg: Message) -> AsyncIterator[Message]:
        proc = registry.find(msg.get("process"), running=False)
        async for event in _follow(proc, proc.subscribe(), keepalive_interval(request)):
            yield event

    async def list_(request: Request, msg: Message) -> Message:
        processes = []
        for proc in registry.procs.values():
            if proc.running:
                info: Message = {"config": proc.config, "pid": proc.pid}
                if proc.tag is not None:
                    info["tag"] = proc.tag
                processes.append(info)
        return {"processes": processes} if processes else {}

    async def send_input(request: Request, msg: Message) -> Message:
        proc = registry.find(msg.get("process"))
        data, to_pty = _input(msg.get("input"))
        await proc.write(data, to_pty)
        return {}

    async def stream_input(request: Request, messages: AsyncIterator[Message]) -> Message:
        proc: Proc | None = None
        async for msg in messages:
            if "start" in msg:
                start_event = msg["start"] if isinstance(msg["start"], dict) else {}
                proc = registry.find(start_event.get("process"))
            elif "data" in msg:
                if proc is None:
                    raise ConnectError("invalid_argument", "data before the start message")
                data_event = msg["data"] if isinstance(msg["data"], dict) else {}
                data, to_pty = _input(data_event.get("input"))
                await proc.write(data, to_pty)
            elif "keepalive" not in msg:
                raise ConnectError("invalid_argument", "expected start, data or keepalive")
        return {}

    async def close_stdin(request: Request, msg: Message) -> Message:
        await registry.find(msg.get("process")).close_stdin()
        return {}

    async def send_signal(request: Request, msg: Message) -> Message:
        proc = registry.find(msg.get("process"))
        raw = msg.get("signal")
        sig = SIGNALS.get(raw) if isinstance(raw, str | int) else None
        if sig is None:
            raise ConnectError("invalid_argument",
                               f"unsupported signal {msg.get('signal')!r}: use SIGNAL_SIGTERM or "
                               "SIGNAL_SIGKILL")  # fmt: skip
        proc.send_signal(sig)
        if sig == signal.SIGKILL:
            await proc.ended(KILL_WAIT_S)  # so that a List right after no longer shows it
        return {}

    async def update(request: Request, msg: Message) -> Message:
        proc = registry.find(msg.get("process"))
        if msg.get("pty") is not None:
            proc.resize(*_pty_size(msg["pty"]))
        return {}

    base = "/process.Process/"
    return [
        Route(base + "Start", server_stream(start), methods=["POST"]),
        Route(base + "Connect", server_stream(connect), methods=["POST"]),
        Route(base + "List", unary(list_), methods=["POST"]),
        Route(base + "SendInput", unary(send_input), methods=["POST"]),
        Route(base + "StreamInput", client_stream(stream_input), methods=["POST"]),
        Route(base + "CloseStdin", unary(close_stdin), methods=["POST"]),
        Route(base + "SendSignal", unary(send_signal), methods=["POST"]),
        Route(base + "Update", unary(update), methods=["POST"]),
    ]
