"""runsc's kernel state kept against a sibling's (node/state_delta.py): stored smaller than
alone, rebuilt byte for byte, its base kept while a snapshot names it and replaced once none
does, a damaged base refusing only the snapshots kept against it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from vivarium.node.records import new_sandbox_id
from vivarium.node.snapshots import SnapshotCorrupt, SnapshotStore, chunk_recipes, named_chunks
from vivarium.node.state_delta import BASE, STATE_FILE

RUNSC = "0.0~test"
KERNEL = random.Random(2).randbytes(1 << 20)  # what a template's sandboxes' states share


def _state(own: int) -> bytes:
    """A sibling's kernel state: the shared bytes, changed every few KB and shifted."""
    rng = random.Random(own)
    state = bytearray(KERNEL)
    for offset in range(0, len(state), 3000):
        state[offset : offset + 8] = rng.randbytes(8)
    return rng.randbytes(100) + bytes(state)


def _commit(store: SnapshotStore, key: str, own: int, build: str = "b1") -> dict[str, object]:
    staging = store.staging(key)
    (staging / "checkpoint").mkdir()
    (staging / "checkpoint" / STATE_FILE).write_bytes(_state(own))
    (staging / "checkpoint" / "pages.img").write_bytes(KERNEL[:4096] + bytes([own]))
    store.commit(key, staging, {"sandbox_id": key, "template": "base", "build_id": build}, RUNSC)
    return json.loads((store.root / key / "manifest.json").read_text())


def _state_back(store: SnapshotStore, key: str) -> bytes:
    snapshot = store.load(key, RUNSC)
    try:
        return (snapshot.checkpoint / STATE_FILE).read_bytes()
    finally:
        store.release(snapshot)


def test_a_siblings_state_is_kept_against_the_first_and_comes_back_whole(
    tmp_path: Path,
) -> None:  # fmt: skip
    store = SnapshotStore(tmp_path, dedup=True)
    first, second, other = new_sandbox_id(), new_sandbox_id(), new_sandbox_id()
    assert _commit(store, first, 1)["bases"] == {}  # the build's first: the base itself
    manifest = _commit(store, second, 2)
    assert manifest["bases"] == {STATE_FILE: json.loads(
        (tmp_path / first / "manifest.json").read_text())["files"][STATE_FILE]}  # fmt: skip
    alone = json.loads((tmp_path / first / "manifest.json").read_text())["stored_bytes"]
    assert manifest["stored_bytes"] < alone / 4, (manifest["stored_bytes"], alone)
    assert _commit(store, other, 3, build="b2")["bases"] == {}  # another build: its own base
    assert _state_back(store, first) == _state(1)
    assert _state_back(store, second) == _state(2)
    assert _state_back(store, other) == _state(3)


def test_the_base_stays_while_a_snapshot_names_it_and_is_replaced_after(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, dedup=True)
    first, second, third = new_sandbox_id(), new_sandbox_id(), new_sandbox_id()
    _commit(store, first, 1)
    _commit(store, second, 2)
    store.delete_local(first)  # the base's own snapshot goes; the second still names it
    store.collect_chunks()
    assert _state_back(store, second) == _state(2)
    store.delete_local(second)
    store.collect_chunks()
    assert store.chunks.stored_bytes() == 0
    manifest = _commit(store, third, 3)  # the remembered base went: this one is the new base
    assert manifest["bases"] == {}
    assert _state_back(store, third) == _state(3)


def test_a_damaged_base_refuses_only_the_snapshots_kept_against_it(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, dedup=True)
    first, second, other = new_sandbox_id(), new_sandbox_id(), new_sandbox_id()
    _commit(store, first, 1)
    manifest = _commit(store, second, 2)
    _commit(store, other, 3, build="b2")
    base = chunk_recipes(manifest, store.chunks)[STATE_FILE + BASE]
    assert {digest for digest, _ in base} <= named_chunks(manifest, store.chunks)
    path = store.chunks.path(base[0][0])
    body = bytearray(path.read_bytes())
    body[-1] ^= 0xFF
    path.write_bytes(bytes(body))
    for key in (first, second):
        with pytest.raises(SnapshotCorrupt, match=f"snapshot of {key} is corrupt"):
            store.load(key, RUNSC)
    assert _state_back(store, other) == _state(3)
    assert not list(tmp_path.glob(".tmp-*"))
