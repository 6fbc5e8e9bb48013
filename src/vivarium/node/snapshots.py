"""Snapshots on the node's disk: `<state>/snapshots/<key>/` holding `checkpoint/` (runsc's
image: memory, processes and the root filesystem's changes) and `manifest.json` (the sandbox's
record, the checkpoint's checksum and size, the runsc version).

The key is a paused sandbox's id (its one snapshot, replaced by each pause), a team's snapshot's
id (`new_snapshot_id`, started from by creates), or a fork's (`new_fork_key`, kept only while
its children start). They never collide: sandbox ids start with `i`, team snapshots' with `s`.

By default (VIVARIUM_SNAPSHOT_DEDUP=0 turns it off) a paused sandbox's snapshot is kept as
chunks (chunks.py): its `manifest.json` lists, per file of runsc's image, the chunks it is made
of, and the image is rebuilt from them, verified chunk by chunk, for each resume. Sandboxes
from one template, and the successive pauses of one sandbox, share most of their chunks; the
kernel state, which they cannot share, is kept against a sibling's (state_delta.py). A
team's snapshot or a fork's keeps its image whole, in `checkpoint/`, ready for the many creates
that start from it.

Writes are atomic: a snapshot is assembled under a temporary name, fsync'ed, checksummed and
only then renamed into place, so a crash or a full disk never leaves a half snapshot that looks
complete. A snapshot is verified against its checksum (or its chunks against their names) and
runsc version before every restore.

Optionally a remote tier (an `ObjectStore`: S3 or compatible, `snapshot_s3.py`) holds a durable
copy: a pause is complete only once the snapshot is stored there too, and a snapshot missing
from the local disk (another node's, a lost disk) is fetched, verified and then renamed into
place. The local directory stays the working copy: runsc restores from local files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vivarium.errors import Conflict, HostNotReady, InsufficientStorage, NotFound, RuntimeFailure
from vivarium.node import state_delta
from vivarium.node.chunks import (
    MEMORY,
    STATE,
    ChunkBatch,
    ChunkCorrupt,
    Chunking,
    ChunkStore,
    Recipe,
    decode_recipe,
    encode_recipe,
)
from vivarium.node.records import ID_ALPHABET, ID_LENGTH, SANDBOX_PREFIX
from vivarium.statedir import fsync_path, fsync_tree
from vivarium.templates.store import dir_size, sha256_dir

log = logging.getLogger(__name__)

TEAM_PREFIX = "s"
FORK_PREFIX = "fork_"  # `_` is in no sandbox or snapshot id: the sweep below cannot take one
# In a pause's staging directory: runsc's checkpoint there is whole (and stopped the sandbox),
# with the record to seal it with. A start after a crash seals it rather than removing it.
CHECKPOINTED = "checkpointed.json"
CHUNKS = "chunks"  # the chunk store's directory: no key starts with `c`
ROOM_HEADROOM = 64 << 20  # kept free beyond a rebuilt image


def new_snapshot_id() -> str:
    """A team's snapshot: E2B's template id shape (it is passed as `templateID` to a create)."""
    return TEAM_PREFIX + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH - 1))


def new_fork_key() -> str:
    """The snapshot a fork starts its children from; removed once they started (or by the
    next start of the node, if it crashed meanwhile)."""
    return FORK_PREFIX + secrets.token_hex(8)


class SnapshotCorrupt(RuntimeFailure):
    code = "snapshot_corrupt"


class SnapshotStoreUnavailable(HostNotReady):
    """The remote snapshot store did not answer or refused (503: retry once it is back)."""

    code = "snapshot_store_unavailable"


class SnapshotNotStored(RuntimeFailure):
    """The snapshot was sealed locally but could not be stored remotely; nothing of it is
    visible there. Its local staging directory is left for the caller (the node restores the
    sandbox from it)."""

    code = "snapshot_not_stored"


class ObjectStore(Protocol):
    """The durable tier of the snapshot store. Every method blocks (the node calls them from
    threads) and raises SnapshotStoreUnavailable when the store cannot be reached."""

    url: str

    def check(self) -> None:
        """Raise unless the store answers and the bucket exists."""

    def put(self, sandbox_id: str, directory: Path, manifest: dict[str, Any],
            chunks: ChunkStore) -> None:  # fmt: skip
        """Store `directory/checkpoint/` (or, for a chunked manifest, the chunks it names that
        the store lacks, read from `chunks`) and then, last, the manifest, as the sandbox's
        newest snapshot, and drop older ones. Raises SnapshotNotStored, with nothing of this
        snapshot readable, if any part fails."""

    def manifest(self, sandbox_id: str) -> dict[str, Any] | None:
        """The manifest of the sandbox's newest complete snapshot, or None."""

    def fetch(self, sandbox_id: str, manifest: dict[str, Any], into: Path,
              adding: ChunkBatch) -> None:  # fmt: skip
        """Download that snapshot's checkpoint into `into/checkpoint/` (unverified), or, for a
        chunked one, the chunks the node's store lacks into it, each pinned by `adding` and
        verified; SnapshotCorrupt if one is damaged."""

    def exists(self, sandbox_id: str) -> bool:
        """Whether the sandbox has a complete snapshot in the store."""

    def delete(self, sandbox_id: str) -> None:
        """Delete every object of the sandbox (manifests first)."""

    def collect(self, chunks: ChunkStore) -> int | None:
        """Delete the stored chunks no stored manifest names, under `chunks`' pins."""


