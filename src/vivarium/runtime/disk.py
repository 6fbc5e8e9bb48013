"""A sandbox's disk: the host file system that holds its writable layer.

runsc keeps a sandbox's writable root layer in a "filestore" file (`--overlay2=root:dir=D`)
instead of in the sandbox's memory, so writing files does not spend the memory limit. runsc has
no size option for that layer, so D is a file system of the sandbox's own: a sparse ext4 image,
loop-mounted. Past its size, writes inside fail with ENOSPC and the sandbox lives on. The image
costs the host only what is written (`discard` gives deleted blocks back), and making one takes
a few tens of milliseconds.

A checkpoint holds the layer's contents, so a snapshot needs no copy of the disk; each restore
gets an empty disk of its own.

A restore needs a little more room than the sandbox had. While running, runsc allocates the
filestore with fallocate, which stops cleanly at ENOSPC; a restore writes the saved layer back
through a mapping, and ext4's reservations for those delayed writes run out a few MiB before the
disk is full. The sentry then dies of SIGBUS and the sandbox cannot resume (seen with a disk
filled to the last block). So the image is SLACK larger than asked, and once the container runs,
`hold_back` fills the SLACK with a RESERVE file the sandbox cannot reach: its room stays what was
asked for, across any number of pauses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from vivarium.proc import run_sync

IMAGE = "disk.img"
MOUNT = "disk"
RESERVE = "reserve"  # beside runsc's filestore, on the disk's root
SLACK = 32 << 20
# No journal: the file system lives only as long as one incarnation of the sandbox, and runsc's
# filestore file is unlinked on creation; nothing on it needs to survive a host crash.
MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal",
        "-E", "lazy_itable_init=1,nodiscard"]  # fmt: skip


def mount_point(directory: Path) -> Path:
    return directory / MOUNT


def create(directory: Path, size_bytes: int) -> Path:
    """A fresh, empty disk with room for `size_bytes` once `hold_back` has run, for the container
    whose files live in `directory`; returns where runsc's filestore goes."""
    directory.mkdir(parents=True, exist_ok=True)
    image, target = directory / IMAGE, mount_point(directory)
    remove(directory)
    with open(image, "wb") as f:
        f.truncate(size_bytes + SLACK)
    try:
        run_sync([*MKFS, str(image)])
        target.mkdir(exist_ok=True)
        run_sync(["mount", "-o", "loop,discard,nosuid,nodev", str(image), str(target)])
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    target.chmod(0o700)
    return target


def hold_back(directory: Path) -> None:
    """Take the SLACK back from a container that has started: what its restore left free, up to
    SLACK, goes to the reserve file."""
    target = mount_point(directory)
    st = os.statvfs(target)
    size = min(SLACK, st.f_bavail * st.f_frsize)
    if size <= 0:
        return
    fd = os.open(target / RESERVE, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def remove(directory: Path) -> None:
    """Unmount and delete the disk, if any (also a half-made one). A disk still in use (its
    sandbox not yet gone) is detached lazily and freed when runsc lets go of it."""
    target = mount_point(directory)
    if os.path.ismount(target):
        run_sync(["umount", "--lazy", str(target)], check=False)
    with contextlib.suppress(OSError):
        target.rmdir()
    (directory / IMAGE).unlink(missing_ok=True)


def discard(directory: Path) -> None:
    """Remove the disk, then `directory` with everything else in it (rmtree must never walk
    into a mounted disk)."""
    remove(directory)
    shutil.rmtree(directory, ignore_errors=True)


def usage(directory: Path) -> tuple[int, int] | None:
    """(bytes used, bytes in all) of the sandbox's files on the disk, as the host sees them (the
    reserve left out); None without a disk."""
    target = mount_point(directory)
    if not os.path.ismount(target):
        return None
    st = os.statvfs(target)
    try:
        reserved = os.stat(target / RESERVE).st_blocks * 512
    except FileNotFoundError:
        reserved = 0
    used = (st.f_blocks - st.f_bfree) * st.f_frsize - reserved
    return used, used + st.f_bavail * st.f_frsize  # what it has and what it can still take
