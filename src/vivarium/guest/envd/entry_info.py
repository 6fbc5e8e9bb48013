"""EntryInfo, the description of a file or directory that Stat, ListDir, MakeDir, Move and the
watchers' events carry, built from lstat, the owner's names and the `user.e2b.*` xattrs that hold
a file's user metadata (written by /files uploads). Kept apart from the service so the watchers
and uploads share one definition of what an entry looks like on the wire.

Wire format: proto3 JSON as protobuf-go emits it (lowerCamelCase names, int64 as strings, enums
by name, RFC 3339 timestamps, default values omitted). EntryInfo follows current envd: a symlink
has `isSymlink: true`, `type` is its target's type, `mode` the target's permission bits and
`permissions` the link's own Go-style mode string (e.g. `Lrwxrwxrwx`, `dtrwxrwxrwx` for /tmp).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
import time

from .connect import Message

FILE_TYPE_FILE = "FILE_TYPE_FILE"
FILE_TYPE_DIRECTORY = "FILE_TYPE_DIRECTORY"
FILE_TYPE_SYMLINK = "FILE_TYPE_SYMLINK"

METADATA_XATTR_PREFIX = "user.e2b."

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
