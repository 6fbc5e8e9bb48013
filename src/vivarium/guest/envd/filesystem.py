"""The `filesystem.Filesystem` Connect service: Stat, ListDir, MakeDir, Move, Remove, WatchDir and
the polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher).

Also the helpers the plain HTTP `/files` endpoints share (files.py): path resolution, the
permission checks, EntryInfo and the upload temp-file naming that watchers translate.

Permissions: envd runs as root, but every operation must behave as if the request's user did it
(a `user` gets permission_denied writing into /root). Switching credentials is not an option in an
asyncio server: setuid/setgroups are process-wide (glibc broadcasts them to every thread), and
forking per operation would make every call and every streamed byte cost a process. So `Access`
reproduces the kernel's discretionary check by hand (owner/group/other bits with the user's
supplementary groups, search permission on every directory on the way, the sticky bit for
unlink/rename, root bypassing all but nothing else) before the operation runs as root, and
created files and directories are chowned to the user. POSIX ACLs, capabilities other than root's
and LSMs are not modelled, and check-then-act leaves a small race window; the guard reproduces
the user's view, it is not a security boundary (the user can run anything inside the sandbox).

Wire format: proto3 JSON as protobuf-go emits it (lowerCamelCase names, int64 as strings, enums
by name, RFC 3339 timestamps, default values omitted). EntryInfo follows current envd: a symlink
has `isSymlink: true`, `type` is its target's type, `mode` the target's permission bits and
`permissions` the link's own Go-style mode string (e.g. `Lrwxrwxrwx`, `dtrwxrwxrwx` for /tmp).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import grp
import os
import pwd
import re
import secrets
import shutil
import stat
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from starlette.requests import Request
from starlette.routing import Route

from .auth import User, request_user
from .connect import (
    ConnectError,
    Message,
    keepalive_interval,
    server_stream,
    string_field,
    unary,
)
from .state import EnvdState

P = ParamSpec("P")
T = TypeVar("T")

R_OK, W_OK, X_OK = 4, 2, 1

FILE_TYPE_FILE = "FILE_TYPE_FILE"
FILE_TYPE_DIRECTORY = "FILE_TYPE_DIRECTORY"
FILE_TYPE_SYMLINK = "FILE_TYPE_SYMLINK"

EVENT_CREATE = "EVENT_TYPE_CREATE"
EVENT_WRITE = "EVENT_TYPE_WRITE"
EVENT_REMOVE = "EVENT_TYPE_REMOVE"
EVENT_RENAME = "EVENT_TYPE_RENAME"
EVENT_CHMOD = "EVENT_TYPE_CHMOD"

METADATA_XATTR_PREFIX = "user.e2b."

# A watcher whose consumer stops reading must not grow without bound: past this many undelivered
# events it fails, like envd does when inotify's own queue overflows.
MAX_PENDING_EVENTS = 65536
MAX_POLLING_WATCHERS = 1024
POLL_INTERVAL_S = 0.25


async def blocking(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run filesystem work in a worker thread so one slow disk call never stalls other requests."""
    return await asyncio.to_thread(fn, *args, **kwargs)


# --- errors ------------------------------------------------------------------------------------

_ERRNO_CODES = {
    errno.ENOENT: "not_found",
    errno.EEXIST: "already_exists",
    errno.EACCES: "permission_denied",
    errno.EPERM: "permission_denied",
    errno.EROFS: "permission_denied",
    errno.ENOTDIR: "invalid_argument",
    errno.EISDIR: "invalid_argument",
    errno.EINVAL: "invalid_argument",
    errno.ENAMETOOLONG: "invalid_argument",
    errno.ENOTEMPTY: "failed_precondition",
    errno.ELOOP: "failed_precondition",
    errno.EBUSY: "failed_precondition",
    errno.ENOSPC: "resource_exhausted",
    errno.EDQUOT: "resource_exhausted",
}


