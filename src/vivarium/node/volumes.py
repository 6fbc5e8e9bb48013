"""Volumes: directories that outlive sandboxes, on the node's disk, mounted by any number of
sandboxes at once.

A volume is a sparse ext4 image of its own (`<root>/<volume id>/volume.img`), mounted at
`<root>/<volume id>/fs` while the node runs; its files are `fs/data` (ext4's `lost+found` stays
out of sight). A file system of its own bounds its size: a full volume fails writes with ENOSPC
inside and never fills the node's disk. Its journal keeps it whole across a host crash.

Sandboxes reach volumes through their *hub*, a directory that every template's spec mounts at
`VOLUME_HUB` (runtime/bundle.py): a restore sees only the mounts its checkpoint was taken with,
and what the host mounts into a running sandbox's directories afterwards is not seen (both
measured on runsc 20240729). So before a container is restored the node bind-mounts each volume
into `<hub>/<volume name>`, and the gofer's recursive bind carries them in; envd's /init then
mounts `VOLUME_HUB/<name>` at the path the create asked for (guest/envd/volumes.py). That mount
is part of the sandbox's state: a pause keeps it, and the next incarnation gets a hub with the
same volumes. The hub lives on the container's own disk, so what a sandbox writes into the hub
itself (not into a volume) counts against its disk, and removing the container's disk detaches
the volumes first (runtime/disk.discard).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import InvalidArgument, NotFound
from vivarium.node.records import ID_ALPHABET
from vivarium.proc import run_sync
from vivarium.runtime import disk

log = logging.getLogger(__name__)

IMAGE = "volume.img"
FS = "fs"
DATA = "data"
HUB = "volumes"  # below the container's disk
STORING = ".storing"  # `.<id>.storing`: a copy of the volume being stored (volume_share.py)
# The sandbox's default user owns a new volume's root, so that code running as `user` can write.
OWNER_UID = OWNER_GID = 1000
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
MAX_MOUNTS = 16
# Paths a volume may not be mounted over: the sandbox's own machinery.
RESERVED = ("/proc", "/sys", "/dev", "/opt/vivarium", "/run/vivarium")


def new_volume_id() -> str:
    return "v" + "".join(secrets.choice(ID_ALPHABET) for _ in range(19))


def valid_volume_id(value: str) -> bool:
    return len(value) == 20 and all(c in ID_ALPHABET for c in value)


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid volume name {name!r}",
            "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class VolumeMount:
    """A volume as one sandbox mounts it."""

    name: str
    path: str
    volume_id: str

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path, "volume_id": self.volume_id}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> VolumeMount:
        return cls(data["name"], data["path"], data["volume_id"])


def check_mount_path(path: str) -> str:
    """An absolute, normalised path that is not `/` and not the sandbox's machinery."""
    if (
        not path.startswith("/")
        or "\0" in path
        or len(path) > 1024
        or os.path.normpath(path) != path
        or path.startswith("//")
    ):
        raise InvalidArgument(
            f"volume mount path {path!r} is not a normalised absolute path",
            "use a path like /mnt/data",
        )
    if path == "/":
        raise InvalidArgument("a volume cannot be mounted over /", "use a path like /mnt/data")
    for reserved in RESERVED:
        if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"):
            raise InvalidArgument(f"a volume cannot be mounted at {path}",
                                  f"{reserved} is the sandbox's own")  # fmt: skip
    return path


def check_mounts(mounts: list[VolumeMount]) -> None:
    if len(mounts) > MAX_MOUNTS:
        raise InvalidArgument(f"at most {MAX_MOUNTS} volume mounts per sandbox")
    paths = sorted(check_mount_path(m.path) for m in mounts)
    for a, b in zip(paths, paths[1:], strict=False):
        if b == a or b.startswith(a + "/"):
            raise InvalidArgument(f"volume mounts {a} and {b} overlap", "use separate paths")
    names = [m.name for m in mounts]
    if len(set(names)) != len(names):
        raise InvalidArgument("a volume can be mounted only once per sandbox")


