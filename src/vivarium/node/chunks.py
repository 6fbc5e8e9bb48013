"""Snapshot files kept as content-addressed, compressed chunks, so that snapshots share storage.

Sandboxes restored from one template hold mostly the same memory, and successive pauses of one
sandbox differ little. A checkpoint file is cut where its content says (FastCDC), not at fixed
offsets, so that bytes shifted by an insertion still fall into the same chunks; each chunk is
stored once, zstd-compressed, under the SHA-256 of its uncompressed bytes. A snapshot's
manifest lists its chunks (a *recipe*: digest and length, in order).

Measured on this host (2026-12-01, three paused `base` sandboxes, runsc's checkpoint
uncompressed, 16 KiB average chunks): 127 MiB of checkpoints in 14.7 MiB of chunks; the third
sandbox, holding 1 MiB of random bytes of its own, added 1.4 MiB.

Reads are verified: a chunk whose bytes no longer hash to its name, or that is missing, fails
the file being rebuilt (ChunkCorrupt) and nothing else. A damaged chunk is moved aside
(`.corrupt-<digest>`, kept for inspection), so that the next snapshot holding those bytes stores
them again instead of naming the damaged copy; that also makes the failed snapshot whole again.

Collection is crash-safe. Chunks are written to a temporary name, fsync'ed and renamed into
place before the recipe naming them is written, so a recipe never names a chunk that a crash
could lose. Collection deletes only chunks that no recipe names (the caller reads the recipes)
and that no snapshot being added holds (see `adding` and `collect`), one unlink at a time, so
`kill -9` at any point of it loses nothing a recipe names. One process owns a store.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import mmap
import os
import secrets
import struct
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import zstandard
from fastcdc import fastcdc

from vivarium.errors import RuntimeFailure
from vivarium.statedir import fsync_path

log = logging.getLogger(__name__)

# 16 KiB on average: a sandbox's own writes are page-sized and scattered, and smaller chunks
# share more (4 KiB: 13.6 MiB for the three checkpoints above; 64 KiB: 17.3 MiB) at the cost
# of longer recipes (about 2,500 entries for a 40 MiB checkpoint).
MIN_CHUNK = 4 << 10
AVG_CHUNK = 16 << 10
MAX_CHUNK = 128 << 10
ZSTD_LEVEL = 3  # higher levels gained little on checkpoint pages and cost a pause much more
_IO_BUFFER = 1 << 20

Recipe = list[tuple[str, int]]  # (SHA-256 of the uncompressed chunk, its length), in order


_ENTRY = struct.Struct(">32sI")  # a recipe's entry as stored: the digest's bytes, the length


def encode_recipe(recipe: Recipe) -> str:
    """A recipe as a manifest keeps it: packed and base64'd, about 48 bytes a chunk (as JSON
    pairs of hex and a number it was 76, which for a 40 MiB image came to 200 KB)."""
    packed = b"".join(_ENTRY.pack(bytes.fromhex(digest), length) for digest, length in recipe)
    return base64.b64encode(packed).decode()


def decode_recipe(text: str) -> Recipe:
    packed = base64.b64decode(text, validate=True)
    if len(packed) % _ENTRY.size:
        raise ValueError("a recipe's length is not a whole number of entries")
    return [(digest.hex(), length) for digest, length in _ENTRY.iter_unpack(packed)]


class ChunkCorrupt(RuntimeFailure):
    code = "snapshot_corrupt"


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root  # made with the first chunk
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()  # chunks of snapshots being added
        self._touched: set[str] | None = None  # pinned since the running collection began

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    # -- adding ----------------------------------------------------------------------------

    @contextmanager
    def adding(self) -> Iterator[ChunkBatch]:
        """`batch.file(path)` stores a file's chunks and returns its recipe. The chunks stay
        safe from collection until the block ends: write the recipe (durably) inside it."""
        batch = ChunkBatch(self)
        try:
            yield batch
        finally:
            with self._lock:
                self._pins.subtract(batch.pinned)
                self._pins += Counter()  # drops the counts that reached zero

    def _pin(self, digest: str) -> None:
        with self._lock:  # before the existence check: from now on collect() skips it
            self._pins[digest] += 1
            if self._touched is not None:
                self._touched.add(digest)

    def _write(self, target: Path, body: bytes) -> None:
        self.root.mkdir(mode=0o700, exist_ok=True)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = target.with_name(f".tmp-{target.name}-{secrets.token_hex(4)}")
        try:
            # A buffered file writes all of `body` or raises (os.write may stop short on a
            # full disk, and a short chunk would then be named and reused as if whole).
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(body)
                out.flush()
                os.fsync(out.fileno())
            tmp.rename(target)  # two adds of one chunk write the same bytes: either rename wins
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # -- reading ---------------------------------------------------------------------------

    def rebuild(self, recipe: Recipe, dest: Path) -> None:
        """Write the file `recipe` describes to `dest`, verifying every chunk; ChunkCorrupt
        (and no `dest`) if one is missing or damaged."""
        decompressor = zstandard.ZstdDecompressor()
        try:
            with dest.open("wb", buffering=_IO_BUFFER) as out:
                for digest, length in recipe:
                    out.write(self._read(decompressor, digest, length))
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def _read(self, decompressor: zstandard.ZstdDecompressor, digest: str, length: int) -> bytes:
        where = self.path(digest)
        hint = "the snapshot cannot be restored from this copy"
        try:
            data = decompressor.decompress(where.read_bytes(), max_output_size=length)
        except FileNotFoundError:
            raise ChunkCorrupt(f"chunk {where} is missing", hint) from None
        except OSError as exc:  # the disk, not the chunk: left where it is
            raise ChunkCorrupt(f"chunk {where} could not be read: {exc}", hint) from None
        except zstandard.ZstdError as exc:
            raise self._damaged(where, f"does not decompress: {exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._damaged(where, "is corrupt (its bytes do not match its name)")
        if len(data) != length:  # the recipe is wrong, not the chunk, which others may need
            raise ChunkCorrupt(f"chunk {where} has {len(data)} bytes, the recipe says {length}",
                               hint)  # fmt: skip
        return data

    def _damaged(self, where: Path, what: str) -> ChunkCorrupt:
        aside = where.with_name(f".corrupt-{where.name}")
        with contextlib.suppress(FileNotFoundError):  # another restore moved it already
            where.rename(aside)
        return ChunkCorrupt(f"chunk {where} {what}", f"it is kept as {aside}; the snapshot "
                            "cannot be restored from this copy")  # fmt: skip

    # -- collection ------------------------------------------------------------------------

    def collect(self, live: Callable[[], Collection[str]]) -> int | None:
        """Delete the chunks that no recipe names; returns how many went (None if another
        collection is running: it may have read the recipes before the latest change).

        `live()` reads every recipe kept now. It is called after collection began, so a recipe
        written meanwhile is either seen by it or was still being added when collection began
        or later, and then its chunks were pinned: either way they are kept."""
        with self._lock:
            if self._touched is not None:
                return None
            self._touched = set(self._pins)
        removed = 0
        try:
            keep = live()
            for directory in self._chunk_dirs():
                for entry in os.scandir(directory):
                    digest = entry.name
                    if digest.startswith(".") or digest in keep:
                        continue
                    with self._lock:
                        if digest in self._touched or self._pins[digest]:
                            continue
                        os.unlink(entry.path)
                    removed += 1
        finally:
            with self._lock:
                self._touched = None
        if removed:
            log.info("removed %d unreferenced chunk(s) from %s", removed, self.root)
        return removed

    def sweep(self) -> None:
        """Temporary files of adds that a crash cut short. Only before anything is added."""
        for directory in self._chunk_dirs():
            for entry in os.scandir(directory):
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)

    def _chunk_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.iterdir() if p.is_dir() and len(p.name) == 2]

    def stored_bytes(self) -> int:
        """What the chunks take on disk (compressed)."""
        return sum(entry.stat().st_size for d in self._chunk_dirs() for entry in os.scandir(d))


class ChunkBatch:
    """The chunks one snapshot adds, pinned until its recipes are written (ChunkStore.adding)."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.pinned: list[str] = []
        self.new_bytes = 0  # what the chunks it was the first to store take (compressed)

    def file(self, path: Path) -> Recipe:
        store = self.store
        recipe: Recipe = []
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        with path.open("rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return recipe
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                chunks = fastcdc(data, min_size=MIN_CHUNK, avg_size=AVG_CHUNK,
                                 max_size=MAX_CHUNK, hf=hashlib.sha256)  # fmt: skip
                try:
                    for chunk in chunks:
                        digest = chunk.hash
                        store._pin(digest)
                        self.pinned.append(digest)
                        target = store.path(digest)
                        if not target.exists():
                            body = compressor.compress(
                                data[chunk.offset : chunk.offset + chunk.length]
                            )
                            store._write(target, body)
                            self.new_bytes += len(body)
                        recipe.append((digest, chunk.length))
                finally:
                    chunks.close()  # drops its views of the map, which cannot close under them
        # Every chunk named durable, also one another add renamed in and has not synced yet:
        # a directory with nothing pending syncs at once.
        for directory in sorted({store.path(digest).parent for digest, _ in recipe}):
            fsync_path(directory)
        if recipe:
            fsync_path(store.root)
        return recipe
