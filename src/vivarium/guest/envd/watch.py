"""Watching a directory for WatchDir and the polling watchers (CreateWatcher / GetWatcherEvents /
RemoveWatcher): `DirWatch` turns inotify events, or snapshot differences where inotify is
unavailable or exhausted, into FilesystemEvent messages the way envd (fsnotify) reports them,
hiding the temporary files of /files uploads. `open_watch` checks the request user may list the
directory first. Kept apart from the service because it is the one stateful, long-lived part.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import stat
import struct
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from .access import R_OK, X_OK, Access, blocking, os_error, resolve_path
from .auth import request_user
from .connect import Message, string_field
from .entry_info import entry_info
from .state import EnvdState
from .upload import UPLOAD_TEMP_RE

EVENT_CREATE = "EVENT_TYPE_CREATE"
EVENT_WRITE = "EVENT_TYPE_WRITE"
EVENT_REMOVE = "EVENT_TYPE_REMOVE"
EVENT_RENAME = "EVENT_TYPE_RENAME"
EVENT_CHMOD = "EVENT_TYPE_CHMOD"

# A watcher whose consumer stops reading must not grow without bound: past this many undelivered
# events it fails, like envd does when inotify's own queue overflows.
MAX_PENDING_EVENTS = 65536
POLL_INTERVAL_S = 0.25

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_DELETE_SELF
    | IN_MOVE_SELF | IN_ONLYDIR
)  # fmt: skip
_EVENT_HEADER = struct.Struct("iIII")

# Event kinds in the order fsnotify reports the ops of one inotify event (envd emits one
# FilesystemEvent per op).
_INOTIFY_OPS = (
    (IN_CREATE | IN_MOVED_TO, EVENT_CREATE),
    (IN_MOVED_FROM | IN_MOVE_SELF, EVENT_RENAME),
    (IN_ATTRIB, EVENT_CHMOD),
    (IN_MODIFY, EVENT_WRITE),
    (IN_DELETE | IN_DELETE_SELF, EVENT_REMOVE),
)

Emit = Callable[[str, str, str], None]  # (name relative to the watched dir, event type, full path)


def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


# Hand-written rather than a package: the guest's dependencies are vendored into every template,
# so each one's size counts, and this needs only inotify_init1, inotify_add_watch,
# inotify_rm_watch and the event struct; inotify_simple would add a package for about the same
# code.
class _InotifyBackend:
    """inotify(7) through ctypes; events are read on the event loop as the fd becomes readable."""

    def __init__(self, root: str, recursive: bool, emit: Emit, fail: Callable[[str], None]):
        self.root = root
        self.recursive = recursive
        self.emit = emit
        self.fail = fail
        self.fd = -1
        self.paths: dict[int, str] = {}
        self.root_wd = -1
        self.libc = _libc()
        self.loop: asyncio.AbstractEventLoop | None = None
        # MOVED_FROM of an upload temp file, by rename cookie: the MOVED_TO that follows is the
        # upload landing and is reported as a write.
        self.upload_cookies: dict[int, str] = {}

    def start(self) -> None:
        if not hasattr(self.libc, "inotify_init1"):
            raise OSError(errno.ENOSYS, "inotify is not available")
        fd = self.libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd = fd
        try:
            self.root_wd = self._add(self.root)
            if self.recursive:
                self._add_tree(self.root, skip_root=True)
        except BaseException:
            os.close(fd)
            self.fd = -1
            raise
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(fd, self._readable)

    def close(self) -> None:
        if self.fd >= 0:
            if self.loop is not None:
                self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1

    def _add(self, path: str) -> int:
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), path)
        self.paths[wd] = path
        return int(wd)

    def _add_tree(self, top: str, skip_root: bool = False) -> None:
        # Watch a directory before listing it: a subdirectory created in between is then either
        # in the listing or reported by the new watch (listing first could miss it for good).
        pending = [top]
        while pending:
            directory = pending.pop()
            if not (skip_root and directory == top):
                try:
                    self._add(directory)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR):  # gone meanwhile: fine
                        continue
                    raise
            try:
                with os.scandir(directory) as entries:
                    pending += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue

    def _forget_tree(self, top: str) -> None:
        for wd, path in list(self.paths.items()):
            if path == top or path.startswith(top + "/"):
                self.libc.inotify_rm_watch(self.fd, wd)
                self.paths.pop(wd, None)

    def _readable(self) -> bool:
        """Handle one read's worth of events; False once nothing more is queued."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.fail(f"watcher error: {exc}")
            return False
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            raw = data[offset + _EVENT_HEADER.size : offset + _EVENT_HEADER.size + length]
            offset += _EVENT_HEADER.size + length
            self._event(wd, mask, cookie, os.fsdecode(raw.rstrip(b"\x00")))
        return self.fd >= 0

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            self.fail("watcher error: event queue overflow")
            return
        directory = self.paths.get(wd)
        if directory is None:
            return
        if mask & IN_IGNORED:
            self.paths.pop(wd, None)
            return
        if not name and wd != self.root_wd:
            # DELETE_SELF/MOVE_SELF of a subdirectory: its parent's watch already reported it.
            return
        full = os.path.join(directory, name) if name else directory
        if self.recursive and mask & IN_ISDIR:
            if mask & IN_MOVED_FROM:
                self._forget_tree(full)
            if mask & (IN_CREATE | IN_MOVED_TO):
                try:
                    self._add_tree(full)
                except OSError as exc:
                    self.fail(f"error adding path {full} to watcher: {exc}")
                    return
        temp = UPLOAD_TEMP_RE.match(name)
        if temp:
            if mask & IN_MOVED_FROM:
                self.upload_cookies[cookie] = temp["kind"]
            return
        relative = os.path.relpath(full, self.root)
        if mask & IN_MOVED_TO and cookie in self.upload_cookies:
            self._upload_landed(relative, full, new=self.upload_cookies.pop(cookie) == "new")
            return
        for bits, event_type in _INOTIFY_OPS:
            if mask & bits:
                self.emit(relative, event_type, full)

    def _upload_landed(self, relative: str, full: str, new: bool) -> None:
        """Report an upload as envd's own writes in place show it (open with O_CREAT|O_TRUNC,
        chown to the user, write): a new file is CREATE, CHMOD, then WRITE if it has content;
        a replaced one is CHMOD, then WRITE (the truncation, and the content)."""
        if new:
            self.emit(relative, EVENT_CREATE, full)
        self.emit(relative, EVENT_CHMOD, full)
        try:
            written = os.stat(full).st_size > 0
        except OSError:
            written = True  # gone again: it was written before that
        if written or not new:
            self.emit(relative, EVENT_WRITE, full)

    def flush(self) -> None:
        """Take in the events the kernel has queued so far (the loop may not have yet)."""
        while self.fd >= 0 and self._readable():
            pass


