"""A cluster's volumes, carried between nodes through the object store (shelf.py), under
`<VIVARIUM_SNAPSHOT_URL>/volumes/<volume id>/` (Settings.volume_share_url).

A volume lives on one node at a time, the one the catalog names (api/volumes.py decides when it
moves). Its node stores it when it changed since it was last stored (its sweep), and before it
hands it to another node; the node it moves to fetches that copy. The image is frozen
(`fsfreeze`) while it is copied, so the copy is the file system as one moment left it, even
with sandboxes writing to it (their writes wait for that moment).

Whether it changed since it was last stored is told first by the image file (what a sandbox
writes reaches it through the loop device, which updates its modification time), then, if the
image changed, by the files' own times (ext4 writes to the image by itself, thawing one). The
`published` file beside the image keeps both as they were.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vivarium.node.shelf import Shelf, ShelfError
from vivarium.node.volumes import DATA, FS, IMAGE, STORING, VolumeStore
from vivarium.proc import run_sync
from vivarium.runtime import disk

log = logging.getLogger(__name__)

PUBLISHED = "published"  # beside the image: what it was when last stored


class VolumeShare:
    def __init__(self, url: str, endpoint_url: str, signing_key: bytes,
                 volumes: VolumeStore) -> None:  # fmt: skip
        self.shelf = Shelf(url, endpoint_url, signing_key)
        self.volumes = volumes

    def _dir(self, volume_id: str) -> Path:
        return self.volumes.root / volume_id

    def last_stored(self, volume_id: str) -> dict[str, Any] | None:
        """What this node last stored of the volume (when, the image's time and size)."""
        try:
            data = json.loads((self._dir(volume_id) / PUBLISHED).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def changed(self, volume_id: str) -> bool:
        """Whether the volume's files changed since this node last stored it (blocking)."""
        directory = self._dir(volume_id)
        last = self.last_stored(volume_id)
        if last is None:
            return True
        run_sync(["sync", "-f", str(directory / FS)], check=False)  # writes reach the image
        stamp = _stamp(directory)
        if stamp == last.get("stamp"):
            return False
        # The image was written to: by a sandbox, or by ext4 alone (thawing it after it was
        # stored writes its superblock). Its files say which; taken after the stamp, they
        # show every write the stamp saw, so the stamp can stand for them next time.
        try:
            if _files(directory) != last.get("files"):
                return True
        except OSError:  # a file went while it was read: written to, then
            return True
        self._mark(directory, stamp, last["files"], last.get("at", time.time()))
        return False

    def publish(self, volume_id: str) -> int:
        """Store the volume as it is now (blocking); returns the archive's size."""
        directory = self._dir(volume_id)
        copy = directory.with_name(f".{volume_id}{STORING}")
        disk.discard(copy)
        copy.mkdir()
        try:
            # Frozen only while the image is copied (holes kept: what was written is read once),
            # not while it is compressed and uploaded.
            with _frozen(directory / FS):
                stamp, files = _stamp(directory), _files(directory)
                run_sync(["cp", "--sparse=always", str(directory / IMAGE), str(copy / IMAGE)],
                         timeout=1800.0)  # fmt: skip
            size = self.shelf.put(volume_id, copy, [IMAGE], {})
        finally:
            disk.discard(copy)
        self._mark(directory, stamp, files, time.time())
        return size

    def stored(self, volume_id: str) -> bool:
        return self.shelf.manifest(volume_id) is not None

    def fetch(self, volume_id: str) -> bool:
        """Put the stored copy in place here and mount it (blocking); False if none is
        stored. The volume must not be here."""
        directory = self._dir(volume_id)
        partial = directory.with_name(f".{volume_id}.fetching")
        disk.discard(partial)
        manifest = self.shelf.get(volume_id, partial)
        if manifest is None:
            return False
        try:
            os.rename(partial, directory)
        except OSError as exc:
            disk.discard(partial)
            raise ShelfError(f"placing volume {volume_id} failed: {exc}") from None
        self.volumes.mount(volume_id)
        run_sync(["sync", "-f", str(directory / FS)], check=False)
        self._mark(directory, _stamp(directory), _files(directory), time.time())  # as stored
        return True

    def delete(self, volume_id: str) -> None:
        """Its stored copy; logged, not raised, if the store refuses (nothing reads it again)."""
        try:
            self.shelf.delete(volume_id)
        except ShelfError as exc:
            log.warning("the stored copy of volume %s is left: %s", volume_id, exc)

    @staticmethod
    def _mark(directory: Path, stamp: list[int], files: str, at: float) -> None:
        mark = {"stamp": stamp, "files": files, "at": at}
        (directory / PUBLISHED).write_text(json.dumps(mark))


@contextlib.contextmanager
def _frozen(fs: Path) -> Iterator[None]:
    """No write reaches the file system meanwhile (writers wait), and all before it are on
    its image."""
    run_sync(["fsfreeze", "--freeze", str(fs)])
    try:
        yield
    finally:
        run_sync(["fsfreeze", "--unfreeze", str(fs)], check=False)


def _stamp(directory: Path) -> list[int]:
    st = (directory / IMAGE).stat()
    return [st.st_mtime_ns, st.st_size]


def _files(directory: Path) -> str:
    """One digest of every file's name, type, owner, mode, size and times in the volume: any
    write changes the modification or change time of what it wrote."""
    digest = hashlib.sha256()
    data = directory / FS / DATA
    for root, dirs, files in os.walk(data):
        dirs.sort()
        for name in [".", *sorted(files), *dirs]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            digest.update(f"{os.path.relpath(path, data)}\0{st.st_mode}:{st.st_uid}:{st.st_gid}:"
                          f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n".encode())  # fmt: skip
    return digest.hexdigest()
