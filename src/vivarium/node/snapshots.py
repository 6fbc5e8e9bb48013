"""Snapshots of paused sandboxes on the node's disk: `<state>/snapshots/<sandbox id>/` holding
`checkpoint/` (runsc's image: memory, processes and the in-memory root filesystem changes) and
`manifest.json` (the sandbox's record, the checkpoint's checksum and size, the runsc version).

Writes are atomic: a snapshot is assembled under a temporary name, fsync'ed, checksummed and
only then renamed into place, so a crash or a full disk never leaves a half snapshot that looks
complete. A snapshot is verified against its checksum before every restore.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.errors import Conflict, NotFound, RuntimeFailure
from vivarium.templates.store import dir_size, sha256_dir


class SnapshotCorrupt(RuntimeFailure):
    code = "snapshot_corrupt"


@dataclass(frozen=True)
class Snapshot:
    sandbox_id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.manifest["record"])

    @property
    def size(self) -> int:
        return int(self.manifest["size_bytes"])

    @property
    def checksum(self) -> str:
        return str(self.manifest["checksum"])


def _fsync_tree(top: Path) -> None:
    for root, _dirs, files in os.walk(top):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def staging(self, sandbox_id: str) -> Path:
        """A fresh temporary directory for the next snapshot of this sandbox."""
        path = self.root / f".tmp-{sandbox_id}-{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def commit(self, sandbox_id: str, staging: Path, record: dict[str, Any],
               runsc_version: str) -> Snapshot:  # fmt: skip
        """Seal `staging` (which holds `checkpoint/`) as the sandbox's snapshot. Blocking."""
        checkpoint = staging / "checkpoint"
        manifest = {
            "sandbox_id": sandbox_id, "record": record, "runsc_version": runsc_version,
            "checksum": sha256_dir(checkpoint), "size_bytes": dir_size(checkpoint),
            "created_at": time.time(),
        }  # fmt: skip
        (staging / "manifest.json").write_text(json.dumps(manifest))
        _fsync_tree(staging)
        final = self.root / sandbox_id
        old = None
        if final.exists():  # the previous pause's snapshot: replaced only once this one is whole
            old = self.root / f".old-{sandbox_id}-{secrets.token_hex(4)}"
            final.rename(old)
        staging.rename(final)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Snapshot(sandbox_id, final, manifest)

    def load(self, sandbox_id: str, runsc_version: str) -> Snapshot:
        """The sandbox's snapshot, verified; it stays in place whatever happens next."""
        path = self.root / sandbox_id
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no snapshot of sandbox {sandbox_id!r} on this node") from None
        except ValueError:
            raise SnapshotCorrupt(f"snapshot of {sandbox_id} has an unreadable manifest",
                                  f"inspect {path}; it is kept as it is") from None  # fmt: skip
        if manifest.get("runsc_version") != runsc_version:
            raise Conflict(
                f"snapshot of {sandbox_id} was made by runsc {manifest.get('runsc_version')}, "
                f"this node runs {runsc_version}",
                "resume it on a node with that runsc version; the snapshot is kept",
            )
        snapshot = Snapshot(sandbox_id, path, manifest)
        if not snapshot.checkpoint.is_dir() or sha256_dir(snapshot.checkpoint) != snapshot.checksum:
            raise SnapshotCorrupt(f"snapshot of {sandbox_id} is corrupt (checksum mismatch)",
                                  f"it is kept for inspection in {path}")  # fmt: skip
        return snapshot

    def exists(self, sandbox_id: str) -> bool:
        return (self.root / sandbox_id / "manifest.json").exists()

    def delete(self, sandbox_id: str) -> None:
        shutil.rmtree(self.root / sandbox_id, ignore_errors=True)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def sweep_staging(self) -> None:
        """Temporary directories left by a crash mid-pause (never a valid snapshot)."""
        for path in self.root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".old-*"):
            sandbox_id = path.name[len(".old-") :].rsplit("-", 1)[0]
            if (self.root / sandbox_id).exists():
                shutil.rmtree(path, ignore_errors=True)
            else:  # crashed between the two renames: the previous snapshot is still the one
                path.rename(self.root / sandbox_id)