def os_error(exc: OSError, path: str) -> ConnectError:
    code = _ERRNO_CODES.get(exc.errno or 0, "internal")
    return ConnectError(code, f"{exc.strerror or exc}: {path}")


def denied(path: str) -> ConnectError:
    return ConnectError("permission_denied", f"permission denied: {path}")


# --- paths and permissions ---------------------------------------------------------------------


def resolve_path(path: str, user: User, default_workdir: str | None = None) -> str:
    """Make a request path absolute the way envd does: empty means the default workdir, `~` is the
    user's home, relative paths are relative to the home; `..` and `.` are cleaned lexically."""
    if "\x00" in path:
        raise ConnectError("invalid_argument", "path contains a NUL byte")
    if not path:
        path = default_workdir or user.home
    if path.startswith("~"):
        if len(path) > 1 and path[1] != "/":
            raise ConnectError("invalid_argument", f"cannot expand user-specific home dir: {path}")
        path = user.home + path[1:]
    if not os.path.isabs(path):
        path = os.path.join(user.home, path)
    path = os.path.normpath(path)
    # normpath keeps a leading "//" (POSIX allows it to mean something else); envd does not.
    return "/" + path.lstrip("/")


class Access:
    """The request user's permissions, checked by hand because envd itself runs as root."""

    def __init__(self, user: User) -> None:
        self.user = user
        self.uid = user.uid
        self.gid = user.gid
        self.groups = frozenset(user.groups)  # looked up once per user (auth.lookup_user)

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    def allows(self, st: os.stat_result, want: int) -> bool:
        if self.is_root:
            # Root passes every read/write check; execute still needs some x bit on a file.
            return not (want & X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111)
        if st.st_uid == self.uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want

    def search(self, path: str) -> None:
        """Search (x) permission on every directory leading to `path`, as path lookup needs.

        Checked along the parent's resolved path; a missing component stops the walk so the
        operation itself reports not_found."""
        if self.is_root:
            return
        parent = os.path.realpath(os.path.dirname(path))
        current = "/"
        for part in ["", *[p for p in parent.split("/") if p]]:
            current = os.path.join(current, part) if part else current
            try:
                st = os.stat(current)
            except OSError:
                return
            if not stat.S_ISDIR(st.st_mode):
                return
            if not self.allows(st, X_OK):
                raise denied(path)

    def require(self, path: str, want: int, st: os.stat_result) -> None:
        """`want` on an existing entry whose stat the caller has (after `search`)."""
        if not self.allows(st, want):
            raise denied(path)

    def require_dir_write(self, directory: str) -> None:
        """Creating or removing entries in `directory` needs w and x on it."""
        self.search(directory)
        try:
            st = os.stat(directory)
        except OSError as exc:
            raise os_error(exc, directory) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", f"not a directory: {directory}")
        if not self.allows(st, W_OK | X_OK):
            raise denied(directory)

    def require_unlink(self, path: str, st: os.stat_result) -> None:
        """Removing or replacing `path`: write on its directory, and in a sticky directory
        (/tmp) the user must own the entry or the directory."""
        directory = os.path.dirname(path)
        self.require_dir_write(directory)
        if self.is_root:
            return
        dir_st = os.stat(directory)
        if dir_st.st_mode & stat.S_ISVTX and self.uid not in (st.st_uid, dir_st.st_uid):
            raise denied(path)

    def require_tree_removal(self, root: str) -> None:
        """Before deleting a directory tree, every directory in it must be readable (to list it)
        and writable (to empty it); checked up front so a refusal deletes nothing."""
        if self.is_root:
            return
        for directory, dirnames, filenames in os.walk(root, onerror=_raise):
            dir_st = os.lstat(directory)
            if not self.allows(dir_st, R_OK | W_OK | X_OK):
                raise denied(directory)
            if dir_st.st_mode & stat.S_ISVTX and dir_st.st_uid != self.uid:
                for name in dirnames + filenames:
                    if os.lstat(os.path.join(directory, name)).st_uid != self.uid:
                        raise denied(os.path.join(directory, name))


