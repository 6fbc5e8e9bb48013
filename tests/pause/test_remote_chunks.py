"""Chunked snapshots in the S3-compatible tier (a real S3 server: moto's, started here): the
bucket holds each chunk once, a pause uploads only what the bucket lacks, a node with an empty
disk rebuilds a snapshot byte for byte from it, a damaged chunk there refuses only the
snapshots that hold it, and chunks no stored manifest names are collected, never one a pause
is adding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import CREDENTIALS, MotoServer, keys
from tests.unit.test_chunked_snapshots import RUNSC, _commit, _image, _restored
from vivarium.node.chunks import ChunkStore
from vivarium.node.records import new_sandbox_id
from vivarium.node.snapshot_s3 import S3Store
from vivarium.node.snapshots import SnapshotCorrupt, SnapshotStore, named_chunks

S3_PORT = 5128
BUCKET = "chunks"


@pytest.fixture(scope="module")
def s3(monkeypatch_module: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, value in CREDENTIALS.items():
        monkeypatch_module.setenv(name, value)
    server = MotoServer(S3_PORT)
    server.start()
    try:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        yield client
    finally:
        server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _store(root: Path, prefix: str) -> SnapshotStore:
    remote = S3Store(f"s3://{BUCKET}/{prefix}", f"http://127.0.0.1:{S3_PORT}")
    return SnapshotStore(root, remote, dedup=True)


def _chunk_keys(s3: Any, prefix: str) -> set[str]:
    return {k.rsplit("/", 1)[1] for k in keys(s3, BUCKET, f"{prefix}/chunks/")}


def test_the_bucket_holds_each_chunk_once_and_an_empty_node_rebuilds_from_it(
    s3: Any, tmp_path: Path
) -> None:
    prefix = "node-a"
    store = _store(tmp_path / "a", prefix)
    first, second = new_sandbox_id(), new_sandbox_id()
    _commit(store, first, _image(1))
    alone = _chunk_keys(s3, prefix)
    _commit(store, second, _image(2))
    both = _chunk_keys(s3, prefix)
    ours = {k for k in keys(s3, BUCKET, prefix + "/") if "/chunks/" not in k}
    assert all(k.endswith("/manifest.json") for k in ours) and len(ours) == 2  # no image
    manifest = json.loads((tmp_path / "a" / second / "manifest.json").read_text())
    assert named_chunks(manifest, store.chunks) <= both
    added = both - alone
    # Only what the second holds of its own went up (its 256 KiB and the chunks around them).
    assert 0 < sum(s3.head_object(Bucket=BUCKET, Key=f"{prefix}/chunks/{d[:2]}/{d}")
                   ["ContentLength"] for d in added) < (384 << 10)  # fmt: skip

    # Another node, or this one after losing its disk: only the bucket has them.
    fresh = _store(tmp_path / "b", prefix)
    assert _restored(fresh, second) == _image(2)
    assert _restored(fresh, first) == _image(1)
    assert (tmp_path / "b" / second / "manifest.json").exists()
    assert not list((tmp_path / "b").glob(".tmp-*"))


def test_a_damaged_chunk_in_the_bucket_refuses_only_its_snapshots(s3: Any, tmp_path: Path) -> None:
    prefix = "node-b"
    store = _store(tmp_path / "a", prefix)
    damaged, intact = new_sandbox_id(), new_sandbox_id()
    _commit(store, damaged, _image(3))
    _commit(store, intact, _image(4))
    own = sorted(_names(tmp_path / "a", damaged) - _names(tmp_path / "a", intact))
    key = f"{prefix}/chunks/{own[0][:2]}/{own[0]}"
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[-1] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))

    fresh = _store(tmp_path / "b", prefix)
    with pytest.raises(SnapshotCorrupt, match="corrupt"):
        fresh.load(damaged, RUNSC)
    assert not (tmp_path / "b" / damaged).exists()  # nothing half-fetched here
    assert not list((tmp_path / "b").glob(".tmp-*"))
    assert keys(s3, BUCKET, f"{prefix}/{damaged}/")  # kept there
    assert _restored(fresh, intact) == _image(4)


def _names(root: Path, key: str) -> set[str]:
    return named_chunks(
        json.loads((root / key / "manifest.json").read_text()), ChunkStore(root / "chunks")
    )


def test_unnamed_chunks_are_collected_and_chunks_being_added_are_not(
    s3: Any, tmp_path: Path
) -> None:
    prefix = "node-c"
    store = _store(tmp_path, prefix)
    kept, deleted = new_sandbox_id(), new_sandbox_id()
    _commit(store, kept, _image(5))
    _commit(store, deleted, _image(6))
    store.collect_chunks()
    before = _chunk_keys(s3, prefix)
    assert before == _names(tmp_path, kept) | _names(tmp_path, deleted)
    _commit(store, kept, _image(7))  # its next pause replaces the first
    store.delete_local(deleted)
    store.delete_remote(deleted)
    # A pause adding chunks meanwhile: pinned, so kept although no manifest names them yet.
    with store.chunks.adding() as adding:
        adding.pin(_names(tmp_path, kept))
        store.delete_local(kept)
        store.delete_remote(kept)
        assert store.collect_chunks() > 0
        assert _chunk_keys(s3, prefix) == set(adding.pinned)
    store.remote_may_hold_unnamed_chunks = True
    store.collect_chunks()
    assert _chunk_keys(s3, prefix) == set()
