"""The remote tier of the snapshot store on S3 or any S3-compatible server (MinIO, Ceph, ...):
a durable copy of every snapshot, so a paused sandbox survives the loss of the node's disk.

Layout under `s3://<bucket>/<prefix>/`:
- `<sandbox id>/<generation>/manifest.json`, written last: a generation without one is
  incomplete and never read; once a newer generation's manifest is stored, older ones go.
- a whole image's files beside it, `<sandbox id>/<generation>/checkpoint/<file>` (large ones
  in parts: boto3's managed transfer);
- or, for a snapshot kept as chunks (its manifest has recipes), nothing beside it: its chunks
  are in `chunks/<2 hex>/<SHA-256>`, the same zstd bytes as on the node's disk, shared by every
  snapshot that names them. A pause uploads only the chunks the bucket lacks, a fetch downloads
  only those the node lacks, and chunks no manifest names are collected (`collect`).

One node owns a prefix (its pins keep a collection from deleting a chunk a pause is about to
name). Every call blocks: the node runs them in threads. Credentials come from boto3's usual
chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, an instance role).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from vivarium.config import parse_s3_url
from vivarium.node.chunks import ChunkBatch, ChunkCorrupt, ChunkStore, verified
from vivarium.node.snapshots import (
    SnapshotCorrupt,
    SnapshotNotStored,
    SnapshotStoreUnavailable,
    index_roots,
    named_chunks,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHUNKS = "chunks"  # no sandbox or snapshot id starts with `c`
CHUNK_CALLS = 8  # chunks moved at once: each is a small object, so calls, not bytes, set the pace
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
        # The chunks the bucket holds, listed once and then kept up to date by this node's own
        # uploads and collections (None: to be listed; a failed call forgets it).
        self._known: set[str] | None = None
        self._known_lock = threading.Lock()

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

    def put(self, sandbox_id: str, directory: Path, manifest: dict[str, Any],
            chunks: ChunkStore) -> None:  # fmt: skip
        generation = str(manifest["generation"])
        base = self._key(sandbox_id, generation)
        try:
            if "files" in manifest:  # its chunks are pinned in `chunks` by the caller
                self._upload_chunks(named_chunks(manifest, chunks), chunks)
            else:
                files = sorted(p for p in (directory / "checkpoint").rglob("*") if p.is_file())
                for path in files:
                    key = f"{base}/{path.relative_to(directory).as_posix()}"
                    self._s3().upload_file(str(path), self.bucket, key, Config=TRANSFER)
            self._s3().put_object(Bucket=self.bucket, Key=f"{base}/{MANIFEST}",
                                  Body=json.dumps(manifest).encode())  # fmt: skip
        except (*S3_ERRORS, OSError) as exc:
            self._forget()
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

    def fetch(self, sandbox_id: str, manifest: dict[str, Any], into: Path,
              adding: ChunkBatch) -> None:  # fmt: skip
        if "files" in manifest:
            try:
                # Index blocks first, level by level: they say which chunks the snapshot holds.
                for root, depth in index_roots(manifest).values():
                    level = root
                    for below in range(depth, -1, -1):
                        digests = {digest for digest, _ in level}
                        adding.pin(digests)
                        self._download_chunks(digests, adding.store)
                        if below:
                            level = adding.store.expand(level)
            except S3_ERRORS as exc:
                raise self._unavailable(f"fetching the snapshot of sandbox {sandbox_id}",
                                        exc) from None  # fmt: skip
            except ChunkCorrupt as exc:
                raise SnapshotCorrupt(
                    f"the copy of sandbox {sandbox_id}'s snapshot in {self.url} is corrupt: "
                    f"{exc.message}", "it is kept there; nothing was restored",
                ) from None  # fmt: skip
            return
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

    # -- plain objects (template builds: template_share.py) ----------------------------------

    def upload(self, key: str, path: Path) -> None:
        self._s3().upload_file(str(path), self.bucket, self._key(key), Config=TRANSFER)

    def download(self, key: str, path: Path) -> None:
        self._s3().download_file(self.bucket, self._key(key), str(path), Config=TRANSFER)

    def write(self, key: str, body: bytes) -> None:
        self._s3().put_object(Bucket=self.bucket, Key=self._key(key), Body=body)

    def read(self, key: str) -> bytes | None:
        """The object's bytes; None if there is no such object."""
        try:
            return self._s3().get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def delete_under(self, key: str) -> None:
        """Every object below `key`/, its manifest.json first (see _delete_keys)."""
        self._delete_keys(self._list(self._key(key) + "/"))

    # -- chunks ------------------------------------------------------------------------------

    def _chunk_key(self, digest: str) -> str:
        return self._key(CHUNKS, digest[:2], digest)

    def _known_chunks(self) -> set[str]:
        with self._known_lock:
            if self._known is None:
                self._known = set(self._stored_chunks())
            return self._known

    def _forget(self) -> None:
        """After a failed call the bucket may not be what this node thinks (it may even have
        been emptied): list it again before trusting it."""
        with self._known_lock:
            self._known = None

    def _upload_chunks(self, digests: Collection[str], chunks: ChunkStore) -> None:
        known = self._known_chunks()
        missing = sorted(set(digests) - known)

        def upload(digest: str) -> None:
            body = chunks.path(digest).read_bytes()
            self._s3().put_object(Bucket=self.bucket, Key=self._chunk_key(digest), Body=body)
            with self._known_lock:
                known.add(digest)

        with ThreadPoolExecutor(CHUNK_CALLS) as pool:
            list(pool.map(upload, missing))  # the first failure is raised

    def _get_chunk(self, digest: str) -> bytes:
        """A chunk as stored (compressed, unverified)."""
        answer = self._s3().get_object(Bucket=self.bucket, Key=self._chunk_key(digest))
        return answer["Body"].read()

    def _read_chunk(self, digest: str, length: int) -> bytes:
        """A chunk's bytes, uncompressed and verified, read from the bucket."""
        return verified(digest, self._get_chunk(digest), length)

    def _download_chunks(self, digests: Collection[str], chunks: ChunkStore) -> None:
        missing = sorted(d for d in set(digests) if not chunks.path(d).exists())

        def download(digest: str) -> None:
            chunks.add_verified(digest, self._get_chunk(digest))

        with ThreadPoolExecutor(CHUNK_CALLS) as pool:
            list(pool.map(download, missing))

    def collect(self, chunks: ChunkStore) -> int | None:
        """Delete the chunks no stored manifest names (and no pause of this node is adding:
        `chunks`' pins); None if a collection of `chunks` is running."""

        def live() -> set[str]:
            named: set[str] = set()
            for key in self._manifest_keys():
                body = self._s3().get_object(Bucket=self.bucket, Key=key)["Body"].read()
                try:
                    named_chunks(json.loads(body), chunks, self._read_chunk, into=named)
                except (ValueError, TypeError, AttributeError, ChunkCorrupt):
                    raise SnapshotCorrupt(
                        f"s3://{self.bucket}/{key} is unreadable: no chunk is collected "
                        "until it is", "repair or remove that snapshot",
                    ) from None  # fmt: skip
            return named

        def remove(digests: list[str]) -> None:
            self._delete_keys([self._chunk_key(d) for d in digests])
            with self._known_lock:
                if self._known is not None:
                    self._known.difference_update(digests)

        try:
            return chunks.collect(live, self._stored_chunks(), remove, batch=1000)
        except S3_ERRORS as exc:
            self._forget()
            raise self._unavailable("collecting unused chunks", exc) from None

    def _manifest_keys(self) -> Iterator[str]:
        """Every generation's manifest (an older one too, until it is deleted: a crash may
        leave it the newest), without listing the chunks."""
        pages = self._s3().get_paginator("list_objects_v2")
        top = self.prefix + "/" if self.prefix else ""
        for page in pages.paginate(Bucket=self.bucket, Prefix=top, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                under = common.get("Prefix", "")
                if under and under != top + CHUNKS + "/":
                    yield from (k for k in self._list(under) if k.endswith("/" + MANIFEST))

    def _stored_chunks(self) -> list[str]:
        return [key.rsplit("/", 1)[-1] for key in self._list(self._key(CHUNKS) + "/")]