def _raise(exc: OSError) -> None:
    raise exc


def make_dirs(access: Access, path: str) -> bool:
    """Create `path` and its missing parents as the user (each needs w+x on its parent), owned
    by the user. Returns whether anything was created."""
    created = False
    current = "/"
    for part in [p for p in path.split("/") if p]:
        parent, current = current, os.path.join(current, part)
        try:
            st = os.stat(current)
        except FileNotFoundError:
            access.require_dir_write(parent)
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:  # a concurrent creator won; fine if it made a directory
                if os.path.isdir(current):
                    continue
                raise ConnectError("invalid_argument", f"path is a file: {current}") from None
            except OSError as exc:
                raise os_error(exc, current) from None
            os.lchown(current, access.uid, access.gid)
            created = True
            continue
        except OSError as exc:
            raise os_error(exc, current) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", f"path is a file: {current}")
    return created


# --- EntryInfo -----------------------------------------------------------------------------------

# Go's os.FileMode.String(): envd reports permissions in this format, so do we.
_GO_MODE_CHARS = "dalTLDpSugct?"


def go_mode_string(mode: int) -> str:
    flags = {
        "d": stat.S_ISDIR(mode),
        "L": stat.S_ISLNK(mode),
        "D": stat.S_ISBLK(mode) or stat.S_ISCHR(mode),
        "p": stat.S_ISFIFO(mode),
        "S": stat.S_ISSOCK(mode),
        "u": bool(mode & stat.S_ISUID),
        "g": bool(mode & stat.S_ISGID),
        "c": stat.S_ISCHR(mode),
        "t": bool(mode & stat.S_ISVTX),
    }
    prefix = "".join(c for c in _GO_MODE_CHARS if flags.get(c)) or "-"
    rwx = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return prefix + rwx


def protobuf_timestamp(ns: int) -> str:
    """A Timestamp as protobuf JSON writes it: UTC, 0/3/6/9 fractional digits. Not the REST
    API's times (api/shapes.rfc3339, microseconds from a float): each side follows its own wire
    format, and guest code does not import host code."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos:
        if nanos % 1_000_000 == 0:
            text += f".{nanos // 1_000_000:03d}"
        elif nanos % 1_000 == 0:
            text += f".{nanos // 1_000:06d}"
        else:
            text += f".{nanos:09d}"
    return text + "Z"


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return FILE_TYPE_FILE
    if stat.S_ISDIR(mode):
        return FILE_TYPE_DIRECTORY
    return None  # FILE_TYPE_UNSPECIFIED: fifos, sockets, devices (omitted, as default values are)


class Names:
    """uid/gid -> name lookups, cached for the length of one listing."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.groups: dict[int, str] = {}

    def user(self, uid: int) -> str:
        if uid not in self.users:
            try:
                self.users[uid] = pwd.getpwuid(uid).pw_name
            except KeyError:
                self.users[uid] = str(uid)
        return self.users[uid]

    def group(self, gid: int) -> str:
        if gid not in self.groups:
            try:
                self.groups[gid] = grp.getgrgid(gid).gr_name
            except KeyError:
                self.groups[gid] = str(gid)
        return self.groups[gid]


def read_metadata(path: str) -> dict[str, str]:
    """User metadata: the `user.e2b.*` xattrs with the prefix stripped (none if unsupported)."""
    try:
        names = os.listxattr(path)
    except OSError:
        return {}
    metadata = {}
    for name in names:
        if not name.startswith(METADATA_XATTR_PREFIX):
            continue
        try:
            metadata[name[len(METADATA_XATTR_PREFIX) :]] = os.getxattr(path, name).decode()
        except (OSError, UnicodeDecodeError):
            continue  # set out-of-band with bytes a JSON string cannot carry: skip just this key
    return metadata


