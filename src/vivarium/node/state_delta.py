"""runsc's kernel state kept as a difference from a sibling's.

The state file of runsc's image (`checkpoint.img`, ~1.3 MiB for an idle `base` sandbox: the
sentry's kernel objects) differs from a sibling's every few hundred bytes, so content-defined
chunks share none of it (chunks.py). Most of its bytes are still a sibling's, shifted: zstd
compressing it with a sibling's state as a raw dictionary needs 49 KB where alone it needs 86
KB (measured 2026-12-03 on six paused siblings), 3% of what a paused sandbox stores of its own.

The *base* of a template build is the state of the first sandbox of that build this process
pauses, kept as ordinary chunks. Every snapshot compressed against it names those chunks in its
manifest (`bases`), so collection keeps them as long as one does, the remote tier stores and
fetches them with the rest, and a resume rebuilds the base first. Bases are remembered in
memory only: after a restart the first pause of each build makes a new one. A base whose chunks
went (every snapshot naming it was deleted) is replaced the same way.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import zstandard

from vivarium.node.chunks import ChunkBatch, ChunkCorrupt, Chunking, ChunkStore, Recipe

STATE_FILE = "checkpoint.img"
BASE = "@base"  # a manifest's key for the base of the file named before it
# 23 ms for 1.3 MiB, 49 KB. Level 12 gives 42 KB for 32 ms; precomputing the dictionary's
# tables halves the time but holds ~20 MiB per template build.
LEVEL = 9
# The difference is already compressed: chunked like the state, stored as it is.
DELTA = Chunking(min_size=16 << 10, avg_size=64 << 10, max_size=256 << 10, level=1)


@dataclass(frozen=True)
class Base:
    root: Recipe
    depth: int
    named: frozenset[str]  # its chunks and index blocks
    dictionary: zstandard.ZstdCompressionDict = field(repr=False)


class Bases:
    """The base of each template build this process paused a sandbox of."""

    def __init__(self, store: ChunkStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._by_build: dict[str, Base] = {}

    def claim(self, build: str, adding: ChunkBatch) -> Base | None:
        """The build's base, its chunks pinned for `adding` (to be named by its manifest), or
        None if there is none yet or its chunks went."""
        with self._lock:
            base = self._by_build.get(build)
        if base is None:
            return None
        adding.pin(base.named)  # before looking: from now on no collection removes them
        if all(os.path.exists(self._store.path(digest)) for digest in base.named):
            return base
        with self._lock:
            if self._by_build.get(build) is base:
                del self._by_build[build]
        return None

    def offer(self, build: str, root: Recipe, depth: int, state: bytes) -> None:
        """`state`, just stored with the index `root`, as the build's base if it has none.
        Call it once the manifest naming it is durable, while its chunks are still pinned."""
        with self._lock:
            if build in self._by_build:
                return
        levels = self._store.levels(root, depth)
        named = frozenset(digest for level in levels for digest, _ in level)
        dictionary = zstandard.ZstdCompressionDict(state, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        with self._lock:
            self._by_build.setdefault(build, Base(root, depth, named, dictionary))


def against(base: Base, state: bytes) -> bytes:
    """`state` compressed with the base as its dictionary (a zstd frame with its checksum)."""
    compressor = zstandard.ZstdCompressor(level=LEVEL, dict_data=base.dictionary,
                                          write_checksum=True)  # fmt: skip
    return compressor.compress(state)


def restored(delta: bytes, base: bytes) -> bytes:
    """The state `against` compressed; ChunkCorrupt if it does not decompress whole."""
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    try:
        return zstandard.ZstdDecompressor(dict_data=dictionary).decompress(delta)
    except zstandard.ZstdError as exc:
        raise ChunkCorrupt(
            f"its kernel state does not decompress against its base: {exc}"
        ) from None