def remote_store(url: str, endpoint_url: str = "") -> ObjectStore | None:
    """The remote tier configured by VIVARIUM_SNAPSHOT_URL, or None for local snapshots only."""
    if not url:
        return None
    from vivarium.node.snapshot_s3 import S3Store  # boto3 is loaded only when configured

    return S3Store(url, endpoint_url)


@dataclass(frozen=True)
class Snapshot:
    sandbox_id: str
    path: Path
    manifest: dict[str, Any]
    # A chunked snapshot's image, rebuilt for one restore (SnapshotStore.release removes it).
    rebuilt: Path | None = None

    @property
    def checkpoint(self) -> Path:
        if self.rebuilt is not None:
            return self.rebuilt
        if "files" in self.manifest:
            raise RuntimeError(f"the image of chunked snapshot {self.sandbox_id} was not rebuilt")
        return self.path / "checkpoint"

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.manifest["record"])

    @property
    def size(self) -> int:
        return int(self.manifest["size_bytes"])

    @property
    def stored(self) -> int:
        """What it added to the node's disk: a chunked snapshot shares the rest."""
        return int(self.manifest.get("stored_bytes", self.size))

    @property
    def checksum(self) -> str:
        return str(self.manifest["checksum"])

    @property
    def mode(self) -> str:
        """ "full" (a runsc image: memory and files) or "filesystem" (node/file_snapshots.py)."""
        return str(self.manifest.get("mode", "full"))


