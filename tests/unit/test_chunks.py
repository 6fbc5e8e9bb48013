"""The chunk store: files rebuilt byte for byte, shared chunks stored once, damage refused,
and collection that never loses a chunk a recipe names, also when killed halfway."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vivarium.node.chunks import INDEX_MAX, ChunkCorrupt, ChunkStore, Recipe


def _bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _add(store: ChunkStore, path: Path, data: bytes) -> Recipe:
    path.write_bytes(data)
    with store.adding() as adding:
        return adding.file(path)


def test_a_file_comes_back_byte_for_byte(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    data = _bytes(1, 3 << 20) + bytes(1 << 20) + _bytes(2, 12345)
    recipe = _add(store, tmp_path / "a", data)
    assert sum(length for _, length in recipe) == len(data)
    store.rebuild(recipe, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert _add(store, tmp_path / "empty", b"") == []
    store.rebuild([], tmp_path / "empty-out")
    assert (tmp_path / "empty-out").read_bytes() == b""


def test_files_that_share_content_share_chunks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    base = _bytes(3, 8 << 20)
    _add(store, tmp_path / "a", base)
    alone = store.stored_bytes()
    # 1 MiB of its own inserted in the middle (shifting what follows) and a page changed.
    other = bytearray(base[: 4 << 20] + _bytes(4, 1 << 20) + base[4 << 20 :])
    other[100_000:104_096] = _bytes(5, 4096)
    recipe = _add(store, tmp_path / "b", bytes(other))
    added = store.stored_bytes() - alone
    assert added < (1 << 20) + (512 << 10), added  # its own bytes and a few chunks around them
    store.rebuild(recipe, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == bytes(other)


def test_recipes_kept_as_index_blocks_share_all_but_the_blocks_around_a_change(
    tmp_path: Path,
) -> None:  # fmt: skip
    store = ChunkStore(tmp_path / "chunks")
    base = _bytes(9, 40 << 20)  # about 2,500 chunks, as a sandbox's memory
    recipe = _add(store, tmp_path / "a", base)
    other = bytearray(base)
    other[20 << 20 : (20 << 20) + 4096] = _bytes(10, 4096)  # one page of its own
    changed = _add(store, tmp_path / "b", bytes(other))
    with store.adding() as adding:
        (root, depth), (changed_root, changed_depth) = adding.index(recipe), adding.index(changed)
    levels, changed_levels = store.levels(root, depth), store.levels(changed_root, changed_depth)
    assert levels[-1] == recipe and changed_levels[-1] == changed
    assert depth == changed_depth >= 2 and len(root) <= INDEX_MAX  # what a manifest keeps
    # Each level shares all but the block around the change (or two, where it falls on a cut).
    for level, changed_level in zip(levels[1:-1], changed_levels[1:-1], strict=True):
        assert len(set(changed_level) - set(level)) <= 2
    with pytest.raises(ChunkCorrupt):
        store.expand([("00" * 32, 36)])  # a block that is not there


def test_a_damaged_or_missing_chunk_fails_only_its_files(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    damaged = _add(store, tmp_path / "a", _bytes(6, 1 << 20))
    missing = _add(store, tmp_path / "b", _bytes(7, 1 << 20))
    intact = _add(store, tmp_path / "c", _bytes(8, 1 << 20))
    chunk = store.path(damaged[len(damaged) // 2][0])
    body = bytearray(chunk.read_bytes())
    body[len(body) // 2] ^= 0xFF
    chunk.write_bytes(bytes(body))
    store.path(missing[0][0]).unlink()
    for recipe, name in ((damaged, "a"), (missing, "b")):
        with pytest.raises(ChunkCorrupt):
            store.rebuild(recipe, tmp_path / f"{name}-out")
        assert not (tmp_path / f"{name}-out").exists()  # no half file left to restore from
    # Moved aside, kept for inspection: the next add of those bytes stores them again, which
    # makes the damaged file whole again.
    assert not chunk.exists() and chunk.with_name(f".corrupt-{chunk.name}").exists()
    _add(store, tmp_path / "a2", (tmp_path / "a").read_bytes())
    store.rebuild(damaged, tmp_path / "a-out")
    assert (tmp_path / "a-out").read_bytes() == (tmp_path / "a").read_bytes()
    store.rebuild(intact, tmp_path / "c-out")
    assert (tmp_path / "c-out").read_bytes() == (tmp_path / "c").read_bytes()


def test_collection_removes_only_what_no_recipe_names(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    gone = _add(store, tmp_path / "a", _bytes(9, 1 << 20))
    kept = _add(store, tmp_path / "b", _bytes(10, 1 << 20))
    assert store.collect(lambda: {d for d, _ in kept}) == len({d for d, _ in gone})
    assert not any(store.path(d).exists() for d, _ in gone)
    store.rebuild(kept, tmp_path / "out")


def test_chunks_being_added_survive_a_collection(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    (tmp_path / "a").write_bytes(_bytes(11, 1 << 20))
    with store.adding() as adding:
        recipe = adding.file(tmp_path / "a")
        assert store.collect(set) == 0  # its recipe is not written yet: pinned
    # A snapshot added and finished while a collection reads the recipes, which then misses
    # its recipe: its chunks were pinned after the collection began, so they stay.
    late: Recipe = []

    def live() -> set[str]:
        late.extend(_add(store, tmp_path / "b", _bytes(12, 1 << 20)))
        return {d for d, _ in recipe}

    store.collect(live)
    store.rebuild(late, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "b").read_bytes()


COLLECTOR = """
import sys
from pathlib import Path
from vivarium.node.chunks import ChunkStore
store = ChunkStore(Path(sys.argv[1]))
keep = set(Path(sys.argv[2]).read_text().split())
print("collecting", flush=True)
store.collect(lambda: keep)
print("done", flush=True)
"""


def test_kill_9_during_collection_loses_nothing_referenced(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    store = ChunkStore(root)
    kept = _add(store, tmp_path / "a", _bytes(13, 2 << 20))
    (tmp_path / "live").write_text("\n".join(d for d, _ in kept))
    garbage = 20_000  # unreferenced chunks: enough that the kill lands halfway
    rng = random.Random(14)
    for _ in range(garbage):
        digest = rng.randbytes(32).hex()
        path = store.path(digest)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")

    def count() -> int:
        return sum(len(os.listdir(d)) for d in root.iterdir())

    total = count()
    proc = subprocess.Popen([sys.executable, "-c", COLLECTOR, str(root), str(tmp_path / "live")],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "collecting"
    deadline = time.monotonic() + 120
    while count() > total - garbage // 10 and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    left = count()
    assert len(kept) < left < total, "the kill did not land during the collection"
    store.rebuild(kept, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()
    # The next collection finishes the work.
    assert ChunkStore(root).collect(lambda: {d for d, _ in kept}) == left - len(
        {d for d, _ in kept}
    )


def test_a_wrong_recipe_fails_without_touching_the_chunks_it_names(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "chunks")
    recipe = _add(store, tmp_path / "a", _bytes(15, 256 << 10))
    digest, length = recipe[0]
    with pytest.raises(ChunkCorrupt, match="the recipe says"):
        store.rebuild([(digest, length + 1)], tmp_path / "out")
    assert store.path(digest).exists()  # a sound chunk others may name stays in place
    store.rebuild(recipe, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == (tmp_path / "a").read_bytes()
