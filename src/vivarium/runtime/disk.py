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
import logging
import os
import re
import shutil
from pathlib import Path

from vivarium.proc import run_sync

log = logging.getLogger(__name__)

IMAGE = "disk.img"
MOUNT = "disk"
RESERVE = "reserve"  # beside runsc's filestore, on the disk's root
SLACK = 32 << 20
MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,nodiscard"]
# A sandbox's disk has no journal: the file system lives only as long as one incarnation of the
# sandbox, and runsc's filestore file is unlinked on creation; nothing on it needs to survive a
# host crash. A volume's does (node/volumes.py).
NO_JOURNAL = ["-O", "^has_journal"]


def mount_point(directory: Path) -> Path:
    return directory / MOUNT


def create(directory: Path, size_bytes: int) -> Path:
    """A fresh, empty disk with room for `size_bytes` once `hold_back` has run, for the container
    whose files live in `directory`; returns where runsc's filestore goes."""
    directory.mkdir(parents=True, exist_ok=True)
    image, target = directory / IMAGE, mount_point(directory)
    remove(directory)
    make_filesystem(image, size_bytes + SLACK, journal=False)
    mount(image, target)
    target.chmod(0o700)
    return target


def make_filesystem(image: Path, size_bytes: int, *, journal: bool) -> None:
    """A sparse ext4 image of `size_bytes` (only what is written costs disk)."""
    with open(image, "wb") as f:
        f.truncate(size_bytes)
    try:
        run_sync([*MKFS, *([] if journal else NO_JOURNAL), str(image)])
    except BaseException:
        image.unlink(missing_ok=True)
        raise


def mount(image: Path, target: Path) -> None:
    target.mkdir(exist_ok=True)
    run_sync(["mount", "-o", "loop,discard,nosuid,nodev", str(image), str(target)])


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    base = os.path.realpath(directory)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces and the like escaped as octal.
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


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
    """Remove the disk, then `directory` with everything else in it. rmtree must never walk
    into a mount: below the disk are the volumes the sandbox mounted (node/volumes.py), which
    outlive it. So every mount below is detached first, and if one stays, nothing is deleted
    (logged; the next start tries again)."""
    for point in mounts_under(directory):
        run_sync(["umount", "--lazy", str(point)], check=False)
    remove(directory)
    if left := mounts_under(directory):
        log.error("%s is still mounted: %s is left as it is", left[0], directory)
        return
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