Snapshot = dict[str, tuple[bool, int, int, int, int, int, int]]


class _PollingBackend:
    """Fallback when inotify is unavailable (or out of instances/watches): compare directory
    snapshots a few times a second. Coarser (no per-write events, renames look like remove +
    create) but it reports creations, writes and removals."""

    def __init__(self, root: str, recursive: bool, emit: Emit, fail: Callable[[str], None]):
        self.root = root
        self.recursive = recursive
        self.emit = emit
        self.fail = fail
        self.task: asyncio.Task[None] | None = None
        self.snapshot: Snapshot = {}

    def _scan(self) -> Snapshot:
        snapshot: Snapshot = {}
        pending = [self.root]
        while pending:
            directory = pending.pop()
            try:
                entries = list(os.scandir(directory))
            except OSError:
                continue
            for entry in entries:
                if UPLOAD_TEMP_RE.match(entry.name):
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                is_dir = stat.S_ISDIR(st.st_mode)
                relative = os.path.relpath(entry.path, self.root)
                snapshot[relative] = (is_dir, st.st_ino, st.st_size, st.st_mtime_ns,
                                      st.st_mode, st.st_uid, st.st_gid)  # fmt: skip
                if is_dir and self.recursive:
                    pending.append(entry.path)
        return snapshot

    def start(self) -> None:
        self.snapshot = self._scan()
        self.task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            try:
                current = await blocking(self._scan)
            except Exception as exc:  # keep the watcher's consumer informed rather than hang
                self.fail(f"watcher error: {exc}")
                return
            self._diff(self.snapshot, current)
            self.snapshot = current

    def _diff(self, before: Snapshot, after: Snapshot) -> None:
        for relative in sorted(after.keys() - before.keys()):
            self.emit(relative, EVENT_CREATE, os.path.join(self.root, relative))
            if not after[relative][0] and after[relative][2]:
                self.emit(relative, EVENT_WRITE, os.path.join(self.root, relative))
        for relative in sorted(after.keys() & before.keys()):
            old, new = before[relative], after[relative]
            full = os.path.join(self.root, relative)
            if old[1] != new[1]:  # replaced by another inode (e.g. an upload's rename)
                self.emit(relative, EVENT_WRITE, full)
                continue
            if not new[0] and (old[2], old[3]) != (new[2], new[3]):
                self.emit(relative, EVENT_WRITE, full)
            if (old[4], old[5], old[6]) != (new[4], new[5], new[6]):
                self.emit(relative, EVENT_CHMOD, full)
        for relative in sorted(before.keys() - after.keys()):
            self.emit(relative, EVENT_REMOVE, os.path.join(self.root, relative))