class VolumeStore:
    def __init__(self, root: Path, size_mb: int) -> None:
        self.root = root
        self.size_mb = size_mb

    def _dir(self, volume_id: str) -> Path:
        if not valid_volume_id(volume_id):
            raise NotFound(f"volume {volume_id!r} not found")
        return self.root / volume_id

    def data(self, volume_id: str) -> Path:
        """Where the volume's files are on the host; NotFound if it has none."""
        path = self._dir(volume_id) / FS / DATA
        if not os.path.ismount(path.parent):
            raise NotFound(f"volume {volume_id!r} not found on this node")
        return path

    def present(self, volume_id: str) -> bool:
        """Whether the volume is here, mounted."""
        return os.path.ismount(self._dir(volume_id) / FS)

    def mountable(self, volume_id: str) -> bool:
        """Whether the volume is here but not mounted (a mount that failed at start)."""
        return (self._dir(volume_id) / IMAGE).exists() and not self.present(volume_id)

    def mount(self, volume_id: str) -> None:
        self._mount(self._dir(volume_id))

    def create(self, volume_id: str) -> None:
        directory = self._dir(volume_id)
        directory.mkdir(mode=0o700, parents=True)
        try:
            disk.make_filesystem(directory / IMAGE, self.size_mb << 20, journal=True)
            disk.mount(directory / IMAGE, directory / FS)
            data = directory / FS / DATA
            data.mkdir(mode=0o755)
            os.chown(data, OWNER_UID, OWNER_GID)
        except BaseException:
            self.delete(volume_id)
            raise

    def delete(self, volume_id: str) -> None:
        """Remove the volume and its files. Sandboxes that still mount it keep a detached view
        of it until they end (the control plane refuses to delete a volume in use)."""
        directory = self._dir(volume_id)
        target = directory / FS
        if os.path.ismount(target):
            run_sync(["umount", "--lazy", str(target)], check=False)
        if os.path.ismount(target):
            raise RuntimeError(f"{target} could not be unmounted")
        shutil.rmtree(directory, ignore_errors=True)

    def ids(self) -> list[str]:
        return [d.name for d in self.root.iterdir() if valid_volume_id(d.name)]

    def mount_all(self) -> int:
        """Mount every volume's file system (after a host restart); returns how many there are.
        Half-made volumes (no image) are removed."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        count = 0
        for directory in sorted(self.root.iterdir()):  # `.<id>.storing` before `<id>`
            if not valid_volume_id(directory.name) or not (directory / IMAGE).exists():
                # Half-made, or what a fetch or store a crash cut short left (volume_share.py).
                log.warning("removing half-made volume %s", directory.name)
                if directory.name.endswith(STORING):  # it may have been left frozen
                    run_sync(["fsfreeze", "--unfreeze",
                              str(self.root / directory.name[1 : -len(STORING)] / FS)],
                             check=False)  # fmt: skip
                if directory.is_dir():
                    shutil.rmtree(directory, ignore_errors=True)
                else:
                    directory.unlink(missing_ok=True)
                continue
            count += 1
            if not os.path.ismount(directory / FS):
                try:
                    self._mount(directory)
                except Exception:  # that volume answers 404; the node and the rest go on
                    log.exception("could not mount volume %s", directory.name)
        return count

    @staticmethod
    def _mount(directory: Path) -> None:
        """Mount a volume's file system. Sandboxes that outlived the node's previous run may
        still hold the image through its loop device: that device is mounted again (one
        file system, shared), never a second one over the same image, which would corrupt it."""
        image, target = directory / IMAGE, directory / FS
        for _ in range(20):
            attached = run_sync(["losetup", "--associated", str(image), "--noheadings",
                                 "--output", "NAME"], check=False).stdout.split()  # fmt: skip
            if not attached:
                disk.mount(image, target)
                return
            target.mkdir(exist_ok=True)
            # It fails if the device is being let go just now (its last user gone): then the
            # image is soon free to be attached anew.
            if run_sync(["mount", "-o", "nosuid,nodev", attached[0], str(target)],
                        check=False).ok:  # fmt: skip
                return
            time.sleep(0.1)
        raise RuntimeError(f"could not mount volume {directory.name}: {image} stays attached")

    def usage(self, volume_id: str) -> tuple[int, int]:
        """(bytes used, bytes in all)."""
        st = os.statvfs(self.data(volume_id))
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        return used, used + st.f_bavail * st.f_frsize

    def attach(self, filestore: Path, mounts: list[VolumeMount], files: Path | None = None,
               files_name: str = "") -> Path:  # fmt: skip
        """The hub of a container about to be restored, on its disk (`filestore`, where runsc's
        filestore goes), with each volume bind-mounted under its name, and `files` (a
        filesystem-only snapshot, node/file_snapshots.py) read-only under `files_name`."""
        hub = filestore / HUB
        hub.mkdir(mode=0o755, exist_ok=True)
        for mount in mounts:
            _bind(self.data(mount.volume_id), hub / mount.name)
        if files is not None:
            _bind(files, hub / files_name, read_only=True)
        return hub


def _bind(source: Path, target: Path, *, read_only: bool = False) -> None:
    target.mkdir(mode=0o755, exist_ok=True)
    run_sync(["mount", "--bind", str(source), str(target)])
    if read_only:
        run_sync(["mount", "-o", "remount,bind,ro", str(target)])
