"""The remote tier of the snapshot store on S3 or any S3-compatible server (MinIO, Ceph, ...):
a durable copy of every snapshot, so a paused sandbox survives the loss of the node's disk.

Layout under `s3://<bucket>/<prefix>/`: `<sandbox id>/<generation>/checkpoint/<file>` and,
written last, `<sandbox id>/<generation>/manifest.json`. A generation without a manifest is
incomplete and never read; once a newer generation's manifest is stored, older ones are
deleted. Large files go up in parts (boto3's managed transfer). Every call blocks: the node
runs them in threads. Credentials come from boto3's usual chain (AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, an instance role).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from vivarium.config import parse_s3_url
from vivarium.node.snapshots import SnapshotCorrupt, SnapshotNotStored, SnapshotStoreUnavailable

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# What any S3 call may raise: the service's refusals, transport failures, s3transfer's wrapper.
S3_ERRORS = (BotoCoreError, ClientError, Boto3Error)
TRANSFER = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20,
                          max_concurrency=4)  # fmt: skip
UNREACHABLE_HINT = (
    "check that the bucket exists, VIVARIUM_SNAPSHOT_URL, VIVARIUM_S3_ENDPOINT_URL and the "
    "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws)"
)


class S3Store:
    def __init__(self, url: str, endpoint_url: str = "") -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self._client: S3Client | None = None
        self._client_lock = threading.Lock()

    def _s3(self) -> S3Client:
        """The client, made on first use (in a thread: it loads boto3's service models)."""
        with self._client_lock:
            if self._client is None:
                config = Config(
                    connect_timeout=5, read_timeout=60,
                    retries={"max_attempts": 3, "mode": "standard"},
                    # Checksums only where S3 requires them: several S3-compatible servers
                    # refuse the CRC trailers botocore adds by default, and a snapshot carries
                    # its own SHA-256, verified after every download.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                    # Self-hosted servers rarely have wildcard DNS for bucket subdomains.
                    s3={"addressing_style": "path"} if self.endpoint_url else None,
                )  # fmt: skip
                self._client = boto3.session.Session().client(
                    "s3", endpoint_url=self.endpoint_url or None, config=config
                )
            return self._client

    def _key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)

    def _list(self, under: str) -> list[str]:
        """Every key below `under` (a "directory" ending in /)."""
        keys: list[str] = []
        pages = self._s3().get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=under):
            keys += [item["Key"] for item in page.get("Contents", []) if "Key" in item]
        return keys

    def _complete(self, sandbox_id: str) -> list[str]:
        """Generations of the sandbox that have their manifest, oldest first."""
        base = self._key(sandbox_id) + "/"
        found = (key[len(base) :].split("/") for key in self._list(base))
        return sorted(parts[0] for parts in found if parts[1:] == [MANIFEST])

    def _delete_keys(self, keys: list[str]) -> None:
        """Manifests first, in calls of their own: a delete cut short never leaves a manifest
        whose files are gone (that would read as a corrupt snapshot rather than none)."""
        manifests = [key for key in keys if key.endswith("/" + MANIFEST)]
        rest = [key for key in keys if not key.endswith("/" + MANIFEST)]
        for group in (manifests, rest):
            for start in range(0, len(group), 1000):  # the most one request may delete
                batch: list[ObjectIdentifierTypeDef] = [
                    {"Key": key} for key in group[start : start + 1000]
                ]
                answer = self._s3().delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if errors := answer.get("Errors"):
                    raise SnapshotStoreUnavailable(
                        f"{len(errors)} object(s) of {self.url} could not be deleted, e.g. "
                        f"{errors[0].get('Key')}: {errors[0].get('Message')}", UNREACHABLE_HINT
                    )  # fmt: skip

    def _unavailable(self, doing: str, exc: Exception) -> SnapshotStoreUnavailable:
        return SnapshotStoreUnavailable(f"{doing} in {self.url} failed: {exc}", UNREACHABLE_HINT)

    # -- ObjectStore -----------------------------------------------------------------------

    def check(self) -> None:
        try:
            self._s3().head_bucket(Bucket=self.bucket)
        except S3_ERRORS as exc:
            raise SnapshotStoreUnavailable(
                f"snapshot store {self.url} is unreachable or refused: {exc}", UNREACHABLE_HINT
            ) from None

    def put(self, sandbox_id: str, directory: Path, manifest: dict[str, Any]) -> None:
        generation = str(manifest["generation"])
        base = self._key(sandbox_id, generation)
        files = sorted(p for p in (directory / "checkpoint").rglob("*") if p.is_file())
        try:
            for path in files:
                key = f"{base}/{path.relative_to(directory).as_posix()}"
                self._s3().upload_file(str(path), self.bucket, key, Config=TRANSFER)
            self._s3().put_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}",
                                  Body=json.dumps(manifest).encode())  # fmt: skip
        except (*S3_ERRORS, OSError) as exc:
            try:  # unreadable anyway without its manifest; don't leave the bytes behind
                self._delete_keys(self._list(base + "/"))
            except (*S3_ERRORS, SnapshotStoreUnavailable):
                log.warning("parts of an unfinished snapshot are left in s3://%s/%s/",
                            self.bucket, base)  # fmt: skip
            raise SnapshotNotStored(
                f"storing the snapshot of sandbox {sandbox_id} in {self.url} failed: {exc}",
                UNREACHABLE_HINT,
            ) from None
        try:  # this generation is whole: the older ones are superseded
            current = base + "/"
            self._delete_keys([k for k in self._list(self._key(sandbox_id) + "/")
                               if not k.startswith(current)])  # fmt: skip
        except (*S3_ERRORS, SnapshotStoreUnavailable) as exc:
            log.warning("older snapshots of %s are left in %s: %s", sandbox_id, self.url, exc)

    def manifest(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            generations = self._complete(sandbox_id)
            if not generations:
                return None
            key = self._key(sandbox_id, generations[-1], MANIFEST)
            body = self._s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except S3_ERRORS as exc:
            raise self._unavailable(f"reading the snapshot of sandbox {sandbox_id}", exc) from None
        try:
            manifest = json.loads(body)
            if not isinstance(manifest, dict):
                raise ValueError("not an object")
        except ValueError:
            raise SnapshotCorrupt(f"the snapshot of sandbox {sandbox_id} in {self.url} has an "
                                  f"unreadable manifest", f"inspect s3://{self.bucket}/{key}; "
                                  "it is kept as it is") from None  # fmt: skip
        manifest.setdefault("generation", generations[-1])
        return manifest

    def fetch(self, sandbox_id: str, manifest: dict[str, Any], into: Path) -> None:
        base = self._key(sandbox_id, str(manifest["generation"]), "checkpoint") + "/"
        try:
            for key in self._list(base):
                relative = PurePosixPath(key[len(base) :])
                if not relative.parts or relative.is_absolute() or ".." in relative.parts:
                    raise SnapshotCorrupt(f"unexpected object {key} in {self.url}",
                                          "it is kept there; nothing was restored")  # fmt: skip
                target = into / "checkpoint" / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                self._s3().download_file(self.bucket, key, str(target), Config=TRANSFER)
        except S3_ERRORS as exc:
            raise self._unavailable(f"fetching the snapshot of sandbox {sandbox_id}", exc) from None

    def exists(self, sandbox_id: str) -> bool:
        try:
            return bool(self._complete(sandbox_id))
        except S3_ERRORS as exc:
            raise self._unavailable(
                f"looking up the snapshot of sandbox {sandbox_id}", exc
            ) from None

    def delete(self, sandbox_id: str) -> None:
        try:
            self._delete_keys(self._list(self._key(sandbox_id) + "/"))
        except S3_ERRORS as exc:
            raise self._unavailable(f"deleting the snapshot of sandbox {sandbox_id}", exc) from None
