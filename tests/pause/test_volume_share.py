"""Volumes carried between nodes (node/volume_share.py), against a real S3 server: a volume is
stored only when it changed, comes back whole on another "node" (another volume directory),
mounted, and is not taken for changed there; nothing is left behind by a corrupt copy."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import CREDENTIALS, bucket_server
from vivarium.node.shelf import ARCHIVE, ShelfError
from vivarium.node.volume_share import VolumeShare
from vivarium.node.volumes import VolumeStore, new_volume_id

S3_PORT = 5132
BUCKET = "vivarium-volumes"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    os.environ.update(CREDENTIALS)
    with bucket_server(S3_PORT, BUCKET) as server:
        yield server.endpoint


@pytest.fixture
def nodes(endpoint: str, tmp_path: Path) -> Iterator[tuple[VolumeShare, VolumeShare]]:
    """Two nodes' volume stores sharing one bucket."""
    made = []
    for name in ("a", "b"):
        volumes = VolumeStore(tmp_path / name, 64)
        volumes.root.mkdir()
        made.append(VolumeShare(f"s3://{BUCKET}/cluster/volumes", endpoint, b"key", volumes))
    yield made[0], made[1]
    for share in made:
        for volume_id in share.volumes.ids():
            share.volumes.delete(volume_id)


def test_a_volume_is_stored_when_it_changed_and_comes_back_whole(
    nodes: tuple[VolumeShare, VolumeShare],
) -> None:
    here, there = nodes
    volume_id = new_volume_id()
    here.volumes.create(volume_id)
    (here.volumes.data(volume_id) / "lesson.txt").write_text("week one\n")
    assert here.changed(volume_id)
    assert here.publish(volume_id) > 0
    assert not here.changed(volume_id)
    (here.volumes.data(volume_id) / "lesson.txt").write_text("week two\n")
    assert here.changed(volume_id)
    here.publish(volume_id)
    assert there.fetch(volume_id)
    assert (there.volumes.data(volume_id) / "lesson.txt").read_text() == "week two\n"
    assert there.volumes.present(volume_id) and not there.changed(volume_id)
    image = there.volumes.root / volume_id / "volume.img"
    assert image.stat().st_blocks * 512 < image.stat().st_size // 2  # holes kept
    there.delete(volume_id)
    assert not there.stored(volume_id)


def test_nothing_stored_is_no_volume_and_a_corrupt_copy_leaves_nothing(
    nodes: tuple[VolumeShare, VolumeShare],
) -> None:
    here, there = nodes
    assert not there.fetch(new_volume_id())
    volume_id = new_volume_id()
    here.volumes.create(volume_id)
    here.publish(volume_id)
    here.shelf.objects.write(f"{volume_id}/{ARCHIVE}", b"not the archive")
    with pytest.raises(ShelfError, match="corrupt"):
        there.fetch(volume_id)
    assert list(there.volumes.root.iterdir()) == []
    here.delete(volume_id)
