"""The state directory is root's alone: it holds envd access tokens and env vars (records),
whole memory images (snapshots), the catalog, the keys and the node's socket.

Its own mode (0700) is what keeps every other local user out, including the sandboxes' sentries,
which run on the host as `nobody`; the modes inside are tightened too, so that a copy or a
looser parent does not expose them. An install made before this was locked down is repaired at
start, with a log line per entry. A path that another user could rename or replace is refused:
no mode inside it would help then.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from vivarium.errors import ConfigError

log = logging.getLogger(__name__)

DIR_MODE = 0o700
FILE_MODE = 0o600
# What may hold a secret or a user's data, below the state directory. The rest (template root
# filesystems, the /proc/sys copy bind-mounted into sandboxes, the caches) keeps the modes the
# sandboxes need; the state directory's own mode already closes it to other users.
PRIVATE_DIRS = ("sandboxes", "snapshots", "disks", "runsc", "runsc-build", "egress-ca")
PRIVATE_FILES = ("vivarium.db", "vivarium.db-wal", "vivarium.db-shm", "admin.key", "secret.key",
                 "node.lock")  # fmt: skip


def write_private(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace a file whole, root's alone from its first byte (not after a chmod): a crash
    leaves the old content or the new one, never a mix. `durable`: also after a power loss."""
    tmp = path.with_name(path.name + ".tmp")
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE), "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    tmp.rename(path)


def fsync_path(path: str | Path) -> None:
    """Make a file's content, or a directory's entries (a rename into it), durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(top: Path) -> None:
    for root, _dirs, files in os.walk(top):
        for name in files:
            fsync_path(Path(root, name))
        fsync_path(Path(root))


def prepare(state_dir: Path) -> list[str]:
    """Check the path, create the directory if needed and tighten it; returns what changed."""
    check_path(state_dir)
    state_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    changed = _tighten(state_dir, DIR_MODE)
    for name in PRIVATE_DIRS:
        changed += _tighten_tree(state_dir / name)
    for name in PRIVATE_FILES:
        changed += _tighten(state_dir / name, FILE_MODE)
    for line in changed:
        log.warning("state directory tightened: %s", line)
    return changed


def check_path(state_dir: Path) -> None:
    """Refuse a state directory that a user other than root could replace: one owned by another
    user, or below a directory that others may write to (unless it is sticky and root's, as
    /tmp is: there nobody else may rename or remove what root created)."""
    path = state_dir.absolute()
    chain = [path, *path.parents]
    for directory in chain:
        try:
            st = directory.lstat()
        except FileNotFoundError:
            continue  # made below by us, with our modes
        what = "the state directory" if directory == path else f"its parent {directory}"
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(
                f"state directory {state_dir}: {what} is a symbolic link",
                "set VIVARIUM_STATE_DIR to the real path",
            )
        if st.st_uid != 0:
            raise ConfigError(
                f"state directory {state_dir}: {what} belongs to uid {st.st_uid}, not root, "
                "so that user could replace what the server keeps there",
                "use a directory whose every parent belongs to root (the default is "
                "/var/lib/vivarium)",
            )
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = st.st_mode & stat.S_ISVTX
        if directory != path and writable and not sticky:
            raise ConfigError(
                f"state directory {state_dir}: {what} is writable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}), so they could replace it",
                "use a directory below parents that only root can write to (the default is "
                "/var/lib/vivarium)",
            )


def _tighten(path: Path, mode: int) -> list[str]:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return []
    if stat.S_ISLNK(st.st_mode):
        return []  # not followed: a link's target is not necessarily ours to change
    now = stat.S_IMODE(st.st_mode)
    wanted = now & mode  # only ever removes permissions
    if now == wanted:
        return []
    os.chmod(path, wanted)
    return [f"{path} {now:04o} -> {wanted:04o}"]


def _tighten_tree(root: Path) -> list[str]:
    """Every directory 0700 and every file 0600 at most, without crossing into mounted disks
    (a sandbox's writable layer is the sandbox's business)."""
    changed = _tighten(root, DIR_MODE)
    if not root.is_dir():
        return changed
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        for name in list(dirs):
            if os.path.ismount(here / name):
                dirs.remove(name)
                continue
            changed += _tighten(here / name, DIR_MODE)
        for name in files:
            changed += _tighten(here / name, FILE_MODE)
    return changed
