"""Deleting a snapshot that sandboxes are being started from waits until they have started
(the files are theirs until then); new starts no longer find it."""

from __future__ import annotations

from pathlib import Path

from vivarium.config import Settings
from vivarium.node.node import Node
from vivarium.node.records import valid_sandbox_id
from vivarium.node.snapshots import new_fork_key, new_snapshot_id


def _sealed(node: Node, key: str) -> Path:
    staging = node.snapshots.staging(key)
    (staging / "checkpoint").mkdir()
    (staging / "checkpoint" / "checkpoint.img").write_bytes(b"state")
    return node.snapshots.commit(key, staging, {}, "test").path


def test_a_snapshot_in_use_is_deleted_when_the_last_start_is_done(tmp_path: Path) -> None:
    node = Node(Settings(state_dir=tmp_path / "state", warm_pool={}))
    key = new_snapshot_id()
    path = _sealed(node, key)
    with node.snapshot_in_use(key), node.snapshot_in_use(key):
        node.delete_snapshot(key)
        assert path.exists()  # two starts still read it
    assert not path.exists()
    other = new_snapshot_id()
    path = _sealed(node, other)
    with node.snapshot_in_use(other):
        pass
    assert path.exists()  # used and not deleted: kept
    node.delete_snapshot(other)
    assert not path.exists()


def test_snapshot_keys_never_collide_and_a_crash_leaves_no_fork_snapshot(tmp_path: Path) -> None:
    node = Node(Settings(state_dir=tmp_path / "state", warm_pool={}))
    snapshot, fork = new_snapshot_id(), new_fork_key()
    assert snapshot.startswith("s") and valid_sandbox_id(snapshot) and len(snapshot) == 20
    assert not valid_sandbox_id(fork)  # no sandbox or snapshot id can look like one
    kept, forked = _sealed(node, snapshot), _sealed(node, fork)
    node.snapshots.sweep_staging()  # what a start does
    assert kept.exists() and not forked.exists()


def test_a_linked_image_outlives_the_commit_that_moves_its_staging(tmp_path: Path) -> None:
    # A snapshot of a running sandbox restores it from the checkpoint while sealing moves it.
    node = Node(Settings(state_dir=tmp_path / "state", warm_pool={}))
    key = new_snapshot_id()
    staging = node.snapshots.staging(key)
    (staging / "checkpoint").mkdir()
    (staging / "checkpoint" / "checkpoint.img").write_bytes(b"state")
    image = node.snapshots.linked_image(staging)
    sealed = node.snapshots.commit(key, staging, {}, "test")
    assert not staging.exists() and (sealed.checkpoint / "checkpoint.img").read_bytes() == b"state"
    assert (image / "checkpoint.img").read_bytes() == b"state"
    node.snapshots.discard(image)
    assert (sealed.checkpoint / "checkpoint.img").read_bytes() == b"state"
