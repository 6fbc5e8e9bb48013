"""The files of a volume, as E2B's volume content API sees them: stat, list, make a directory,
write, read, remove, chmod/chown.

A volume's data directory is shared with untrusted sandboxes, which write into it as root while
the host serves these calls: between two system calls of ours a sandbox can plant a symbolic
link, swap a directory for a link to `/`, leave a fifo or hard-link a file anywhere. So no call
here resolves a path by name from the host's root. Every path is walked one component at a time
from a descriptor of the volume's root, each step opened relative to its parent's descriptor
with O_NOFOLLOW: a link anywhere in a path is refused, never followed, and whatever a sandbox
does, an operation acts inside the volume. What is changed (mode, owner) is changed through a
descriptor of the object that was checked, or by name with AT_SYMLINK_NOFOLLOW. A file is read
only once its descriptor is known to be a regular file (opened O_NONBLOCK so that a fifo cannot
hang the server), and written into a fresh temporary file that a rename puts in place: readers,
the sandboxes included, see the old content or the new, never a part.

The functions are blocking: the caller runs them in a thread.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from vivarium.errors import Conflict, InvalidArgument, NotFound, VivariumError

# The sandbox's default user owns what the API creates, so that code running as `user` can
# change it afterwards.
DEFAULT_UID = DEFAULT_GID = 1000
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755

MAX_PATH = 4096  # Linux's PATH_MAX
MAX_NAME = 255  # bytes in one component, ext4's limit
MAX_DEPTH = 32
MAX_ENTRIES = 100_000  # one listing's worth: a bigger reply would hold the server's memory
# Removing a tree holds one descriptor per level: bounded well below the usual 1024 files.
MAX_REMOVE_DEPTH = 256
MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown

_ROOT_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
# O_PATH: a step of a walk needs no read permission and opens no device.
_STEP_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
# Listing, fsync and fchmod/fchown need a descriptor opened for reading.
_DIR_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_EARLIEST = datetime(1, 1, 1, tzinfo=UTC).timestamp()
_LATEST = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
_NO_FOLLOW_HINT = "it is a symbolic link, which the volume API does not follow"


class VolumeFull(VivariumError):
    code = "volume_full"
    http_status = 507

    def __init__(
        self, message: str = "the volume is full", hint: str = "delete files from it"
    ) -> None:
        super().__init__(message, hint)


@dataclass(frozen=True)
class _Owner:
    uid: int
    gid: int
    mode: int


class PendingWrite:
    """A new file being written under a temporary name, put in place by `commit`. Any failure
    (and `abort`, or leaving a `with` block uncommitted) removes the temporary file."""

    def __init__(
        self, parent_fd: int, fd: int, temp: str, name: str, parts: Sequence[str], owner: _Owner
    ) -> None:
        self.fd = fd
        self._parent_fd = parent_fd
        self._temp = temp
        self._name = name
        self._parts = tuple(parts)
        self._owner = owner
        self._renamed = False
        self._done = False

    def __enter__(self) -> PendingWrite:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.abort()

    @property
    def path(self) -> str:
        return _shown(self._parts)

    def write(self, data: bytes) -> None:
        self._check_open()
        view = memoryview(data)
        try:
            with _os_errors(self.path):
                while view:
                    view = view[os.write(self.fd, view) :]
        except BaseException:
            self.abort()
            raise

    def commit(self) -> dict[str, Any]:
        """Put the file in place, durably, and return its entry."""
        self._check_open()
        owner = self._owner
        try:
            with _os_errors(self.path):
                # chown before chmod: a chown clears the set-user-ID and set-group-ID bits.
                os.fchown(self.fd, owner.uid, owner.gid)
                os.fchmod(self.fd, owner.mode)
                os.fsync(self.fd)
                os.rename(
                    self._temp, self._name, src_dir_fd=self._parent_fd, dst_dir_fd=self._parent_fd
                )
                self._renamed = True
                # The descriptor, not the name, which a sandbox may already have replaced.
                entry = _entry(os.fstat(self.fd), self._parts, None)
                _fsync_dir(self._parent_fd)
        finally:
            self.abort()
        return entry

    def abort(self) -> None:
        """Drop the temporary file. Idempotent, and never raises: it runs on failure paths."""
        if self._done:
            return
        self._done = True
        with suppress(OSError):
            os.close(self.fd)
        if not self._renamed:
            with suppress(OSError):
                os.unlink(self._temp, dir_fd=self._parent_fd)
        with suppress(OSError):
            os.close(self._parent_fd)

    def _check_open(self) -> None:
        if self._done:
            raise ValueError(f"the write of '{self.path}' has already ended")


class VolumeFiles:
    def __init__(self, root: Path) -> None:
        self._root = root

    def stat(self, path: str) -> dict[str, Any]:
        parts = _parts(path)
        if not parts:
            fd = self._open_root()
            try:
                return _entry(os.fstat(fd), parts, None)
            finally:
                os.close(fd)
        parent = self._walk(parts[:-1])
        try:
            with _os_errors(_shown(parts)):
                return _entry_at(parent, parts)
        finally:
            os.close(parent)

    def list_dir(self, path: str, depth: int = 1) -> list[dict[str, Any]]:
        """The entries below `path`, `depth` levels deep, each directory's entries sorted by name
        and each followed by its own (a linked directory is listed, never entered)."""
        parts = _parts(path)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise InvalidArgument(f"depth must be an integer from 1 to {MAX_DEPTH}, not {depth!r}")
        fd = self._walk(parts)
        try:
            entries: list[dict[str, Any]] = []
            with _os_errors(_shown(parts)):
                self._list(fd, parts, depth, entries)
            return entries
        finally:
            os.close(fd)

    def make_dir(
        self,
        path: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
        mode: int | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Create the directory `path`; `force` creates its missing parents too, alike."""
        parts = _parts(path)
        owner = _owner(uid, gid, mode, DEFAULT_DIR_MODE)
        if not parts:
            raise Conflict("the volume's root '/' already exists")
        shown = _shown(parts)
        parent = self._walk(parts[:-1], make=owner if force else None)
        try:
            with _os_errors(shown):
                # Private until its owner and mode are set.
                os.mkdir(parts[-1], 0o700, dir_fd=parent)
                fd = os.open(parts[-1], _DIR_READ_FLAGS, dir_fd=parent)
                try:
                    _own(fd, owner)
                    return _entry(os.fstat(fd), parts, None)
                finally:
                    os.close(fd)
        finally:
            os.close(parent)

    def open_write(
        self,
        path: str,
        *,
        uid: int | None = None,
        gid: int | None = None,
        mode: int | None = None,
        force: bool = False,
    ) -> PendingWrite:
        """Start writing the file `path`, new or replacing one; `force` creates missing parent
        directories (owned by the default user)."""
        parts = _parts(path)
        owner = _owner(uid, gid, mode, DEFAULT_FILE_MODE)
        if not parts:
            raise InvalidArgument("'/' is the volume's root directory: name a file to write")
        shown = _shown(parts)
        name = parts[-1]
        made = _Owner(DEFAULT_UID, DEFAULT_GID, DEFAULT_DIR_MODE) if force else None
        parent = self._walk(parts[:-1], make=made)
        try:
            with _os_errors(shown):
                try:
                    existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    if stat.S_ISDIR(existing.st_mode):
                        raise InvalidArgument(f"'{shown}' is a directory")
                temp = _temp_name(name)
                # Private until committed; O_EXCL|O_NOFOLLOW: never through what a sandbox put
                # at that name.
                fd = os.open(temp, _TEMP_FLAGS, 0o600, dir_fd=parent)
        except BaseException:
            os.close(parent)
            raise
        return PendingWrite(parent, fd, temp, name, parts, owner)

    def open_read(self, path: str) -> tuple[int, int]:
        """A descriptor of the regular file `path` and its size; the caller closes it."""
        parts = _parts(path)
        shown = _shown(parts)
        if not parts:
            raise InvalidArgument("'/' is a directory")
        parent = self._walk(parts[:-1])
        try:
            with _os_errors(shown):
                # Checked before the open too: opening a device can act on it.
                _check_regular(os.stat(parts[-1], dir_fd=parent, follow_symlinks=False), shown)
                try:
                    fd = os.open(parts[-1], _FILE_READ_FLAGS, dir_fd=parent)
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise InvalidArgument(
                            f"'{shown}' is not a regular file", _NO_FOLLOW_HINT
                        ) from None
                    raise
        finally:
            os.close(parent)
        try:
            # What was opened may not be what was checked: this check is the one that counts.
            st = os.fstat(fd)
            _check_regular(st, shown)
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def remove(self, path: str) -> None:
        """Remove the file, link or directory tree `path`; links inside are removed, never
        followed."""
        parts = _parts(path)
        if not parts:
            raise InvalidArgument("the volume's root cannot be removed")
        shown = _shown(parts)
        parent = self._walk(parts[:-1])
        try:
            with _os_errors(shown):
                try:
                    os.unlink(parts[-1], dir_fd=parent)
                except IsADirectoryError:  # Linux's answer to unlink on a directory
                    _remove_tree(parent, parts[-1], shown)
        finally:
            os.close(parent)

    def update(
        self, path: str, *, uid: int | None = None, gid: int | None = None, mode: int | None = None
    ) -> dict[str, Any]:
        """Change the mode and owner of `path` (a link's owner only: Linux links have no mode)."""
        parts = _parts(path)
        shown = _shown(parts)
        if mode is not None:
            _check_mode(mode)
        for label, value in (("uid", uid), ("gid", gid)):
            if value is not None:
                _check_id(label, value)
        parent = self._open_root() if not parts else self._walk(parts[:-1])
        try:
            with _os_errors(shown):
                if not parts:
                    fd = os.dup(parent)
                else:
                    fd = os.open(parts[-1], os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
                try:
                    link = stat.S_ISLNK(os.fstat(fd).st_mode)
                    # An O_PATH descriptor takes no fchmod/fchown, but its /proc link reaches
                    # the very object checked above, whatever now holds its name.
                    pinned = f"/proc/self/fd/{fd}"
                    if uid is not None or gid is not None:
                        new_uid = -1 if uid is None else uid
                        new_gid = -1 if gid is None else gid
                        if link:
                            os.chown(
                                parts[-1], new_uid, new_gid, dir_fd=parent, follow_symlinks=False
                            )
                        else:
                            os.chown(pinned, new_uid, new_gid)
                    if mode is not None and not link:
                        os.chmod(pinned, mode)
                    target = _readlink(parent, parts[-1]) if link else None
                    return _entry(os.fstat(fd), parts, target)
                finally:
                    os.close(fd)
        finally:
            os.close(parent)

    def _open_root(self) -> int:
        return os.open(self._root, _ROOT_FLAGS)

    def _walk(self, parts: Sequence[str], make: _Owner | None = None) -> int:
        """An O_PATH descriptor of the directory `parts`, reached without following a link;
        missing directories are made (owned by `make`) when it is given."""
        fd = self._open_root()
        try:
            for i, part in enumerate(parts):
                child = _step(fd, part, parts[: i + 1], make)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _list(
        self, fd: int, parts: Sequence[str], depth: int, entries: list[dict[str, Any]]
    ) -> None:
        reader = os.open(".", _DIR_READ_FLAGS, dir_fd=fd)
        try:
            names = sorted(os.listdir(reader))
        finally:
            os.close(reader)
        for name in names:
            child = (*parts, name)
            try:
                entry = _entry_at(fd, child)
            except FileNotFoundError:
                continue  # removed by a sandbox since the listing
            entries.append(entry)
            if len(entries) > MAX_ENTRIES:
                raise InvalidArgument(
                    f"'{_shown(parts)}' holds more than {MAX_ENTRIES} entries at this depth",
                    "list it with a smaller depth, or list its subdirectories one by one",
                )
            if depth > 1 and entry["type"] == "directory":
                try:
                    sub = os.open(name, _STEP_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        continue  # replaced since its stat: listed as it was
                    raise
                try:
                    self._list(sub, child, depth - 1, entries)
                finally:
                    os.close(sub)


def _parts(path: str) -> tuple[str, ...]:
    if not isinstance(path, str):
        raise InvalidArgument(f"a path must be a string, not {type(path).__name__}")
    if len(path) > MAX_PATH:
        raise InvalidArgument(f"the path is longer than {MAX_PATH} characters")
    if "\0" in path:
        raise InvalidArgument("a path cannot contain a NUL character")
    parts = tuple(part for part in path.split("/") if part not in ("", "."))
    for part in parts:
        if part == "..":
            raise InvalidArgument(
                f"'{path}' contains '..': paths are relative to the volume's root"
            )
        try:
            size = len(os.fsencode(part))
        except UnicodeEncodeError:
            raise InvalidArgument(f"'{path}' is not valid UTF-8") from None
        if size > MAX_NAME:
            raise InvalidArgument(f"a name in '{path}' is longer than {MAX_NAME} bytes")
    return parts


def _shown(parts: Sequence[str]) -> str:
    return _text("/" + "/".join(parts))


def _text(name: str) -> str:
    # A sandbox can make names that are not UTF-8 (os.fsdecode keeps their bytes as lone
    # surrogates), which no JSON reply can carry: shown with U+FFFD, as Go's envd does.
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _check_mode(mode: int) -> None:
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise InvalidArgument(f"mode must be from 0 to 0o7777, not {mode!r}")


def _check_id(label: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"{label} must be from 0 to {MAX_ID}, not {value!r}")


def _owner(uid: int | None, gid: int | None, mode: int | None, default_mode: int) -> _Owner:
    owner = _Owner(
        DEFAULT_UID if uid is None else uid,
        DEFAULT_GID if gid is None else gid,
        default_mode if mode is None else mode,
    )
    _check_id("uid", owner.uid)
    _check_id("gid", owner.gid)
    _check_mode(owner.mode)
    return owner


def _own(fd: int, owner: _Owner) -> None:
    # chown before chmod: a chown clears the set-user-ID and set-group-ID bits.
    os.fchown(fd, owner.uid, owner.gid)
    os.fchmod(fd, owner.mode)


def _step(fd: int, part: str, parts: Sequence[str], make: _Owner | None) -> int:
    """The directory `part` of the directory `fd`, made first if missing and `make` is given."""
    shown = _shown(parts)
    try:
        return _open_step(fd, part, shown)
    except NotFound:
        if make is None:
            raise
    with _os_errors(shown):
        try:
            os.mkdir(part, 0o700, dir_fd=fd)
        except FileExistsError:
            pass  # made meanwhile, by a sandbox or another call: the open below judges it
        else:
            made = os.open(part, _DIR_READ_FLAGS, dir_fd=fd)
            try:
                _own(made, make)
            finally:
                os.close(made)
    return _open_step(fd, part, shown)


def _open_step(fd: int, part: str, shown: str) -> int:
    try:
        return os.open(part, _STEP_FLAGS, dir_fd=fd)
    except NotADirectoryError:
        # O_NOFOLLOW|O_DIRECTORY says ENOTDIR for a link as for a file: tell them apart.
        raise _not_a_directory(fd, part, shown) from None
    except OSError as exc:
        mapped = _mapped(exc, shown)
        if mapped is None:
            raise
        raise mapped from exc


def _not_a_directory(fd: int, part: str, shown: str) -> VivariumError:
    try:
        st = os.stat(part, dir_fd=fd, follow_symlinks=False)
    except OSError:
        return NotFound(f"path '{shown}' not found in the volume")
    if stat.S_ISLNK(st.st_mode):
        return NotFound(
            f"'{shown}' is a symbolic link, which the volume API does not follow",
            "name the path it points to instead",
        )
    return InvalidArgument(f"'{shown}' is not a directory")


def _check_regular(st: os.stat_result, shown: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"'{shown}' is a directory")
    if not stat.S_ISREG(st.st_mode):
        hint = _NO_FOLLOW_HINT if stat.S_ISLNK(st.st_mode) else ""
        raise InvalidArgument(f"'{shown}' is not a regular file", hint)


def _temp_name(name: str) -> str:
    # Cut so the temporary name stays within MAX_NAME bytes; surrogateescape keeps a cut
    # character's bytes intact.
    prefix = os.fsdecode(os.fsencode(name)[: MAX_NAME - 64])
    return f".{prefix}.vivarium-{secrets.token_hex(16)}"


def _fsync_dir(fd: int) -> None:
    reader = os.open(".", _DIR_READ_FLAGS, dir_fd=fd)
    try:
        os.fsync(reader)
    finally:
        os.close(reader)


def _readlink(parent: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=parent)
    except OSError:
        return None  # no longer a link: a sandbox replaced it since its stat


def _entry_at(parent: int, parts: Sequence[str]) -> dict[str, Any]:
    st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
    target = _readlink(parent, parts[-1]) if stat.S_ISLNK(st.st_mode) else None
    return _entry(st, parts, target)


def _entry(st: os.stat_result, parts: Sequence[str], target: str | None) -> dict[str, Any]:
    """E2B's VolumeEntryStat."""
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "symlink"
    else:
        kind = "unknown"
    entry: dict[str, Any] = {
        "name": _text(parts[-1]) if parts else "/",
        "type": kind,
        "path": _shown(parts),
        "size": st.st_size,
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "atime": _time(st.st_atime),
        "mtime": _time(st.st_mtime),
        "ctime": _time(st.st_ctime),
    }
    if target is not None:
        entry["target"] = _text(target)
    return entry


def _time(timestamp: float) -> str:
    # Clamped: a sandbox can set any time at all, beyond what datetime represents.
    timestamp = min(max(timestamp, _EARLIEST), _LATEST)
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _remove_tree(parent: int, name: str, shown: str) -> None:
    """Empty and remove the directory `name` of `parent`, depth first, with one descriptor per
    level: no path is ever resolved, so a link inside is removed as a link."""
    # (descriptor, its name in the level above, the names still to remove in it)
    stack: list[tuple[int, str, Iterator[str]]] = []

    def enter(at: int, child: str) -> None:
        fd = os.open(child, _DIR_READ_FLAGS, dir_fd=at)
        try:
            names = iter(os.listdir(fd))
        except BaseException:
            os.close(fd)
            raise
        stack.append((fd, child, names))

    try:
        enter(parent, name)
        while stack:
            fd, _, names = stack[-1]
            for child in names:
                try:
                    os.unlink(child, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except IsADirectoryError:
                    if len(stack) >= MAX_REMOVE_DEPTH:
                        raise InvalidArgument(
                            f"'{shown}' nests directories more than {MAX_REMOVE_DEPTH} deep, "
                            "which the volume API does not remove (part of it may be gone)",
                            "remove it from inside a sandbox instead (rm -rf)",
                        ) from None
                    try:
                        enter(fd, child)
                    except OSError as exc:
                        # Replaced by a sandbox since: the rmdir below reports what remains.
                        if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                            raise
                        continue
                    break
            else:
                _, done, _ = stack.pop()
                os.close(fd)
                with suppress(FileNotFoundError):
                    os.rmdir(done, dir_fd=stack[-1][0] if stack else parent)
    finally:
        for fd, _, _ in stack:
            os.close(fd)


@contextmanager
def _os_errors(shown: str) -> Iterator[None]:
    """Turns the OSErrors a client can cause into the API's errors about `shown`."""
    try:
        yield
    except OSError as exc:
        mapped = _mapped(exc, shown)
        if mapped is None:
            raise
        raise mapped from exc


def _mapped(exc: OSError, shown: str) -> VivariumError | None:
    code = exc.errno
    if code == errno.ENOENT:
        return NotFound(f"path '{shown}' not found in the volume")
    if code == errno.ENOTDIR:
        return InvalidArgument(f"'{shown}' is not a directory")
    if code == errno.ELOOP:
        return InvalidArgument(
            f"'{shown}' is a symbolic link, which the volume API does not follow"
        )
    if code == errno.EEXIST:
        return Conflict(f"'{shown}' already exists")
    if code in (errno.ENOSPC, errno.EDQUOT):
        return VolumeFull(f"the volume is full: '{shown}' could not be written")
    if code == errno.EISDIR:
        return InvalidArgument(f"'{shown}' is a directory")
    if code in (errno.ENOTEMPTY, errno.EBUSY):
        return Conflict(
            f"'{shown}' changed while it was being removed",
            "a sandbox may be writing into it: retry",
        )
    if code == errno.ENAMETOOLONG:
        return InvalidArgument(f"'{shown}' is too long a path")
    if code == errno.EMLINK:
        return Conflict(f"'{shown}': its directory holds too many entries")
    return None