class SnapshotStore:
    def __init__(self, root: Path, remote: ObjectStore | None = None, *,
                 dedup: bool = False) -> None:  # fmt: skip
        self.root = root
        self.remote = remote
        self.dedup = dedup
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.chunks = ChunkStore(root / CHUNKS)
        self.bases = state_delta.Bases(self.chunks)
        # Set when a snapshot went (and at start: a crash may have left chunks behind), here
        # and in the remote tier.
        self.may_hold_unnamed_chunks = True
        self.remote_may_hold_unnamed_chunks = remote is not None
        # A team's snapshot never changes once sealed (each one taken is a new key): it is
        # checksummed once per process, not on each of the many creates it serves. Key ->
        # generation; plain dict operations, which are atomic across the threads that load.
        self._verified: dict[str, str] = {}
        # One fetch of a key at a time: creates from another node's team snapshot start on
        # this node at once, and the first fetch's copy serves the others.
        self._fetching: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)

    def chunked(self, key: str) -> bool:
        """Whether the snapshot `key` is kept as chunks: with dedup on, a paused sandbox's,
        which is restored once and is much like the others (also in the remote tier). A
        team's snapshot stays whole, ready for the many creates it serves. (Snapshots already
        kept as chunks are read as such whatever the setting: their manifests say.)"""
        return self.dedup and key.startswith(SANDBOX_PREFIX)

    def compressed(self, key: str) -> bool:
        """Whether the snapshot `key` is saved runsc-compressed: only a paused sandbox's whole
        image (dedup off), restored once and kept small. Chunks are cut from uncompressed
        bytes (the chunk store compresses those it does not hold, and compressed bytes would
        share none), and a team's snapshot restores for every create it serves, faster
        uncompressed, like a template's (recipe.TEMPLATE_COMPRESSION)."""
        return not self.chunked(key) and key.startswith(SANDBOX_PREFIX)

    def check(self) -> None:
        """Raise SnapshotStoreUnavailable unless the remote tier (if any) answers. Blocking."""
        if self.remote is not None:
            self.remote.check()

    def staging(self, sandbox_id: str) -> Path:
        """A fresh temporary directory for the next snapshot of this sandbox."""
        path = self.root / f".tmp-{sandbox_id}-{secrets.token_hex(4)}"
        path.mkdir()
        return path

    def linked_image(self, staging: Path) -> Path:
        """A second name for the checkpoint in `staging` (hard links, so no copy), which the
        commit that renames `staging` does not move: a restore may read it meanwhile. It is
        temporary (`.tmp-`): remove it with discard() once the restore is done."""
        image = staging / "checkpoint"
        linked = self.root / f".tmp-{staging.name.removeprefix('.tmp-')}-image"
        for directory, _dirs, files in os.walk(image):
            target = linked / Path(directory).relative_to(image)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                os.link(Path(directory) / name, target / name)
        return linked

    def commit(
        self, sandbox_id: str, staging: Path, record: dict[str, Any], runsc_version: str, *,
        remote: bool = True, mode: str = "full",
    ) -> Snapshot:  # fmt: skip
        """Seal `staging` (which holds `checkpoint/`) as the snapshot `sandbox_id`, storing it
        in the remote tier first if there is one and `remote` (SnapshotNotStored: `staging` is
        left as it is, sealed, and nothing replaced the previous snapshot). Blocking."""
        checkpoint = staging / "checkpoint"
        manifest = {
            "sandbox_id": sandbox_id, "record": record, "runsc_version": runsc_version,
            "mode": mode,
            "size_bytes": dir_size(checkpoint), "created_at": time.time(),
            # Names the copy in the remote tier; later pauses sort after earlier ones.
            "generation": f"{time.time_ns():020d}-{secrets.token_hex(4)}",
        }  # fmt: skip
        if not self.chunked(sandbox_id):
            manifest["checksum"] = sha256_dir(checkpoint)
            (staging / "manifest.json").write_text(json.dumps(manifest))
            fsync_tree(staging)
            if self.remote is not None and remote:
                self.remote.put(sandbox_id, staging, manifest, self.chunks)
            return self._replace(sandbox_id, staging, manifest)
        build = f"{record.get('template')}/{record.get('build_id')}"
        with self.chunks.adding() as adding:  # pinned until the manifest naming them is written
            roots: dict[str, tuple[Recipe, int]] = {}
            bases: dict[str, tuple[Recipe, int]] = {}  # by the name of the file kept against it
            new_base = None
            for path in _image_files(checkpoint):
                if path.name != state_delta.STATE_FILE:
                    roots[path.name] = adding.index(adding.file(path, _chunking(path)))
                    continue
                state = path.read_bytes()
                base = self.bases.claim(build, adding)
                if base is None:
                    roots[path.name] = new_base = adding.index(adding.data(state, STATE))
                else:
                    delta = state_delta.against(base, state)
                    roots[path.name] = adding.index(adding.data(delta, state_delta.DELTA))
                    bases[path.name] = (base.root, base.depth)
            manifest["files"] = {name: encode_recipe(root) for name, (root, _) in roots.items()}
            manifest["bases"] = {name: encode_recipe(root) for name, (root, _) in bases.items()}
            roots |= {name + state_delta.BASE: root for name, root in bases.items()}  # _decoded's
            files = {name: root for name, (root, _depth) in roots.items()}
            manifest["index_depths"] = {name: depth for name, (_root, depth) in roots.items()}
            manifest["stored_bytes"] = adding.new_bytes  # what it added to the store
            manifest["checksum"] = _recipes_digest(files)  # what the catalog records
            (staging / "manifest.json").write_text(json.dumps(manifest))
            fsync_path(staging / "manifest.json")  # the chunks it names are durable already
            fsync_path(staging)
            if new_base is not None:
                self.bases.offer(build, *new_base, state)
            if self.remote is not None and remote:
                try:
                    self.remote.put(sandbox_id, staging, manifest, self.chunks)
                except BaseException:
                    self.may_hold_unnamed_chunks = True  # the ones it added, named by nothing
                    raise
                self.remote_may_hold_unnamed_chunks = True  # the older generation went
            snapshot = self._replace(sandbox_id, staging, manifest)
        # Only now: until the snapshot is in place, a failure restores the sandbox from it.
        shutil.rmtree(snapshot.path / "checkpoint", ignore_errors=True)
        return snapshot

    def _replace(self, sandbox_id: str, staging: Path, manifest: dict[str, Any]) -> Snapshot:
        """Rename the sealed `staging` into place as the snapshot `sandbox_id`."""
        final = self.root / sandbox_id
        old = None
        if final.exists():  # the previous pause's snapshot: replaced only once this one is whole
            old = self.root / f".old-{sandbox_id}-{secrets.token_hex(4)}"
            final.rename(old)
        staging.rename(final)
        fsync_path(self.root)
        (final / CHECKPOINTED).unlink(missing_ok=True)  # sealed: the mark has served
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            self.may_hold_unnamed_chunks = True
        return Snapshot(sandbox_id, final, manifest)

    def load(self, sandbox_id: str, runsc_version: str,
             source: ObjectStore | None = None) -> Snapshot:  # fmt: skip
        """The sandbox's snapshot, verified; it stays in place whatever happens next. Without
        a local copy it is fetched from the remote tier (if any; `source`, another node's, for
        a sandbox paused there) first. Blocking."""
        path = self.root / sandbox_id
        if source is not None and (path / "manifest.json").exists():
            self._drop_if_stale(sandbox_id, source)
        remote = source or self.remote
        if remote is not None and not (path / "manifest.json").exists():
            with self._fetching[sandbox_id]:
                if not (path / "manifest.json").exists():
                    return self._fetch(remote, sandbox_id, runsc_version)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise NotFound(f"no snapshot of sandbox {sandbox_id!r} on this node") from None
        except ValueError:
            raise SnapshotCorrupt(f"snapshot of {sandbox_id} has an unreadable manifest",
                                  f"inspect {path}; it is kept as it is") from None  # fmt: skip
        _check_version(sandbox_id, manifest, runsc_version)
        if "files" in manifest:
            return self._rebuild(sandbox_id, path, manifest)
        snapshot = Snapshot(sandbox_id, path, manifest)
        generation = str(manifest.get("generation"))
        if self._verified.get(sandbox_id) == generation:
            return snapshot
        if not snapshot.checkpoint.is_dir() or sha256_dir(snapshot.checkpoint) != snapshot.checksum:
            raise SnapshotCorrupt(f"snapshot of {sandbox_id} is corrupt (checksum mismatch)",
                                  f"it is kept for inspection in {path}")  # fmt: skip
        if sandbox_id.startswith(TEAM_PREFIX):
            self._verified[sandbox_id] = generation
        return snapshot

    def _drop_if_stale(self, sandbox_id: str, source: ObjectStore) -> None:
        """A copy here of a snapshot `source` (another node's part of the store) holds: left
        from before the sandbox moved away and was paused again there, it is dropped."""
        try:
            mine = json.loads((self.root / sandbox_id / "manifest.json").read_text())
        except (OSError, ValueError):
            mine = {}
        theirs = source.manifest(sandbox_id)
        if theirs is not None and theirs.get("checksum") != mine.get("checksum"):
            log.info("dropping this node's older copy of %s's snapshot", sandbox_id)
            self.delete_local(sandbox_id)

    def _rebuild(self, sandbox_id: str, path: Path, manifest: dict[str, Any]) -> Snapshot:
        """A chunked snapshot's image, rebuilt and verified into a directory of its own (which
        release() removes); SnapshotCorrupt if a chunk is missing or damaged."""
        image = self.root / f".tmp-{sandbox_id}-{secrets.token_hex(4)}-image"
        _check_room(self.root, int(manifest.get("size_bytes", 0)), sandbox_id)
        image.mkdir(mode=0o700)
        try:
            if _recipes_digest(_decoded(manifest)) != manifest.get("checksum"):  # before any read
                raise ChunkCorrupt("its recipes do not match its checksum")
            recipes = chunk_recipes(manifest, self.chunks)
            for name, recipe in recipes.items():
                if name.endswith(state_delta.BASE):
                    continue  # read with the file kept against it
                base = recipes.get(name + state_delta.BASE)
                if base is None:
                    self.chunks.rebuild(recipe, image / name)
                else:
                    delta, dictionary = self.chunks.content(recipe), self.chunks.content(base)
                    (image / name).write_bytes(state_delta.restored(delta, dictionary))
        except ChunkCorrupt as exc:
            self.discard(image)
            raise SnapshotCorrupt(f"snapshot of {sandbox_id} is corrupt: {exc.message}",
                                  f"it is kept for inspection in {path}") from None  # fmt: skip
        except BaseException:
            self.discard(image)
            raise
        return Snapshot(sandbox_id, path, manifest, rebuilt=image)

    def release(self, snapshot: Snapshot) -> None:
        """Done restoring from `snapshot`: remove its rebuilt image, if it has one. (A restored
        sandbox keeps the files it has open; runsc reads the rest during the restore.)"""
        if snapshot.rebuilt is not None:
            self.discard(snapshot.rebuilt)

    def collect_chunks(self) -> int:
        """Remove the chunks no snapshot names any more, here and in the remote tier, where a
        snapshot went since the last time (crash-safe: chunks.py). Blocking."""
        removed = 0
        # (Without dedup there is no chunk store: no manifest to read every round.)
        if self.may_hold_unnamed_chunks and self.chunks.root.is_dir():
            # Cleared before the manifests are read: a snapshot going meanwhile sets it again.
            self.may_hold_unnamed_chunks = False
            here = self.chunks.collect(self._named_chunks)
            if here is None:  # another collection was running: this one's turn is still due
                self.may_hold_unnamed_chunks = True
            removed += here or 0
        if self.remote is not None and self.remote_may_hold_unnamed_chunks:
            self.remote_may_hold_unnamed_chunks = False
            try:
                there = self.remote.collect(self.chunks)
            except BaseException:
                self.remote_may_hold_unnamed_chunks = True
                raise
            if there is None:
                self.remote_may_hold_unnamed_chunks = True
            removed += there or 0
        return removed

    def _named_chunks(self) -> set[str]:
        named: set[str] = set()
        # `.old-` ones too (a crash between the renames of a commit makes one current again);
        # not `.tmp-` ones, being written: their chunks are pinned until they are in place.
        for entry in self.root.iterdir():
            if entry.name.startswith(".tmp-"):
                continue
            try:
                manifest = json.loads((entry / "manifest.json").read_text())
                if not isinstance(manifest, dict):
                    raise ValueError("not an object")
                named_chunks(manifest, self.chunks, into=named)
            except (FileNotFoundError, NotADirectoryError):
                continue  # no snapshot (the chunk store itself), or deleted meanwhile
            except (ValueError, ChunkCorrupt):
                raise SnapshotCorrupt(
                    f"{entry / 'manifest.json'} is unreadable: no chunk is collected until it is",
                    "repair or remove that snapshot",
                ) from None
        return named

    def _fetch(self, remote: ObjectStore, sandbox_id: str, runsc_version: str) -> Snapshot:
        """Download the newest remote snapshot into a staging directory, verify it and only
        then rename it into place: a failed or corrupt download leaves nothing behind here."""
        manifest = remote.manifest(sandbox_id)
        if manifest is None:
            raise NotFound(f"no snapshot of sandbox {sandbox_id!r} on this node or in {remote.url}")
        _check_version(sandbox_id, manifest, runsc_version)
        staging = self.staging(sandbox_id)
        if "files" in manifest:
            return self._fetch_chunked(remote, sandbox_id, manifest, staging)
        try:
            with self.chunks.adding() as adding:  # (a whole image: nothing to pin)
                remote.fetch(sandbox_id, manifest, staging, adding)
            checkpoint = staging / "checkpoint"
            if not checkpoint.is_dir() or sha256_dir(checkpoint) != manifest.get("checksum"):
                raise SnapshotCorrupt(
                    f"the copy of sandbox {sandbox_id}'s snapshot in {remote.url} is corrupt "
                    "(checksum mismatch)", "it is kept there for inspection; nothing was restored",
                )  # fmt: skip
            final = self._fetched(sandbox_id, staging, manifest)
        except BaseException:
            self.discard(staging)
            raise
        log.info("snapshot of %s fetched from %s", sandbox_id, remote.url)
        return Snapshot(sandbox_id, final, manifest)

    def _fetch_chunked(self, remote: ObjectStore, sandbox_id: str, manifest: dict[str, Any],
                       staging: Path) -> Snapshot:  # fmt: skip
        """The chunks this node lacks, verified one by one as they arrive, then the manifest
        put in place; the image is rebuilt from them as for a snapshot taken here."""
        try:
            with self.chunks.adding() as adding:  # pinned until the manifest naming them is here
                remote.fetch(sandbox_id, manifest, staging, adding)
                final = self._fetched(sandbox_id, staging, manifest)
        except BaseException:
            self.discard(staging)
            self.may_hold_unnamed_chunks = True
            raise
        log.info("snapshot of %s fetched from %s (as chunks)", sandbox_id, remote.url)
        return self._rebuild(sandbox_id, final, manifest)

    def _fetched(self, sandbox_id: str, staging: Path, manifest: dict[str, Any]) -> Path:
        """Put a fetched snapshot in place, its manifest last written and all of it durable."""
        (staging / "manifest.json").write_text(json.dumps(manifest))
        fsync_tree(staging)
        final = self.root / sandbox_id
        shutil.rmtree(final, ignore_errors=True)  # at most a directory without a manifest
        staging.rename(final)
        fsync_path(self.root)
        return final

    def local(self, sandbox_id: str) -> Snapshot | None:
        """The sealed snapshot on this disk as its manifest describes it (not verified)."""
        path = self.root / sandbox_id
        try:
            return Snapshot(sandbox_id, path, json.loads((path / "manifest.json").read_text()))
        except (OSError, ValueError):
            return None

    def held(self, sandbox_id: str) -> bool:
        """Whether this host holds the sandbox's snapshot (no remote call: cheap enough for the
        proxy to ask on every request for a sandbox that is not running)."""
        return (self.root / sandbox_id / "manifest.json").exists()

    def exists(self, sandbox_id: str) -> bool:
        return self.held(sandbox_id) or (self.remote is not None and self.remote.exists(sandbox_id))

    def paused_keys(self) -> list[str]:
        """The paused sandboxes whose snapshots are held here."""
        return [p.name for p in self.root.glob(f"{SANDBOX_PREFIX}*")
                if (p / "manifest.json").exists()]  # fmt: skip

    def team_snapshot_keys(self) -> list[str]:
        """The teams' snapshots held here (their catalog rows say which are still wanted)."""
        return [p.name for p in self.root.glob(f"{TEAM_PREFIX}*") if (p / "manifest.json").exists()]

    def delete_local(self, sandbox_id: str) -> None:
        self._verified.pop(sandbox_id, None)
        shutil.rmtree(self.root / sandbox_id, ignore_errors=True)
        self.may_hold_unnamed_chunks = True

    def delete_remote(self, sandbox_id: str, other: ObjectStore | None = None) -> None:
        """Best effort: a store that cannot be reached is logged, not raised (the sandbox is
        gone either way; what is left there is never read again). `other`: another node's
        part of the store instead of this node's (its chunks are that node's to collect)."""
        store = other or self.remote
        if store is None:
            return
        try:
            store.delete(sandbox_id)
            if other is None:
                self.remote_may_hold_unnamed_chunks = True
        except SnapshotStoreUnavailable as exc:
            log.warning("snapshot of %s not deleted from the store: %s", sandbox_id, exc)

    def discard(self, staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def mark_checkpointed(self, staging: Path, record: dict[str, Any],
                          runsc_version: str) -> None:  # fmt: skip
        """The pause's checkpoint in `staging` is whole: from now on it is the sandbox's only
        copy (the checkpoint stopped it), which a start after a crash seals."""
        marker = staging / CHECKPOINTED
        marker.write_text(json.dumps({"record": record, "runsc_version": runsc_version}))
        fsync_path(marker)
        fsync_path(staging)

    def sweep_staging(self) -> None:
        """Temporary directories left by a crash (never a valid snapshot), but for a pause's
        whole checkpoint, which is sealed as the sandbox's snapshot (it is its only copy); and
        forks' snapshots (a fork that a crash cut short has no children left to start)."""
        checkpointed = []
        for path in [*self.root.glob(".tmp-*"), *self.root.glob(f"{FORK_PREFIX}*")]:
            if (path / CHECKPOINTED).is_file() and path.name.startswith(f".tmp-{SANDBOX_PREFIX}"):
                checkpointed.append(path)
            else:
                shutil.rmtree(path, ignore_errors=True)
        for path in self.root.glob(".old-*"):
            sandbox_id = path.name[len(".old-") :].rsplit("-", 1)[0]
            if (self.root / sandbox_id).exists():
                shutil.rmtree(path, ignore_errors=True)
            else:  # crashed between the two renames: the previous snapshot is still the one
                path.rename(self.root / sandbox_id)
        if self.chunks.root.is_dir():  # else never deduplicated here: nothing to look for
            self.chunks.sweep()
            for image in self.root.glob(f"{SANDBOX_PREFIX}*/checkpoint"):  # a commit cut short
                try:
                    chunked = "files" in json.loads((image.parent / "manifest.json").read_text())
                except Exception:  # not a sealed snapshot: left as it is, refused when loaded
                    continue
                if chunked:
                    shutil.rmtree(image, ignore_errors=True)
        for staging in checkpointed:
            self._seal_after_crash(staging)

    def _seal_after_crash(self, staging: Path) -> None:
        sandbox_id = staging.name.removeprefix(".tmp-").rsplit("-", 1)[0]
        try:
            marked = json.loads((staging / CHECKPOINTED).read_text())
            args = (sandbox_id, staging, marked["record"], marked["runsc_version"])
            try:
                snapshot = self.commit(*args)
            except SnapshotNotStored:  # the remote store refused it: this disk keeps it
                snapshot = self.commit(*args, remote=False)
        except Exception:  # left as it is (tried again at the next start): its last copy
            log.exception("the checkpoint of %s that a crash interrupted could not be sealed "
                          "(left in %s)", sandbox_id, staging)  # fmt: skip
            return
        log.warning("sealed the snapshot of %s, whose pause a crash interrupted (%s)",
                    sandbox_id, snapshot.path)  # fmt: skip


def _check_room(root: Path, size: int, sandbox_id: str) -> None:
    """A rebuilt image needs its whole size on the node's disk."""
    free = shutil.disk_usage(root).free
    if free < size + ROOM_HEADROOM:
        raise InsufficientStorage(
            f"not enough disk space to resume {sandbox_id}: {free >> 20} MiB free in {root}, "
            f"{(size + ROOM_HEADROOM) >> 20} MiB needed",
            "free some disk space and resume again; the snapshot is kept",
        )


def _image_files(checkpoint: Path) -> list[Path]:
    """The files of runsc's image (it writes no directories)."""
    entries = sorted(checkpoint.iterdir())
    if any(not entry.is_file() for entry in entries):
        raise RuntimeFailure(f"runsc's image {checkpoint} holds more than files", "report this")
    return entries


def _chunking(path: Path) -> Chunking:
    return MEMORY if path.name.startswith("pages") else STATE


def named_chunks(
    manifest: dict[str, Any], chunks: ChunkStore, read: Callable[[str, int], bytes] | None = None,
    into: set[str] | None = None,
) -> set[str]:  # fmt: skip
    """The chunks a snapshot's manifest names, its index blocks included (none for a whole
    image), added to `into` (whose blocks are not read again: what they name is in it). Blocks
    are read from `chunks`, or with `read` where it lacks them. ChunkCorrupt if its recipes or
    a block are unreadable."""
    named = set() if into is None else into
    if "files" not in manifest:
        return named
    for root, depth in index_roots(manifest).values():
        level = root
        for below in range(depth, -1, -1):
            unread = [(digest, length) for digest, length in level if digest not in named]
            named |= {digest for digest, _ in level}
            if below:
                level = chunks.expand(unread, read)
    return named


def chunk_recipes(manifest: dict[str, Any], chunks: ChunkStore) -> dict[str, Recipe]:
    """A chunked manifest's recipes (its index expanded), by file name (bases as `_decoded`
    names them); ChunkCorrupt if they are unreadable."""
    return {name: chunks.levels(root, depth)[-1]
            for name, (root, depth) in index_roots(manifest).items()}  # fmt: skip


def index_roots(manifest: dict[str, Any]) -> dict[str, tuple[Recipe, int]]:
    """A chunked manifest's files and bases (`_decoded`): the root of each one's index and its
    depth (0: the root is the file's recipe); ChunkCorrupt if they are unreadable."""
    roots = _decoded(manifest)
    depths = manifest.get("index_depths", {})
    if not isinstance(depths, dict) or set(depths) - set(roots):
        raise ChunkCorrupt("its index depths are unreadable")
    found = {name: (root, depths.get(name, 0)) for name, root in roots.items()}
    if any(not isinstance(depth, int) or not 0 <= depth <= 8 for _, depth in found.values()):
        raise ChunkCorrupt(f"its index depths are out of range: {depths}")
    return found


def _decoded(manifest: dict[str, Any]) -> dict[str, Recipe]:
    """A chunked manifest's recipes, by file name, and those of the bases its files are kept
    against (state_delta.py), by the file's name and `@base`; ChunkCorrupt if they are
    unreadable."""
    try:
        recipes = {str(name): decode_recipe(text) for name, text in manifest["files"].items()}
        bases = {f"{name}{state_delta.BASE}": decode_recipe(text)
                 for name, text in manifest.get("bases", {}).items()}  # fmt: skip
    except (ValueError, TypeError, AttributeError) as exc:
        raise ChunkCorrupt(f"its recipes are unreadable: {exc}") from None
    if any("/" in name or "@" in name or name.startswith(".") for name in recipes):
        raise ChunkCorrupt(f"its manifest names unexpected files: {sorted(recipes)}")
    if any(name[: -len(state_delta.BASE)] not in recipes for name in bases):
        raise ChunkCorrupt(f"its manifest has bases of no file: {sorted(bases)}")
    return recipes | bases


def _recipes_digest(files: dict[str, Recipe]) -> str:
    """One SHA-256 naming a chunked snapshot's content: over its files' names and chunks."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0".encode())
        for chunk, length in files[name]:
            digest.update(f"{chunk}:{length}\0".encode())
    return digest.hexdigest()


def _check_version(sandbox_id: str, manifest: dict[str, Any], runsc_version: str) -> None:
    """runsc restores only its own checkpoints: a snapshot of another version is refused (and
    kept) before anything is restored or downloaded."""
    made_by = manifest.get("runsc_version")
    if made_by != runsc_version:
        raise Conflict(
            f"snapshot of {sandbox_id} was made by runsc {made_by}, this node runs {runsc_version}",
            "resume it on a node with that runsc version; the snapshot is kept",
        )