def entry_info(
    path: str,
    st: os.stat_result | None = None,
    *,
    real: str | None = None,
    names: Names | None = None,
) -> Message:
    """EntryInfo of `path` (lstat; a symlink is described, not followed). `real` is where the
    entry really is when `path` is how the user named it (a listing under a symlinked dir)."""
    real = real or path
    if st is None:
        st = os.lstat(real)
    names = names or Names()
    entry: Message = {"name": os.path.basename(path) or "/"}
    kind = _kind(st.st_mode)
    mode = stat.S_IMODE(st.st_mode) & 0o777
    metadata_path = real
    if stat.S_ISLNK(st.st_mode):
        entry["isSymlink"] = True
        try:
            target = os.path.realpath(real, strict=True)
            target_st = os.stat(real)
        except (OSError, RuntimeError):
            # Dangling or looping: envd reports the link itself as the target then. Report it as
            # a symlink so listings (which drop unknown types) still show it.
            entry["symlinkTarget"] = real
            kind, mode = FILE_TYPE_SYMLINK, 0
        else:
            entry["symlinkTarget"] = target
            kind, mode = _kind(target_st.st_mode), target_st.st_mode & 0o777
            metadata_path = target
    if kind:
        entry["type"] = kind
    entry["path"] = path
    if st.st_size:
        entry["size"] = str(st.st_size)
    if mode:
        entry["mode"] = mode
    entry["permissions"] = go_mode_string(st.st_mode)
    entry["owner"] = names.user(st.st_uid)
    entry["group"] = names.group(st.st_gid)
    entry["modifiedTime"] = protobuf_timestamp(st.st_mtime_ns)
    metadata = read_metadata(metadata_path)
    if metadata:
        entry["metadata"] = metadata
    return entry


# --- uploads (named here because watchers must recognise them) ---------------------------------

# /files writes into `.<name>.<12 hex>.envd-<new|old>` next to the target and renames it into
# place, so readers never see half a file. Watchers hide these names and report the rename as the
# CREATE (+ WRITE) or WRITE a plain write would have produced; new/old says whether the target
# existed.
UPLOAD_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.envd-(?P<kind>new|old)$")


def upload_temp_name(name: str, replaces: bool) -> str:
    return f".{name}.{secrets.token_hex(6)}.envd-{'old' if replaces else 'new'}"


# --- watching -------------------------------------------------------------------------------------

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

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(f"watcher error: {exc}")
            return
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, cookie, length = _EVENT_HEADER.unpack_from(data, offset)
            raw = data[offset + _EVENT_HEADER.size : offset + _EVENT_HEADER.size + length]
            offset += _EVENT_HEADER.size + length
            self._event(wd, mask, cookie, os.fsdecode(raw.rstrip(b"\x00")))

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
            kind = self.upload_cookies.pop(cookie)
            if kind == "new":
                self.emit(relative, EVENT_CREATE, full)
            self.emit(relative, EVENT_WRITE, full)
            return
        for bits, event_type in _INOTIFY_OPS:
            if mask & bits:
                self.emit(relative, event_type, full)


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


