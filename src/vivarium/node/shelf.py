"""Directories a cluster's nodes hand each other through the object store, each as one archive:
template builds (template_share.py) and volumes (volume_share.py).

Under `<url>/<key>/`:
- `archive.tar.zst`: GNU tar's archive of the directory's members (owners by number, extended
  attributes such as file capabilities, and holes: a sparse image costs what was written);
- `manifest.json`, written last: the archive's SHA-256 and size, and what the caller adds,
  signed with a key derived from the cluster secret (a node mounts what it fetches: only the
  cluster's nodes may write it). A key without one holds nothing (a put cut short).

Every call blocks (the node runs them in threads) and raises ShelfError for whatever failed,
the store or the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vivarium.proc import run_sync
from vivarium.runtime import disk

ARCHIVE = "archive.tar.zst"
MANIFEST = "manifest.json"
TAR = ["tar", "--zstd", "--sparse", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
TAR_TIMEOUT_S = 1800.0


class ShelfError(Exception):
    """The store or the disk failed; the message says which and how."""


class Shelf:
    def __init__(self, url: str, endpoint_url: str, signing_key: bytes) -> None:
        from vivarium.node.snapshot_s3 import S3Store  # boto3 is loaded only when configured

        self.objects = S3Store(url, endpoint_url)
        self.url = self.objects.url
        self._key = signing_key

    def _signature(self, manifest: dict[str, Any]) -> str:
        body = json.dumps({k: v for k, v in manifest.items() if k != "signature"},
                          sort_keys=True).encode()  # fmt: skip
        return hmac.new(self._key, body, hashlib.sha256).hexdigest()

    def put(self, key: str, directory: Path, members: list[str], info: dict[str, Any]) -> int:
        """Store `members` of `directory` under `key` (replacing what was there); returns the
        archive's size."""
        with self.packed(directory, members) as archive:
            return self.upload(key, archive, info)

    @contextlib.contextmanager
    def packed(self, directory: Path, members: list[str]) -> Iterator[Path]:
        """`members` of `directory` in an archive beside it, removed afterwards (what must not
        change while it is read need not wait for the upload)."""
        archive = directory.parent / f".{directory.name}.{os.getpid()}.tar.zst"
        try:
            run_sync([*TAR, "-cf", str(archive), "-C", str(directory), *members],
                     timeout=TAR_TIMEOUT_S)  # fmt: skip
        except Exception as exc:  # tar, the disk
            archive.unlink(missing_ok=True)
            raise ShelfError(f"packing {directory} failed: {exc}") from None
        try:
            yield archive
        finally:
            archive.unlink(missing_ok=True)

    def upload(self, key: str, archive: Path, info: dict[str, Any]) -> int:
        """A packed archive stored under `key`, its manifest last; returns its size."""
        try:
            size = archive.stat().st_size
            manifest = {**info, "sha256": _sha256(archive), "size": size}
            manifest["signature"] = self._signature(manifest)
        except OSError as exc:
            raise ShelfError(f"reading {archive} failed: {exc}") from None
        self._call(self.objects.upload, f"{key}/{ARCHIVE}", archive)
        self._call(self.objects.write, f"{key}/{MANIFEST}", json.dumps(manifest).encode())
        return size

    def manifest(self, key: str) -> dict[str, Any] | None:
        raw = self._call(self.objects.read, f"{key}/{MANIFEST}")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise ShelfError(f"{self.url}/{key}/{MANIFEST} is unreadable: {exc}") from None
        if not hmac.compare_digest(str(data.get("signature", "")), self._signature(data)):
            raise ShelfError(f"{self.url}/{key} was not stored by a node of this cluster (its "
                             "signature does not match this cluster secret)")  # fmt: skip
        return data

    def get(self, key: str, into: Path) -> dict[str, Any] | None:
        """Unpack what `key` holds into the new directory `into`, checked against its
        checksum; its manifest, or None if the store holds nothing there. Nothing is left in
        `into` if this fails."""
        manifest = self.manifest(key)
        if manifest is None:
            return None
        archive = into.parent / f".{into.name}.{os.getpid()}.tar.zst"
        try:
            self._call(self.objects.download, f"{key}/{ARCHIVE}", archive)
            if _sha256(archive) != manifest.get("sha256"):
                raise ShelfError(f"the copy of {key} in {self.url} is corrupt (checksum mismatch)")
            into.mkdir()
            run_sync([*TAR, "-xf", str(archive), "-C", str(into)], timeout=TAR_TIMEOUT_S)
        except BaseException as exc:
            disk.discard(into)
            if isinstance(exc, ShelfError) or not isinstance(exc, Exception):
                raise
            raise ShelfError(f"fetching {key} from {self.url} failed: {exc}") from None
        finally:
            archive.unlink(missing_ok=True)
        return manifest

    def delete(self, key: str) -> None:
        self._call(self.objects.delete_under, key)

    def _call(self, method: Any, *args: Any) -> Any:
        from vivarium.node.snapshot_s3 import S3_ERRORS
        from vivarium.node.snapshots import SnapshotStoreUnavailable

        try:
            return method(*args)
        except (*S3_ERRORS, SnapshotStoreUnavailable, OSError) as exc:
            raise ShelfError(f"{self.url} failed: {exc}") from None


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
