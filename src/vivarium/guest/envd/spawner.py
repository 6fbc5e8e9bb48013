"""envd's side of vivarium-spawn (guest/spawn.c): the resident helper that starts every process
as its user and reports when each one exits.

One helper serves all of envd over a Unix socket, so a command costs a single vfork + exec of the
command inside the sandbox, and envd needs no thread per process. The wire format is described
at the top of spawn.c.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
from dataclasses import dataclass

# Templates compile guest/spawn.c to this path; envd's tests point it elsewhere.
SPAWN_HELPER = os.environ.get("VIVARIUM_SPAWN_HELPER", "/opt/vivarium/bin/vivarium-spawn")

HEADER = struct.Struct("=8I")  # length, id, uid, gid, flags, ngroups, nargv, nenv
REPLY = struct.Struct("=IIii")  # kind, id, a, b
STARTED, FAILED, EXITED = 1, 2, 3
FLAG_CTTY = 1
STAGES = {1: "setsid", 2: "controlling terminal", 3: "credentials", 4: "cwd", 5: "exec"}
GONE_POLL_S = 0.2  # how often to look for processes whose exit the lost helper would report

log = logging.getLogger("envd.spawner")


class SpawnError(Exception):
    def __init__(self, stage: str, err: int) -> None:
        super().__init__(f"{stage}: {os.strerror(err)}")
        self.stage = stage
        self.errno = err


@dataclass(frozen=True)
class Launch:
    """What to start: the command line and environment, as whom, where and with which stdio."""

    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: tuple[int, ...]
    cwd: str
    stdio: tuple[int, int, int]
    ctty: bool = False

    def encode(self, request_id: int) -> bytes:
        strings = [self.cwd, *self.argv, *(f"{k}={v}" for k, v in self.env.items())]
        if any("\0" in s for s in strings):
            raise ValueError("arguments, environment and cwd cannot contain NUL bytes")
        body = array.array("I", self.groups).tobytes() + b"".join(
            s.encode("utf-8", "surrogateescape") + b"\0" for s in strings
        )
        flags = FLAG_CTTY if self.ctty else 0
        header = HEADER.pack(len(body), request_id, self.uid, self.gid, flags,
                             len(self.groups), len(self.argv), len(self.env))  # fmt: skip
        return header + body


class Spawner:
    """Starts the helper on first use (envd starts it at boot so templates checkpoint it)."""

    def __init__(self, helper: str = SPAWN_HELPER) -> None:
        self.helper = helper
        self._sock: socket.socket | None = None
        self._helper_pid = 0
        self._ids = itertools.count(1)
        self._send_lock = asyncio.Lock()
        self._buffer = b""
        self._starting: dict[int, asyncio.Future[tuple[int, asyncio.Future[int | None]]]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}  # per running pid

    def ensure_started(self) -> None:
        if self._sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # fd 0 is the socket; 1 and 2 stay envd's, so passed fds land at 3 and above.
            self._helper_pid = os.posix_spawn(
                self.helper, [self.helper], {"PATH": "/usr/bin:/bin"},
                file_actions=[(os.POSIX_SPAWN_DUP2, theirs.fileno(), 0)],
            )  # fmt: skip
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)

    async def spawn(self, launch: Launch) -> tuple[int, asyncio.Future[int | None]]:
        """Start the process. Returns its pid once it exec'd, and a future of its exit code
        (minus the signal number when a signal ended it; None if the spawner was lost).
        Raises SpawnError if it could not start."""
        self.ensure_started()
        assert self._sock is not None
        request_id = next(self._ids)
        data = launch.encode(request_id)
        started: asyncio.Future[tuple[int, asyncio.Future[int | None]]]
        started = asyncio.get_running_loop().create_future()
        self._starting[request_id] = started
        loop = asyncio.get_running_loop()
        try:
            async with self._send_lock:  # requests must not interleave on the stream
                fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", launch.stdio))]
                while True:
                    try:
                        sent = self._sock.sendmsg([data], fds)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(0.001)
                if sent < len(data):
                    await loop.sock_sendall(self._sock, data[sent:])
            return await started
        finally:
            self._starting.pop(request_id, None)

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(64 * 1024)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._lost()
            return
        self._buffer += chunk
        while len(self._buffer) >= REPLY.size:
            kind, request_id, a, b = REPLY.unpack_from(self._buffer)
            self._buffer = self._buffer[REPLY.size :]
            self._dispatch(kind, request_id, a, b)

    def _dispatch(self, kind: int, request_id: int, a: int, b: int) -> None:
        loop = asyncio.get_running_loop()
        if kind == STARTED:
            # Registered before any later EXITED record of this pid is read.
            exit_future: asyncio.Future[int | None] = loop.create_future()
            self._exits[a] = exit_future
            future = self._starting.get(request_id)
            if future is not None and not future.done():
                future.set_result((a, exit_future))
        elif kind == FAILED:
            failed = self._starting.get(request_id)
            if failed is not None and not failed.done():
                failed.set_exception(SpawnError(STAGES.get(a, "spawn"), b))
        elif kind == EXITED:
            exited = self._exits.pop(a, None)
            if exited is not None and not exited.done():
                exited.set_result(os.waitstatus_to_exitcode(b))

    def _lost(self) -> None:
        """The helper died (it should not): fail pending starts, watch its orphans (init reaps
        them now) until they are gone, and start a new helper on the next spawn."""
        log.error("vivarium-spawn (pid %d) exited; starting a new one", self._helper_pid)
        self.close()
        self._buffer = b""
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._helper_pid, os.WNOHANG)
        for future in self._starting.values():
            if not future.done():
                future.set_exception(SpawnError("spawn", errno.EPIPE))
        orphans, self._exits = self._exits, {}
        for pid, exit_future in orphans.items():
            asyncio.get_running_loop().create_task(_when_gone(pid, exit_future))

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None


async def _when_gone(pid: int, future: asyncio.Future[int | None]) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        await asyncio.sleep(GONE_POLL_S)
    if not future.done():
        future.set_result(None)