class DirWatch:
    """Events under one directory, delivered as FilesystemEvent messages to `sink`."""

    def __init__(
        self,
        root: str,
        recursive: bool,
        include_entry: bool,
        sink: Callable[[Message], None],
        fail: Callable[[str], None],
        *,
        force_polling: bool = False,
    ) -> None:
        self.root = root
        self.include_entry = include_entry
        self.sink = sink
        self.fail = fail
        self.backend: _InotifyBackend | _PollingBackend
        self.backend = _PollingBackend(root, recursive, self._emit, fail)
        if not force_polling:
            with contextlib.suppress(OSError):  # no usable libc: poll
                self.backend = _InotifyBackend(root, recursive, self._emit, fail)

    def start(self) -> None:
        try:
            self.backend.start()
        except OSError as exc:
            if not isinstance(self.backend, _InotifyBackend) or exc.errno in (
                errno.EACCES,
                errno.ENOENT,
                errno.ENOTDIR,
            ):
                raise
            # ENOSYS, EMFILE (max_user_instances), ENOSPC (max_user_watches): degrade to polling.
            self.backend = _PollingBackend(self.root, self.backend.recursive, self._emit, self.fail)
            self.backend.start()

    def close(self) -> None:
        self.backend.close()

    def flush(self) -> None:
        """Events of changes made before this call are delivered by the time it returns (where
        inotify is used): a GetWatcherEvents right after a write sees the write."""
        if isinstance(self.backend, _InotifyBackend):
            self.backend.flush()

    @property
    def polling(self) -> bool:
        return isinstance(self.backend, _PollingBackend)

    def _emit(self, name: str, event_type: str, full: str) -> None:
        event: Message = {"name": name, "type": event_type}
        if self.include_entry and event_type not in (EVENT_REMOVE, EVENT_RENAME):
            # Gone again already: the event goes without its entry.
            with contextlib.suppress(OSError):
                event["entry"] = entry_info(full)
        self.sink(event)


def _flag(message: Message, camel: str, snake: str) -> bool:
    return bool(message.get(camel, message.get(snake, False)))


async def open_watch(
    request: Request, state: EnvdState, message: Message, sink: Callable[[Message], None],
    fail: Callable[[str], None],
) -> DirWatch:  # fmt: skip
    user = request_user(request, state)
    path = resolve_path(string_field(message, "path"), user, state.default_workdir)
    access = Access(user)

    await blocking(access.require_dir, path, R_OK | X_OK, f"path {path} not a directory")
    watch = DirWatch(
        path, _flag(message, "recursive", "recursive"),
        _flag(message, "includeEntry", "include_entry"), sink, fail,
    )  # fmt: skip
    try:
        watch.start()
    except OSError as exc:
        raise os_error(exc, path) from None
    return watch


class PollingWatcher:
    """A CreateWatcher watcher: buffers events until GetWatcherEvents collects them."""

    def __init__(self) -> None:
        self.events: list[Message] = []
        self.error: str | None = None
        self.watch: DirWatch | None = None

    def sink(self, event: Message) -> None:
        if self.error:
            return
        if len(self.events) >= MAX_PENDING_EVENTS:
            self.fail("watcher error: too many events not collected")
            return
        self.events.append(event)

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
        if self.watch is not None:
            self.watch.close()
