"""Snapshot files kept as content-addressed, compressed chunks, so that snapshots share storage.

Sandboxes restored from one template hold mostly the same memory, and successive pauses of one
sandbox differ little. A checkpoint file is cut where its content says (FastCDC), not at fixed
offsets, so that bytes shifted by an insertion still fall into the same chunks; each chunk is
stored once, zstd-compressed, under the SHA-256 of its uncompressed bytes. A snapshot's
manifest lists its chunks (a *recipe*: digest and length, in order).

A recipe is itself kept as chunks (an *index*), so that siblings share it too: its entries are
cut into blocks where a digest says (on average every 11 entries: a sandbox's own chunks change
only the blocks around them), each block is stored as a chunk, and so on for the recipe of the
blocks until it has at most INDEX_MAX entries: the manifest keeps that root and its depth.
Without it, each sandbox's manifest was ~125 KB, as much as a tenth of what it held of its own;
with it, a few KB.

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
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import zstandard
from fastcdc import fastcdc

from vivarium.errors import RuntimeFailure
from vivarium.statedir import fsync_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunking:
    """How a file is cut (FastCDC's minimum, average and maximum) and its chunks compressed."""

    min_size: int
    avg_size: int
    max_size: int
    level: int


# Memory: a sandbox's own pages are scattered among its siblings', so small chunks share more:
# for six paused `base` siblings each holding 1 MiB of its own (2026-12-02), what each stored
# of its own besides the shared part came to 1172 KiB at 16 KiB on average, 1133 at 8, 1089 at
# 4, which doubles the chunks (and files, and S3 requests) at each step: 8 KiB, about 5,000
# chunks for a 40 MiB image. Bounding them closer to the average helps as much for almost
# no more chunks (a change anywhere in a long chunk costs all of it): 1133 KiB at 2-64 KiB,
# 1115 at 4-16 KiB, 1105 at 4-12 KiB with 7% more chunks (2026-12-03). Higher zstd levels
# gained little here and cost a pause more.
MEMORY = Chunking(min_size=4 << 10, avg_size=8 << 10, max_size=16 << 10, level=3)
# Anything else (runsc's kernel state: 1.3 MiB that differs all over from a sibling's, so none
# of it is shared): large chunks and a higher level compress it better, 160 KiB -> 88 KiB per
# sandbox, for 14 ms; against a sibling's, 49 KiB (state_delta.py).
STATE = Chunking(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10, level=9)
MAX_CHUNK = max(MEMORY.max_size, STATE.max_size)
INDEX_LEVEL = 3
_IO_BUFFER = 1 << 20
_SYNCERS = 8  # fsyncs at once: the filesystem's journal commits them together

Recipe = list[tuple[str, int]]  # (SHA-256 of the uncompressed chunk, its length), in order


_ENTRY = struct.Struct(">32sI")  # a recipe's entry as stored: the digest's bytes, the length
# An entry whose digest's first byte is below this ends an index block (3 in 32), and a block
# holds at most INDEX_MAX entries. Blocks of ~11 entries left a paused sibling 30 KiB of index
# of its own, 35 KiB with 16 and 42 KiB with 32 (simulated on six siblings, 2026-12-03).
INDEX_CUT = 24
INDEX_MAX = 64


def _pack(recipe: Recipe) -> bytes:
    return b"".join(_ENTRY.pack(bytes.fromhex(digest), length) for digest, length in recipe)


def _unpack(packed: bytes) -> Recipe:
    if len(packed) % _ENTRY.size:
        raise ValueError("a recipe's length is not a whole number of entries")
    return [(digest.hex(), length) for digest, length in _ENTRY.iter_unpack(packed)]


def encode_recipe(recipe: Recipe) -> str:
    """A recipe as a manifest keeps it: packed and base64'd, about 48 bytes a chunk."""
    return base64.b64encode(_pack(recipe)).decode()


def decode_recipe(text: str) -> Recipe:
    return _unpack(base64.b64decode(text, validate=True))


def _index_blocks(recipe: Recipe) -> list[Recipe]:
    blocks: list[Recipe] = [[]]
    for entry in recipe:
        blocks[-1].append(entry)
        if int(entry[0][:2], 16) < INDEX_CUT or len(blocks[-1]) == INDEX_MAX:
            blocks.append([])
    return [block for block in blocks if block]


class ChunkCorrupt(RuntimeFailure):
    code = "snapshot_corrupt"


def verified(digest: str, body: bytes, length: int | None = None) -> bytes:
    """A stored chunk's bytes, uncompressed, if they are what its name (and length) say;
    ChunkCorrupt if not."""
    try:
        data = zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_CHUNK)
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(f"chunk {digest} does not decompress: {exc}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise ChunkCorrupt(f"chunk {digest} is corrupt (its bytes do not match its name)")
    if length is not None and len(data) != length:
        raise ChunkCorrupt(f"chunk {digest} has {len(data)} bytes, the recipe says {length}")
    return data


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root  # made with the first chunk
        self._root = str(root)
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()  # chunks of snapshots being added
        self._touched: set[str] | None = None  # pinned since the running collection began

    def path(self, digest: str) -> Path:
        return Path(self._where(digest))

    def _where(self, digest: str) -> str:
        # (Strings, not Paths: a pause or resume asks for thousands of chunks, and pathlib's
        # parsing was a third of what a pause spent here.)
        return os.path.join(self._root, digest[:2], digest)

    # -- adding ----------------------------------------------------------------------------

    @contextmanager
    def adding(self) -> Iterator[ChunkBatch]:
        """`batch.file(path)` stores a file's chunks and returns its recipe. The chunks stay
        safe from collection until the block ends: write the recipe (durably) inside it."""
        batch = ChunkBatch(self)
        try:
            yield batch
        finally:
            for tmp in batch._pending.values():  # written by an add that failed midway
                _unlink(tmp)
            with self._lock:
                self._pins.subtract(batch.pinned)
                self._pins += Counter()  # drops the counts that reached zero

    def _pin(self, digest: str) -> None:
        with self._lock:  # before the existence check: from now on collect() skips it
            self._pins[digest] += 1
            if self._touched is not None:
                self._touched.add(digest)

    def add_verified(self, digest: str, body: bytes) -> None:
        """Store a chunk fetched from elsewhere (compressed, as stored here), once it proved to
        be the bytes its name says; ChunkCorrupt if not. Pin it first (ChunkBatch.pin)."""
        verified(digest, body)
        tmp = self._write_tmp(digest, body)
        try:
            fsync_path(tmp)
            os.rename(tmp, self._where(digest))
        except BaseException:
            _unlink(tmp)
            raise

    def _write_tmp(self, digest: str, body: bytes) -> str:
        """The chunk written under a temporary name beside its own, not yet synced: the caller
        syncs it and only then renames it into place, so that a name never holds less than the
        whole chunk, whatever a crash cuts short."""
        directory = os.path.join(self._root, digest[:2])
        if not os.path.isdir(directory):
            self.root.mkdir(mode=0o700, exist_ok=True)
            os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = os.path.join(directory, f".tmp-{digest}-{secrets.token_hex(4)}")
        try:
            # A buffered file writes all of `body` or raises (os.write may stop short on a
            # full disk, and a short chunk would then be named and reused as if whole).
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(body)
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    # -- reading ---------------------------------------------------------------------------

    def expand(self, index: Recipe, read: Callable[[str, int], bytes] | None = None) -> Recipe:
        """The recipe one level of index blocks stands for, the blocks verified (ChunkCorrupt if
        one is missing or damaged). `read(digest, length)` reads a block this store lacks
        (verified too)."""
        decompressor = zstandard.ZstdDecompressor()
        recipe: Recipe = []
        for digest, length in index:
            if read is not None and not self.path(digest).exists():
                packed = read(digest, length)
            else:
                packed = self._read(decompressor, digest, length)
            try:
                recipe += _unpack(packed)
            except ValueError as exc:
                raise ChunkCorrupt(f"index block {digest} is unreadable: {exc}") from None
        return recipe

    def levels(self, root: Recipe, depth: int,
               read: Callable[[str, int], bytes] | None = None) -> list[Recipe]:  # fmt: skip
        """An index's levels, from its root down to the file's own recipe (the last)."""
        found = [root]
        for _ in range(depth):
            found.append(self.expand(found[-1], read))
        return found

    def rebuild(self, recipe: Recipe, dest: Path) -> None:
        """Write the file `recipe` describes to `dest`, verifying every chunk; ChunkCorrupt
        (and no `dest`) if one is missing or damaged. (One thread: reading chunks from several
        was slower, each chunk being small enough for Python's own work to dominate.)"""
        decompressor = zstandard.ZstdDecompressor()
        try:
            with dest.open("wb", buffering=_IO_BUFFER) as out:
                for digest, length in recipe:
                    out.write(self._read(decompressor, digest, length))
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    def content(self, recipe: Recipe) -> bytes:
        """The (small) file `recipe` describes, in memory, every chunk verified."""
        decompressor = zstandard.ZstdDecompressor()
        return b"".join(self._read(decompressor, digest, length) for digest, length in recipe)

    def _read(self, decompressor: zstandard.ZstdDecompressor, digest: str, length: int) -> bytes:
        hint = "the snapshot cannot be restored from this copy"
        try:
            with open(self._where(digest), "rb") as file:
                body = file.read()
            data = decompressor.decompress(body, max_output_size=length)
        except FileNotFoundError:
            raise ChunkCorrupt(f"chunk {self.path(digest)} is missing", hint) from None
        except OSError as exc:  # the disk, not the chunk: left where it is
            raise ChunkCorrupt(f"chunk {self.path(digest)} could not be read: {exc}",
                               hint) from None  # fmt: skip
        except zstandard.ZstdError as exc:
            raise self._damaged(self.path(digest), f"does not decompress: {exc}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise self._damaged(self.path(digest), "is corrupt (its bytes do not match its name)")
        if len(data) != length:  # the recipe is wrong, not the chunk, which others may need
            raise ChunkCorrupt(f"chunk {self.path(digest)} has {len(data)} bytes, the recipe "
                               f"says {length}", hint)  # fmt: skip
        return data

    def _damaged(self, where: Path, what: str) -> ChunkCorrupt:
        aside = where.with_name(f".corrupt-{where.name}")
        with contextlib.suppress(FileNotFoundError):  # another restore moved it already
            where.rename(aside)
        return ChunkCorrupt(f"chunk {where} {what}", f"it is kept as {aside}; the snapshot "
                            "cannot be restored from this copy")  # fmt: skip

    # -- collection ------------------------------------------------------------------------

    def collect(
        self, live: Callable[[], Collection[str]], stored: Iterable[str] | None = None,
        remove: Callable[[list[str]], None] | None = None, *, batch: int = 1,
    ) -> int | None:  # fmt: skip
        """Delete the chunks that no recipe names; returns how many went (None if another
        collection is running: it may have read the recipes before the latest change).

        `live()` reads every recipe kept now. It is called after collection began, so a recipe
        written meanwhile is either seen by it or was still being added when collection began
        or later, and then its chunks were pinned: either way they are kept.

        By default the chunks are this store's own; `stored` and `remove` collect another copy
        of them (the remote tier's) under the same pins, `batch` digests per `remove`, each
        batch under the lock that pins take: a pin waits until its chunk is gone or kept."""
        with self._lock:
            if self._touched is not None:
                return None
            self._touched = set(self._pins)
        removed = 0
        pending: list[str] = []
        unlink = remove or self._unlink

        def flush() -> int:
            with self._lock:
                assert self._touched is not None
                going = [d for d in pending if d not in self._touched and not self._pins[d]]
                if going:
                    unlink(going)
            pending.clear()
            return len(going)

        try:
            keep = live()
            for digest in self._stored() if stored is None else stored:
                if digest.startswith(".") or digest in keep:
                    continue
                pending.append(digest)
                if len(pending) >= batch:
                    removed += flush()
            if pending:
                removed += flush()
        finally:
            with self._lock:
                self._touched = None
        if removed:
            where = self.root if stored is None else "the remote store"
            log.info("removed %d unreferenced chunk(s) from %s", removed, where)
        return removed

    def _unlink(self, digests: list[str]) -> None:
        for digest in digests:
            os.unlink(self.path(digest))

    def _stored(self) -> Iterator[str]:
        for directory in self._chunk_dirs():
            for entry in os.scandir(directory):
                yield entry.name

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
        self._pending: dict[str, str] = {}  # digest -> its chunk written, not yet in place
        self.new_bytes = 0  # what the chunks it was the first to store take (compressed)

    def pin(self, digests: Iterable[str]) -> None:
        """Keep chunks from collection until the batch ends (ones about to be fetched)."""
        for digest in digests:
            self.store._pin(digest)
            self.pinned.append(digest)

    def file(self, path: Path, chunking: Chunking = MEMORY) -> Recipe:
        with path.open("rb") as file:
            if os.fstat(file.fileno()).st_size == 0:
                return []
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return self.data(data, chunking)

    def data(self, data: bytes | mmap.mmap, chunking: Chunking = MEMORY) -> Recipe:
        recipe: Recipe = []
        if len(data):
            compressor = zstandard.ZstdCompressor(level=chunking.level)
            chunks = fastcdc(data, min_size=chunking.min_size, avg_size=chunking.avg_size,
                             max_size=chunking.max_size, hf=hashlib.sha256)  # fmt: skip
            try:
                for chunk in chunks:
                    view = data[chunk.offset : chunk.offset + chunk.length]
                    recipe.append((self._add(compressor, chunk.hash, view), chunk.length))
            finally:
                chunks.close()  # drops its views of a map, which cannot close under them
        self._sync(recipe)
        return recipe

    def index(self, recipe: Recipe) -> tuple[Recipe, int]:
        """Store `recipe` as index blocks (the module's docstring); returns the root and its
        depth (0: the recipe was short enough to be its own root)."""
        compressor = zstandard.ZstdCompressor(level=INDEX_LEVEL)
        depth = 0
        while len(recipe) > INDEX_MAX:
            index: Recipe = []
            for block in _index_blocks(recipe):
                packed = _pack(block)
                digest = hashlib.sha256(packed).hexdigest()
                index.append((self._add(compressor, digest, packed), len(packed)))
            self._sync(index)
            recipe, depth = index, depth + 1
        return recipe, depth

    def _add(self, compressor: zstandard.ZstdCompressor, digest: str, data: bytes) -> str:
        store = self.store
        store._pin(digest)
        self.pinned.append(digest)
        if digest not in self._pending and not os.path.exists(store._where(digest)):
            body = compressor.compress(data)
            self._pending[digest] = store._write_tmp(digest, body)
            self.new_bytes += len(body)
        return digest

    def _sync(self, recipe: Recipe) -> None:
        """Make the chunks written since the last call durable and put them in place (their
        files synced, then renamed, then their directories synced), and every chunk `recipe`
        names durable: also one another add renamed in and has not synced yet (a directory
        with nothing pending syncs at once). Synced by several threads at once, which the
        filesystem's journal commits together: one by one, they were half of a pause's time
        here."""
        store = self.store
        pending, self._pending = self._pending, {}
        try:
            with ThreadPoolExecutor(_SYNCERS) as pool:
                list(pool.map(fsync_path, pending.values()))
                for digest, tmp in pending.items():
                    os.rename(tmp, store._where(digest))  # adds of one chunk write one content
                pending = {}
                directories = {os.path.join(store._root, digest[:2]) for digest, _ in recipe}
                list(pool.map(fsync_path, sorted(directories)))
        finally:
            for tmp in pending.values():
                _unlink(tmp)
        if recipe:
            fsync_path(store.root)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
