"""A paused sandbox's snapshot kept as chunks: rebuilt byte for byte for its resume, sharing
storage with the others, a damaged chunk refusing only the snapshots that hold it, and the
chunks of replaced or deleted snapshots collected. Teams' snapshots stay whole."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from vivarium.node.chunks import INDEX_MAX, decode_recipe
from vivarium.node.records import new_sandbox_id
from vivarium.node.snapshots import SnapshotCorrupt, SnapshotStore, named_chunks, new_snapshot_id

RUNSC = "0.0~test"
TEMPLATE = random.Random(1).randbytes(4 << 20)  # what every sandbox of a template holds alike


def _image(own: int) -> dict[str, bytes]:
    """runsc's image files of a sandbox with 256 KiB of its own in the middle of its memory."""
    mine = random.Random(own).randbytes(256 << 10)
    return {"checkpoint.img": b"kernel state %d" % own,
            "pages.img": TEMPLATE[: 2 << 20] + mine + TEMPLATE[2 << 20 :],
            "pages_meta.img": b""}  # fmt: skip


def _commit(store: SnapshotStore, key: str, image: dict[str, bytes]) -> None:
    staging = store.staging(key)
    (staging / "checkpoint").mkdir()
    for name, data in image.items():
        (staging / "checkpoint" / name).write_bytes(data)
    store.commit(key, staging, {"sandbox_id": key}, RUNSC)


def _restored(store: SnapshotStore, key: str) -> dict[str, bytes]:
    snapshot = store.load(key, RUNSC)
    try:
        return {p.name: p.read_bytes() for p in snapshot.checkpoint.iterdir()}
    finally:
        store.release(snapshot)
        assert snapshot.rebuilt is None or not snapshot.rebuilt.exists()


def test_paused_snapshots_are_chunks_that_come_back_whole_and_share_storage(
    tmp_path: Path,
) -> None:  # fmt: skip
    store = SnapshotStore(tmp_path, dedup=True)
    first, second = new_sandbox_id(), new_sandbox_id()
    _commit(store, first, _image(1))
    alone = store.chunks.stored_bytes()
    _commit(store, second, _image(2))
    assert sorted(p.name for p in (tmp_path / second).iterdir()) == ["manifest.json"]
    added = store.chunks.stored_bytes() - alone
    assert added < (256 << 10) + (128 << 10), added  # its own bytes and the chunks around them
    manifest = json.loads((tmp_path / second / "manifest.json").read_text())
    assert manifest["index_depths"]["pages.img"] >= 1  # its recipe kept as index blocks
    assert manifest["stored_bytes"] == added  # those blocks included
    # The manifest lists index blocks, not the ~800 chunks: siblings share those blocks too.
    assert all(len(decode_recipe(root)) <= INDEX_MAX for root in manifest["files"].values())
    assert len(json.dumps(manifest["files"])) < 4096
    assert manifest["size_bytes"] == sum(len(d) for d in _image(2).values())
    assert _restored(store, first) == _image(1)
    assert _restored(store, second) == _image(2)
    assert not list(tmp_path.glob(".tmp-*"))  # the rebuilt images are gone


def test_a_damaged_chunk_refuses_only_the_snapshots_that_hold_it(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, dedup=True)
    damaged, intact = new_sandbox_id(), new_sandbox_id()
    _commit(store, damaged, _image(3))
    _commit(store, intact, _image(4))

    def chunks(key: str) -> set[str]:
        return named_chunks(
            json.loads((tmp_path / key / "manifest.json").read_text()), store.chunks
        )

    own = sorted(chunks(damaged) - chunks(intact))[0]
    path = store.chunks.path(own)
    body = bytearray(path.read_bytes())
    body[-1] ^= 0xFF
    path.write_bytes(bytes(body))
    with pytest.raises(SnapshotCorrupt, match=f"snapshot of {damaged} is corrupt"):
        store.load(damaged, RUNSC)
    assert (tmp_path / damaged / "manifest.json").exists()  # kept as it was
    assert path.with_name(f".corrupt-{path.name}").exists()  # and the chunk, aside
    assert not list(tmp_path.glob(".tmp-*"))
    assert _restored(store, intact) == _image(4)