async def _open_watch(
    request: Request, state: EnvdState, message: Message, sink: Callable[[Message], None],
    fail: Callable[[str], None],
) -> DirWatch:  # fmt: skip
    user = request_user(request, state)
    path = resolve_path(string_field(message, "path"), user, state.default_workdir)
    access = Access(user)

    def check() -> None:
        access.search(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise os_error(exc, path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", f"path {path} not a directory")
        access.require(path, R_OK | X_OK, st)

    await blocking(check)
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


# --- the service ----------------------------------------------------------------------------------


def _depth(message: Message) -> int:
    try:
        depth = int(message.get("depth") or 0)
    except (TypeError, ValueError):
        raise ConnectError("invalid_argument", "depth must be an integer") from None
    return depth if depth > 0 else 1


def _list_dir(access: Access, requested: str, depth: int) -> list[Message]:
    access.search(requested)
    try:
        real = os.path.realpath(requested, strict=True)
        st = os.stat(real)
    except OSError as exc:
        raise os_error(exc, requested) from None
    except RuntimeError:  # symlink loop (older Pythons raise this instead of ELOOP)
        raise ConnectError("failed_precondition", f"cyclic symlink at {requested}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConnectError("invalid_argument", f"path is not a directory: {requested}")
    access.search(real)
    access.require(requested, R_OK | X_OK, st)
    names = Names()
    entries: list[Message] = []

    # Depth-first in name order, like Go's filepath.WalkDir; symlinked directories are listed but
    # not descended into, and subdirectories the user cannot read are listed but not opened.
    def visit(real_dir: str, shown_dir: str, level: int) -> None:
        try:
            with os.scandir(real_dir) as iterator:
                children = sorted(iterator, key=lambda e: e.name)
        except OSError as exc:
            if level == 1:
                raise os_error(exc, shown_dir) from None
            return
        for child in children:
            shown = os.path.join(shown_dir, child.name)
            try:
                child_st = child.stat(follow_symlinks=False)
                entries.append(entry_info(shown, child_st, real=child.path, names=names))
            except OSError:
                continue  # removed while listing
            if (
                level < depth
                and stat.S_ISDIR(child_st.st_mode)
                and access.allows(child_st, R_OK | X_OK)
            ):
                visit(child.path, shown, level + 1)

    visit(real, requested, 1)
    return entries


def _stat(access: Access, path: str) -> Message:
    access.search(path)
    try:
        return entry_info(path)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:  # "/file/x" does not exist (so `exists` says False)
            raise ConnectError("not_found", f"file not found: {path}") from None
        raise os_error(exc, path) from None


def _make_dir(access: Access, path: str) -> Message:
    access.search(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        make_dirs(access, path)
        return entry_info(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConnectError("already_exists", f"directory already exists: {path}")
    raise ConnectError("invalid_argument", f"path already exists but it is not a directory: {path}")


def _copy_keeping_owner(src: str, dst: str) -> None:
    shutil.copy2(src, dst, follow_symlinks=False)
    st = os.lstat(src)
    os.lchown(dst, st.st_uid, st.st_gid)


def _move_across_filesystems(src: str, dst: str) -> None:
    """What `mv` does on EXDEV: copy (keeping owners, modes and times), then delete."""
    st = os.lstat(src)
    if not stat.S_ISDIR(st.st_mode):
        _copy_keeping_owner(src, dst)
        os.unlink(src)
        return
    shutil.copytree(src, dst, symlinks=True, copy_function=_copy_keeping_owner)
    for directory, _, _ in os.walk(src):
        copied = os.path.join(dst, os.path.relpath(directory, src))
        dir_st = os.lstat(directory)
        os.lchown(copied, dir_st.st_uid, dir_st.st_gid)
    shutil.rmtree(src)


def _move(access: Access, source: str, destination: str) -> Message:
    access.search(source)
    try:
        st = os.lstat(source)
    except OSError as exc:
        raise os_error(exc, source) from None
    access.require_unlink(source, st)
    target_dir = os.path.dirname(destination)
    if stat.S_ISDIR(st.st_mode) and os.path.dirname(source) != target_dir:
        access.require(source, W_OK, st)  # its ".." entry changes
    make_dirs(access, target_dir)
    access.require_dir_write(target_dir)
    with contextlib.suppress(FileNotFoundError):  # replacing an entry is removing it
        access.require_unlink(destination, os.lstat(destination))
    try:
        try:
            os.rename(source, destination)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _move_across_filesystems(source, destination)
    except OSError as exc:
        raise os_error(exc, f"{source} -> {destination}") from None
    return entry_info(destination)


def _remove(access: Access, path: str) -> None:
    if path == "/":
        raise ConnectError("invalid_argument", "refusing to remove /")
    access.search(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # like envd's os.RemoveAll: nothing there is success
    except OSError as exc:
        raise os_error(exc, path) from None
    access.require_unlink(path, st)
    try:
        if stat.S_ISDIR(st.st_mode):
            access.require_tree_removal(path)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise os_error(exc, getattr(exc, "filename", None) or path) from None


def routes(state: EnvdState) -> list[Route]:
    watchers: dict[str, PollingWatcher] = {}

    def context(request: Request) -> tuple[User, Access]:
        user = request_user(request, state)
        return user, Access(user)

    def resolve(user: User, message: Message, key: str = "path") -> str:
        return resolve_path(string_field(message, key), user, state.default_workdir)

    async def stat_(request: Request, message: Message) -> Message:
        user, access = context(request)
        return {"entry": await blocking(_stat, access, resolve(user, message))}

    async def list_dir(request: Request, message: Message) -> Message:
        user, access = context(request)
        entries = await blocking(_list_dir, access, resolve(user, message), _depth(message))
        return {"entries": entries} if entries else {}

    async def make_dir(request: Request, message: Message) -> Message:
        user, access = context(request)
        return {"entry": await blocking(_make_dir, access, resolve(user, message))}

    async def move(request: Request, message: Message) -> Message:
        user, access = context(request)
        source = resolve(user, message, "source")
        destination = resolve(user, message, "destination")
        return {"entry": await blocking(_move, access, source, destination)}

    async def remove(request: Request, message: Message) -> Message:
        user, access = context(request)
        await blocking(_remove, access, resolve(user, message))
        return {}

    async def watch_dir(request: Request, message: Message) -> AsyncIterator[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        failure: list[str] = []

        def sink(event: Message) -> None:
            if queue.qsize() >= MAX_PENDING_EVENTS:
                fail("watcher error: client is not reading events fast enough")
            elif not failure:
                queue.put_nowait({"filesystem": event})

        def fail(text: str) -> None:
            if not failure:
                failure.append(text)
                queue.put_nowait({})  # wakes the stream up to end it

        watch = await _open_watch(request, state, message, sink, fail)
        interval = keepalive_interval(request)
        try:
            yield {"start": {}}
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    yield {"keepalive": {}}
                    continue
                if not event:  # the failure marker, queued after every event before it
                    raise ConnectError("internal", failure[0])
                yield event
        finally:
            watch.close()

    async def create_watcher(request: Request, message: Message) -> Message:
        if len(watchers) >= MAX_POLLING_WATCHERS:
            raise ConnectError("resource_exhausted", "too many watchers; remove some first")
        watcher = PollingWatcher()
        watcher.watch = await _open_watch(request, state, message, watcher.sink, watcher.fail)
        watcher_id = "w" + secrets.token_hex(8)
        watchers[watcher_id] = watcher
        return {"watcherId": watcher_id}

    def find_watcher(message: Message) -> tuple[str, PollingWatcher]:
        watcher_id = str(message.get("watcherId", message.get("watcher_id", "")))
        watcher = watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError("not_found", f"watcher with id {watcher_id} not found")
        return watcher_id, watcher

    async def get_watcher_events(request: Request, message: Message) -> Message:
        _, watcher = find_watcher(message)
        if watcher.error:
            raise ConnectError("internal", watcher.error)
        events, watcher.events = watcher.events, []
        return {"events": events} if events else {}

    async def remove_watcher(request: Request, message: Message) -> Message:
        watcher_id, watcher = find_watcher(message)
        if watcher.watch is not None:
            watcher.watch.close()
        del watchers[watcher_id]
        return {}

    handlers: dict[str, Callable[[Request], Awaitable[Any]]] = {
        "Stat": unary(stat_),
        "ListDir": unary(list_dir),
        "MakeDir": unary(make_dir),
        "Move": unary(move),
        "Remove": unary(remove),
        "WatchDir": server_stream(watch_dir),
        "CreateWatcher": unary(create_watcher),
        "GetWatcherEvents": unary(get_watcher_events),
        "RemoveWatcher": unary(remove_watcher),
    }
    return [
        Route(f"/filesystem.Filesystem/{name}", endpoint, methods=["POST"])
        for name, endpoint in handlers.items()
    ]
