"""A cluster's template builds, shared through the object store: the node that builds a team
template publishes it, as a node publishes a built-in template's build the first time it pauses
or snapshots a sandbox on it (each host builds its own); any other node fetches a build the
first time a sandbox needs it there (a create, a resume, a snapshot's start, a build on top of
it), then keeps it like its own.

Layout under `<VIVARIUM_SNAPSHOT_URL>/templates/<template id>/<build id>/`
(Settings.template_share_url):
- `build.tar.zst`: the build directory (manifest, spec, checkpoint, the rootfs: a team
  template's sparse image, with --sparse so that it costs what was written, or a built-in
  template's tree);
- `manifest.json`, written last: the archive's SHA-256 and size. A build without it is not
  there yet (or was cut short) and is never read.

A build never changes once made, so a copy is never stale: fetching is the only way in.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from vivarium.errors import NotFound, RuntimeFailure
from vivarium.node.snapshots import SnapshotStoreUnavailable
from vivarium.proc import run_sync
from vivarium.runtime import disk
from vivarium.templates.custom import ROOTFS_IMAGE
from vivarium.templates.store import Template, TemplateStore, sha256_dir

log = logging.getLogger(__name__)

ARCHIVE = "build.tar.zst"
MANIFEST = "manifest.json"
MEMBERS = ("manifest.json", "spec.json", "checkpoint")  # and the rootfs: image or tree
# Owners by number, extended attributes (file capabilities) and holes kept.
TAR = ["tar", "--zstd", "--sparse", "--numeric-owner", "--xattrs", "--xattrs-include=*"]
TAR_TIMEOUT_S = 1800.0
HINT = "check VIVARIUM_SNAPSHOT_URL and the object store; the build is kept where it was made"


class TemplateShare:
    def __init__(self, url: str, endpoint_url: str = "") -> None:
        from vivarium.node.snapshot_s3 import S3Store  # boto3 is loaded only when configured

        self.objects = S3Store(url, endpoint_url)
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per build
        self._shared: set[str] = set()  # builds known to be in the store

    @staticmethod
    def _key(name: str, build_id: str, member: str = "") -> str:
        return "/".join(p for p in (name, build_id, member) if p)

    # -- the building node -----------------------------------------------------------------

    async def share(self, template: Template) -> None:
        """The build is in the store, published now if it is not (once per build: a pause or
        snapshot of a sandbox on a built-in template's build, which another node resumes on
        that build). RuntimeFailure if it cannot be."""
        key = f"{template.name}/{template.build_id}"
        if key in self._shared:
            return
        async with self._turns[key]:
            if key not in self._shared:
                size = await asyncio.to_thread(self.publish, template)
                log.info("build %s of template %s is in the store (%d MiB)",
                         template.build_id, template.name, size >> 20)  # fmt: skip

    def publish(self, template: Template) -> int:
        """Store the build for the other nodes (blocking); returns the archive's size. Done
        once per build: a build made again (the same recipe) is already there."""
        from vivarium.node.snapshot_s3 import S3_ERRORS

        name, build_id = template.name, template.build_id
        try:
            if (stored := self.objects.read(self._key(name, build_id, MANIFEST))) is None:
                size = self._upload(template)
            else:
                size = int(json.loads(stored).get("size", 0))
        except (*S3_ERRORS, OSError, ValueError) as exc:
            raise RuntimeFailure(f"storing build {build_id} of template {name!r} in "
                                 f"{self.objects.url} failed: {exc}", HINT) from None  # fmt: skip
        self._shared.add(f"{name}/{build_id}")
        return size

    def _upload(self, template: Template) -> int:
        name, build_id = template.name, template.build_id
        archive = template.build_dir.parent / f".{build_id}.{os.getpid()}.tar.zst"
        image = (template.build_dir / ROOTFS_IMAGE).exists()
        if image:
            # Read-only while it is read: everything the build wrote is on the image, and
            # ext4's lazy inode-table initialisation stops writing to it. Sandboxes never
            # write there (their root layer is runsc's overlay).
            run_sync(["mount", "-o", "remount,ro", str(template.rootfs)])
        try:
            rootfs = ROOTFS_IMAGE if image else "rootfs"
            run_sync([*TAR, "-cf", str(archive), "-C", str(template.build_dir), *MEMBERS, rootfs],
                     timeout=TAR_TIMEOUT_S)  # fmt: skip
            digest, size = _sha256(archive), archive.stat().st_size
            self.objects.upload(self._key(name, build_id, ARCHIVE), archive)
        finally:
            archive.unlink(missing_ok=True)
            if image:
                run_sync(["mount", "-o", "remount,rw", str(template.rootfs)], check=False)
        info = {"sha256": digest, "size": size, "build_id": build_id}
        self.objects.write(self._key(name, build_id, MANIFEST), json.dumps(info).encode())
        return size

    def delete(self, name: str) -> None:
        """Every build of the template (blocking); logged, not raised, if the store refuses:
        what is left there is never read again."""
        from vivarium.node.snapshot_s3 import S3_ERRORS

        try:
            self.objects.delete_under(self._key(name, ""))
        except (*S3_ERRORS, SnapshotStoreUnavailable) as exc:
            log.warning("builds of template %s are left in %s: %s", name,
                        self.objects.url, exc)  # fmt: skip

    # -- any other node --------------------------------------------------------------------

    async def fetch(self, store: TemplateStore, name: str, build_id: str) -> Template:
        """The build, fetched into `store` unless it is there already (one fetch at a time per
        build; the others wait for it). NotFound if the store has no such build."""
        async with self._turns[f"{name}/{build_id}"]:
            try:
                return store.build(name, build_id)
            except NotFound:
                pass
            log.info("fetching build %s of template %s from %s", build_id, name,
                     self.objects.url)  # fmt: skip
            await asyncio.to_thread(self._fetch, store, name, build_id)
            self._shared.add(f"{name}/{build_id}")
            template = store.build(name, build_id)
            log.info("build %s of template %s is here (%d MiB)", build_id, name,
                     template.manifest.get("rootfs_bytes", 0) >> 20)  # fmt: skip
            return template

    def _fetch(self, store: TemplateStore, name: str, build_id: str) -> None:
        from vivarium.node.snapshot_s3 import S3_ERRORS

        builds = store.builds_dir(name)
        builds.mkdir(parents=True, exist_ok=True)
        partial = builds / f".{build_id}.fetching"
        archive = builds / f".{build_id}.tar.zst"
        try:
            raw = self.objects.read(self._key(name, build_id, MANIFEST))
            if raw is None:
                raise NotFound(f"build {build_id} of template {name!r} is on no node and not "
                               f"in {self.objects.url}", "build the template again")  # fmt: skip
            info: dict[str, Any] = json.loads(raw)
            self.objects.download(self._key(name, build_id, ARCHIVE), archive)
            if _sha256(archive) != info.get("sha256"):
                raise RuntimeFailure(
                    f"the stored build {build_id} of template {name!r} is corrupt "
                    "(checksum mismatch)", "build the template again",
                )  # fmt: skip
            disk.discard(partial)
            partial.mkdir()
            run_sync([*TAR, "-xf", str(archive), "-C", str(partial)], timeout=TAR_TIMEOUT_S)
            manifest = json.loads((partial / "manifest.json").read_text())
            if sha256_dir(partial / "checkpoint") != manifest.get("checkpoint_sha256"):
                raise RuntimeFailure(
                    f"the checkpoint of stored build {build_id} of template {name!r} is corrupt",
                    "build the template again",
                )  # fmt: skip
            final = builds / build_id
            _relocate(partial, final)
            partial.rename(final)
            if (final / ROOTFS_IMAGE).exists():
                disk.mount(final / ROOTFS_IMAGE, final / "rootfs")
        except (*S3_ERRORS, OSError, ValueError) as exc:
            raise RuntimeFailure(f"fetching build {build_id} of template {name!r} from "
                                 f"{self.objects.url} failed: {exc}", HINT) from None  # fmt: skip
        finally:
            archive.unlink(missing_ok=True)
            disk.discard(partial)


def _relocate(build_dir: Path, final: Path) -> None:
    """The spec names its rootfs (and any mount of the build) by absolute path: the paths of
    the build's new home, which may differ from the building node's."""
    path = build_dir / "spec.json"
    spec = json.loads(path.read_text())
    made_in = str(Path(spec["root"]["path"]).parent)
    spec["root"]["path"] = str(final / "rootfs")
    for mount in spec.get("mounts", []):
        source = str(mount.get("source", ""))
        if source == made_in or source.startswith(made_in + "/"):
            mount["source"] = str(final) + source[len(made_in) :]
    path.write_text(json.dumps(spec, indent=1))


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