def test_chunks_of_replaced_and_deleted_snapshots_are_collected(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, dedup=True)
    kept, deleted = new_sandbox_id(), new_sandbox_id()
    _commit(store, kept, _image(5))
    _commit(store, deleted, _image(6))
    store.collect_chunks()
    full = store.chunks.stored_bytes()
    _commit(store, kept, _image(7))  # its next pause replaces the first
    store.delete_local(deleted)
    assert store.may_hold_unnamed_chunks
    assert store.collect_chunks() > 0
    assert not store.may_hold_unnamed_chunks and store.collect_chunks() == 0  # nothing went since
    assert store.chunks.stored_bytes() < full
    assert _restored(store, kept) == _image(7)


def test_teams_snapshots_stay_whole_and_older_paused_ones_still_resume(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, dedup=True)
    team = new_snapshot_id()
    _commit(store, team, _image(8))
    assert (tmp_path / team / "checkpoint" / "pages.img").read_bytes() == _image(8)["pages.img"]
    assert _restored(store, team) == _image(8)
    # A paused sandbox's snapshot from before chunking: a whole image with its checksum.
    old = new_sandbox_id()
    (tmp_path / old).mkdir()
    (tmp_path / old / "checkpoint").mkdir()
    for name, data in _image(8).items():
        (tmp_path / old / "checkpoint" / name).write_bytes(data)
    manifest = json.loads((tmp_path / team / "manifest.json").read_text())
    manifest["sandbox_id"] = old
    (tmp_path / old / "manifest.json").write_text(json.dumps(manifest))  # same bytes: same sum
    store.collect_chunks()
    assert _restored(store, old) == _image(8)


def test_a_start_removes_what_a_crashed_commit_left_and_survives_a_broken_manifest(
    tmp_path: Path,
) -> None:  # fmt: skip
    store = SnapshotStore(tmp_path, dedup=True)
    key, broken = new_sandbox_id(), new_sandbox_id()
    _commit(store, key, _image(10))
    (tmp_path / key / "checkpoint").mkdir()  # the whole image a crash left beside its chunks
    (tmp_path / key / "checkpoint" / "pages.img").write_bytes(b"x" * 4096)
    (tmp_path / broken / "checkpoint").mkdir(parents=True)
    (tmp_path / broken / "manifest.json").write_text("{not json")
    SnapshotStore(tmp_path, dedup=True).sweep_staging()  # what a start does
    assert not (tmp_path / key / "checkpoint").exists()
    assert (tmp_path / broken / "checkpoint").exists()  # left for inspection
    assert _restored(store, key) == _image(10)


@pytest.mark.parametrize("dedup", [True, False])
def test_a_start_puts_back_a_snapshot_a_crash_left_between_its_replacements_renames(
    tmp_path: Path, dedup: bool
) -> None:
    store = SnapshotStore(tmp_path, dedup=dedup)
    key = new_sandbox_id()
    _commit(store, key, _image(11))
    # A crash after the previous snapshot was moved aside and before the new one took its place.
    (tmp_path / key).rename(tmp_path / f".old-{key}-0123abcd")
    SnapshotStore(tmp_path, dedup=dedup).sweep_staging()  # what a start does
    assert store.held(key) and _restored(store, key) == _image(11)


@pytest.mark.parametrize("dedup", [True, False])
def test_a_start_seals_a_pause_checkpoint_a_crash_left_unsealed(
    tmp_path: Path, dedup: bool
) -> None:
    store = SnapshotStore(tmp_path, dedup=dedup)
    paused, unfinished = new_sandbox_id(), new_sandbox_id()
    for key, marked in ((paused, True), (unfinished, False)):
        staging = store.staging(key)
        (staging / "checkpoint").mkdir()
        for name, data in _image(12).items():
            (staging / "checkpoint" / name).write_bytes(data)
        if marked:  # runsc's checkpoint ended (and stopped the sandbox); the node died then
            store.mark_checkpointed(staging, {"sandbox_id": key}, RUNSC)
    SnapshotStore(tmp_path, dedup=dedup).sweep_staging()  # what a start does
    assert store.held(paused) and _restored(store, paused) == _image(12)
    assert not (tmp_path / paused / "checkpointed.json").exists()
    # A checkpoint not known to be whole is never taken for a snapshot.
    assert not store.held(unfinished) and not list(tmp_path.glob(".tmp-*"))
