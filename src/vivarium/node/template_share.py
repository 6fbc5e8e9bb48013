"""A cluster's template builds, shared through the object store (shelf.py): the node that builds
a team template publishes it, as a node publishes a built-in template's build the first time it
pauses or snapshots a sandbox on it (each host builds its own); any other node fetches a build
the first time a sandbox needs it there (a create, a resume, a snapshot's start, a build on top
of it), then keeps it like its own. Builds are under `<VIVARIUM_SNAPSHOT_URL>/templates/
<template id>/<build id>/` (Settings.template_share_url): the manifest, spec, checkpoint and
rootfs (a team template's sparse image, or a built-in template's tree). A build never changes
once made, so a copy is never stale.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from pathlib import Path

from vivarium.errors import NotFound, RuntimeFailure
from vivarium.node.shelf import Shelf, ShelfError
from vivarium.proc import run_sync
from vivarium.runtime import disk
from vivarium.templates.custom import ROOTFS_IMAGE
from vivarium.templates.store import Template, TemplateStore, sha256_dir

log = logging.getLogger(__name__)

MEMBERS = ["manifest.json", "spec.json", "checkpoint"]  # and the rootfs: image or tree
HINT = "check VIVARIUM_SNAPSHOT_URL and the object store; the build is kept where it was made"


class TemplateShare:
    def __init__(self, url: str, endpoint_url: str, signing_key: bytes) -> None:
        self.shelf = Shelf(url, endpoint_url, signing_key)
        self._turns: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per build
        self._shared: set[str] = set()  # builds known to be in the store

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
        key = f"{template.name}/{template.build_id}"
        try:
            stored = self.shelf.manifest(key)
            size = int(stored["size"]) if stored is not None else self._put(key, template)
        except ShelfError as exc:
            raise RuntimeFailure(f"build {template.build_id} of template {template.name!r} "
                                 f"was not stored: {exc}", HINT) from None  # fmt: skip
        self._shared.add(key)
        return size

    def _put(self, key: str, template: Template) -> int:
        image = (template.build_dir / ROOTFS_IMAGE).exists()
        if not image:
            return self.shelf.put(key, template.build_dir, [*MEMBERS, "rootfs"], {})
        # Read-only while it is read: everything the build wrote is on the image, and ext4's
        # lazy inode-table initialisation stops writing to it. Sandboxes never write there
        # (their root layer is runsc's overlay).
        run_sync(["mount", "-o", "remount,ro", str(template.rootfs)])
        try:
            return self.shelf.put(key, template.build_dir, [*MEMBERS, ROOTFS_IMAGE], {})
        finally:
            run_sync(["mount", "-o", "remount,rw", str(template.rootfs)], check=False)

    def delete(self, name: str) -> None:
        """Every build of the template (blocking); logged, not raised, if the store refuses:
        what is left there is never read again."""
        try:
            self.shelf.delete(name)
        except ShelfError as exc:
            log.warning("builds of template %s are left in the store: %s", name, exc)

    # -- any other node --------------------------------------------------------------------

    async def fetch(self, store: TemplateStore, name: str, build_id: str) -> Template:
        """The build, fetched into `store` unless it is there already (one fetch at a time per
        build; the others wait for it). NotFound if the store has no such build."""
        key = f"{name}/{build_id}"
        async with self._turns[key]:
            try:
                return store.build(name, build_id)
            except NotFound:
                pass
            log.info("fetching build %s of template %s from %s", build_id, name, self.shelf.url)
            await asyncio.to_thread(self._fetch, store, name, build_id)
            self._shared.add(key)
            template = store.build(name, build_id)
            log.info("build %s of template %s is here", build_id, name)
            return template

    def _fetch(self, store: TemplateStore, name: str, build_id: str) -> None:
        builds = store.builds_dir(name)
        builds.mkdir(parents=True, exist_ok=True)
        partial, final = builds / f".{build_id}.fetching", builds / build_id
        disk.discard(partial)  # a fetch a crash cut short
        try:
            if self.shelf.get(f"{name}/{build_id}", partial) is None:
                raise NotFound(f"build {build_id} of template {name!r} is on no node and not "
                               f"in {self.shelf.url}", "build the template again")  # fmt: skip
            manifest = json.loads((partial / "manifest.json").read_text())
            if sha256_dir(partial / "checkpoint") != manifest.get("checkpoint_sha256"):
                raise ShelfError(f"the checkpoint of build {build_id} is corrupt")
            _relocate(partial, final)
            # A build is there once its manifest is (TemplateStore.build): put in place last,
            # after its rootfs is mounted.
            (partial / "manifest.json").rename(partial / "manifest.fetched")
            disk.discard(final)  # a fetch a crash cut short after this point
            partial.rename(final)
            if (final / ROOTFS_IMAGE).exists():
                disk.mount(final / ROOTFS_IMAGE, final / "rootfs")
            (final / "manifest.fetched").rename(final / "manifest.json")
        except BaseException as exc:
            disk.discard(partial)
            disk.discard(final)
            if isinstance(exc, (ShelfError, OSError, ValueError)):
                raise RuntimeFailure(f"build {build_id} of template {name!r} could not be "
                                     f"fetched: {exc}", HINT) from None  # fmt: skip
            raise


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
