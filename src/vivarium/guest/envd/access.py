"""Acting on the filesystem as the request's user: resolving the path a request names, checking
the user's permissions, turning OS errors into Connect errors and running the blocking calls off
the event loop. Both the Connect `filesystem.Filesystem` service and the HTTP `/files` endpoint
act through these, so a user gets the same answer from either.

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
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from .auth import User
from .connect import ConnectError

P = ParamSpec("P")
T = TypeVar("T")

R_OK, W_OK, X_OK = 4, 2, 1


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

    def require_dir(self, path: str, want: int, not_dir: str) -> None:
        """`want` on a directory; `not_dir` is the invalid_argument message when it is not one."""
        self.search(path)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise os_error(exc, path) from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", not_dir)
        self.require(path, want, st)

    def require_dir_write(self, directory: str) -> None:
        """Creating or removing entries in `directory` needs w and x on it."""
        self.require_dir(directory, W_OK | X_OK, f"not a directory: {directory}")

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
